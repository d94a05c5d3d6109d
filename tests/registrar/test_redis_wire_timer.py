"""registrar/redis_wire.py's bookkeeping per command, on a fake loop and transport (no Redis, no
real time): one timeout timer per connection, replies handed over from the read itself."""

from __future__ import annotations

import asyncio
from typing import Any

from libon_tsilo.registrar.asyncio_bridge import reactor_loop
from libon_tsilo.registrar.redis_wire import ReplyError, RespConnection


class FakeHandle:
    def __init__(self, loop: FakeLoop, when: float, callback: Any) -> None:
        self.loop, self.when, self.callback, self.cancelled = loop, when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """What RespConnection asks of its loop: its time, timers (recorded), and futures."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeHandle] = []
        self.armed = 0  # call_later calls

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any) -> FakeHandle:
        self.armed += 1
        handle = FakeHandle(self, self.now + delay, callback)
        self.timers.append(handle)
        return handle

    def create_future(self) -> asyncio.Future[Any]:
        return reactor_loop().create_future()

    def advance(self, to: float) -> None:
        self.now = to
        while due := [t for t in self.timers if not t.cancelled and t.when <= self.now]:
            for timer in due:
                self.timers.remove(timer)
                timer.callback()


class FakeTransport:
    def __init__(self, conn: RespConnection) -> None:
        self.conn = conn
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True
        self.conn.connection_lost(None)


def connect(timeout: float = 2.0) -> tuple[FakeLoop, RespConnection, FakeTransport]:
    loop = FakeLoop()
    conn = RespConnection(loop, timeout)  # type: ignore[arg-type]
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return loop, conn, transport


def test_many_pending_commands_arm_one_timeout_timer() -> None:
    loop, conn, transport = connect()
    replies: list[Any] = []
    for _ in range(100):
        conn.call(replies.append, b"PING")
    assert loop.armed == 1
    conn.data_received(b"+PONG\r\n" * 100)
    assert replies == [b"PONG"] * 100
    for _ in range(100):  # the timer still armed covers these too
        conn.call(replies.append, b"PING")
    assert loop.armed == 1


def test_a_reply_reaches_its_callback_from_the_read_itself() -> None:
    _, conn, _ = connect()
    replies: list[Any] = []
    conn.call(replies.append, b"GET", b"k")
    conn.call(replies.append, b"NOSUCH")
    conn.data_received(b"$2\r\nv1\r\n-ERR unknown command\r\n")
    assert replies[0] == b"v1"
    assert isinstance(replies[1], ReplyError) and "unknown command" in str(replies[1])


def test_the_timeout_counts_from_each_commands_own_send() -> None:
    loop, conn, transport = connect(timeout=2.0)
    replies: list[Any] = []
    conn.call(replies.append, b"PING")  # t=0: the timer is armed for t=2
    loop.advance(1.5)
    conn.call(replies.append, b"BLPOP", b"never", 0)  # t=1.5: owed by t=3.5
    conn.data_received(b"+PONG\r\n")
    loop.advance(2.0)  # the first command was answered: the second still has 1.5 s
    assert not transport.aborted and replies == [b"PONG"]
    loop.advance(3.49)
    assert not transport.aborted
    loop.advance(3.5)
    assert transport.aborted
    assert isinstance(replies[1], ConnectionError) and "no answer within 2 s" in str(replies[1])
    assert conn.lost.result() == "no answer within 2 s"


def test_a_failing_callback_is_logged_and_the_next_reply_still_delivered() -> None:
    _, conn, transport = connect()
    got: list[Any] = []

    def broken(reply: Any) -> None:
        raise RuntimeError("a bug in the caller")

    conn.call(broken, b"PING")
    conn.call(got.append, b"PING")
    conn.data_received(b"+PONG\r\n+PONG\r\n")
    assert got == [b"PONG"] and not transport.aborted
