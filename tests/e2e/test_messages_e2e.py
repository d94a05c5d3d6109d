"""Instant messages to sleeping phones end to end: the real twistd, the webhook push fake as a process
(tests/fakes/webhook_fake.py), and small UDP user agents written here from RFC 3261/3428 (not with the
server's parser): alice sends MESSAGEs, bob's phone registers with RFC 8599 push parameters and sleeps.

Scenarios: each of two devices gets a message once; MESSAGEs to the sleeping phone get 202 and a push of type "message" each (sender and
preview in the payload); when the phone registers it gets them in order, each after the 2xx of the
previous, and they are deleted; a message accepted before a restart is delivered after it, when the
phone registers with the new process (same message database); with digest on, alice is challenged
(407) and her authenticated MESSAGE is stored with her verified identity; on a two-node cluster over
Redis, the node that accepted a MESSAGE delivers it after its own restart when the phone registers on
the other node.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.proc import HOST, ServerProcess, admin_rpc, free_port
from tests.e2e.pushdevice import Agent, Msg, _branch, _tag, response_to
from tests.e2e.test_registrar_e2e import add_user
from tests.fakes import webhook_fake
from tests.registrar.helpers import digest_authorization
from tests.waiting import wait_until

PRID = "bob-token-0123456789"


class Phone(Agent):
    """A UDP user agent: REGISTER (with push parameters), send MESSAGE, receive and answer MESSAGEs."""

    def __init__(self, server: tuple[str, int], user: str, push: bool = False) -> None:
        super().__init__(server)
        self.user = user
        self.push = push
        self.call_id = uuid.uuid4().hex
        self.cseq = 0
        self.tag = _tag()

    def _request(self, method: str, ruri: str, to: str, extra: list[tuple[str, str]],
                 body: bytes = b"", call_id: str | None = None) -> bytes:
        self.cseq += 1
        head = [f"{method} {ruri} SIP/2.0",
                f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={_branch()};rport",
                "Max-Forwards: 70",
                f"From: <sip:{self.user}@{HOST}>;tag={self.tag}",
                f"To: {to}",
                f"Call-ID: {call_id or self.call_id}",
                f"CSeq: {self.cseq} {method}"]
        head += [f"{k}: {v}" for k, v in extra]
        head.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    def register(self) -> Msg:
        contact = f"sip:{self.user}@{HOST}:{self.port}"
        if self.push:
            contact += f";pn-provider=webhook;pn-prid={PRID};pn-param=bob-phone"
        self.send(self._request("REGISTER", f"sip:{HOST}", f"<sip:{self.user}@{HOST}>",
                                [("Contact", f"<{contact}>"), ("Expires", "600")]))
        return self.final("REGISTER")

    def message(self, to: str, text: str, extra: list[tuple[str, str]] | None = None) -> Msg:
        self.send(self._request("MESSAGE", f"sip:{to}@{HOST}", f"<sip:{to}@{HOST}>",
                                [("Content-Type", "text/plain;charset=UTF-8"), *(extra or [])],
                                text.encode(), call_id=uuid.uuid4().hex))
        return self.final("MESSAGE")

    def final(self, method: str, timeout: float = 5.0) -> Msg:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(deadline - time.monotonic())
            if got is None:
                continue
            msg, addr = got
            if msg.is_request:
                self.note("request", msg)
                continue
            if msg.cseq_method == method and msg.status >= 200:
                return msg
        raise AssertionError(f"no final answer to {method}")

    def incoming(self, timeout: float = 5.0) -> tuple[Msg, tuple[str, int]]:
        """The next request the server sends us (a MESSAGE), unanswered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(deadline - time.monotonic())
            if got is not None and got[0].is_request:
                return got
        raise AssertionError("no request from the server")


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Callable[[], tuple[str, Path]]]:
    procs = []

    def start() -> tuple[str, Path]:
        record = tmp_path / f"webhook{len(procs)}.jsonl"
        proc, port = webhook_fake.spawn(["--port", "0", "--record", str(record)])
        procs.append(proc)
        return f"http://{HOST}:{port}/push", record

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def config(url: str, tmp_path: Path, auth: bool = False) -> dict[str, dict[str, Any]]:
    return {
        "auth": {"enabled": auth},
        "push": {"providers": ["webhook"], "webhook": [{"name": "webhook", "url": url, "timeout": 2.0}]},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
        # both databases outside the per-server directory: a restarted server reads the same ones
        "location": {"path": str(tmp_path / "location.sqlite")},
        "messages": {"db": str(tmp_path / "messages.sqlite")},
    }


def message_pushes(record: Path) -> list[dict[str, Any]]:
    return [r["body"] for r in webhook_fake.read_records(record) if r["body"].get("type") == "message"]


def stats(server: ServerProcess) -> dict[str, Any]:
    return admin_rpc(server, "msg.stats")


def message_pushes_done(server: ServerProcess) -> int:
    """Message pushes whose outcome the server has (the webhook answered, or they failed)."""
    return sum(admin_rpc(server, "stats")["push"]["by_kind"].get("message", {}).values())


def test_messages_to_a_sleeping_phone_are_pushed_then_delivered_in_order(
        start_sip_server: Any, webhook: Any, tmp_path: Path) -> None:
    url, record = webhook()
    server = start_sip_server(extra=config(url, tmp_path), tls=False)
    bob = Phone((HOST, server.sip_port), "bob", push=True)
    alice = Phone((HOST, server.sip_port), "alice")
    assert bob.register().status == 200  # then the app sleeps

    for text in ("first", "second"):
        answer = alice.message("bob", text)
        assert answer.status == 202, answer.first
    pushes = wait_until(lambda: len(message_pushes(record)) >= 2 and message_pushes(record), 10, "2 message pushes")
    assert [p["preview"] for p in pushes] == ["first", "second"]
    assert all(p["pn_prid"] == PRID and p["caller"]["uri"] == f"sip:alice@{HOST}" for p in pushes)
    assert len({p["message_id"] for p in pushes}) == 2
    assert stats(server)["waiting"] == 2

    assert bob.register().status == 200  # the push woke the app
    got = []
    for _ in range(2):
        msg, addr = bob.incoming()
        assert msg.method == "MESSAGE"
        got.append(msg)
        if len(got) == 1:
            assert stats(server)["in_flight"] == 1  # the second waits for this one's 2xx
        bob.send(response_to(msg, 200, "OK", _tag()), addr)
    assert [m.body for m in got] == [b"first", b"second"]
    first = got[0]
    assert first.get("content-type") == "text/plain;charset=UTF-8"
    assert f"sip:alice@{HOST}" in (first.get("from") or "") and first.get("date")
    assert first.get("call-id") != got[1].get("call-id")
    wait_until(lambda: stats(server)["waiting"] == 0, 5, "the delivered messages deleted")
    s = stats(server)
    assert (s["accepted"], s["delivered"], s["done"], s["pushed"]) == (2, 2, 2, 2)


def test_a_message_stored_before_a_restart_is_delivered_after_it(
        start_sip_server: Any, webhook: Any, tmp_path: Path) -> None:
    url, record = webhook()
    first = start_sip_server(extra=config(url, tmp_path), tls=False)
    bob = Phone((HOST, first.sip_port), "bob", push=True)
    assert bob.register().status == 200
    assert Phone((HOST, first.sip_port), "alice").message("bob", "kept across restarts").status == 202
    wait_until(lambda: message_pushes(record), 10, "the message push")
    assert first.stop() == 0

    second = start_sip_server(extra=config(url, tmp_path), tls=False)
    assert stats(second)["waiting"] == 1  # restored from the message database
    bob2 = Phone((HOST, second.sip_port), "bob", push=True)  # the app wakes up, the server moved
    assert bob2.register().status == 200
    msg, addr = bob2.incoming()
    assert msg.method == "MESSAGE" and msg.body == b"kept across restarts"
    bob2.send(response_to(msg, 200, "OK", _tag()), addr)
    wait_until(lambda: stats(second)["waiting"] == 0, 5, "the delivered message deleted")
    assert len(message_pushes(record)) == 1  # nobody was pushed again after the restart


def test_with_digest_the_sender_is_challenged_and_stored_as_verified(
        start_sip_server: Any, webhook: Any, tmp_path: Path) -> None:
    url, _ = webhook()
    server = start_sip_server(extra=config(url, tmp_path, auth=True), tls=False)
    add_user(server, "alice", "alice-pw")
    add_user(server, "bob", "bob-pw")
    alice = Phone((HOST, server.sip_port), "alice")
    challenge = alice.message("bob", "hi")
    assert challenge.status == 407
    creds = digest_authorization(challenge.get("proxy-authenticate") or "", "alice", "alice-pw", "MESSAGE",
                                 f"sip:bob@{HOST}")
    answer = alice.message("bob", "hi", [("Proxy-Authorization", creds)])
    assert answer.status == 202, answer.first
    [dumped] = admin_rpc(server, "msg.dump")
    assert dumped["sender"] == f"sip:alice@{HOST}" and dumped["aor"] == f"sip:bob@{HOST}"
    creds = digest_authorization(challenge.get("proxy-authenticate") or "", "alice", "alice-pw", "MESSAGE",
                                 f"sip:nobody@{HOST}", nc=2)
    # the nonce was challenged for bob's URI: reused for another, good credentials get stale=true
    # (a 407 nonce is bound to its Request-URI), and the UA answers the fresh one silently
    stale = alice.message("nobody", "hi", [("Proxy-Authorization", creds)])
    assert stale.status == 407 and "stale=true" in (stale.get("proxy-authenticate") or "")
    creds = digest_authorization(stale.get("proxy-authenticate") or "", "alice", "alice-pw", "MESSAGE",
                                 f"sip:nobody@{HOST}")
    unknown = alice.message("nobody", "hi", [("Proxy-Authorization", creds)])
    assert unknown.status == 404


def test_cluster_on_redis_the_accepting_node_delivers_when_the_phone_registers_elsewhere(
        start_sip_server: Any, webhook: Any, redis_server: Any, tmp_path: Path) -> None:
    """Two nodes on one redis-server: a MESSAGE accepted by node A (stored in Redis) for a phone that
    registered on node B; A is restarted (same node id: it loads its messages back from Redis); the
    phone registers on B again and A, told by Redis, delivers the MESSAGE to it."""
    url, record = webhook()

    def node(node_id: str) -> ServerProcess:
        cfg = config(url, tmp_path)
        cfg["location"] = {"backend": "redis", "url": redis_server.url, "key_prefix": "im:"}
        cfg["cluster"] = {"node_id": node_id}
        server = start_sip_server(extra=cfg, tls=False)
        wait_until(lambda: admin_rpc(server, "stats")["usrloc"]["redis"]["up"], 10, f"node {node_id} on redis")
        return server

    a, b = node("a"), node("b")
    bob = Phone((HOST, b.sip_port), "bob", push=True)
    assert bob.register().status == 200
    wait_until(lambda: admin_rpc(a, "ul.dump")["aors"].get(f"sip:bob@{HOST}"), 5, "bob's binding on node a")
    assert Phone((HOST, a.sip_port), "alice").message("bob", "via redis").status == 202
    wait_until(lambda: message_pushes(record), 10, "node a's message push")
    assert redis_server.cli("SCARD", "im:msgs:a") == b":1"

    assert a.stop() == 0
    a2 = node("a")
    assert stats(a2)["waiting"] == 1  # loaded back from Redis
    assert stats(b)["waiting"] == 0  # node b never had it
    assert bob.register().status == 200  # woken, on node b again
    msg, addr = bob.incoming()
    assert msg.body == b"via redis" and addr == (HOST, a2.sip_port)  # sent by node a
    bob.send(response_to(msg, 200, "OK", _tag()), addr)
    wait_until(lambda: stats(a2)["waiting"] == 0, 5, "the delivered message deleted")
    # the deletion is written behind, in the next commit
    wait_until(lambda: redis_server.cli("SCARD", "im:msgs:a") == b":0", 5, "the message gone from Redis")


def test_each_device_gets_a_message_once(start_sip_server: Any, webhook: Any, tmp_path: Path) -> None:
    """bob has a desk phone (no push token: reachable) and a sleeping phone. The desk phone gets the
    MESSAGE at once; its next REGISTER brings nothing more (the message still waits for the other
    phone); the sleeping phone gets it when it registers, and then the message is deleted."""
    url, record = webhook()
    server = start_sip_server(extra=config(url, tmp_path), tls=False)
    desk = Phone((HOST, server.sip_port), "bob")
    phone = Phone((HOST, server.sip_port), "bob", push=True)
    assert desk.register().status == 200 and phone.register().status == 200
    assert Phone((HOST, server.sip_port), "alice").message("bob", "to both").status == 202
    msg, addr = desk.incoming()
    assert msg.body == b"to both"
    desk.send(response_to(msg, 200, "OK", _tag()), addr)
    wait_until(lambda: stats(server)["delivered"] == 1, 5, "the desk phone's delivery counted")
    assert len(message_pushes(record)) <= 1  # only the sleeping phone is pushed
    assert stats(server)["waiting"] == 1  # the sleeping phone has not got it

    # the server emits a REGISTER's binding events in the reactor turn that sends its 200, before
    # it can answer the admin request below: a MESSAGE for the desk phone would be in flight by then
    assert desk.register().status == 200
    s = stats(server)
    assert (s["in_flight"], s["delivered"], s["waiting"]) == (0, 1, 1)
    assert desk.seen("request") == []

    assert phone.register().status == 200
    msg, addr = phone.incoming()
    assert msg.body == b"to both"
    phone.send(response_to(msg, 200, "OK", _tag()), addr)
    wait_until(lambda: stats(server)["waiting"] == 0, 5, "the message deleted once both have it")
    assert stats(server)["delivered"] == 2
    # the push is an HTTP request the server may still be making (under load, after the phone got
    # its message): its outcome counted means the webhook wrote its record before answering
    wait_until(lambda: message_pushes_done(server) >= 1, 10, "the message push answered")
    assert [p["pn_prid"] for p in message_pushes(record)] == [PRID]
    assert message_pushes_done(server) == 1
