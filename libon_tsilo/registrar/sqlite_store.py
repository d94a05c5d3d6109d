"""Write-behind SQLite persistence of bindings, in batches off the reactor thread.

The in-memory LocationStore is authoritative; this module only keeps a copy that survives a restart.
Changes are coalesced per (aor, key) (last write wins) and written by one transaction per batch at
most ``flush_interval`` seconds after the first change of the batch. The file is in WAL mode with
synchronous=NORMAL: a commit survives the process being killed (not a power cut), which is what
"kill -9 loses nothing older than one batch interval" needs, at a fraction of the fsync cost.

Batches are serialized (a DeferredLock) so one connection is never used by two threads at once and
batches land in order. A failed batch is re-queued unless a newer change superseded it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from libon_tsilo.registrar.binding import Binding
from libon_tsilo.util import redact_key

__all__ = ["SqliteBindingStore"]

log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (
    aor        TEXT NOT NULL,
    key        TEXT NOT NULL,
    expires_at REAL NOT NULL,
    data       TEXT NOT NULL,
    PRIMARY KEY (aor, key)
)
"""

# (aor, key) -> the binding to write, or None to delete the row
Batch = dict[tuple[str, str], Binding | None]
RunInThread = Callable[..., defer.Deferred]


class SqliteBindingStore:
    """Persistence for the location store. ``run_in_thread(f, *args) -> Deferred`` may be injected
    (tests run batches synchronously); by default a private one-thread pool is used."""

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        flush_interval: float = 0.2,
        reactor: Any = None,
        threadpool: ThreadPool | None = None,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.flush_interval = max(0.0, min(flush_interval, 1.0))
        self._pending: Batch = {}
        self._timer: IDelayedCall | None = None
        self._lock = defer.DeferredLock()
        self._owned_pool: ThreadPool | None = None
        if run_in_thread is None:
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = default_reactor
            if threadpool is None:
                threadpool = self._owned_pool = ThreadPool(minthreads=1, maxthreads=1, name="location-sqlite")
                # a worker thread left running would keep the process from exiting if stop() is
                # never called (a crash during start-up): the reactor's shutdown stops it anyway
                reactor.addSystemEventTrigger("after", "shutdown", self._stop_pool)
            pool = threadpool

            def run_in_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
                return deferToThreadPool(reactor, pool, f, *args)

        self._run = run_in_thread
        # opened here (start-up, reactor thread) and then used by one batch at a time in a worker
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._closed = False

    def start(self) -> None:
        if self._owned_pool is not None and not self._owned_pool.started:
            self._owned_pool.start()

    # -- start-up -------------------------------------------------------------------------------

    def load(self, now: float) -> list[Binding]:
        """Every stored binding still alive at ``now``; expired rows are deleted. Runs once, at start,
        before the reactor serves traffic, so it is synchronous."""
        self._db.execute("DELETE FROM bindings WHERE expires_at <= ?", (now,))
        out: list[Binding] = []
        for aor, key, data in self._db.execute("SELECT aor, key, data FROM bindings"):
            try:
                binding = Binding.from_dict(json.loads(data))
            except (ValueError, TypeError, KeyError) as exc:
                log.warn(
                    "location db: dropping unreadable binding {aor} {key}: {err}",
                    aor=aor, key=redact_key(key), err=exc,
                )
                self._db.execute("DELETE FROM bindings WHERE aor = ? AND key = ?", (aor, key))
                continue
            out.append(binding)
        return out

    # -- changes --------------------------------------------------------------------------------

    def save(self, binding: Binding) -> None:
        self._queue((binding.aor, binding.key), binding)

    def delete(self, binding: Binding) -> None:
        self._queue((binding.aor, binding.key), None)

    def _queue(self, ident: tuple[str, str], value: Binding | None) -> None:
        if self._closed:
            return
        self._pending[ident] = value
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(self.flush_interval, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> defer.Deferred:
        """Write everything queued so far; the Deferred fires once it is committed (or failed and
        re-queued). Never errbacks."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        batch, self._pending = self._pending, {}
        if not batch:
            # still wait for a batch in flight, so flush() means "everything so far is on disk"
            return self._lock.run(defer.succeed, None)
        rows = [(ident, json.dumps(b.to_dict()) if b is not None else None, b) for ident, b in batch.items()]
        return self._lock.run(self._write, rows, batch)

    def _write(self, rows: list, batch: Batch) -> defer.Deferred:
        d = self._run(self._write_sync, rows)
        d.addErrback(self._write_failed, batch)
        return d

    def _write_sync(self, rows: list) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            for (aor, key), data, binding in rows:
                if data is None:
                    db.execute("DELETE FROM bindings WHERE aor = ? AND key = ?", (aor, key))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO bindings (aor, key, expires_at, data) VALUES (?, ?, ?, ?)",
                        (aor, key, binding.expires_at, data),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write_failed(self, failure: Any, batch: Batch) -> None:
        log.failure("location db: batch of {n} changes failed; will retry", failure, n=len(batch))
        if self._closed:
            return
        for ident, value in batch.items():
            if ident not in self._pending:
                self._pending[ident] = value
        if self._pending and (self._timer is None or not self._timer.active()):
            self._timer = self.clock.callLater(max(self.flush_interval, 0.5), self._timed_flush)

    # -- shutdown -------------------------------------------------------------------------------

    def stop(self) -> defer.Deferred:
        """Final flush, then close the file and stop the private thread pool."""
        d = self.flush()

        def close(_: object) -> None:
            self._closed = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._db.close()
            self._stop_pool()

        d.addCallback(close)
        return d

    def _stop_pool(self) -> None:
        if self._owned_pool is not None and self._owned_pool.started:
            self._owned_pool.stop()
