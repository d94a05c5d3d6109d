"""The lean Redis connection of the location store's hot paths (registrar/redis_wire.py), against a
real redis-server: replies in order, errors, pub/sub messages, a lost connection, a silent server,
TLS."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from libon_tsilo.registrar.asyncio_bridge import reactor_loop
from libon_tsilo.registrar.redis_store import make_redis_client
from libon_tsilo.registrar.redis_wire import ReplyError, open_connection
from tests.certs import CertPaths
from tests.redis_server import RedisServer, _free_tcp_port
from tests.waiting import wait_until


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
async def test_commands_sent_together_and_one_left_unanswered(redis_server: RedisServer) -> None:
    loop = reactor_loop()
    conn = await wait(asyncio.ensure_future(open_connection(make_redis_client(redis_server.url), loop, 2.0)))
    got: list[Any] = []
    conn.call_all([(got.append, (b"SET", b"k", 1)), (got.append, (b"NOSUCHCOMMAND",)), (got.append, (b"GET", b"k"))])
    conn.send_unanswered(b"INCR", b"k")  # CLIENT REPLY SKIP: no reply to match
    assert await wait(conn.command(b"GET", b"k")) == b"2"  # the next reply is the GET's own
    assert got[0] == b"OK" and isinstance(got[1], ReplyError) and got[2] == b"1"
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_server_that_would_answer_a_skipped_reply_is_told_apart(redis_server: RedisServer,
                                                                          tmp_path: Path) -> None:
    loop = reactor_loop()
    conn = await wait(asyncio.ensure_future(open_connection(make_redis_client(redis_server.url), loop, 2.0)))
    assert await wait(asyncio.ensure_future(conn.skips_replies()))
    conn.close()
    without = RedisServer(tmp_path / "no-client", extra_args=("--rename-command", "CLIENT", ""))
    without.dir.mkdir()
    without.start()
    try:
        conn = await wait(asyncio.ensure_future(open_connection(make_redis_client(without.url), loop, 2.0)))
        assert not await wait(asyncio.ensure_future(conn.skips_replies()))
        # its extra replies were read off: the next command gets its own reply
        assert await wait(conn.command(b"SET", b"k", b"v")) == b"OK"
        assert await wait(conn.command(b"GET", b"k")) == b"v"
        conn.close()
    finally:
        without.stop()


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
async def test_a_stream_that_is_not_resp_closes_the_connection_and_fails_what_is_pending(
    redis_server: RedisServer,
) -> None:
    loop = reactor_loop()
    conn = await wait(asyncio.ensure_future(open_connection(make_redis_client(redis_server.url), loop, 2.0)))
    blocked = conn.command(b"BLPOP", b"never", 0)
    conn.data_received(b"?not a reply\r\n")  # as if the stream had been corrupted on the way
    with pytest.raises(ConnectionError):
        await wait(blocked)
    assert (await wait(conn.lost)).startswith("protocol error")


@pytest_twisted.ensureDeferred
async def test_a_server_that_does_not_answer_in_time_closes_the_connection(redis_server: RedisServer) -> None:
    loop = reactor_loop()
    conn = await wait(asyncio.ensure_future(open_connection(make_redis_client(redis_server.url), loop, 0.2)))
    silent = conn.command(b"BLPOP", b"never", 0)  # Redis holds the answer: it comes too late
    with pytest.raises(ConnectionError, match="no answer within 0.2 s"):
        await wait(silent)
    assert await wait(conn.lost) == "no answer within 0.2 s"


@pytest.fixture
def tls_redis(tmp_path: Path, test_certs: CertPaths) -> Iterator[int]:
    """A redis-server answering TLS on its own port (and plain TCP on another, to know it is up)."""
    plain, tls = _free_tcp_port(), _free_tcp_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(plain), "--tls-port", str(tls),
         "--tls-cert-file", str(test_certs.cert), "--tls-key-file", str(test_certs.key),
         "--tls-ca-cert-file", str(test_certs.ca), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _answers(plain), 10, "redis-server with TLS")
        yield tls
    finally:
        proc.kill()
        proc.wait(10)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_a_tls_connection_is_opened_by_redis_py_and_read_here(tls_redis: int, test_certs: CertPaths) -> None:
    loop = reactor_loop()
    got: list[bytes] = []
    url = f"rediss://127.0.0.1:{tls_redis}/0?ssl_ca_certs={test_certs.ca}"
    feed = await wait(asyncio.ensure_future(open_connection(make_redis_client(url), loop, 2.0, got.append)))
    writer = await wait(asyncio.ensure_future(open_connection(make_redis_client(url), loop, 2.0)))
    await wait(feed.command(b"SUBSCRIBE", b"ch"))
    assert await wait(writer.command(b"PUBLISH", b"ch", b"over TLS")) == 1
    assert await wait(feed.command(b"PING")) == [b"pong", b""]
    assert got == [b"over TLS"]
    feed.close()
    writer.close()
