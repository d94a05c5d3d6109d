"""Group commit: one batch is written at a time, and what queues meanwhile shares the next write.

The stores whose writes a client waits on (a REGISTER's 200, a MESSAGE's 202) answer only once the
write holding the change is committed. A commit costs the same whatever its size (a thread hand-off,
an fsync or a Redis round trip), so a burst should share a few of them: an idle store waits
``flush_interval`` after its first change, so that a burst lands in one batch; while a batch is
being written the next one fills up, and it goes when the first returns.

``GroupCommit`` holds that schedule and nothing else: the store fills ``open`` (a ``Batch`` of its
own kind), calls ``changed()``, writes the batch it is handed, and calls ``finished()`` when the
write returned (after answering that batch's waiters). A waiter is a Deferred (``wait``), or any
object with a Deferred's ``callback(None)`` and ``errback(reason)`` (``notify``): the registrar's
answer to a REGISTER waits so, without the ~25k instructions of a Deferred and its callback chain.
``WorkerThread`` is the private one-thread pool a blocking writer (SQLite) runs its batches in.

A store whose writes run on an asyncio loop (Redis) gives ``soon`` (the loop's ``call_soon``): with
no ``flush_interval`` an idle store then writes on the loop's next turn, once the rest of the
REGISTER that queued the change has queued its other changes, without a timer (a zero-delay
``callLater`` is a Twisted DelayedCall and a loop timer handle per batch). Changes made between
``hold()`` and ``release()`` (a REGISTER's, LocationStore.hold_writes) schedule nothing: ``release``
writes them at once on such a store, without the loop turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["Batch", "GroupCommit", "RunInThread", "Waiter", "WorkerThread"]

RunInThread = Callable[..., defer.Deferred]


class Waiter(Protocol):
    """Who waits for a batch: ``callback(None)`` once it is written, ``errback(reason)`` (an
    exception) when the store says it failed. A Deferred is one."""

    def callback(self, result: None) -> object: ...

    def errback(self, reason: BaseException) -> object: ...


class Batch(Protocol):
    """Changes written together (a store's own class: ``len()`` counts its changes), and who waits
    for them: ``waiters``, ``(key, Waiter)`` pairs, where the store decides what a key means (which
    change's failure fails it); a None key is a flush, which fires whatever the outcome. A protocol,
    not a base class: this module is compiled (mypyc), and an interpreted class (the SQLite stores')
    cannot subclass a compiled one."""

    waiters: list[tuple[Any, Waiter]]

    def __len__(self) -> int: ...


BatchT = TypeVar("BatchT", bound=Batch)


class GroupCommit(Generic[BatchT]):
    """``write(batch)`` starts writing a batch; the store calls ``finished()`` when it returned."""

    def __init__(
        self, clock: IReactorTime, flush_interval: float, new_batch: Callable[[], BatchT],
        write: Callable[[BatchT], None], soon: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.clock = clock
        self.flush_interval = max(0.0, min(flush_interval, 1.0))
        self._new_batch = new_batch
        self._write = write
        # may be set later (before the first change): a store whose loop is known only at its start
        self.soon = soon
        self.open: BatchT = new_batch()
        self.inflight: BatchT | None = None
        self.closed = False
        self._timer: IDelayedCall | None = None
        self._soon_due = False  # ``soon`` was asked to start the open batch
        self._held = False  # between hold() and release(): changes wait for release()
        self._changed_while_held = False

    def hold(self) -> None:
        """The changes from now until ``release()`` belong together (one REGISTER's, made
        synchronously): none of them schedules a write by itself."""
        self._held = True

    def release(self) -> None:
        """The held changes are all in. An idle store with ``soon`` writes them at once: the loop
        turn ``soon`` waits for would add nothing to them, and costs a turn of its own (~10k
        instructions per REGISTER on the Redis store); a busy one sends them when its batch in
        flight returns, and a store with a ``flush_interval`` waits it, as ``changed()`` does."""
        changed, self._held, self._changed_while_held = self._changed_while_held, False, False
        if not changed or self.closed:
            return
        if self.soon is not None and not self.flush_interval:
            self.start()
        else:
            self.changed()

    def changed(self) -> None:
        """A change went into ``open``: an idle store writes it ``flush_interval`` from now (on the
        loop's next turn with ``soon``), or at ``release()`` while held."""
        if self._held:
            self._changed_while_held = True
            return
        if self.inflight is None and self._timer is None and not self._soon_due:
            if self.soon is not None and not self.flush_interval:
                self._soon_due = True
                self.soon(self.start)
            else:
                self._timer = self.clock.callLater(self.flush_interval, self.start)

    def wait(self, key: Any) -> defer.Deferred | None:
        """A Deferred for the batch holding the changes queued so far (None when nothing waits to
        be written); ``key`` is the store's, handed back with it in the batch's waiters."""
        d: defer.Deferred = defer.Deferred()
        return d if self.notify(key, d) else None

    def notify(self, key: Any, waiter: Waiter) -> bool:
        """``wait`` with a waiter of the caller's; False (and ``waiter`` never called) when nothing
        waits to be written."""
        batch = self.open if len(self.open) else self.inflight
        if batch is None:
            return False
        batch.waiters.append((key, waiter))
        return True

    def flush(self) -> defer.Deferred:
        """Write what is queued now; the Deferred fires once it is written (or failed)."""
        d = self.wait(None)
        if d is None:
            return defer.succeed(None)
        if len(self.open):
            self.start()
        return d

    def pending(self) -> int:
        """Changes queued or being written."""
        return len(self.open) + (len(self.inflight) if self.inflight is not None else 0)

    def start(self) -> None:
        """Write the open batch now, unless one is in flight (it goes when that one returns)."""
        self._soon_due = False  # a turn already asked for finds nothing left, or the next batch
        if self._timer is not None:
            self._cancel_timer()
        if self.inflight is not None or not len(self.open):
            return
        batch = self.inflight = self.open
        self.open = self._new_batch()
        self._write(batch)

    def finished(self, wait: float = 0.0) -> None:
        """The batch in flight returned; what queued meanwhile goes ``wait`` seconds from now
        (at once when that is not positive)."""
        self.inflight = None
        if self.closed or not len(self.open) or self._timer is not None:
            return
        if wait > 0:
            self._timer = self.clock.callLater(wait, self.start)
        else:
            self.start()

    def close(self) -> BatchT:
        """No more writes; returns the batch that will never be written."""
        self.closed = True
        self._cancel_timer()
        lost, self.open = self.open, self._new_batch()
        return lost

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class WorkerThread:
    """A private one-thread pool named ``name``; the reactor's shutdown stops it even when the
    store's ``stop()`` never ran (a crash during start-up), so it never keeps the process alive."""

    def __init__(self, name: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        reactor.addSystemEventTrigger("after", "shutdown", self.stop)

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return deferToThreadPool(self._reactor, self.pool, f, *args)

    def start(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        if self.pool.started:
            self.pool.stop()
