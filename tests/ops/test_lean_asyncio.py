"""ops/lean_asyncio.py: the asyncio reactor re-arms its loop timer only for an earlier deadline, and
reads our UDP port without Twisted's per-event wrapping.

Each test builds a reactor on a fresh asyncio loop of its own (not installed: the tests' own
reactor stays) and counts the loop's ``call_at``; the timers then run on that loop in real time
(a few ms, in a thread: the tests' own reactor runs a loop in the main one), since a loop's clock
cannot be injected.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import asyncioreactor, error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from libon_tsilo.ops.lean_asyncio import LeanAsyncioReactor
from libon_tsilo.sip.twisted_io import UDPPort


class CountingLoop(asyncio.SelectorEventLoop):
    """A loop that counts the timers armed on it."""

    armed = 0

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        self.armed += 1
        return super().call_at(when, callback, *args, context=context)


@pytest.fixture
def loop() -> Iterator[CountingLoop]:
    loop = CountingLoop()
    yield loop
    loop.close()


def _run_until(loop: asyncio.AbstractEventLoop, done: list[Any], n: int) -> None:
    """Run ``loop`` until ``done`` holds ``n`` items (at most 2 s), in a thread of its own: the
    tests' reactor already runs a loop in this one."""

    def check() -> None:
        if len(done) >= n or loop.time() > bound:
            loop.stop()
        else:
            loop.call_soon(check)

    bound = loop.time() + 2.0
    loop.call_soon(check)
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    thread.join()


def test_calls_due_after_the_armed_one_do_not_re_arm_the_loop_timer(loop: CountingLoop) -> None:
    reactor = LeanAsyncioReactor(loop)
    first = reactor.callLater(10.0, lambda: None)
    armed = loop.armed
    later = [reactor.callLater(20.0 + i, lambda: None) for i in range(200)]
    # the stock reactor compares two clocks read one after the other: about half of these re-armed
    assert loop.armed == armed
    sooner = reactor.callLater(5.0, lambda: None)
    assert loop.armed == armed + 1  # an earlier deadline does
    for dc in [first, sooner, *later]:
        dc.cancel()


def test_the_calls_still_run_when_due_and_in_order(loop: CountingLoop) -> None:
    reactor = LeanAsyncioReactor(loop)
    done: list[str] = []
    reactor.callLater(0.004, done.append, "c")
    reactor.callLater(0.002, done.append, "b")
    reactor.callLater(0.0, done.append, "a")
    cancelled = reactor.callLater(0.001, done.append, "never")
    moved = reactor.callLater(60.0, done.append, "d")
    moved.reset(0.006)  # moved sooner: the timer must follow it
    cancelled.cancel()
    _run_until(loop, done, 4)
    assert done == ["a", "b", "c", "d"]
    # nothing left armed once the last call ran: the next call arms the timer, a later one not
    armed = loop.armed
    e = reactor.callLater(30.0, done.append, "e")
    f = reactor.callLater(40.0, done.append, "f")
    assert loop.armed == armed + 1
    e.cancel()
    f.cancel()


def test_a_call_made_from_a_firing_call_runs_too(loop: CountingLoop) -> None:
    reactor = LeanAsyncioReactor(loop)
    done: list[str] = []
    reactor.callLater(0.001, lambda: reactor.callLater(0.001, done.append, "second"))
    _run_until(loop, done, 1)
    assert done == ["second"]


def test_a_call_due_now_runs_on_the_next_turn_without_a_loop_timer(loop: CountingLoop) -> None:
    reactor = LeanAsyncioReactor(loop)
    done: list[str] = []
    later = reactor.callLater(30.0, done.append, "later")
    armed = loop.armed
    reactor.callLater(0, done.append, "a")
    reactor.callLater(0, lambda: reactor.callLater(0, done.append, "c"))  # one made by a call due now
    reactor.callLater(0, done.append, "b")
    _run_until(loop, done, 3)
    assert done == ["a", "b", "c"]
    # the stock reactor armed a timer for each call due now, then re-armed it for the 30 s one
    assert loop.armed == armed
    assert reactor._armed_for == later.getTime()
    later.cancel()


def test_a_cancelled_call_at_the_head_is_not_woken_for(loop: CountingLoop) -> None:
    reactor = LeanAsyncioReactor(loop)
    done: list[str] = []
    reactor.callLater(0.001, done.append, "first")
    cancelled = reactor.callLater(30.0, done.append, "never")
    last = reactor.callLater(60.0, done.append, "last")
    _run_until(loop, done, 1)  # "first" ran: the other two are in the heap, the timer armed for 30 s
    assert reactor._armed_for == cancelled.getTime()
    cancelled.cancel()
    reactor.callLater(0.001, done.append, "second")
    _run_until(loop, done, 2)
    assert done == ["first", "second"]
    # once "second" ran, the loop's timer waits for the next call that will run, not the cancelled one
    assert reactor._armed_for == last.getTime()
    assert reactor.getDelayedCalls() == [last]
    last.cancel()


def test_on_uvloop_a_timed_call_wakes_the_loop_once_and_never_runs_early() -> None:
    """uvloop's timers count whole milliseconds from a truncated clock, and a delay under half a
    millisecond runs at once: armed for the exact delay, each call woke the loop ~34 times."""
    import uvloop

    class CountingUVLoop(uvloop.Loop):  # type: ignore[misc,name-defined]
        armed = 0

        def call_later(self, delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
            self.armed += 1  # uvloop's call_at calls this too
            return super().call_later(delay, callback, *args, context=context)

    loop = CountingUVLoop()
    try:
        reactor = LeanAsyncioReactor(loop)
        early: list[float] = []
        done: list[int] = []
        n = 20

        def step(i: int, due: float) -> None:
            early.append(due - reactor.seconds())
            done.append(i)
            if i + 1 < n:
                delay = 0.0004 + (i % 7) * 0.00037  # fractions of a millisecond, some under half
                reactor.callLater(delay, step, i + 1, reactor.seconds() + delay)

        reactor.callLater(0.0023, step, 0, reactor.seconds() + 0.0023)
        _run_until(loop, done, n)
        assert done == list(range(n))
        assert max(early) <= 0.0  # no call ran before its time
        assert loop.armed == n  # one loop timer per call: it never fired before the deadline
    finally:
        loop.close()


def test_on_uvloop_the_timer_is_armed_with_one_loop_call() -> None:
    """uvloop's call_at is its call_later of the deadline less its clock, read again: the reactor
    gives call_later the delay it computed, one Python-level call and one clock read per arm."""
    import uvloop

    class Loop(uvloop.Loop):  # type: ignore[misc,name-defined]
        direct_call_at = 0

        def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> Any:
            self.direct_call_at += 1
            return super().call_at(when, callback, *args, context=context)

    loop = Loop()
    try:
        reactor = LeanAsyncioReactor(loop)
        done: list[int] = []
        reactor.callLater(0.003, done.append, 1)
        reactor.callLater(0.001, done.append, 0)  # earlier: armed again
        _run_until(loop, done, 2)
        assert done == [0, 1]
        assert loop.direct_call_at == 0
    finally:
        loop.close()


# -- the per-event path of our UDP port -------------------------------------------------------------


class _Received(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


def _reactor_with_port(loop: asyncio.AbstractEventLoop, proto: DatagramProtocol, lean: bool) -> tuple[Any, Any]:
    reactor = LeanAsyncioReactor(loop)
    if lean:
        reactor.lean_readers = frozenset({UDPPort})
    port = UDPPort(0, proto, "127.0.0.1", 65535, reactor)
    port.startListening()
    return reactor, port


def _send_to(port: Any, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, ("127.0.0.1", port.getHost().port))


@pytest.mark.parametrize("lean", [True, False])
def test_our_udp_port_is_read_without_the_log_context(
    loop: CountingLoop, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    wrapped: list[Any] = []
    real = asyncioreactor.callWithLogger
    monkeypatch.setattr(asyncioreactor, "callWithLogger", lambda s, *a, **k: (wrapped.append(s), real(s, *a, **k))[1])
    proto = _Received()
    reactor, port = _reactor_with_port(loop, proto, lean)
    try:
        _send_to(port, b"one")
        _send_to(port, b"two")
        _run_until(loop, proto.got, 2)
        assert proto.got == [b"one", b"two"]
        # our port's readable events skip callWithLogger; a reader of another type keeps it
        assert [s for s in wrapped if s is port] == ([] if lean else [port] * len(wrapped))
        assert wrapped or lean
    finally:
        port.stopListening()
    assert port not in reactor.getReaders()  # removeReader works on a lean reader too


def test_a_port_whose_read_fails_is_logged_and_disconnected_as_twisted_does(loop: CountingLoop) -> None:
    proto = _Received()
    reactor, port = _reactor_with_port(loop, proto, lean=True)
    logged: list[dict[str, Any]] = []
    reactor._log = Logger(observer=logged.append)
    lost: list[Any] = []

    def broken() -> None:
        raise RuntimeError("bug in doRead")

    port.doRead = broken
    port.connectionLost = lambda reason=None: lost.append(reason)
    try:
        _send_to(port, b"ping")
        _run_until(loop, lost, 1)
        assert [e["log_failure"].type for e in logged] == [RuntimeError]  # with its traceback
        assert lost[0].check(RuntimeError)  # _disconnectSelectable: the failure reaches connectionLost
        assert port not in reactor.getReaders()
    finally:
        port.socket.close()


def test_a_port_whose_read_returns_a_reason_is_disconnected(loop: CountingLoop) -> None:
    proto = _Received()
    reactor, port = _reactor_with_port(loop, proto, lean=True)
    lost: list[Any] = []
    port.doRead = lambda: error.ConnectionLost("gone")
    port.connectionLost = lambda reason=None: lost.append(reason)
    try:
        _send_to(port, b"ping")
        _run_until(loop, lost, 1)
        assert lost[0].check(error.ConnectionLost)
    finally:
        port.socket.close()
