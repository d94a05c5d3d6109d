"""Users database: HA1 only, realm-bound, clear errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from libon_tsilo.registrar.users import UserError, UsersDB
from libon_tsilo.sip.digest import ha1


def test_add_get_passwd_del(tmp_path: Path) -> None:
    path = str(tmp_path / "users.sqlite")
    db = UsersDB(path)
    db.add("alice", "pw1", "example.com")
    assert db.get_ha1("alice", "example.com", "MD5") == ha1("alice", "example.com", "pw1", "MD5")
    assert db.get_ha1("alice", "example.com", "SHA-256") == ha1("alice", "example.com", "pw1", "SHA-256")
    assert db.get_ha1("alice", "other-realm", "MD5") is None
    assert db.get_ha1("bob", "example.com", "MD5") is None
    db.set_password("alice", "pw2", "example.com")
    assert db.get_ha1("alice", "example.com", "MD5") == ha1("alice", "example.com", "pw2", "MD5")
    assert [r.username for r in db.list()] == ["alice"]
    db.delete("alice")
    assert db.list() == []
    db.close()


def test_plaintext_never_stored(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite"
    db = UsersDB(str(path))
    db.add("alice", "VerySecretPassword", "r")
    db.close()
    raw = sqlite3.connect(str(path))
    dumped = "\n".join(raw.iterdump())
    raw.close()
    assert "VerySecretPassword" not in dumped
    for f in tmp_path.iterdir():
        assert b"VerySecretPassword" not in f.read_bytes()


@pytest.mark.parametrize(
    "op",
    [
        lambda db: db.add("alice", "x", "r"),  # duplicate
        lambda db: db.add("bad name", "x", "r"),
        lambda db: db.add("", "x", "r"),
        lambda db: db.add("bob", "", "r"),
        lambda db: db.add("bob", "a\nb", "r"),
        lambda db: db.delete("nobody"),
        lambda db: db.set_password("nobody", "x", "r"),
    ],
)
def test_errors(op) -> None:  # noqa: ANN001
    db = UsersDB(":memory:")
    db.add("alice", "x", "r")
    with pytest.raises(UserError):
        op(db)
    db.close()
