"""The SSH manhole (ops/manhole.py).

Unit tests for the password hashes, the two credential files, the host key and the namespace; then
the real `twistd` process with a manhole, reached with OpenSSH's `ssh` client: key login evaluates
``ts_dump()`` and reads the result, password login (through SSH_ASKPASS) works, a wrong key or
password gets nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from twisted.conch.ssh import keys
from twisted.cred import credentials, error
from twisted.internet import defer

from libon_tsilo.ops.manhole import (
    AuthorizedKeysFile,
    PasswordFileChecker,
    hash_password,
    load_host_key,
    main,
    make_namespace,
    read_password_file,
    verify_password,
)
from libon_tsilo.ops.rpc import Rpc
from tests.e2e.proc import HOST, JSON_LOG, free_port, log_events, start_server
from tests.fakes.calls import FakeCall
from tests.ops.test_rpc import build

SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh = pytest.mark.skipif(
    not (SSH and SSH_KEYGEN), reason="OpenSSH client (ssh, ssh-keygen) not installed"
)


def sync_run(fn, *args):
    return defer.maybeDeferred(fn, *args)


def result_of(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire synchronously"
    return out[0]


# --- password hashes --------------------------------------------------------------------------


def test_hash_roundtrip_and_format():
    encoded = hash_password("correct horse")
    assert re.fullmatch(r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", encoded)
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct hors", encoded)
    assert hash_password("x") != hash_password("x")  # salted


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "scrypt",
        "plain$1$2$3$4$5",
        "scrypt$1000$8$1$AAAA$AAAA",
        "scrypt$16384$8$1$!!$AAAA",
        "scrypt$16384$99$1$AAAA$AAAA",
        "scrypt$x$8$1$AAAA$AAAA",
    ],
)
def test_malformed_hashes_never_match(bad):
    assert not verify_password("anything", bad)


def test_password_file(tmp_path):
    path = tmp_path / "passwords"
    path.write_text(f"# operators\n\nalice:{hash_password('a-pass', n=2**10)}\nbroken line\nbob:md5$xyz\n")
    users = read_password_file(str(path))
    assert list(users) == ["alice"]
    checker = PasswordFileChecker(str(path), run=sync_run)
    ok = result_of(checker.requestAvatarId(credentials.UsernamePassword(b"alice", b"a-pass")))
    assert ok == b"alice"
    for user, pw in ((b"alice", b"wrong"), (b"bob", b"xyz"), (b"carol", b"a-pass"), (b"alice", b"\xff")):
        failure = result_of(checker.requestAvatarId(credentials.UsernamePassword(user, pw)))
        assert failure.check(error.UnauthorizedLogin), (user, pw)
    missing = PasswordFileChecker(str(tmp_path / "nope"), run=sync_run)
    failure = result_of(missing.requestAvatarId(credentials.UsernamePassword(b"alice", b"a-pass")))
    assert failure.check(error.UnauthorizedLogin)


def test_password_file_is_reread_at_each_login(tmp_path):
    path = tmp_path / "passwords"
    path.write_text(f"alice:{hash_password('one', n=2**10)}\n")
    checker = PasswordFileChecker(str(path), run=sync_run)
    assert result_of(checker.requestAvatarId(credentials.UsernamePassword(b"alice", b"one"))) == b"alice"
    path.write_text(f"alice:{hash_password('two', n=2**10)}\n")
    assert result_of(checker.requestAvatarId(credentials.UsernamePassword(b"alice", b"one"))).check(
        error.UnauthorizedLogin
    )
    assert result_of(checker.requestAvatarId(credentials.UsernamePassword(b"alice", b"two"))) == b"alice"


def test_hash_command(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["hash", "ops"]) == 0
    line = capsys.readouterr().out.strip()
    user, _, encoded = line.partition(":")
    assert user == "ops" and verify_password("s3cret", encoded)
    assert main(["hash"]) == 2
    assert main(["hash", "a:b"]) == 2


# --- keys -------------------------------------------------------------------------------------


def test_authorized_keys_file(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = keys.Key(ed25519.Ed25519PrivateKey.generate()).public()
    path = tmp_path / "authorized_keys"
    path.write_bytes(b"# ops\n" + key.toString("openssh", comment=b"op@laptop") + b"\nnot a key\n\n")
    found = AuthorizedKeysFile(str(path)).getAuthorizedKeys(b"anyone")
    assert found == [key]
    assert AuthorizedKeysFile(str(tmp_path / "missing")).getAuthorizedKeys(b"x") == []


def test_host_key_created_once_private(tmp_path):
    path = tmp_path / "manhole_host_key"
    first = load_host_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert first.isPublic() is False
    assert load_host_key(path) == first


# --- namespace --------------------------------------------------------------------------------


def test_namespace_helpers(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    parts = root.parts
    ns = make_namespace(root, parts, Rpc(parts, root))
    for name in ("service", "parts", "registrar", "location", "silo", "calls", "push", "config"):
        assert name in ns
    assert ns["service"] is root and ns["calls"] is parts.b2bua and ns["silo"] is parts.silo
    parts.silo.store(FakeCall("c1@x", "alice"))
    assert ns["ts_dump"]()["stats"]["stored_transactions"] == 1
    assert ns["ts_lookup"]("alice")["calls"][0]["call_id"] == "c1@x"
    assert ns["ts_lookup"]("bob") == {"error": "RURI not found in tsilo table", "status": 404}
    assert ns["ul_dump"]()["binding_count"] == 0
    assert ns["ul_lookup"](aor="alice")["status"] == 404
    assert "tsilo" in ns["stats"]()
    assert ns["health"]()["status"] == "ok"
    assert ns["push_senders"]() == []  # no push layer configured

    class Router:
        senders = ["apns-sender"]

    class Waker:
        router = Router()

    parts.extra["push"] = Waker()
    assert ns["push_senders"]() == ["apns-sender"]


# --- the real process over ssh ----------------------------------------------------------------


def ssh_args(port: int, user: str, key: Path | None) -> list[str]:
    args = [
        str(SSH),
        "-tt",
        "-p",
        str(port),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-F",
        "/dev/null",
    ]
    if key is not None:
        args += [
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "PreferredAuthentications=publickey",
        ]
    else:
        args += [
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "NumberOfPasswordPrompts=1",
        ]
    return args + [f"{user}@{HOST}"]


def keygen(path: Path) -> Path:
    subprocess.run(
        [str(SSH_KEYGEN), "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True
    )
    return path


@pytest.fixture
def manhole_server(tmp_path):
    good = keygen(tmp_path / "good")
    keygen(tmp_path / "other")
    (tmp_path / "authorized_keys").write_text((tmp_path / "good.pub").read_text())
    (tmp_path / "passwords").write_text(f"ops:{hash_password('manhole-pw')}\n")
    port = free_port(udp_too=False)
    directory = tmp_path / "server"
    directory.mkdir()
    server = start_server(
        directory,
        {
            "manhole": {
                "listen": f"tcp:{port}:interface={HOST}",
                "authorized_keys": str(tmp_path / "authorized_keys"),
                "passwords": str(tmp_path / "passwords"),
            },
            "auth": {"enabled": False},
            "log": JSON_LOG,
        },
    )
    yield server, port, good, tmp_path
    code = server.stop()
    assert code == 0, server.output()  # SIGTERM is a clean exit (ops/shutdown.py)
    assert not server.tracebacks(), server.output()


@needs_ssh
def test_ssh_key_login_evaluates_ts_dump(manhole_server):
    server, port, good, _tmp = manhole_server
    proc = subprocess.run(
        ssh_args(port, "op", good), input=b"ts_dump()\rstats()['usrloc']\r", capture_output=True, timeout=30
    )
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, (proc.returncode, out, proc.stderr, server.output()[-4000:])
    assert "'stored_ruris': 0" in out and "'stored_transactions': 0" in out, out
    assert "{'registered_aors': 0, 'bindings': 0}" in out, out
    (login,) = log_events(server, "libon_tsilo.ops.manhole", user="op", level="info")
    assert login["fingerprint"], login
    # the host key was created in the state directory, private
    host_key = server.config_path.parent / "manhole_host_key"
    assert stat.S_IMODE(os.stat(host_key).st_mode) == 0o600


def _ssh_with_password(port: int, askpass: Path, password: str) -> subprocess.CompletedProcess[bytes]:
    """ssh as "ops" with `password` typed by an SSH_ASKPASS script (no tty), sending "1 + 41"."""
    askpass.write_text(f"#!/bin/sh\necho {password}\n")
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    return subprocess.run(ssh_args(port, "ops", None), input=b"1 + 41\r", capture_output=True,
                          timeout=30, env=env, start_new_session=True)


@needs_ssh
def test_ssh_password_login(manhole_server):
    server, port, _good, tmp = manhole_server
    proc = _ssh_with_password(port, tmp / "askpass.sh", "manhole-pw")
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, (proc.returncode, out, proc.stderr, server.output()[-4000:])
    assert "\r\n42\r\n" in out, out


@needs_ssh
def test_ssh_wrong_credentials_get_nothing(manhole_server):
    server, port, _good, tmp = manhole_server
    proc = subprocess.run(
        ssh_args(port, "op", tmp / "other"), input=b"ts_dump()\r", capture_output=True, timeout=30
    )
    assert proc.returncode == 255 and b"stored_ruris" not in proc.stdout
    proc = _ssh_with_password(port, tmp / "askpass-wrong.sh", "not-the-password")
    assert proc.returncode == 255 and b"42" not in proc.stdout
    assert [e["level"] for e in log_events(server, "libon_tsilo.ops.manhole", user="ops")] == ["warn"]


# --- failed logins per source ([limits] login_max_failures / login_ban_time) --------------


def test_login_guard_blocks_a_source_until_its_failures_age_out():
    from twisted.internet.task import Clock

    from libon_tsilo.ratelimit import LoginGuard

    clock = Clock()
    guard = LoginGuard(clock, "manhole_login", max_failures=3, window=300)
    for _ in range(2):
        guard.failed("192.0.2.1")
        clock.advance(10)
    assert not guard.blocked("192.0.2.1")
    guard.failed("192.0.2.1")
    assert guard.blocked("192.0.2.1") and not guard.blocked("192.0.2.2")
    guard.refuse("192.0.2.1")
    assert guard.limit_hits() == {"manhole_login": 1}
    clock.advance(279.9)
    assert guard.blocked("192.0.2.1")
    clock.advance(0.1)  # the first failure is 300 s old
    assert not guard.blocked("192.0.2.1")


@pytest.fixture
def guarded_manhole(tmp_path):
    good = keygen(tmp_path / "good")
    (tmp_path / "authorized_keys").write_text((tmp_path / "good.pub").read_text())
    (tmp_path / "passwords").write_text(f"ops:{hash_password('manhole-pw')}\n")
    port = free_port(udp_too=False)
    directory = tmp_path / "server"
    directory.mkdir()
    server = start_server(
        directory,
        {
            "manhole": {
                "listen": f"tcp:{port}:interface={HOST}",
                "authorized_keys": str(tmp_path / "authorized_keys"),
                "passwords": str(tmp_path / "passwords"),
            },
            "auth": {"enabled": False},
            "limits": {"login_max_failures": 2, "login_ban_time": 600},
            "log": JSON_LOG,
        },
    )
    yield server, port, good, tmp_path
    code = server.stop()
    assert code == 0, server.output()
    assert not server.tracebacks(), server.output()


@needs_ssh
def test_ssh_password_guessing_is_refused_after_the_limit(guarded_manhole):
    server, port, good, tmp = guarded_manhole
    for n in range(2):
        proc = _ssh_with_password(port, tmp / f"askpass-wrong{n}.sh", "not-the-password")
        assert proc.returncode == 255 and b"42" not in proc.stdout
    # the right password from the same source is not even checked now, and keys do not help either
    proc = _ssh_with_password(port, tmp / "askpass.sh", "manhole-pw")
    assert proc.returncode == 255 and b"42" not in proc.stdout, proc.stdout
    proc = subprocess.run(ssh_args(port, "op", good), input=b"1 + 41\r", capture_output=True, timeout=30)
    assert proc.returncode == 255 and b"42" not in proc.stdout
    refused = log_events(server, "libon_tsilo.ratelimit", name="manhole_login", host="127.0.0.1")
    assert [(e["level"], e["n"], e["window"]) for e in refused] == [("warn", 2, 600)], server.output()[-3000:]
    assert not [e for e in log_events(server, "libon_tsilo.ops.manhole", level="info") if "user" in e]  # no login
