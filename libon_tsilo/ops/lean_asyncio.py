"""Twisted's asyncio reactor, with a loop timer re-armed only when the earliest deadline moves earlier,
and the server's UDP listeners read without Twisted's per-event wrapping.

Twisted's ``AsyncioSelectorReactor`` keeps its DelayedCalls in its own heap and one asyncio timer
for the earliest. Its ``callLater`` decides whether to re-arm that timer by comparing a deadline it
computes afresh, ``loop.time() + timeout()``, with the one it armed: two clocks read one after the
other (the loop's monotonic one, then ``time.time()`` inside ``timeout()``), so for an unchanged
earliest call the two differ by the nanoseconds between the reads, and about half of all calls
re-arm (a ``timeout()``, a handle cancelled, a ``call_at``) for nothing: 8 re-arms per late-fork
call (bench/redis_cost.py). Here the comparison is made on the reactor's own deadlines
(``DelayedCall.time``), which are exact: a new call re-arms the timer only when it is due before
the one armed. A call due at once (``callLater(0, ...)``: ``callFromThread``, ``stop``,
``deferLater(reactor, 0)``) runs from the loop's next turn (``call_soon``) instead of from a timer
armed for now (then re-armed for the next deadline), and a cancelled call at the head of the heap
is dropped before the timer is armed, rather than woken for. What runs when, and in which order,
is unchanged.

uvloop's timers count whole milliseconds from a clock truncated to the millisecond (libuv's
``uv_now``), and a delay that rounds to 0 ms runs from the loop's next turn: a timer armed for a
deadline 2.4 ms away fires up to 1.5 ms early, the reactor finds nothing due, re-arms for the
0.9 ms left (fires early again), then for less than 0.5 ms, which runs at once, turn after turn
until the deadline passes: 34 loop turns per timed call (13,775 for 400 calls), ~12 per late-fork
call on a node of the Redis store. On such a loop the timer is armed for the delay rounded up to
the next millisecond, plus one: it fires once, at the deadline or up to 2 ms after it (SIP's
timers are 500 ms and up). The stdlib loop's clock is exact: its timers get the delay as it is.

Per readable event, Twisted's ``addReader`` has the loop call ``log.callWithLogger`` (the
selectable's ``logPrefix()`` pushed as the legacy log context around the call), then
``_readOrWrite`` (a ``fileno()`` check), then ``doRead``: the wrapping ops/lean_epoll.py takes off
the epoll reactor. For a reader of one of the ``lean_readers`` types (ops/reactor.py names the SIP
UDP port, whose ``doRead`` logs through ``twisted.logger`` and never reads that context) the loop
calls ``_lean_read`` instead, which is ``_readOrWrite`` without the check: a ``doRead`` that
raises or returns a reason is logged and disconnected as Twisted does. Every other reader and
every writer keeps Twisted's path.
"""

from __future__ import annotations

import asyncio
from heapq import heappop
from math import ceil
from typing import Any, Callable

from twisted.internet.asyncioreactor import AsyncioSelectorReactor
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.posixbase import PosixReactorBase

__all__ = ["LeanAsyncioReactor", "install"]

# what Twisted's timeout() caps a wait at (a 32-bit count of milliseconds)
_LONGEST = 2147483.0


class LeanAsyncioReactor(AsyncioSelectorReactor):
    """``AsyncioSelectorReactor`` whose loop timer is re-armed only for an earlier deadline, and
    whose ``lean_readers`` types are read without the per-event wrapping."""

    lean_readers: frozenset[type] = frozenset()

    def __init__(self, eventloop: asyncio.AbstractEventLoop | None = None) -> None:
        # the reactor time (``seconds()``) the loop's timer is armed for; None when none is armed
        self._armed_for: float | None = None
        # a loop callback is queued that runs the calls due now (callLater(0, ...))
        self._soon = False
        super().__init__(eventloop)
        # a loop whose timers count whole milliseconds (uvloop): see the module doc
        self._whole_ms = any(c.__module__.startswith("uvloop") for c in type(self._asyncioEventloop).__mro__)

    def addReader(self, reader: IReadDescriptor) -> None:
        if type(reader) not in self.lean_readers:
            super().addReader(reader)
            return
        if reader in self._readers:
            return
        fd = reader.fileno()
        # a socket (the lean types are ports): never one of the files epoll refuses, which
        # Twisted's addReader polls continuously instead
        self._asyncioEventloop.add_reader(fd, self._lean_read, reader)
        self._readers[reader] = fd  # type: ignore[index]

    def _lean_read(self, reader: Any) -> None:
        try:
            why = reader.doRead()
        except Exception as e:
            why = e
            self._log.failure("reading {reader!r} failed", reader=reader)
        if why:
            self._disconnectSelectable(reader, why, True)

    def _onTimer(self) -> None:
        self._timerHandle = None
        self._armed_for = None
        self._scheduledAt = None
        self.runUntilCurrent()
        self._reschedule()

    def _onSoon(self) -> None:
        self._soon = False
        self.runUntilCurrent()
        self._reschedule()

    def _reschedule(self) -> None:
        if self._soon:
            return  # the loop's next turn runs what is due, then arms the timer for what is not
        self._insertNewDelayedCalls()
        heap = self._pendingTimedCalls
        # a cancelled call stays in the heap until due: no loop wake-up for it when it is first
        while heap and heap[0].cancelled:
            heappop(heap)
            self._cancellations -= 1
        if not heap:
            return
        when = heap[0].time
        armed = self._armed_for
        if armed is None or when < armed:
            self._arm(when)

    def _arm(self, when: float) -> None:
        handle = self._timerHandle
        if handle is not None:
            handle.cancel()
        self._armed_for = when
        delay = max(0.0, min(_LONGEST, when - self.seconds()))
        if self._whole_ms:
            # never early: a truncated start and a rounded count each lose up to a millisecond
            delay = (ceil(delay * 1000.0) + 1) / 1000.0
        # call_later, not call_at(loop.time() + delay): uvloop's call_at is call_later of the
        # deadline less its clock read again, a second Python-level call and clock read per arm
        # (~2k instructions; a late-fork call arms ~3 times, an idle node 10 times a second)
        self._timerHandle = self._asyncioEventloop.call_later(delay, self._onTimer)  # type: ignore[assignment]

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> DelayedCall:
        dc = PosixReactorBase.callLater(self, delay, callable, *args, **kwargs)
        if self._soon:
            return dc  # the loop's next turn runs what is due, then arms the timer for what is not
        if delay <= 0:
            # due now: run on the loop's next turn (as a timer due now would), without arming a
            # loop timer for it and another for the next deadline once it ran
            self._soon = True
            self._asyncioEventloop.call_soon(self._onSoon)
            return dc
        armed = self._armed_for
        if armed is None or dc.time < armed:
            self._arm(dc.time)
        return dc


def install(eventloop: asyncio.AbstractEventLoop | None = None) -> LeanAsyncioReactor:
    """Install it as Twisted's reactor (as ``asyncioreactor.install`` does); returns it."""
    from twisted.internet.main import installReactor

    reactor = LeanAsyncioReactor(eventloop)
    installReactor(reactor)
    return reactor
