"""Timers on an injected clock: named timer sets, the timed state-machine base every transaction
builds on, and the UA core's 2xx retransmitter (RFC 3261 §13.3.1.4).

Every transaction owns one :class:`TimerSet`; ending the transaction calls ``cancel_all()`` so no
``DelayedCall`` outlives the state machine that scheduled it.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = [
    "ExpiryQueue",
    "ExpiryTimer",
    "LayerServices",
    "SERVER_SLACK_SHARE",
    "State",
    "TimerSet",
    "TransactionBase",
    "TwoXXRetransmitter",
    "backoff",
    "cancel_expiry",
    "final_wait_slack",
    "is_reliable",
]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib


def backoff(interval: float, cap: float) -> float:
    """Next retransmission interval: double, but never beyond ``cap`` (T2)."""
    return min(interval * 2, cap)


class TimerSet:
    """A handful of named one-shot timers (RFC names: "A", "B", ...).

    Starting a timer under a name that is already running replaces it, which is what the
    retransmission timers want when they reschedule themselves.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._calls: dict[str, IDelayedCall] = {}

    def start(self, name: str, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.cancel(name)
        self._calls[name] = self._clock.callLater(delay, self._fire, name, fn, args)

    def _fire(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._calls.pop(name, None)
        fn(*args)

    def cancel(self, name: str) -> None:
        call = self._calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def cancel_all(self) -> None:
        for name in list(self._calls):
            self.cancel(name)

    def __contains__(self, name: object) -> bool:
        return name in self._calls

    def __len__(self) -> int:
        return len(self._calls)

    def names(self) -> list[str]:
        return sorted(self._calls)


# Deadlines are reached when the reactor says so; a float sum (now + delay) may land one ulp past
# the DelayedCall's own time, which must not postpone the expiry to the next wake-up.
_EPSILON = 1e-6

# How late a wait that only ends a transaction may end (final_wait_slack): at most a second.
SLACK_CAP = 1.0
SERVER_SLACK_SHARE = 1.0 / 16  # what the server runs with (ops); 0, the layer's default, is exact


def final_wait_slack(delay: float, share: float) -> float:
    """How late the end of a ``delay`` wait may come when all it does is end a transaction (timers
    D, I, J, K, L, M) or report one that nobody answered (B, F): ``delay * share``, at most
    ``SLACK_CAP``.

    Why any: each of those fires once per transaction, ~5 per call, so at a steady load they were
    reactor wake-ups on top of the messages' own (~3 a call), and a wake-up with nothing in it
    costs 75-200 us of CPU here (bench/wakeup_cost.py). The server runs with
    ``SERVER_SLACK_SHARE``: late by up to ``delay / 16`` (T4: 0.31 s; 64*T1: 1 s), one wake-up
    ends every wait due within that span.
    What it costs: a transaction absorbs retransmissions that much longer (harmless: it answers
    them as it would have), its memory is held that much longer, and a request nobody answers is
    reported (408) up to a second after its 64*T1 (32 s by default)."""
    return min(delay * share, SLACK_CAP)


class ExpiryTimer:
    """One DelayedCall for every ExpiryQueue of a layer, armed for the earliest deadline among them
    (a queue's deadline: its oldest entry's, plus the queue's ``slack``).

    A queue that owned its timer armed and cancelled a DelayedCall each time it went from empty to
    busy and back: the T1 queue (the first resend of timers A, E and of a 2xx) does so for every
    transaction, since nearly every request is answered within T1, and each arm+cancel costs the
    reactor's heap Python-level comparisons among every pending call. Shared with the 64*T1 queue,
    which always holds the final waits of recent calls, the timer is almost never armed anew: an entry
    leaving its queue early leaves the timer where it is (it fires, finds nothing due, re-arms for
    the earliest head), and the timer is cancelled only when every queue is empty.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queues: list[ExpiryQueue] = []
        self._call: IDelayedCall | None = None
        self._at = 0.0  # when _call fires
        self._expiring = False  # inside _expire: it arms the timer for the earliest head when done

    def due(self, deadline: float) -> None:
        """A queue holds an entry due at ``deadline``: fire no later than that."""
        if self._expiring:
            # not from inside _expire (a callback starting a new transaction): it arms for the heads
            return
        call = self._call
        if call is not None:
            if deadline >= self._at - _EPSILON:
                return
            # sooner: a new DelayedCall, since reset() to an earlier time searches the reactor's
            # whole heap (list.index) before it sifts
            if call.active():
                call.cancel()
        self._at = deadline
        self._call = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), self._expire)

    def idle(self) -> None:
        """A queue went empty: no timer stays once every queue is empty."""
        if self._call is None:
            return
        for queue in self._queues:
            if queue._live:
                return
        if self._call.active():
            self._call.cancel()
        self._call = None

    def _expire(self) -> None:
        self._call = None
        self._expiring = True
        try:
            for queue in self._queues:
                queue._expire_due()
        finally:
            self._expiring = False
        earliest: float | None = None
        for queue in self._queues:
            head = queue._head()
            if head is not None:
                head += queue.slack
                if earliest is None or head < earliest:
                    earliest = head
        if earliest is not None and self._call is None:
            self.due(earliest)


class ExpiryQueue:
    """Run callbacks a fixed delay after they were added, with no DelayedCall of their own.

    The wait states that end a transaction (timers J, K, I, D) use the same delay for every
    transaction of a layer, so their deadlines arrive in the order they were set: a FIFO replaces
    the reactor's heap, and one timer (an :class:`ExpiryTimer`, shared by the layer's queues when
    given) armed for the oldest deadline serves thousands of transactions (a DelayedCall per
    transaction cost more than the rest of the transaction layer).
    ``add`` returns a handle for ``discard``; when nothing is left waiting, the timer is cancelled.

    ``slack``: an entry may run up to that much after its deadline (:func:`final_wait_slack`): the
    timer is armed for the oldest deadline plus ``slack``, and when it fires every queue runs all
    that is due, so the entries due within ``slack`` of each other run in one reactor wake-up.
    """

    def __init__(self, clock: IReactorTime, delay: float, timer: ExpiryTimer | None = None,
                 slack: float = 0.0) -> None:
        self._clock = clock
        self.delay = delay
        self.slack = slack
        self._queue: deque[list[Any]] = deque()  # [deadline, callback or None when discarded]
        self._live = 0
        self._timer = timer if timer is not None else ExpiryTimer(clock)
        self._timer._queues.append(self)

    def __len__(self) -> int:
        return self._live

    def add(self, fn: Callable[[], Any]) -> list[Any]:
        # [deadline, callback (None once discarded), this queue]: the entry alone is enough to leave
        deadline = self._clock.seconds() + self.delay
        entry = [deadline, fn, self]
        self._queue.append(entry)
        self._live += 1
        self._timer.due(deadline + self.slack)
        return entry

    def discard(self, entry: list[Any]) -> None:
        if entry[1] is None:
            return
        entry[1] = None
        self._live -= 1
        if self._live == 0:
            self.clear()
            return
        # Timers B and F are discarded by nearly every response, 64*T1 before they reach the head:
        # drop the dead entries once they are a third of the queue, so the queue (and what the
        # garbage collector walks) stays proportional to what really waits. Amortized O(1).
        queue = self._queue
        if len(queue) > 64 and 2 * len(queue) > 3 * self._live:
            self._queue = deque(e for e in queue if e[1] is not None)

    def clear(self) -> None:
        for entry in self._queue:
            entry[1] = None
        self._queue.clear()
        self._live = 0
        self._timer.idle()

    def _head(self) -> float | None:
        """The deadline of the oldest live entry, dropping discarded ones before it."""
        queue = self._queue
        while queue and queue[0][1] is None:
            queue.popleft()
        return queue[0][0] if queue else None

    def _expire_due(self) -> None:
        now = self._clock.seconds() + _EPSILON
        # self._queue is read afresh each time: a callback may discard entries, and discard() may
        # replace the deque with a purged copy
        while self._queue and self._queue[0][0] <= now:
            entry = self._queue.popleft()
            fn = entry[1]
            if fn is None:
                continue
            entry[1] = None
            self._live -= 1
            try:
                fn()
            except Exception:
                log.failure("expiry callback {fn!r} failed", fn=fn)


def cancel_expiry(entry: list[Any]) -> None:
    """Take an entry that :meth:`ExpiryQueue.add` returned out of its queue, whichever queue that
    is (the entry names it); nothing if it ran or was cancelled already."""
    entry[2].discard(entry)


class TwoXXRetransmitter:
    """Retransmit a 2xx to INVITE until its ACK arrives (the UA core's job, not the transaction's).

    The first copy is sent by the caller (through the server transaction); this object sends the
    copies: after T1, then doubling up to T2, until ``stop()``. After 64*T1 without an ACK it stops
    and calls ``on_give_up()`` so the TU can tear the dialog down (RFC 3261 §13.3.1.4).
    On reliable flows pass ``retransmit=False``: nothing is resent but the 64*T1 deadline still runs.
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Callable[[], Any],
        t1: float,
        t2: float,
        on_give_up: Callable[[], Any],
        retransmit: bool = True,
        expiry: Callable[[float], ExpiryQueue] | None = None,
    ) -> None:
        self._send = send
        self._t2 = t2
        self._on_give_up = on_give_up
        self._interval = t1
        self._timers = TimerSet(clock)
        # With ``expiry`` (the transaction layer's shared queues by delay) the two fixed-delay timers,
        # the first resend after T1 and the 64*T1 deadline, take a place in a shared ExpiryQueue
        # instead of a DelayedCall each: almost every 2xx is ACKed before either fires.
        self._waits: list[tuple[ExpiryQueue, list[Any]]] = []
        if retransmit:
            if expiry is None:
                self._timers.start("G2xx", t1, self._resend)
            else:
                queue = expiry(t1)
                self._waits.append((queue, queue.add(self._resend)))
        if expiry is None:
            self._timers.start("giveup", 64 * t1, self._give_up)
        else:
            queue = expiry(64 * t1)
            self._waits.append((queue, queue.add(self._give_up)))

    @property
    def active(self) -> bool:
        return len(self._timers) > 0 or any(entry[1] is not None for _, entry in self._waits)

    def _resend(self) -> None:
        try:
            self._send()
        except Exception:
            # A transport that fails once may recover; the 64*T1 deadline bounds the attempts.
            log.failure("2xx retransmission failed")
        self._interval = backoff(self._interval, self._t2)
        self._timers.start("G2xx", self._interval, self._resend)

    def _give_up(self) -> None:
        self.stop()
        self._on_give_up()

    def stop(self) -> None:
        self._timers.cancel_all()
        waits, self._waits = self._waits, []
        for queue, entry in waits:
            queue.discard(entry)


class State(enum.StrEnum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"  # RFC 6026: a 2xx to INVITE was sent / received
    TERMINATED = "Terminated"


class LayerServices(Protocol):
    """The part of TransactionLayer a transaction calls back into."""

    transport: Any
    clock: IReactorTime
    # read-only properties, not plain attributes: mypyc 1.20's code generator crashes on a float
    # attribute of a Protocol (an AssertionError in emit_method_call); a plain attribute satisfies them
    @property
    def t1(self) -> float: ...

    @property
    def t2(self) -> float: ...

    @property
    def t4(self) -> float: ...

    def forget(self, txn: TransactionBase) -> None: ...

    def tu_hook(self, name: str, *args: Any) -> None: ...

    def send_request(self, req: Any, target: Any, flow: Any, on_response: Callable[[Any], Any]) -> Any: ...

    def expiry(self, delay: float, slack: float = 0.0) -> ExpiryQueue: ...

    def final_slack(self, delay: float) -> float: ...


def is_reliable(transport_name: str | None) -> bool:
    """Only UDP needs retransmissions; every stream transport (tcp, tls, ws...) is reliable."""
    return (transport_name or "udp").lower() != "udp"


class TransactionBase:
    """A state machine with its own timers, removed from the layer's table when it terminates.

    At 1,000 calls/s some 30,000 transactions sit in their final wait (timers J, L, M: 64*T1) at
    any time, and every object they hold is one more for each garbage collection to walk: a
    transaction has slots (no attribute dict), creates its TimerSet only when it starts a timer
    and drops it, idle, when it enters its final wait, and is itself its ExpiryQueue callback.
    """

    __slots__ = ("layer", "key", "id", "state", "reliable", "_timers", "_expiry")

    def __init__(self, layer: LayerServices, key: tuple[Any, ...], txn_id: str) -> None:
        self.layer = layer
        self.key = key
        self.id = txn_id
        self.state: State = State.TERMINATED
        self.reliable = False
        self._timers: TimerSet | None = None
        # the place in one of the layer's ExpiryQueues (final wait, or timer B/F), to leave it early
        self._expiry: list[Any] | None = None

    @property
    def timers(self) -> TimerSet:
        timers = self._timers
        if timers is None:
            timers = self._timers = TimerSet(self.layer.clock)
        return timers

    def _cancel_timer(self, name: str) -> None:
        if self._timers is not None:
            self._timers.cancel(name)

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def terminate(self) -> None:
        """Stop every timer and leave the layer's table; safe to call twice."""
        if self._timers is not None:
            self._timers.cancel_all()
        self._end_wait()
        if self.state is not State.TERMINATED:
            self.state = State.TERMINATED
            self.layer.forget(self)

    # the ExpiryQueue callback of the final wait: the transaction itself, not a bound method object
    def __call__(self) -> None:
        self.terminate()

    def halt(self) -> None:
        """Service stop: cancel timers without telling anyone."""
        if self._timers is not None:
            self._timers.cancel_all()
        self._end_wait()
        self.state = State.TERMINATED

    def _end_wait(self) -> None:
        entry = self._expiry
        if entry is not None:
            self._expiry = None
            entry[2].discard(entry)

    def _final_wait(self, delay: float) -> None:
        if self._timers is not None and not self._timers:
            self._timers = None
        self._expiry = self.layer.expiry(delay, self.layer.final_slack(delay)).add(self)

    def _wait_then_terminate(self, name: str, delay: float) -> None:
        """Timers D, I, J, K: terminate after ``delay``. Reliable transports use a zero wait: end at
        once. Otherwise the layer's shared queue for that delay ends us (one DelayedCall for all)."""
        if delay <= 0:
            self.terminate()
        else:
            self._final_wait(delay)

    def _accepted_wait(self) -> None:
        """Timers L and M (RFC 6026): terminate 64*T1 after the 2xx, on every transport. The delay is
        the same for every transaction of the layer, so a place in its shared ExpiryQueue replaces a
        DelayedCall (a callLater + cancel and the reactor heap's Python-level comparisons per call)."""
        self._final_wait(64 * self.layer.t1)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state}>"
