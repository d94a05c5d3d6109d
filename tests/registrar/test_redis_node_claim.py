"""One process per node id (review of issue 14, finding 16).

Two processes given the same ``[cluster] node_id`` would share one flow index (each would mark the
other's connections dead at its first load) and one write counter. Each process claims
``<prefix>node:<node_id>`` with its instance token before loading; the second live one stays out of
the cluster and says so. A node restarted after kill -9 waits for its old claim to lapse (at most
``claim_ttl``); after a clean stop it joins at once. Real redis-server.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from libon_tsilo.registrar.location import NotStored
from tests.redis_server import RedisServer
from tests.registrar.helpers import make_binding
from tests.registrar.test_redis_rollback import nodes  # noqa: F401 (the fixture)
from tests.registrar.test_redis_store import Node, _node, until

TTL = 0.3


def _claimed(nodes: list[Node], server: RedisServer, node_id: str) -> Node:  # noqa: F811
    node = _node(nodes, server, node_id)
    node.redis.claim_ttl = TTL
    return node


@pytest_twisted.ensureDeferred
async def test_a_second_live_process_with_the_same_node_id_stays_out_of_the_cluster(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    first = _claimed(nodes, redis_server, "a")
    await first.start()
    tcp = make_binding(uri="sip:tcp@192.0.2.5;transport=tcp", expires_at=600.0, node="a",
                       flow_id="tcp:10.0.0.2:5060-192.0.2.5:4000#1", flow_live=True,
                       received=("tcp", "192.0.2.5", 4000))
    await first.write(tcp)
    second = _claimed(nodes, redis_server, "a")
    second.store.start()
    await until(lambda: second.redis.state == "duplicate", "the second process to give up")
    assert second.redis.loads == 0  # it loaded nothing, so it marked none of a's flows dead
    stats = second.store.redis_stats()
    assert stats is not None and stats["duplicate_node_id_of"] == first.redis.instance
    second.store.add_or_update(make_binding(aor="sip:bob@example.com", expires_at=600.0, node="a"))
    d = second.store.when_durable("sip:bob@example.com")
    assert d is not None
    with pytest.raises(NotStored):
        await d
    with pytest.raises(ConnectionError):
        await second.redis.heartbeat("udp:10.0.0.9:5070", 3.0)
    # the first one goes on as before, its device's connection still live in Redis
    await first.write(make_binding(aor="sip:carol@example.com", expires_at=600.0, node="a"))
    assert first.redis.state == "up" and first.store.lookup(tcp.aor)[0].flow_live
    third = _claimed(nodes, redis_server, "c")
    await third.start()
    assert third.store.lookup(tcp.aor)[0].flow_live


@pytest_twisted.ensureDeferred
async def test_a_node_restarted_after_a_kill_joins_once_its_old_claim_lapses(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    first = Node(redis_server, "b")
    first.redis.claim_ttl = TTL
    await first.start()
    await first.redis._close()  # kill -9: no clean stop, the claim stays until its TTL
    again = _claimed(nodes, redis_server, "b")
    started = time.monotonic()
    await again.start()
    assert again.redis.state == "up" and not again.redis.duplicate_of
    assert time.monotonic() - started > TTL / 3  # it waited for the old claim


@pytest_twisted.ensureDeferred
async def test_a_clean_stop_gives_the_node_id_up(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    first = Node(redis_server, "b")
    first.redis.claim_ttl = 30.0  # a lapse would take far longer than this test
    await first.start()
    assert redis_server.cli("EXISTS", "test:node:b") == b":1"
    await first.store.stop()
    assert redis_server.cli("EXISTS", "test:node:b") == b":0"
    again = _claimed(nodes, redis_server, "b")
    await again.start()
    assert again.redis.state == "up"


@pytest_twisted.ensureDeferred
async def test_each_process_holds_a_change_channel_of_its_own_until_it_stops(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    a, b = _claimed(nodes, redis_server, "a"), _claimed(nodes, redis_server, "b")
    await a.start()
    await b.start()
    assert a.redis.slot is not None and b.redis.slot is not None and a.redis.slot != b.redis.slot
    key = f"test:channel:{a.redis.slot}"
    holder = "return redis.call('GET', KEYS[1]) == ARGV[1] and 1 or 0"
    assert redis_server.cli("EVAL", holder, "1", key, a.redis.instance) == b":1"
    await a.store.stop()
    assert redis_server.cli("GET", key) == b"$-1"  # given up: the next process may take it


@pytest_twisted.ensureDeferred
async def test_a_node_whose_change_channel_was_taken_reloads_on_another_one(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    """Redis lost the claim (flushed, a fail-over) and another process took the channel: the two
    would not hear each other. The renewal sees it; the node takes another channel and loads again."""
    a, b = _claimed(nodes, redis_server, "a"), _claimed(nodes, redis_server, "b")
    await a.start()
    await b.start()
    lost = a.redis.slot
    assert redis_server.cli("SET", f"test:channel:{lost}", "another-process") == b"+OK"
    await until(lambda: a.redis.loads == 2 and a.redis.up, "a to reload")
    assert a.redis.slot not in (lost, b.redis.slot)
    late = make_binding(aor="sip:late@example.com", uri="sip:late@192.0.2.7", expires_at=600.0, node="b")
    await b.write(late)
    await until(lambda: a.store.lookup(late.aor), "b's change on a, on a's new channel")


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_renews_the_claims_in_its_round_trip(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    """A node that beats (cluster/liveness.py) needs no renewal of its own: an idle node reads
    Redis once a second, not three times."""
    a = _node(nodes, redis_server, "a")
    a.redis.claim_ttl = 30.0  # its own renewal (every 10 s) stays out of the test
    await a.start()
    for key in ("test:node:a", f"test:channel:{a.redis.slot}"):
        assert redis_server.cli("PEXPIRE", key, "1000") == b":1"
    assert await a.redis.heartbeat("udp:10.0.0.1:5070", 3.0) == {"udp:10.0.0.1:5070"}
    # the renewal's replies follow the beat's on the same connection: a PING after them
    await Deferred.fromFuture(a.redis._writer.command(b"PING"))  # type: ignore[union-attr]
    for key in ("test:node:a", f"test:channel:{a.redis.slot}"):
        ttl = int(redis_server.cli("PTTL", key)[1:])
        assert ttl > 20_000, f"{key} was not renewed by the beat ({ttl} ms left)"


@pytest_twisted.ensureDeferred
async def test_a_beat_whose_connection_closes_under_it_is_sent_again(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    """The beat shares the feed's connection, which a reload closes (a claim found gone): the beat
    is not lost with it (a lost beat would be logged as Redis failing)."""
    a = _node(nodes, redis_server, "a")
    await a.start()
    beat = a.redis.heartbeat("udp:10.0.0.1:5070", 3.0)
    a.redis._writer.close("a reload")  # type: ignore[union-attr]  # before its answer is read
    assert await beat == {"udp:10.0.0.1:5070"}
