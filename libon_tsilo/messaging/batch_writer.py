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
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from libon_tsilo.group_commit import GroupCommit, RunInThread, Waiter, WorkerThread
from libon_tsilo.messaging.store import NotStored, StoredMessage

__all__ = ["BatchWriter", "Op", "RunInThread"]

log = Logger()

Op = tuple[Any, ...]


class _Batch:
    __slots__ = ("waiters", "ops")

    def __init__(self) -> None:
        self.waiters: list[tuple[Any, Waiter]] = []  # group_commit.Batch
        self.ops: list[Op] = []  # waiters: (msg id, d) fails with the commit; (None, d) never fails

    def __len__(self) -> int:
        return len(self.ops)


class BatchWriter:
    """``run_in_thread(f, *args) -> Deferred`` may be injected (tests write synchronously); by
    default a private one-thread pool named ``name`` writes."""

    name = "messages-store"

    def __init__(
        self, clock: IReactorTime, flush_interval: float = 0.002, reactor: Any = None,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        self.clock = clock
        self._commit: GroupCommit[_Batch] = GroupCommit(clock, flush_interval, _Batch, self._write)
        self._worker: WorkerThread | None = None
        self.commits = 0
        self.failed_commits = 0
        if run_in_thread is None:
            self._worker = WorkerThread(self.name, reactor)
            run_in_thread = self._worker.run
        self._run = run_in_thread

    @property
    def flush_interval(self) -> float:
        return self._commit.flush_interval

    def _start_pool(self) -> None:
        if self._worker is not None:
            self._worker.start()

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
        if self._commit.closed:
            return defer.fail(NotStored("the message store is stopped"))
        self._queue(("add", msg.id, msg.expires_at, json.dumps(msg.to_dict())))
        d = self._commit.wait(msg.id)
        assert d is not None  # the add above is in the open batch
        return d

    def delivered(self, msg: StoredMessage, device: str) -> None:
        self._queue(("mark", msg.id, device, msg.expires_at))

    def delete(self, msg: StoredMessage) -> None:
        self._queue(("delete", msg.id))

    def flush(self) -> defer.Deferred[None]:
        return self._commit.flush()

    def pending(self) -> int:
        return self._commit.pending()

    def stop(self) -> defer.Deferred[None]:
        d = self.flush()

        def close(_: object) -> None:
            self._commit.close()
            self._close()
            if self._worker is not None:
                self._worker.stop()

        d.addCallback(close)
        return d

    # -- the writer -----------------------------------------------------------------------------

    def _queue(self, op: Op) -> None:
        if self._commit.closed:
            return
        self._commit.open.ops.append(op)
        self._commit.changed()

    def _write(self, batch: _Batch) -> None:
        d = self._run(self._write_sync, list(batch.ops))
        d.addCallbacks(lambda _: self._finish(batch, None), lambda f: self._finish(batch, f))

    def _finish(self, batch: _Batch, failure: Failure | None) -> None:
        reason = ""
        if failure is None:
            self.commits += 1
        else:
            self.failed_commits += 1
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            log.error("{store}: a commit of {n} writes failed: {reason}", store=self.name, n=len(batch.ops),
                      reason=reason)
        for key, d in batch.waiters:
            if failure is not None and key is not None:
                d.errback(NotStored(reason))
            else:
                d.callback(None)
        self._commit.finished()  # group commit: what queued up during this write goes now
