"""A real SIP stack the project did not write: baresip (libre) against the real server.

Harness: tests/e2e/baresip.py (config dir per instance, events and commands over ctrl_tcp); the
push endpoint is tests/fakes/webhook_fake.py run as a process. Every server runs the DEFAULT
[auth] config (digest on, default algorithms) with users added by `libon-tsilo-admin`.

Scenarios: a baresip registers over UDP, TCP and TLS; a baresip calls another through the server
and both see the call established, then ended; a baresip that is asleep (killed after registering
an RFC 8599 binding through a quoted ``regq``) is woken by a webhook push, starts again, registers
and answers the parked call, and the push named the Call-ID its INVITE carried.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.baresip import Baresip, account_line, baresip_available
from tests.e2e.proc import HOST, ServerProcess, admin_rpc, free_port
from tests.e2e.test_registrar_e2e import add_user
from tests.fakes import webhook_fake
from tests.waiting import wait_until

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}


def admin() -> dict[str, dict[str, Any]]:
    return {"admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"}}


@pytest.fixture
def server_with_users(start_sip_server: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    def start(extra: dict[str, dict[str, Any]] | None = None) -> ServerProcess:
        server = start_sip_server({**admin(), **(extra or {})})
        for user, password in PASSWORDS.items():
            add_user(server, user, password)
        return server

    return start


@pytest.fixture
def baresips(tmp_path: Path, test_certs: Any) -> Iterator[Callable[..., Baresip]]:
    assert baresip_available(), "baresip is missing (./scripts/test installs the baresip-core package)"
    made: list[Baresip] = []

    def start(*accounts: str, sip_port: int | None = None) -> Baresip:
        b = Baresip(tmp_path / f"baresip{len(made)}", list(accounts), ca_file=test_certs.ca, sip_port=sip_port)
        made.append(b)
        return b.start()

    yield start
    for b in made:
        b.quit()


def account(user: str, port: int, transport: str = "udp", **params: str) -> str:
    params.setdefault("regint", "600")
    return account_line(user, port, transport, PASSWORDS[user], **params)


def no_calls_left(server: ServerProcess) -> bool:
    stats = admin_rpc(server, "stats")
    return stats["calls"]["calls"] == 0 and stats["calls"]["dialogs"] == 0


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_baresip_registers_with_default_auth(server_with_users, baresips, transport):
    server = server_with_users()
    port = server.tls_port if transport == "tls" else server.sip_port
    alice = baresips(account("alice", port, transport))
    ok = alice.wait_event("REGISTER_OK", timeout=5)[0]
    assert ok["param"].startswith("200"), ok
    assert not alice.seen("REGISTER_FAIL")
    bindings = admin_rpc(server, "ul.dump")["aors"]
    assert [b["received"][0].lower() for b in bindings[f"sip:alice@{HOST}"]] == [transport], bindings


def test_baresip_calls_baresip(server_with_users, baresips):
    server = server_with_users()
    alice = baresips(account("alice", server.tls_port, "tls"))
    bob = baresips(account("bob", server.sip_port, "udp", answermode="auto"))
    alice.wait_event("REGISTER_OK", timeout=5)
    bob.wait_event("REGISTER_OK", timeout=5)

    answer = alice.command("dial", f"sip:bob@{HOST}")
    assert answer is not None and answer["ok"], answer
    at_bob = bob.wait_event("CALL_ESTABLISHED", timeout=5)[0]
    at_alice = alice.wait_event("CALL_ESTABLISHED", timeout=5)[0]
    assert at_bob["id"] != at_alice["id"]  # a B2BUA: one dialog per leg
    assert (at_bob["direction"], at_alice["direction"]) == ("incoming", "outgoing")
    alice.command("hangup")
    alice.wait_event("CALL_CLOSED", timeout=5)
    closed = bob.wait_event("CALL_CLOSED", timeout=5)[0]
    assert closed["param"] == "Connection reset by peer", closed  # libre's words for a BYE received
    wait_until(lambda: no_calls_left(server), what="the call to end at the server", explain=lambda: server.output()[-4000:])


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path]]]:
    procs = []

    def start(script: dict[str, list[int | None]] | None = None) -> tuple[str, Path]:
        directory = tmp_path / f"webhook{len(procs)}"
        directory.mkdir()
        record = directory / "record.jsonl"
        args = ["--port", "0", "--record", str(record)]
        if script:
            (directory / "script.json").write_text(json.dumps(script))
            args += ["--script", str(directory / "script.json")]
        proc, port = webhook_fake.spawn(args)
        procs.append(proc)
        return f"http://{HOST}:{port}/push", record

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def push_config(url: str) -> dict[str, dict[str, Any]]:
    return {"push": {"providers": ["webhook"], "webhook": [{"name": "webhook", "url": url, "timeout": 2.0}]}}


def push_account(prid: str, port: int) -> str:
    # baresip copies a quoted regq into the Contact as is: this makes an RFC 8599 binding
    return account("bob", port, "udp", answermode="auto",
                   regq=f"0.5;pn-provider=webhook;pn-prid={prid};pn-param=bob-phone")


def put_to_sleep(server: ServerProcess, baresips: Callable[..., Baresip], prid: str) -> int:
    """bob's app registers an RFC 8599 binding, then is killed: asleep. Returns its SIP port."""
    bob = baresips(push_account(prid, server.sip_port))
    bob.wait_event("REGISTER_OK", timeout=5)
    bound = admin_rpc(server, "ul.dump")["aors"][f"sip:bob@{HOST}"]
    assert [(b["pn_provider"], b["pn_prid"]) for b in bound] == [("webhook", prid)], bound
    bob.kill()  # the app is gone, its push binding stays
    return bob.sip_port


def test_sleeping_baresip_woken_by_webhook_push_answers(server_with_users, baresips, webhook):
    url, record = webhook()
    server = server_with_users(push_config(url))
    prid = uuid.uuid4().hex
    bob_port = put_to_sleep(server, baresips, prid)

    alice = baresips(account("alice", server.sip_port, "udp", regint="0"))
    alice.command("dial", f"sip:bob@{HOST}")
    pushes = wait_until(lambda: webhook_fake.read_records(record), what="the wake-up push", explain=lambda: server.output()[-4000:])
    push = pushes[0]["body"]
    assert (push["type"], push["pn_prid"], push["aor"]) == ("call", prid, f"sip:bob@{HOST}"), push

    # the push wakes the app: it starts and registers again, the parked call forks to it
    woken = baresips(push_account(prid, server.sip_port), sip_port=bob_port)
    incoming = woken.wait_event("CALL_ESTABLISHED", timeout=5)[0]  # auto-answered: no CALL_INCOMING
    alice.wait_event("CALL_ESTABLISHED", timeout=5)
    # the push named the INVITE the device got: its Call-ID and its caller (issue 12 item 3)
    assert push["call_id"] == incoming["id"], (push, incoming)
    assert incoming["peeruri"] == push["caller"]["uri"], (incoming, push)
    alice.command("hangup")
    woken.wait_event("CALL_CLOSED", timeout=5)
    wait_until(lambda: no_calls_left(server), what="the call to end at the server", explain=lambda: server.output()[-4000:])


@pytest.mark.parametrize("endpoint", ["answers 500", "down"])
def test_every_push_failed_caller_gets_480_at_once(server_with_users, baresips, webhook, endpoint):
    """Issue 12 item 6: once the pushes failed after their retries, the caller does not wait 30 s."""
    prid = uuid.uuid4().hex
    if endpoint == "down":
        url, record = f"http://{HOST}:{free_port(udp_too=False)}/push", None  # nothing listens there
    else:
        url, record = webhook({prid: [500]})
    server = server_with_users({**push_config(url), "calls": {"ring_timeout": 30}})
    put_to_sleep(server, baresips, prid)

    alice = baresips(account("alice", server.sip_port, "udp", regint="0"))
    started = time.monotonic()
    alice.command("dial", f"sip:bob@{HOST}")
    closed = alice.wait_event("CALL_CLOSED", timeout=15)[0]  # the ring timeout is 30 s
    assert "480" in closed["param"], closed
    assert time.monotonic() - started < 15
    assert admin_rpc(server, "stats")["push"]["calls_all_failed"] == 1
    if record is not None:
        assert len(webhook_fake.read_records(record)) >= 2  # retried before giving up
    wait_until(lambda: no_calls_left(server), what="the call to end at the server", explain=lambda: server.output()[-4000:])
