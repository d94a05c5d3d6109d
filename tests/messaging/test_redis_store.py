"""The Redis message store against a real redis-server (tests/redis_server.py): durable adds in one
MULTI/EXEC per batch, marks, deletions, expiry left to Redis, each node loading its own messages."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from libon_tsilo.messaging.outbox import Outbox
from libon_tsilo.messaging.redis_store import RedisMessageStore, make_blocking_client
from libon_tsilo.messaging.store import NotStored, StoredMessage
from tests.redis_server import RedisServer

PREFIX = "t:"


def now_clock() -> Clock:
    clock = Clock()
    clock.advance(time.time())  # Redis expires keys on its wall clock
    return clock


def store(redis_server: RedisServer, clock: Clock, node: str = "a") -> RedisMessageStore:
    return RedisMessageStore(make_blocking_client(redis_server.url), clock, node_id=node, key_prefix=PREFIX,
                             run_in_thread=defer.maybeDeferred)


def add(outbox: Outbox, body: bytes) -> StoredMessage:
    """Add and commit (the group commit's timer runs on the outbox's Clock)."""
    got: list[Any] = []
    outbox.add("sip:bob@example.com", "sip:bob@example.com", "sip:alice@example.com", "Alice", "text/plain",
               body, "Mon, 07 Dec 2026 01:00:00 GMT").addBoth(got.append)
    outbox.clock.advance(0.01)  # type: ignore[attr-defined]
    assert isinstance(got[0], StoredMessage), got
    return got[0]


def test_a_message_is_in_redis_before_its_add_fires_and_expires_with_it(redis_server: RedisServer) -> None:
    clock = now_clock()
    s = store(redis_server, clock)
    outbox = Outbox(clock, s, ttl=600)
    outbox.start()
    fired: list[Any] = []
    outbox.add("sip:bob@example.com", "sip:bob@example.com", "sip:alice@example.com", None, "text/plain", b"hi",
               "d").addBoth(fired.append)
    assert fired == [] and redis_server.cli("KEYS", "t:msg:*") == b"*0"  # queued: not written, no 202
    clock.advance(0.01)
    [msg] = fired
    assert isinstance(msg, StoredMessage)
    assert redis_server.cli("EXISTS", f"t:msg:{msg.id}") == b":1"
    ttl = int(redis_server.cli("PTTL", f"t:msg:{msg.id}")[1:])
    assert 590_000 < ttl <= 600_000
    outbox.mark_delivered(msg, "pn:webhook|tok|")
    clock.advance(0.01)
    assert redis_server.cli("SISMEMBER", f"t:msgd:{msg.id}", "pn:webhook|tok|") == b":1"
    assert int(redis_server.cli("PTTL", f"t:msgd:{msg.id}")[1:]) > 0
    outbox.remove(msg)
    clock.advance(0.01)
    assert redis_server.cli("EXISTS", f"t:msg:{msg.id}", f"t:msgd:{msg.id}") == b":0"
    assert redis_server.cli("SCARD", "t:msgs:a") == b":0"
    outbox.stop()


def test_a_restarted_node_loads_its_own_messages_with_their_marks(redis_server: RedisServer) -> None:
    clock = now_clock()
    a = Outbox(clock, store(redis_server, clock, "a"), ttl=600)
    b = Outbox(clock, store(redis_server, clock, "b"), ttl=600)
    a.start()
    b.start()
    first, second = add(a, b"one"), add(a, b"two")
    add(b, b"b's own")
    a.mark_delivered(first, "dev-1")
    a.stop()
    b.stop()

    again = Outbox(clock, store(redis_server, clock, "a"), ttl=600)
    assert again.start() == 2  # not node b's
    pending = again.pending("sip:bob@example.com")
    assert [m.body for m in pending] == [b"one", b"two"]
    assert pending[0].delivered == {"dev-1"} and pending[1].delivered == set()
    assert pending[0].sender_name == "Alice" and pending[1].id == second.id
    again.stop()


def test_ids_of_messages_redis_expired_are_dropped_at_load(redis_server: RedisServer) -> None:
    clock = now_clock()
    s = store(redis_server, clock)
    outbox = Outbox(clock, s, ttl=600)
    outbox.start()
    msg = add(outbox, b"x")
    outbox.stop()
    redis_server.cli("DEL", f"t:msg:{msg.id}")  # what Redis does at the message's expiry
    again = store(redis_server, clock)
    assert again.load(clock.seconds()) == []
    assert redis_server.cli("SCARD", "t:msgs:a") == b":0"


def test_redis_down_fails_the_add(redis_server: RedisServer) -> None:
    clock = now_clock()
    outbox = Outbox(clock, store(redis_server, clock), ttl=600)
    outbox.start()
    redis_server.stop()
    fired: list[Any] = []
    outbox.add("sip:bob@example.com", "sip:bob@example.com", "sip:alice@example.com", None, "text/plain", b"hi",
               "d").addBoth(fired.append)
    clock.advance(0.01)
    assert len(fired) == 1 and fired[0].check(NotStored)
    assert len(outbox) == 0 and outbox.count("sip:bob@example.com") == 0
