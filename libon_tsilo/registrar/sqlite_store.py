"""SQLite persistence of bindings with group commit, written off the reactor thread.

The in-memory LocationStore answers every lookup; this module keeps the copy that survives a restart
and says when a change is on disk, so that a REGISTER is answered 200 only once its binding would
survive kill -9. Group commit: the REGISTERs that arrive while one commit runs share the next one,
and each is answered when that commit returns.

Changes are coalesced per (aor, key) (last write wins) into the open batch. An idle store starts a
batch ``flush_interval`` after its first change (a short wait that lets a burst share one commit);
while a batch is being written the next one fills up, and it starts when the first returns, or
``flush_interval`` after the first started if that is later: under load, one commit every few ms.
The file is in WAL mode with synchronous=NORMAL: a commit survives the process being killed (not a
power cut), at a fraction of the cost of an fsync per commit.

One bad row never blocks the others. A batch whose transaction fails is written again with one
savepoint per row (still one commit): a row that fails on its own is skipped and logged with the
reason (its data would fail forever), a row that fails because the database does (locked, disk
full, I/O error) is queued again and retried after a pause. Either way the REGISTERs waiting for
that AOR are told, and answer 5xx instead of 200.

Text is stored losslessly. The parser keeps bytes that are not UTF-8 as surrogates
(surrogateescape), which SQLite refuses as TEXT: such an aor or key is stored as a BLOB of the
original bytes (never equal to a TEXT value, so it cannot collide with a valid key), and the JSON
of the row escapes them (json round-trips lone surrogates).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from libon_tsilo.group_commit import GroupCommit, RunInThread, Waiter, WorkerThread
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.registrar.location import NotStored, StoreClosed
from libon_tsilo.util import redact_key

__all__ = ["SqliteBindingStore", "sql_text"]

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
_UPSERT = "INSERT OR REPLACE INTO bindings (aor, key, expires_at, data) VALUES (?, ?, ?, ?)"
_DELETE = "DELETE FROM bindings WHERE aor = ? AND key = ?"
# a database that fails as a whole (locked, disk full) is not hammered: failed rows wait this long
RETRY_DELAY = 0.5

Ident = tuple[str, str]  # (aor, key)
# one change of a batch: (aor, key, expires_at, data); data None deletes; aor/key bytes: see sql_text
Row = tuple[str | bytes, str | bytes, float, str | None]
# a row that failed: (its index in the batch, reason, retryable)
RowFailure = tuple[int, str, bool]


def sql_text(text: str) -> str | bytes:
    """``text`` as SQLite can bind it: itself, or its original bytes when it holds surrogates."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")
    return text


class _Batch:
    """Changes committed together; a waiter's key is an aor: it fails when a change of it failed."""

    __slots__ = ("waiters", "changes")

    def __init__(self) -> None:
        self.waiters: list[tuple[Any, Waiter]] = []  # group_commit.Batch
        self.changes: dict[Ident, Binding | None] = {}  # None: delete the row

    def __len__(self) -> int:
        return len(self.changes)


class SqliteBindingStore:
    """Persistence for the location store. ``run_in_thread(f, *args) -> Deferred`` may be injected
    (tests run batches synchronously); by default a private one-thread pool is used."""

    feeds_replica = False  # restored synchronously by LocationStore.start(): see load()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        flush_interval: float = 0.002,
        reactor: Any = None,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self._commit: GroupCommit[_Batch] = GroupCommit(clock, flush_interval, _Batch, self._write)
        # a REGISTER's changes (LocationStore.hold_writes/release_writes): flush_interval after them
        self.hold_writes = self._commit.hold
        self.release_writes = self._commit.release
        self._last_start = float("-inf")
        self._worker: WorkerThread | None = None
        self.commits = 0  # batches committed
        self.rows_written = 0
        self.rows_skipped = 0  # rows whose data failed on their own: dropped, logged
        self.rows_retried = 0  # rows that failed with the database: queued again
        if run_in_thread is None:
            self._worker = WorkerThread("location-sqlite", reactor)
            run_in_thread = self._worker.run
        self._run = run_in_thread
        # opened here (start-up, reactor thread) and then used by one batch at a time in a worker
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    @property
    def flush_interval(self) -> float:
        return self._commit.flush_interval

    def start(self) -> None:
        if self._worker is not None:
            self._worker.start()

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
                    aor=_shown(aor), key=redact_key(_shown(key)), err=exc,
                )
                self._db.execute(_DELETE, (aor, key))
                continue
            out.append(binding)
        return out

    # -- changes --------------------------------------------------------------------------------

    def save(self, binding: Binding) -> None:
        self._queue((binding.aor, binding.key), binding)

    def delete(self, binding: Binding, reason: str = "") -> None:
        self._queue((binding.aor, binding.key), None)

    def _queue(self, ident: Ident, value: Binding | None) -> None:
        if self._commit.closed:
            return
        self._commit.open.changes[ident] = value
        self._commit.changed()

    def when_committed(self, aor: str) -> defer.Deferred | None:
        """A Deferred that fires once the changes queued so far are committed, or fails with
        NotStored when one of ``aor``'s failed. None when nothing is waiting to be written."""
        d: defer.Deferred = defer.Deferred()
        return d if self.notify_committed(aor, d) else None

    def notify_committed(self, aor: str, waiter: Waiter) -> bool:
        """``when_committed`` with a waiter of the caller's (group_commit.Waiter); False, and
        ``waiter`` never called, when nothing is waiting to be written."""
        if self._commit.closed:
            waiter.errback(StoreClosed("the location store is stopped"))
            return True
        return self._commit.notify(aor, waiter)

    def flush(self) -> defer.Deferred:
        """Write everything queued so far now; the Deferred fires once it is committed (or failed:
        see the module doc). Never errbacks."""
        return self._commit.flush()

    def pending(self) -> int:
        """Changes queued or being written."""
        return self._commit.pending()

    # -- the writer -----------------------------------------------------------------------------

    def _write(self, batch: _Batch) -> None:
        self._last_start = self.clock.seconds()
        idents = list(batch.changes)
        rows: list[Row | None] = []
        failures: list[RowFailure] = []
        for i, ident in enumerate(idents):
            # serialized here, on the reactor thread, so the row is a consistent snapshot
            try:
                rows.append(_row(ident, batch.changes[ident]))
            except Exception as exc:
                failures.append((i, f"{type(exc).__name__}: {exc}", False))
                rows.append(None)  # indexes stay those of idents
        d = self._run(self._write_sync, rows)
        d.addCallbacks(
            lambda more: self._finish(batch, idents, failures + more),
            lambda failure: self._crashed(failure, batch, idents),
        )

    def _write_sync(self, rows: list[Row | None]) -> list[RowFailure]:
        """In the worker thread: the batch in one transaction; row by row if that fails."""
        numbered = [(i, row) for i, row in enumerate(rows) if row is not None]
        upserts = [row for _, row in numbered if row[3] is not None]
        deletes = [row[:2] for _, row in numbered if row[3] is None]
        db = self._db
        try:
            db.execute("BEGIN")
            if upserts:
                db.executemany(_UPSERT, upserts)
            if deletes:
                db.executemany(_DELETE, deletes)
            db.execute("COMMIT")
            return []
        except Exception:
            self._rollback()
        return self._write_rows_apart(numbered)

    def _write_rows_apart(self, rows: list[tuple[int, Row]]) -> list[RowFailure]:
        """One transaction, a savepoint per row: a row that fails is reported, the others commit."""
        db = self._db
        failed: list[RowFailure] = []
        try:
            db.execute("BEGIN")
            for i, row in rows:
                db.execute("SAVEPOINT one_row")
                try:
                    if row[3] is None:
                        db.execute(_DELETE, row[:2])
                    else:
                        db.execute(_UPSERT, row)
                except Exception as exc:
                    db.execute("ROLLBACK TO one_row")
                    # OperationalError is the database failing (locked, full, I/O), not this row
                    retryable = isinstance(exc, sqlite3.OperationalError)
                    failed.append((i, f"{type(exc).__name__}: {exc}", retryable))
                db.execute("RELEASE one_row")
            db.execute("COMMIT")
        except Exception as exc:
            # the transaction itself failed: nothing of these rows is on disk
            self._rollback()
            reason = f"{type(exc).__name__}: {exc}"
            return [(i, reason, True) for i, _ in rows]
        return failed

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the connection is beyond repair; the next BEGIN reports it

    def _crashed(self, failure: Failure, batch: _Batch, idents: list[Ident]) -> None:
        log.failure("location db: writing a batch of {n} changes failed", failure, n=len(idents))
        reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self._finish(batch, idents, [(i, reason, True) for i in range(len(idents))])

    def _finish(self, batch: _Batch, idents: list[Ident], failures: list[RowFailure]) -> None:
        """Back on the reactor: account for failed rows, answer the waiters, start the next batch."""
        failed_aors: dict[str, str] = {}
        retry = 0
        for i, reason, retryable in failures:
            ident = idents[i]
            failed_aors.setdefault(ident[0], reason)
            if not retryable:
                self.rows_skipped += 1
                log.warn(
                    "location db: change of binding {key} of {aor} skipped, it cannot be stored: {reason}",
                    aor=_shown(ident[0]), key=redact_key(_shown(ident[1])), reason=reason,
                )
            elif not self._commit.closed and ident not in self._commit.open.changes:  # else superseded
                self._commit.open.changes[ident] = batch.changes[ident]
                retry += 1
        self.rows_retried += retry
        if failures:
            log.warn(
                "location db: {failed} of {n} changes not written ({reason}); {retry} queued again",
                failed=len(failures), n=len(idents), reason=failures[0][1], retry=retry,
            )
        if len(failures) < len(idents):
            self.commits += 1
            self.rows_written += len(idents) - len(failures)
        for aor, d in batch.waiters:
            if aor is not None and aor in failed_aors:
                d.errback(NotStored(failed_aors[aor]))
            else:
                d.callback(None)
        # group commit: what queued up during this write goes next, at most one commit per
        # flush_interval (each costs a thread hand-off and a reactor wake-up, whatever its size)
        next_start = self._last_start + self.flush_interval - self.clock.seconds()
        self._commit.finished(RETRY_DELAY if retry else next_start)

    # -- shutdown -------------------------------------------------------------------------------

    def stop(self) -> defer.Deferred:
        """Final flush, then close the file and stop the private thread pool."""
        d = self.flush()

        def close(_: object) -> None:
            lost = self._commit.close()
            if len(lost):
                log.error("location db: {n} changes not written at shutdown", n=len(lost))
            self._db.close()
            if self._worker is not None:
                self._worker.stop()

        d.addCallback(close)
        return d


def _row(ident: Ident, binding: Binding | None) -> Row:
    aor, key = sql_text(ident[0]), sql_text(ident[1])
    if binding is None:
        return (aor, key, 0.0, None)
    # ensure_ascii (the default) writes surrogates as \\udcXX escapes: the JSON is always valid text
    return (aor, key, float(binding.expires_at), json.dumps(binding.to_dict()))


def _shown(value: str | bytes) -> str:
    """An aor/key for a log line, printable whatever bytes it holds."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value.encode("utf-8", "backslashreplace").decode("utf-8")
