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


def test_numbers_map_to_one_user_each() -> None:
    db = UsersDB(":memory:")
    db.add("alice", "pw", "r")
    db.add("bob", "pw", "r")
    db.set_number("alice", "+33123456789")
    record = db.by_number("+33123456789")
    assert record is not None and record.username == "alice"
    assert db.by_number("+33999999999") is None
    with pytest.raises(UserError, match="already belongs"):
        db.set_number("bob", "+33123456789")
    with pytest.raises(UserError, match="invalid number"):
        db.set_number("bob", "0123456789")
    with pytest.raises(UserError, match="no such user"):
        db.set_number("carol", "+33111111111")
    db.set_number("alice", None)
    assert db.by_number("+33123456789") is None
    db.close()


def test_call_options_and_destination_prefixes() -> None:
    db = UsersDB(":memory:")
    db.add("alice", "pw", "r")
    record = db.get("alice")
    assert record is not None
    assert (record.voicemail, record.max_calls_out, record.allowed_prefixes) == (True, None, ())
    assert record.may_call("+4412345")
    db.set_options("alice", voicemail=False, max_calls_out=3, allowed_prefixes=("+33", "+44"))
    record = db.get("alice")
    assert record is not None
    assert (record.voicemail, record.max_calls_out, record.allowed_prefixes) == (False, 3, ("+33", "+44"))
    assert record.may_call("+33123") and not record.may_call("+1212")
    db.set_options("alice", voicemail=True)  # the others stay as they are
    record = db.get("alice")
    assert record is not None and record.max_calls_out == 3
    with pytest.raises(UserError, match="invalid prefix"):
        db.set_options("alice", allowed_prefixes=("33",))
    with pytest.raises(UserError, match="no such user"):
        db.set_options("bob", voicemail=False)
    assert db.get("bob") is None
    db.close()


def test_an_old_file_gains_the_new_columns_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "old.sqlite")
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE users (username TEXT PRIMARY KEY, realm TEXT NOT NULL,"
        " ha1_md5 TEXT NOT NULL, ha1_sha256 TEXT NOT NULL)"
    )
    old.execute("INSERT INTO users VALUES ('alice', 'r', 'x', 'y')")
    old.commit()
    old.close()
    db = UsersDB(path)
    record = db.get("alice")
    assert record is not None and record.voicemail and record.number is None
    assert db.get_ha1("alice", "r", "MD5") == "x"
    db.set_number("alice", "+33123456789")
    db.close()
