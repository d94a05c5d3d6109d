"""The lean Redis connection of the location store's hot paths (registrar/redis_wire.py), against a
real redis-server: replies in order, errors, pub/sub messages, a lost connection, a silent server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from libon_tsilo.registrar.asyncio_bridge import reactor_loop
from libon_tsilo.registrar.redis_store import make_redis_client
from libon_tsilo.registrar.redis_wire import ReplyError, open_connection
from tests.redis_server import RedisServer


def wait(future: asyncio.Future[Any]) -> Deferred[Any]:
    return Deferred.fromFuture(future)


@pytest_twisted.ensureDeferred
async def test_replies_come_back_in_order_and_errors_as_reply_errors(redis_server: RedisServer) -> None:
    loop = reactor_loop()
    conn = await wait(asyncio.ensure_future(open_connection(make_redis_client(redis_server.url), loop, 2.0)))
    pending = [conn.command(b"SET", b"k", 7), conn.command(b"GET", b"k"), conn.command(b"NOSUCHCOMMAND"),
               conn.command(b"MGET", b"k", b"none")]
    assert await wait(pending[0]) == b"OK"
    assert await wait(pending[1]) == b"7"
    with pytest.raises(ReplyError, match="unknown command"):
        await wait(pending[2])
    assert await wait(pending[3]) == [b"7", None]
    conn.close()
    await wait(conn.lost)
    with pytest.raises(ConnectionError):
        conn.command(b"PING")


@pytest_twisted.ensureDeferred
async def test_a_subscribed_connection_hands_each_message_over(redis_server: RedisServer) -> None:
    loop = reactor_loop()
    got: list[bytes] = []
    client = make_redis_client(redis_server.url)
    conn = await wait(asyncio.ensure_future(open_connection(client, loop, 2.0, got.append)))
    await wait(conn.command(b"SUBSCRIBE", b"ch"))
    for data in (b"one", b"two " * 5000):  # the second spans several reads
        redis_server.cli("PUBLISH", "ch", data)
    assert await wait(conn.command(b"PING")) == [b"pong", b""]  # answered after both messages
    assert got == [b"one", b"two " * 5000]
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_fails_what_is_pending(redis_server: RedisServer) -> None:
    loop = reactor_loop()
    conn = await wait(asyncio.ensure_future(open_connection(make_redis_client(redis_server.url), loop, 2.0)))
    blocked = conn.command(b"BLPOP", b"never", 0)
    redis_server.cli("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    with pytest.raises(ConnectionError):
        await wait(blocked)
    assert "closed" in await wait(conn.lost)


@pytest_twisted.ensureDeferred
async def test_a_server_that_does_not_answer_in_time_closes_the_connection(redis_server: RedisServer) -> None:
    loop = reactor_loop()
    conn = await wait(asyncio.ensure_future(open_connection(make_redis_client(redis_server.url), loop, 0.2)))
    silent = conn.command(b"BLPOP", b"never", 0)  # Redis holds the answer: it comes too late
    with pytest.raises(ConnectionError, match="no answer within 0.2 s"):
        await wait(silent)
    assert await wait(conn.lost) == "no answer within 0.2 s"
