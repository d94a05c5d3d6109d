"""The outbox on SQLite (``[messages] db``, its own file), with group commit (batch_writer.py).

WAL mode, synchronous=FULL (the bindings' file has NORMAL): a commit survives the process being
killed, and the machine losing power.
Two tables: the messages (JSON rows, with their expiry for the clean-up at start) and the devices
each was delivered to.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.messaging.batch_writer import BatchWriter, Op, RunInThread
from libon_tsilo.messaging.store import StoredMessage

__all__ = ["SqliteMessageStore"]

log = Logger()

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        id         TEXT PRIMARY KEY,
        expires_at REAL NOT NULL,
        data       TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS deliveries (
        id     TEXT NOT NULL,
        device TEXT NOT NULL,
        PRIMARY KEY (id, device)
    )""",
)
_INSERT = "INSERT OR REPLACE INTO messages (id, expires_at, data) VALUES (?, ?, ?)"
_MARK = "INSERT OR IGNORE INTO deliveries (id, device) VALUES (?, ?)"
_DELETE = "DELETE FROM messages WHERE id = ?"
_UNMARK = "DELETE FROM deliveries WHERE id = ?"


class SqliteMessageStore(BatchWriter):
    name = "messages-sqlite"

    def __init__(
        self, path: str, clock: IReactorTime, flush_interval: float = 0.002, reactor: Any = None,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        super().__init__(clock, flush_interval, reactor, run_in_thread)
        self.path = path
        # opened on the reactor thread at start-up, then used by one batch at a time in the worker
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL, not the bindings' NORMAL: a 202 promises the message survives, and in WAL mode NORMAL
        # lets an OS crash or power loss roll back commits already acknowledged; one fsync per group
        # commit (hundreds of messages) is the price
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._db.execute(statement)

    def load(self, now: float) -> list[StoredMessage]:
        self._start_pool()
        db = self._db
        db.execute("DELETE FROM messages WHERE expires_at <= ?", (now,))
        db.execute("DELETE FROM deliveries WHERE id NOT IN (SELECT id FROM messages)")
        marks: dict[str, set[str]] = {}
        for msg_id, device in db.execute("SELECT id, device FROM deliveries"):
            marks.setdefault(msg_id, set()).add(device)
        out = []
        for msg_id, data in db.execute("SELECT id, data FROM messages").fetchall():
            try:
                out.append(StoredMessage.from_dict(json.loads(data), marks.get(msg_id)))
            except (ValueError, TypeError, KeyError) as exc:
                log.warn("messages db: dropping unreadable message {id}: {err}", id=msg_id, err=exc)
                db.execute(_DELETE, (msg_id,))
                db.execute(_UNMARK, (msg_id,))
        return out

    def _write_sync(self, ops: list[Op]) -> None:
        db = self._db
        try:
            db.execute("BEGIN")
            for op in ops:
                if op[0] == "delete":
                    db.execute(_DELETE, op[1:])
                    db.execute(_UNMARK, op[1:])
                elif op[0] == "mark":
                    db.execute(_MARK, op[1:3])
                else:
                    db.execute(_INSERT, op[1:])
            db.execute("COMMIT")
        except Exception:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _close(self) -> None:
        self._db.close()
