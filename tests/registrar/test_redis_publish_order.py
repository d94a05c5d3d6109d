"""A binding change reaches the other nodes only after its REGISTER's 200 is sent (review of
issue 14, finding 13: ``udp_via_path = false``).

When the forking node sends the INVITE to a UDP device itself (no edge node to hold it,
cluster/ordering.py), an announcement made inside the write (the Lua script's PUBLISH) could let
its INVITE reach the device before the 200 of the REGISTER that woke the call.
``publish_after_answer`` publishes after the waiters (the 200s) fired. A raw subscriber stands for
the forking node: whatever Redis published before the 200 went is in its socket by then (Redis
writes it out before the script's own reply). Real redis-server; the store's clock is a Clock.
"""

from __future__ import annotations

import select
import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.redis_server import HOST, RedisServer, _resp
from tests.registrar.helpers import make_binding
from tests.registrar.test_redis_rollback import nodes  # noqa: F401 (the fixture)
from tests.registrar.test_redis_store import Node, _node, until


def _subscriber(server: RedisServer) -> socket.socket:
    sock = socket.create_connection((HOST, server.port), timeout=2.0)
    sock.sendall(_resp("PSUBSCRIBE", "test:bindings:*"))  # every node's change channel
    got = b""
    while got.count(b"\r\n") < 6:  # *3, $10 psubscribe, $15 pattern, :1
        got += sock.recv(4096)
    return sock


def _published(sock: socket.socket, wait: float) -> bytes:
    readable, _, _ = select.select([sock], [], [], wait)
    return sock.recv(65536) if readable else b""


@pytest_twisted.ensureDeferred
async def test_the_change_is_published_only_after_the_registers_answer_is_sent(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    b = _node(nodes, redis_server, "b")
    b.redis.publish_after_answer = True  # ops: udp_via_path = false (or no node_address)
    await b.start()
    forking_node = _subscriber(redis_server)
    try:
        seen_at_answer: list[bytes] = []
        binding = make_binding(uri="sip:dev@192.0.2.5", expires_at=600.0, node="b")
        b.store.add_or_update(binding)
        d = b.store.when_durable(binding.aor)
        assert d is not None
        # the registrar sends the 200 in this callback: what the forking node could know by then
        d.addCallback(lambda _: seen_at_answer.append(_published(forking_node, 0.3)))
        await d
        assert seen_at_answer == [b""], "the change was announced before the REGISTER's answer"
        announced = await until(lambda: _published(forking_node, 0.0), "the announcement after it")
        assert b"sip:dev@192.0.2.5" in announced
    finally:
        forking_node.close()


@pytest_twisted.ensureDeferred
async def test_the_change_reaches_the_other_replica_after_the_answer(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    b.redis.publish_after_answer = True
    await a.start()
    await b.start()
    first = make_binding(uri="sip:one@192.0.2.5", expires_at=600.0, node="b")
    second = make_binding(aor="sip:bob@example.com", uri="sip:two@192.0.2.6", expires_at=600.0, node="b")
    await b.write(first)
    await b.write(second)
    b.store.remove(b.store.lookup(first.aor)[0], "unregistered")
    await b.store.flush()
    await until(lambda: a.store.lookup(second.aor) and not a.store.lookup(first.aor), "b's changes on a, in order")
    assert a.events.kinds() == ["added", "added", "removed"]


@pytest.mark.parametrize("after_answer", [True, False], ids=["published-after-the-answer", "published-in-the-write"])
@pytest_twisted.ensureDeferred
async def test_a_node_reads_nothing_back_but_its_writes_answer(
    redis_server: RedisServer, nodes: list[Node], after_answer: bool  # noqa: F811
) -> None:
    """Its own change message (it publishes on a channel it does not subscribe to) and the
    PUBLISH's reply (CLIENT REPLY SKIP) never come back: a REGISTER costs its node one read of
    Redis, not a wake-up more for the announcement."""
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    b.redis.publish_after_answer = after_answer
    await a.start()
    await b.start()
    conn = b.redis._writer
    assert conn is not None
    before = conn.received
    binding = make_binding(uri="sip:dev@192.0.2.5", expires_at=600.0, node="b")
    await b.write(binding)
    # whatever Redis sent b before this PING's answer is read by the time it is
    await Deferred.fromFuture(conn.command(b"PING"))
    assert conn.received - before == 2, "b read more than its write's answer and the PING's"
    await until(lambda: a.store.lookup(binding.aor), "the change on a")
    assert a.events.kinds() == ["added"] and b.events.kinds() == ["added"]


@pytest_twisted.ensureDeferred
async def test_without_client_reply_the_publish_is_answered_and_read(
    tmp_path: Path, nodes: list[Node]  # noqa: F811
) -> None:
    """A server (or a proxy) that does not know CLIENT REPLY: the PUBLISH's reply is read, as it
    was, instead of every later reply going to the wrong command."""
    server = RedisServer(tmp_path, extra_args=("--rename-command", "CLIENT", ""))
    server.start()
    try:
        a, b = _node(nodes, server, "a"), _node(nodes, server, "b")
        b.redis.publish_after_answer = True
        await a.start()
        await b.start()
        first = make_binding(uri="sip:one@192.0.2.5", expires_at=600.0, node="b")
        second = make_binding(aor="sip:bob@example.com", uri="sip:two@192.0.2.6", expires_at=600.0, node="b")
        await b.write(first)
        await b.write(second)  # answered: b's replies are still in step
        await until(lambda: a.store.lookup(first.aor) and a.store.lookup(second.aor), "b's changes on a")
        for node in (a, b):
            await node.store.stop()
    finally:
        server.stop()
