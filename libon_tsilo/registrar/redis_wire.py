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
``use_resp3()`` then switches the connection to RESP3 (Redis 6 or later), where a subscribed
connection still runs commands: the store's writes and its feed share one connection, so a node
reads its write's reply and its own change message in one read instead of one on each of two sockets.

A command's timeout is one timer per connection, not one per command (a timer handle per command
cost a REGISTER more than the rest of its send): it is armed for the oldest unanswered command and
re-armed for the next when it fires too early.

Compiled by mypyc (setup.py): ``RespConnection`` is an asyncio protocol by its methods, not by
subclassing ``asyncio.Protocol`` (a compiled class cannot subclass an interpreted one). A caller
that sends the same command shapes over and over (the batch writes, registrar/redis_writes.py)
packs them itself (``bulk``, ``call_packed``): hiredis's ``pack_command`` converts every argument
afresh, ~11k instructions for a batch's script call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Final

import hiredis
from twisted.logger import Logger

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["SKIP_NEXT_REPLY", "OnReply", "ReplyError", "RespConnection", "bulk", "open_connection"]

log = Logger(namespace=__name__)  # compiled (mypyc): Logger() would name the importer


class ReplyError(Exception):
    """Redis answered a command with an error (the message is Redis's, e.g. "NOSCRIPT ...")."""


SKIP_NEXT_REPLY: bytes = hiredis.pack_command((b"CLIENT", b"REPLY", b"SKIP"))  # type: ignore[arg-type]  # no reply
_PUSH: Final = hiredis.PushNotification
# held here, not looked up on their modules per reply (compiled: a static, not a module attribute)
_REPLY_ERROR: Final = hiredis.ReplyError
_FUTURE: Final = asyncio.Future


def bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string: one argument of a command packed by its caller."""
    return b"$%d\r\n%s\r\n" % (len(value), value)

Reply = Any  # a parsed reply; a ReplyError or ConnectionError instance when the command failed
OnReply = Callable[[Reply], None]


class RespConnection:
    """One connection, commands pipelined, replies matched in order. ``on_message(data)`` gets each
    pub/sub message once the connection subscribed. ``lost`` is done when the connection is gone;
    ``received`` counts replies and messages (the feed's idle check). An ``asyncio.Protocol`` by its
    methods (the module doc says why not by its base)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 on_message: Callable[[bytes], None] | None = None) -> None:
        self.loop = loop
        self.timeout = timeout
        self.on_message = on_message
        self.lost: asyncio.Future[str] = loop.create_future()
        self.received = 0
        self.resp3 = False
        self._transport: asyncio.Transport | None = None
        self.stream_writer: Any = None  # see open_connection
        self._closing = ""  # why we closed it, when we did
        self._reader = hiredis.Reader()
        # per command sent and not answered: who gets its reply (a Future or a callable), and when
        # it was sent (loop time)
        self._pending: deque[tuple[asyncio.Future[Any] | OnReply, float]] = deque()
        self._overdue: asyncio.TimerHandle | None = None  # armed while commands are pending

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        pass  # a command is small and Redis reads fast: nothing to hold back

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._next_reply()) is not False:
            self.received += 1
            kind = type(reply)
            if kind is _PUSH:
                # RESP3: pub/sub messages and SUBSCRIBE's own confirmations come as pushes
                if reply[0] == b"message":
                    if self.on_message is not None:
                        self._call(self.on_message, reply[2])
                    continue
                if reply[0] not in (b"subscribe", b"unsubscribe"):
                    continue  # another kind of push (e.g. client tracking): not ours
            elif (kind is list and not self.resp3 and self.on_message is not None and len(reply) == 3
                    and reply[0] == b"message"):  # RESP2: a plain array (RESP3 commands' replies are not)
                self._call(self.on_message, reply[2])
                continue
            if self._pending:
                target = self._pending.popleft()[0]
                if isinstance(reply, _REPLY_ERROR):
                    reply = ReplyError(str(reply))
                self._deliver(target, reply)

    def _next_reply(self) -> Any:
        """The next whole reply; False when none is complete, or when the stream broke (closed)."""
        try:
            return self._reader.gets()
        except hiredis.ProtocolError as exc:
            self.close(f"protocol error: {exc}")
            return False

    def _deliver(self, target: asyncio.Future[Any] | OnReply, reply: Reply) -> None:
        if isinstance(target, _FUTURE):
            if not target.done():
                if isinstance(reply, Exception):
                    target.set_exception(reply)
                else:
                    target.set_result(reply)
        else:
            self._call(target, reply)

    def _call(self, f: Callable[[Any], None], arg: Any) -> None:
        # called from data_received: an exception here would abort the connection and every command
        # pending on it, for one caller's bug
        try:
            f(arg)
        except Exception:
            log.failure("redis connection: a reply's callback failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        if exc is not None:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = self._closing or "closed by the server"
        while self._pending:
            target = self._pending.popleft()[0]
            self._deliver(target, ConnectionError(f"redis connection lost ({reason})"))
        if not self.lost.done():
            self.lost.set_result(reason)

    def command(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        """Send one command; the Future gets its reply, ReplyError, or ConnectionError when the
        connection is lost or Redis does not answer within ``timeout`` (the connection is then
        closed: what it still owes cannot be matched any more)."""
        future: asyncio.Future[Any] = self.loop.create_future()
        self._send(future, args)
        return future

    def call(self, on_reply: OnReply, *args: bytes | str | int) -> None:
        """``command`` without a Future: ``on_reply`` is called with the reply (a ReplyError or
        ConnectionError instance when it failed) as soon as it is read, not a loop turn later."""
        self._send(on_reply, args)

    def call_packed(self, on_reply: OnReply, data: bytes) -> None:
        """``call`` for a command its caller packed (RESP, ``bulk``): one reply expected. ``data``
        may start with commands Redis answers nothing to (``SKIP_NEXT_REPLY`` and the one after)."""
        self._send_packed(on_reply, data)

    def call_all(self, calls: list[tuple[OnReply, tuple[bytes | str | int, ...]]]) -> None:
        """``call`` for each (on_reply, args), all written at once (one send for the lot)."""
        transport = self._transport
        if transport is None:
            raise ConnectionError("redis connection closed")
        now = self.loop.time()
        self._pending.extend((on_reply, now) for on_reply, _ in calls)
        if self._overdue is None:
            self._overdue = self.loop.call_later(self.timeout, self._check_overdue)
        transport.write(b"".join([hiredis.pack_command(args) for _, args in calls]))  # type: ignore[arg-type]

    def send_unanswered(self, *args: bytes | str | int) -> None:
        """Send one command whose reply Redis must not send (``CLIENT REPLY SKIP`` before it): no
        read, so no wake-up, for a command whose outcome nobody waits for (a PUBLISH). Its failure
        is not seen; a broken connection is, by whatever else uses it. Only once ``skips_replies()``
        said yes: a server that refused the SKIP would answer both, and every later reply would go
        to the wrong command."""
        transport = self._transport
        if transport is None:
            raise ConnectionError("redis connection closed")
        self.write_unanswered(SKIP_NEXT_REPLY + hiredis.pack_command(args))  # type: ignore[arg-type]

    def write_unanswered(self, data: bytes) -> None:
        """``send_unanswered`` for commands packed by the caller, each after ``SKIP_NEXT_REPLY``."""
        transport = self._transport
        if transport is None:
            raise ConnectionError("redis connection closed")
        transport.write(data)

    async def skips_replies(self) -> bool:
        """Does the server honour ``CLIENT REPLY SKIP`` (Redis 3.2+; not every proxy or look-alike)?
        Asked with nothing else in flight; when it does not, its extra replies are read off here."""
        self.send_unanswered(b"ECHO", b"skipped")
        with contextlib.suppress(ReplyError):  # the CLIENT REPLY refused: its error comes first
            if await self.command(b"ECHO", b"answered") == b"answered":
                return True
        while True:  # the extra replies ("skipped", "answered") go to these until the two are in step
            with contextlib.suppress(ReplyError):
                if await self.command(b"ECHO", b"in-step") == b"in-step":
                    return False

    def _send(self, target: asyncio.Future[Any] | OnReply, args: tuple[bytes | str | int, ...]) -> None:
        self._send_packed(target, hiredis.pack_command(args))  # type: ignore[arg-type]  # its stub: 1-tuple

    def _send_packed(self, target: asyncio.Future[Any] | OnReply, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            raise ConnectionError("redis connection closed")
        self._pending.append((target, self.loop.time()))
        if self._overdue is None:
            self._overdue = self.loop.call_later(self.timeout, self._check_overdue)
        transport.write(data)

    def _check_overdue(self) -> None:
        self._overdue = None
        if not self._pending:
            return
        left = self._pending[0][1] + self.timeout - self.loop.time()
        if left <= 0:
            self.close(f"no answer within {self.timeout:g} s")
        else:
            self._overdue = self.loop.call_later(left, self._check_overdue)

    async def use_resp3(self) -> bool:
        """Switch to RESP3 (HELLO 3), where a subscribed connection still runs commands. False, and
        still RESP2, on a Redis before 6, which does not know HELLO."""
        try:
            await self.command(b"HELLO", b"3")
        except ReplyError:
            return False
        self.resp3 = True
        return True

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
