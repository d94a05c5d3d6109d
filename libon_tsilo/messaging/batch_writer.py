"""Group commit for a message store: writes queue up and go in batches, off the reactor thread.

The writes queued while one batch is written share the next one, so a burst of MESSAGEs costs a few
commits, and each sender's 202 waits for the commit that holds its message (``add``). A batch that
fails fails every ``add`` it carried (their senders get a 5xx and send again); the written-behind
marks and deletions it carried are logged as lost (a device may get a message twice, or an expired
message is deleted at the next start). Subclasses say how a batch is written (``_write_sync``, in
the worker thread), how the messages are read back at start (``load``) and how they close.

An op is a tuple: ``("add", id, expires_at, json)``, ``("mark", id, device, expires_at)`` or
``("delete", id)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from libon_tsilo.messaging.store import NotStored, StoredMessage

__all__ = ["BatchWriter", "Op"]

log = Logger()

RunInThread = Callable[..., defer.Deferred]
Op = tuple[Any, ...]


class _Batch:
    __slots__ = ("ops", "waiters")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.waiters: list[tuple[bool, defer.Deferred]] = []  # (fails with the commit?, d)


class BatchWriter:
    """``run_in_thread(f, *args) -> Deferred`` may be injected (tests write synchronously); by
    default a private one-thread pool named ``name`` writes."""

    name = "messages-store"

    def __init__(
        self, clock: IReactorTime, flush_interval: float = 0.002, reactor: Any = None,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        self.clock = clock
        self.flush_interval = max(0.0, min(flush_interval, 1.0))
        self._open = _Batch()
        self._inflight: _Batch | None = None
        self._timer: IDelayedCall | None = None
        self._pool: ThreadPool | None = None
        self._closed = False
        self.commits = 0
        self.failed_commits = 0
        if run_in_thread is None:
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = default_reactor
            pool = self._pool = ThreadPool(minthreads=1, maxthreads=1, name=self.name)
            reactor.addSystemEventTrigger("after", "shutdown", self._stop_pool)

            def run_in_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
                return deferToThreadPool(reactor, pool, f, *args)

        self._run = run_in_thread

    def _start_pool(self) -> None:
        if self._pool is not None and not self._pool.started:
            self._pool.start()

    # -- what subclasses provide ----------------------------------------------------------------

    def load(self, now: float) -> list[StoredMessage]:
        raise NotImplementedError

    def _write_sync(self, ops: list[Op]) -> None:
        """In the worker thread: the whole batch, atomically; raise when it could not be written."""
        raise NotImplementedError

    def _close(self) -> None:
        pass

    # -- MessageStore ---------------------------------------------------------------------------

    def add(self, msg: StoredMessage) -> defer.Deferred[None]:
        if self._closed:
            return defer.fail(NotStored("the message store is stopped"))
        self._queue(("add", msg.id, msg.expires_at, json.dumps(msg.to_dict())))
        d: defer.Deferred[None] = defer.Deferred()
        self._open.waiters.append((True, d))
        return d

    def delivered(self, msg: StoredMessage, device: str) -> None:
        self._queue(("mark", msg.id, device, msg.expires_at))

    def delete(self, msg: StoredMessage) -> None:
        self._queue(("delete", msg.id))

    def flush(self) -> defer.Deferred[None]:
        batch = self._open if self._open.ops else self._inflight
        if batch is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        batch.waiters.append((False, d))
        if batch is self._open:
            self._start()
        return d

    def pending(self) -> int:
        return len(self._open.ops) + (len(self._inflight.ops) if self._inflight else 0)

    def stop(self) -> defer.Deferred[None]:
        d = self.flush()

        def close(_: object) -> None:
            self._closed = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._close()
            self._stop_pool()

        d.addCallback(close)
        return d

    # -- the writer -----------------------------------------------------------------------------

    def _queue(self, op: Op) -> None:
        if self._closed:
            return
        self._open.ops.append(op)
        if self._inflight is None and self._timer is None:
            self._timer = self.clock.callLater(self.flush_interval, self._start)

    def _start(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._inflight is not None or not self._open.ops:
            return
        batch = self._inflight = self._open
        self._open = _Batch()
        d = self._run(self._write_sync, list(batch.ops))
        d.addCallbacks(lambda _: self._finish(batch, None), lambda f: self._finish(batch, f))

    def _finish(self, batch: _Batch, failure: Failure | None) -> None:
        self._inflight = None
        reason = ""
        if failure is None:
            self.commits += 1
        else:
            self.failed_commits += 1
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            log.error("{store}: a commit of {n} writes failed: {reason}", store=self.name, n=len(batch.ops),
                      reason=reason)
        for fails, d in batch.waiters:
            if failure is not None and fails:
                d.errback(NotStored(reason))
            else:
                d.callback(None)
        if not self._closed and self._open.ops and self._timer is None:
            self._start()  # group commit: what queued up during this write goes now

    def _stop_pool(self) -> None:
        if self._pool is not None and self._pool.started:
            self._pool.stop()
