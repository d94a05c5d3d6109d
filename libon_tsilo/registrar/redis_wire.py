"""A lean Redis connection for the location store's two hot paths: the batch writes and the feed.

Through redis-py's asyncio client a REGISTER's write cost ~0.45M instructions more (its command
and its own change message read back) and a change of another node ~0.1M more to read
(bench/redis_cost.py): a command passes its retry and observability wrappers, a pool checkout, an
``asyncio.wait_for`` (a Task) around the send and a timeout context around the read, and every
pub/sub message a health check, a timeout context and a dict. This connection does what those two
paths need and nothing more: replies are parsed by hiredis (C) in ``data_received``, a command is
one ``transport.write`` and a Future, a pub/sub message is one callback.

redis-py still opens the connection (``open_connection``): TCP, TLS, a Unix socket or the master
found through Sentinel, AUTH/ACL and SELECT are its, from the same client the rest of the store
uses; then this protocol takes the transport over. The client must speak RESP2
(``protocol=2``): a pub/sub message is then a plain ``[b"message", channel, data]`` array.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import hiredis

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["ReplyError", "RespConnection", "open_connection"]


class ReplyError(Exception):
    """Redis answered a command with an error (the message is Redis's, e.g. "NOSCRIPT ...")."""


class RespConnection(asyncio.Protocol):
    """One connection, commands pipelined, replies matched in order. ``on_message(data)`` gets each
    pub/sub message once the connection subscribed. ``lost`` is done when the connection is gone;
    ``received`` counts replies and messages (the feed's idle check)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 on_message: Callable[[bytes], None] | None = None) -> None:
        self.loop = loop
        self.timeout = timeout
        self.on_message = on_message
        self.lost: asyncio.Future[str] = loop.create_future()
        self.received = 0
        self._transport: asyncio.Transport | None = None
        self.stream_writer: Any = None  # see open_connection
        self._closing = ""  # why we closed it, when we did
        self._reader = hiredis.Reader()
        # per command sent and not answered: its Future and its timeout
        self._pending: deque[tuple[asyncio.Future[Any], asyncio.TimerHandle]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._next_reply()) is not False:
            self.received += 1
            if (self.on_message is not None and type(reply) is list and len(reply) == 3
                    and reply[0] == b"message"):
                self.on_message(reply[2])
            elif self._pending:
                future, timer = self._pending.popleft()
                timer.cancel()
                if not future.done():
                    if isinstance(reply, hiredis.ReplyError):
                        future.set_exception(ReplyError(str(reply)))
                    else:
                        future.set_result(reply)

    def _next_reply(self) -> Any:
        """The next whole reply; False when none is complete, or when the stream broke (closed)."""
        try:
            return self._reader.gets()
        except hiredis.ProtocolError as exc:
            self.close(f"protocol error: {exc}")
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if exc is not None:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = self._closing or "closed by the server"
        while self._pending:
            future, timer = self._pending.popleft()
            timer.cancel()
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost ({reason})"))
        if not self.lost.done():
            self.lost.set_result(reason)

    def command(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        """Send one command; the Future gets its reply, ReplyError, or ConnectionError when the
        connection is lost or Redis does not answer within ``timeout`` (the connection is then
        closed: what it still owes cannot be matched any more)."""
        transport = self._transport
        if transport is None:
            raise ConnectionError("redis connection closed")
        future: asyncio.Future[Any] = self.loop.create_future()
        self._pending.append((future, self.loop.call_later(self.timeout, self._timed_out)))
        transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]  # its stub says 1-tuple
        return future

    def _timed_out(self) -> None:
        self.close(f"no answer within {self.timeout:g} s")

    def close(self, reason: str = "closed") -> None:
        transport = self._transport
        if transport is not None:
            self._closing = reason
            transport.abort()  # connection_lost fails what is pending
        elif not self.lost.done():
            self.lost.set_result(reason)


async def open_connection(client: Redis, loop: asyncio.AbstractEventLoop, timeout: float,
                          on_message: Callable[[bytes], None] | None = None) -> RespConnection:
    """A RespConnection to the server ``client`` talks to, set up (TLS, AUTH, SELECT, Sentinel) by
    redis-py, which then hands its transport over: its reader and writer are dropped unused."""
    conn = client.connection_pool.make_connection()
    await conn.connect()
    writer = conn._writer  # redis-py's StreamWriter; pinned redis < 9 (setup.cfg)
    conn._reader = conn._writer = None  # ours from here on: redis-py must neither read nor close it
    assert writer is not None
    protocol = RespConnection(loop, timeout, on_message)
    # kept while the connection lives: a StreamWriter that is garbage-collected closes its transport
    protocol.stream_writer = writer
    transport = writer.transport
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return protocol
