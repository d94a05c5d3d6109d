"""libon-tsilo-admin user add|del|list|passwd."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from libon_tsilo.ops import admin_cli
from libon_tsilo.registrar.users import UsersDB
from libon_tsilo.sip.digest import ha1


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "tsilo.toml"
    cfg.write_text('[auth]\nrealm = "example.com"\nusers_db = "users.sqlite"\n')
    return cfg


def _run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = admin_cli.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_add_list_passwd_del(config: Path, tmp_path: Path) -> None:
    c = str(config)
    assert _run(["--config", c, "user", "add", "alice", "--password", "pw1"])[0] == 0
    assert _run(["--config", c, "user", "add", "bob"], stdin="pw-from-stdin\n")[0] == 0
    code, out, _ = _run(["--config", c, "user", "list"])
    assert code == 0 and out.split() == ["alice", "bob"]
    db = UsersDB(str(tmp_path / "users.sqlite"))
    expected = ha1("bob", "example.com", "pw-from-stdin", "SHA-256")
    assert db.get_ha1("bob", "example.com", "SHA-256") == expected
    assert _run(["--config", c, "user", "passwd", "alice"], stdin="pw2\n")[0] == 0
    assert db.get_ha1("alice", "example.com", "MD5") == ha1("alice", "example.com", "pw2", "MD5")
    assert _run(["--config", c, "user", "del", "alice"])[0] == 0
    assert [r.username for r in db.list()] == ["bob"]
    db.close()


def test_prompted_password_on_a_tty(config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    answers = iter(["tty-pw", "tty-pw", "a", "b"])
    monkeypatch.setattr(admin_cli.getpass, "getpass", lambda prompt="": next(answers))

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = io.StringIO()
    c = str(config)
    assert admin_cli.main(["--config", c, "user", "add", "carol"], Tty(), io.StringIO(), err) == 0
    # a mismatched confirmation fails cleanly
    assert admin_cli.main(["--config", c, "user", "passwd", "carol"], Tty(), io.StringIO(), err) == 1
    assert "do not match" in err.getvalue()
    db = UsersDB(str(tmp_path / "users.sqlite"))
    assert db.get_ha1("carol", "example.com", "MD5") == ha1("carol", "example.com", "tty-pw", "MD5")
    db.close()


@pytest.mark.parametrize(
    "argv",
    [[], ["user"], ["user", "frob", "x"], ["user", "add"], ["group", "add", "x"], ["user", "del"]],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert admin_cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_operation_errors_exit_1(config: Path) -> None:
    c = str(config)
    code, _, err = _run(["--config", c, "user", "del", "nobody"])
    assert code == 1 and "no such user" in err
    assert _run(["--config", c, "user", "add", "dave", "--password", "x"])[0] == 0
    code, _, err = _run(["--config", c, "user", "add", "dave", "--password", "x"])
    assert code == 1 and "already exists" in err
    code, _, err = _run(["--config", c, "user", "add", "bad name", "--password", "x"])
    assert code == 1 and "invalid user name" in err


def test_bad_config_exits_1(tmp_path: Path) -> None:
    code, _, err = _run(["--config", str(tmp_path / "missing.toml"), "user", "list"])
    assert code == 1 and "not found" in err


def test_numbers_and_call_options(tmp_path: Path) -> None:
    cfg = tmp_path / "tsilo.toml"
    cfg.write_text(
        '[auth]\nrealm = "example.com"\nusers_db = "users.sqlite"\n'
        '[dialplan]\ncountry_code = "33"\n'
    )
    c = str(cfg)
    code, out, _ = _run(["--config", c, "user", "add", "alice", "--password", "pw", "--number", "01 23 45 67 89"])
    assert code == 0 and "+33123456789" in out
    # one number, one user: the second add fails whole, leaving no user behind
    code, _, err = _run(["--config", c, "user", "add", "bob", "--password", "pw", "--number", "+33123456789"])
    assert code == 1 and "already belongs to 'alice'" in err
    assert _run(["--config", c, "user", "list"])[1].split() == ["alice", "+33123456789"]
    code, _, err = _run(["--config", c, "user", "set", "alice", "--number", "alice"])
    assert code == 1 and "not a phone number" in err
    argv = ["user", "set", "alice", "--voicemail", "off", "--max-calls-out", "2", "--allow-prefixes", "+33, +44"]
    assert _run(["--config", c, *argv])[0] == 0
    code, out, _ = _run(["--config", c, "user", "show", "alice"])
    assert code == 0
    assert out.split() == [
        "alice", "number=+33123456789", "voicemail=off", "max_calls_out=2", "allow_prefixes=+33,+44"
    ]
    assert _run(["--config", c, "user", "set", "alice", "--no-number", "--max-calls-out", "none",
                 "--allow-prefixes", "any"])[0] == 0
    db = UsersDB(str(tmp_path / "users.sqlite"))
    record = db.get("alice")
    assert record is not None
    assert (record.number, record.voicemail, record.max_calls_out, record.allowed_prefixes) == (
        None, False, None, ()
    )
    db.close()
    code, _, err = _run(["--config", c, "user", "set", "alice", "--max-calls-out", "many"])
    assert code == 1 and "--max-calls-out" in err
    assert _run(["--config", c, "user", "show", "nobody"])[0] == 1
