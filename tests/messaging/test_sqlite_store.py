"""The SQLite message store: durable adds with group commit, marks and deletions, restore at start."""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.task import Clock

from libon_tsilo.messaging.outbox import Outbox
from libon_tsilo.messaging.sqlite_store import SqliteMessageStore
from libon_tsilo.messaging.store import NotStored, StoredMessage


class Manual:
    """A run_in_thread whose batches the test runs (``run()``), to see what shares a commit."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            d.callback(f(*args))
        except Exception:
            d.errback()


def msg(i: int, aor: str = "sip:bob@example.com", expires_at: float = 1000.0) -> StoredMessage:
    return StoredMessage(id=f"m{i}", aor=aor, to_uri="sip:bob@example.com", sender="sip:alice@example.com",
                         sender_name="Alice \u00e9", content_type="text/plain", body=f"body {i}\u2603".encode(),
                         date="Mon, 07 Dec 2026 01:00:00 GMT", created_at=0.0, expires_at=expires_at, seq=i)


def test_adds_share_a_commit_and_fire_only_once_it_is_done(tmp_path):
    clock, runner = Clock(), Manual()
    store = SqliteMessageStore(str(tmp_path / "m.sqlite"), clock, flush_interval=0.002, run_in_thread=runner)
    done: list[str] = []
    for i in range(3):
        store.add(msg(i)).addCallback(lambda _, i=i: done.append(f"m{i}"))
    assert runner.calls == [] and done == []
    clock.advance(0.002)
    assert len(runner.calls) == 1  # one commit for the three
    store.add(msg(3)).addCallback(lambda _: done.append("m3"))  # arrives during the write
    assert done == []
    runner.run()
    assert done == ["m0", "m1", "m2"]
    assert len(runner.calls) == 1  # the next batch started at once
    runner.run()
    assert done == ["m0", "m1", "m2", "m3"]
    assert store.commits == 2


def test_restore_keeps_body_marks_and_drops_expired(tmp_path):
    path = str(tmp_path / "m.sqlite")
    clock = Clock()
    store = SqliteMessageStore(path, clock, run_in_thread=defer.maybeDeferred)
    store.add(msg(1))
    store.add(msg(2))
    store.add(msg(3, expires_at=50.0))
    store.delivered(msg(1), "instance:<urn:uuid:1>")
    store.delivered(msg(2), "pn:webhook|tok|")
    store.delete(msg(2))
    clock.advance(1)
    store.stop()

    again = SqliteMessageStore(path, clock, run_in_thread=defer.maybeDeferred)
    loaded = {m.id: m for m in again.load(now=100.0)}
    assert set(loaded) == {"m1"}  # m2 deleted, m3 expired
    assert loaded["m1"].body == "body 1\u2603".encode() and loaded["m1"].sender_name == "Alice \u00e9"
    assert loaded["m1"].delivered == {"instance:<urn:uuid:1>"}
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM deliveries").fetchone()
    assert rows == (1,)


def test_a_failed_commit_fails_its_adds(tmp_path):
    clock = Clock()
    store = SqliteMessageStore(str(tmp_path / "m.sqlite"), clock, run_in_thread=defer.maybeDeferred)
    store._db.execute("DROP TABLE messages")  # every insert fails now
    failures: list[Any] = []
    store.add(msg(1)).addErrback(failures.append)
    clock.advance(1)
    assert failures and failures[0].check(NotStored)
    assert store.failed_commits == 1


def test_the_outbox_on_sqlite_survives_a_restart(tmp_path):
    path = str(tmp_path / "m.sqlite")
    clock = Clock()
    outbox = Outbox(clock, SqliteMessageStore(path, clock, run_in_thread=defer.maybeDeferred), ttl=600)
    outbox.start()
    added: list[StoredMessage] = []
    for body in (b"one", b"two"):
        outbox.add("sip:bob@example.com", "sip:bob@example.com", "sip:alice@example.com", None, "text/plain",
                   body, "d").addCallback(added.append)
    clock.advance(1)
    assert [m.body for m in added] == [b"one", b"two"]
    outbox.mark_delivered(added[0], "dev-a")
    outbox.stop()

    clock.advance(10)
    again = Outbox(clock, SqliteMessageStore(path, clock, run_in_thread=defer.maybeDeferred), ttl=600)
    assert again.start() == 2
    pending = again.pending("sip:bob@example.com")
    assert [m.body for m in pending] == [b"one", b"two"] and pending[0].delivered == {"dev-a"}
    clock.advance(600)  # their ttl runs from when they were accepted, not from the restart
    assert len(again) == 0
    again.stop()


def test_a_commit_is_synced_before_the_202(tmp_path):
    # the 202 promises the message is durable: in WAL mode synchronous=NORMAL does not sync the WAL
    # at each commit, and an OS crash or power loss may roll back messages already acknowledged
    # (https://www.sqlite.org/pragma.html#pragma_synchronous); FULL syncs it, once per group commit
    store = SqliteMessageStore(str(tmp_path / "m.sqlite"), Clock(), run_in_thread=Manual())
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
