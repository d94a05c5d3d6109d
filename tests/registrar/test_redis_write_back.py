"""Write-backs after Redis lost acknowledged bindings (review of issue 14, finding 15).

The bindings a node writes back are acknowledged data (their REGISTERs got a 200): a chunk that
fails is retried, with backoff on the store's clock, until Redis has it; a node with many bindings
writes them in bounded chunks; and a loss the feed does not see (its connection survived) is caught
by the write counter on the next write or heartbeat. Real redis-server (tests/redis_server.py).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from libon_tsilo.registrar.redis_store import binding_redis_key
from tests.redis_server import RedisServer
from tests.registrar.helpers import make_binding
from tests.registrar.test_redis_rollback import nodes  # noqa: F401 (the fixture)
from tests.registrar.test_redis_store import Node, _node, until


def _in_redis(server: RedisServer, binding: Any) -> bool:
    return server.cli("EXISTS", binding_redis_key(b"test:", binding.aor, binding.key)) == b":1"


def _refuse_scripts_after_load(redis_server: RedisServer, a: Node, once: bool = False) -> None:
    """After ``a``'s next load (``once``: only its next one; else every one), Redis refuses scripts
    (NOPERM): the write-back right after the load fails, as against a Redis still recovering."""
    load_all = a.redis._load_all
    refused: list[bool] = []

    async def load_then_refuse_scripts() -> list[Any]:
        loaded = await load_all()
        if not (once and refused):
            refused.append(True)
            assert redis_server.cli("ACL", "SETUSER", "default", "-@scripting") == b"+OK"
        return loaded

    a.redis._load_all = load_then_refuse_scripts  # type: ignore[method-assign]


@pytest_twisted.ensureDeferred
async def test_a_write_back_that_fails_is_retried_until_redis_has_it(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    clock = Clock()
    a = _node(nodes, redis_server, "a", clock)
    await a.start()
    late = make_binding(uri="sip:late@192.0.2.6", expires_at=600.0, node="a")
    assert redis_server.cli("SAVE") == b"+OK"
    await a.write(late)  # acknowledged after the snapshot
    _refuse_scripts_after_load(redis_server, a)
    redis_server.restart()  # from the snapshot: `late` is gone
    await until(lambda: a.redis.loads == 2 and a.redis.rows_retried == 1, "the write-back to fail")
    assert not _in_redis(redis_server, late)
    assert redis_server.cli("ACL", "SETUSER", "default", "+@scripting") == b"+OK"
    clock.advance(a.redis.min_backoff)  # the retry, on the store's clock
    await until(lambda: _in_redis(redis_server, late), "the retried write-back")
    assert a.redis.rows_written_back == 1 and a.redis.write_back_pending() == 0


@pytest_twisted.ensureDeferred
async def test_a_pending_write_back_is_cancelled_on_stop(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    clock = Clock()
    a = Node(redis_server, "a", clock)
    await a.start()
    assert redis_server.cli("SAVE") == b"+OK"
    await a.write(make_binding(uri="sip:late@192.0.2.6", expires_at=600.0, node="a"))
    _refuse_scripts_after_load(redis_server, a)
    redis_server.restart()
    await until(lambda: a.redis.rows_retried == 1, "the write-back to fail")
    assert clock.getDelayedCalls()
    await a.store.stop()
    assert not [c for c in clock.getDelayedCalls() if c.active()]


@pytest_twisted.ensureDeferred
async def test_write_backs_go_in_bounded_chunks(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    # the stores' timers on a Clock: a claim renewal or beat of the real reactor that lands during
    # the restart reloads a second time (rightly), which would add a second round of write-backs
    a, b = _node(nodes, redis_server, "a", Clock()), _node(nodes, redis_server, "b", Clock())
    a.redis.write_back_chunk = 2
    await a.start()
    await b.start()
    assert redis_server.cli("SAVE") == b"+OK"
    late = [make_binding(aor=f"sip:u{i}@example.com", uri=f"sip:late{i}@192.0.2.6", expires_at=600.0,
                         node="a") for i in range(5)]
    for binding in late:
        await a.write(binding)
    # the bindings queued for each chunk, from the restart on: the store queues a chunk's saves, then
    # waits for that batch (when_committed) before it queues the next (the writer is compiled: its
    # methods cannot be wrapped, the store's attributes can)
    written: list[list[bytes]] = [[]]
    save, when_committed = a.redis.save, a.redis.when_committed

    def recorded_save(binding: Any) -> None:
        written[-1].append(binding_redis_key(b"test:", binding.aor, binding.key))
        save(binding)

    def recorded_wait(aor: str) -> Any:
        written.append([])
        return when_committed(aor)

    a.redis.save = recorded_save  # type: ignore[method-assign]
    a.redis.when_committed = recorded_wait  # type: ignore[method-assign]
    redis_server.restart()
    # a's own count, not Redis's keys: Redis holds the last chunk before a has read its answer
    await until(lambda: a.redis.rows_written_back == len(late), "the write-backs")
    assert written.pop() == []  # nothing queued after the last chunk's wait
    assert [len(keys) for keys in written] == [2, 2, 1]  # one batch (one Lua call) each
    assert sorted(key for keys in written for key in keys) == sorted(
        binding_redis_key(b"test:", x.aor, x.key) for x in late)
    assert a.redis.write_back_pending() == 0 and all(_in_redis(redis_server, x) for x in late)
    await until(lambda: all(b.store.lookup(x.aor) for x in late), "every binding on b again")


@pytest_twisted.ensureDeferred
async def test_a_loss_the_feed_did_not_see_is_caught_by_the_next_write(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    a = _node(nodes, redis_server, "a")
    await a.start()
    early = make_binding(uri="sip:early@192.0.2.5", expires_at=600.0, node="a")
    await a.write(early)
    await a.write(make_binding(aor="sip:carol@example.com", uri="sip:c@192.0.2.7", expires_at=600.0, node="a"))
    assert redis_server.cli("FLUSHALL") == b"+OK"  # an operator's mistake: our connections stay
    await a.write(make_binding(aor="sip:bob@example.com", uri="sip:next@192.0.2.6", expires_at=600.0, node="a"))
    await until(lambda: _in_redis(redis_server, early), "a to write its bindings back")
    assert a.redis.loads == 2


@pytest_twisted.ensureDeferred
async def test_a_loss_the_feed_did_not_see_is_caught_by_the_heartbeat_of_an_idle_node(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    a = _node(nodes, redis_server, "a")
    await a.start()
    early = make_binding(uri="sip:early@192.0.2.5", expires_at=600.0, node="a")
    await a.write(early)
    assert redis_server.cli("FLUSHALL") == b"+OK"
    await a.redis.heartbeat("udp:10.0.0.1:5070", 3.0)
    await until(lambda: _in_redis(redis_server, early), "a to write its binding back")


@pytest_twisted.ensureDeferred
async def test_a_write_back_not_yet_in_survives_another_reload(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    clock = Clock()
    a = _node(nodes, redis_server, "a", clock)
    await a.start()
    assert redis_server.cli("SAVE") == b"+OK"
    late = make_binding(uri="sip:late@192.0.2.6", expires_at=600.0, node="a")
    await a.write(late)
    _refuse_scripts_after_load(redis_server, a, once=True)
    redis_server.restart()
    await until(lambda: a.redis.rows_retried == 1, "the write-back to fail")
    # Redis restarts again from the same snapshot: its counter is what this node saw at the loss,
    # so no new loss shows; the write-back still pending is kept, and written at this reload
    redis_server.restart()
    await until(lambda: a.redis.loads == 3, "the third load")
    await until(lambda: _in_redis(redis_server, late), "the pending write-back")
    assert a.store.lookup(late.aor)


async def _pending_write_backs(redis_server: RedisServer, a: Node, n: int) -> list[Any]:
    """``n`` bindings of ``a`` that Redis lost (restarted from a snapshot taken before them), whose
    write-back Redis refuses (no @scripting) until the test lets it: pending, retried on a's Clock."""
    await a.start()
    assert redis_server.cli("SAVE") == b"+OK"
    late = [make_binding(aor=f"sip:u{i}@example.com", uri=f"sip:late{i}@192.0.2.6", expires_at=600.0,
                         node="a") for i in range(n)]
    for binding in late:
        await a.write(binding)
    _refuse_scripts_after_load(redis_server, a)
    redis_server.restart()
    await until(lambda: a.redis.rows_retried >= 1, "the first write-back to fail")
    assert a.redis.write_back_pending() == n and not any(_in_redis(redis_server, x) for x in late)
    return late


@pytest_twisted.ensureDeferred
async def test_a_graceful_stop_waits_for_the_pending_write_backs(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    clock = Clock()
    a = Node(redis_server, "a", clock)  # stopped by the test
    a.redis.write_back_chunk = 1
    a.redis.stop_wait = 5.0  # ops: [ops] drain_timeout
    late = await _pending_write_backs(redis_server, a, 3)
    stopped = a.store.stop()
    assert not stopped.called  # waiting for them, the connection still open
    assert redis_server.cli("ACL", "SETUSER", "default", "+@scripting") == b"+OK"
    clock.advance(a.redis.min_backoff)  # the retry, on the store's clock: the three chunks follow
    await stopped
    assert all(_in_redis(redis_server, x) for x in late)
    assert a.redis.rows_written_back == 3
    assert not [c for c in clock.getDelayedCalls() if c.active()]


@pytest_twisted.ensureDeferred
async def test_the_stop_waits_for_write_backs_no_longer_than_its_bound(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    clock = Clock()
    a = Node(redis_server, "a", clock)
    a.redis.stop_wait = 5.0
    await _pending_write_backs(redis_server, a, 2)
    stopped = a.store.stop()
    clock.advance(4.9)  # Redis still refuses: retried with backoff, the stop still waits
    assert not stopped.called and a.redis.rows_retried > 1
    clock.advance(0.1)
    await stopped  # given up: logged, as before the wait
    assert a.redis.write_back_pending() == 2
    assert not [c for c in clock.getDelayedCalls() if c.active()]
