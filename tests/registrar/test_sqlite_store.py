"""SQLite persistence: batches on the clock, restore with remaining expiry, real thread pool."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from libon_tsilo.registrar.location import LocationStore, NotStored, StoreClosed
from libon_tsilo.registrar.sqlite_store import SqliteBindingStore
from tests.fakes.sip import FakeFlow
from tests.registrar.helpers import make_binding, run_sync


def _open(path: Path, clock: Clock) -> LocationStore:
    persistence = SqliteBindingStore(str(path), clock, flush_interval=0.2, run_in_thread=run_sync)
    store = LocationStore(clock, persistence)
    store.start()
    return store


def _rows(path: Path) -> int:
    db = sqlite3.connect(str(path))
    try:
        return db.execute("SELECT count(*) FROM bindings").fetchone()[0]
    finally:
        db.close()


def test_batches_are_written_after_the_interval(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "loc.sqlite"
    store = _open(path, clock)
    store.add_or_update(make_binding(uri="sip:a@h", expires_at=100.0))
    store.add_or_update(make_binding(uri="sip:b@h", expires_at=100.0))
    assert _rows(path) == 0  # not yet: write-behind
    clock.advance(0.2)
    assert _rows(path) == 2
    store.remove(store.lookup("sip:alice@example.com")[0], "unregistered")
    clock.advance(0.2)
    assert _rows(path) == 1
    store.stop()


def test_restore_with_remaining_expiry(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "loc.sqlite"
    store = _open(path, clock)
    flow = FakeFlow(id="tcp#9")
    b = make_binding(
        uri="sip:a@h;transport=tcp",
        expires_at=300.0,
        flow_id="tcp#9",
        flow_live=True,
        received=("tcp", "192.0.2.10", 40000),
        path=["<sip:edge;lr>"],
        pn_provider="fcm",
        pn_prid="tok",
        pn_param="proj",
        instance='"<urn:uuid:1>"',
        reg_id=1,
        q=0.7,
    )
    store.add_or_update(b, flow)
    store.add_or_update(make_binding(uri="sip:short@h", expires_at=50.0))
    clock.advance(0.2)  # one batch interval: both are now durable
    # the first process "dies" without flushing anything else
    clock2 = Clock()
    clock2.advance(100.0)
    store2 = _open(path, clock2)
    [restored] = store2.lookup("sip:alice@example.com")  # the 50 s one expired while we were down
    assert restored.key == b.key
    assert restored.remaining(clock2.seconds()) == 200
    assert restored.received == ("tcp", "192.0.2.10", 40000)
    assert restored.path == ["<sip:edge;lr>"]
    pn = (restored.pn_provider, restored.pn_prid, restored.pn_param, restored.q)
    assert pn == ("fcm", "tok", "proj", 0.7)
    assert restored.flow_live is False and restored.flow_id is None
    assert _rows(path) == 1  # the expired row was purged at load
    # and the restored one is purged by the timer when it runs out
    clock2.advance(200)
    assert store2.all_count() == 0
    clock2.advance(0.2)
    assert _rows(path) == 0
    store2.stop()
    store.stop()


def test_unreadable_row_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "loc.sqlite"
    clock = Clock()
    store = _open(path, clock)
    store.stop()
    db = sqlite3.connect(str(path))
    db.execute("INSERT INTO bindings VALUES ('a', 'k', 1e12, 'not json')")
    db.commit()
    db.close()
    store2 = _open(path, clock)
    assert store2.all_count() == 0
    assert _rows(path) == 0
    store2.stop()


def test_failed_batch_is_requeued(tmp_path: Path) -> None:
    clock = Clock()
    calls: list[int] = []

    def flaky(f, *args):  # noqa: ANN001
        calls.append(1)
        if len(calls) == 1:
            from twisted.internet import defer

            return defer.fail(sqlite3.OperationalError("disk I/O error"))
        return run_sync(f, *args)

    path = tmp_path / "loc.sqlite"
    persistence = SqliteBindingStore(str(path), clock, flush_interval=0.2, run_in_thread=flaky)
    store = LocationStore(clock, persistence)
    store.start()
    store.add_or_update(make_binding(expires_at=100.0))
    clock.advance(0.2)
    assert _rows(path) == 0
    clock.advance(0.5)
    assert _rows(path) == 1
    store.stop()


@pytest_twisted.inlineCallbacks
def test_real_thread_pool_flush(tmp_path: Path):
    path = tmp_path / "loc.sqlite"
    persistence = SqliteBindingStore(str(path), reactor, flush_interval=0.05, reactor=reactor)
    store = LocationStore(reactor, persistence)
    store.start()
    now = reactor.seconds()
    store.add_or_update(make_binding(expires_at=now + 100.0, registered_at=now))
    yield store.flush()
    assert _rows(path) == 1
    yield store.stop()
    assert persistence._worker is not None and not persistence._worker.pool.started


def test_udp_flow_id_survives_restore(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "loc.sqlite"
    store = _open(path, clock)
    store.add_or_update(make_binding(expires_at=100.0, flow_id="udp:1-2", flow_live=True,
                                     received=("udp", "192.0.2.10", 40000)))
    clock.advance(0.2)
    [b] = _open(path, clock).lookup("sip:alice@example.com")
    assert b.flow_id == "udp:1-2" and b.flow_live is False
    store.stop()


_KILLED_WRITER = """
import sys, time
from twisted.internet import reactor
from libon_tsilo.registrar.location import LocationStore
from libon_tsilo.registrar.sqlite_store import SqliteBindingStore
from tests.registrar.helpers import make_binding

store = LocationStore(reactor, SqliteBindingStore(sys.argv[1], reactor, flush_interval=0.05, reactor=reactor))
store.start()
now = reactor.seconds()
for i in range(50):
    store.add_or_update(make_binding(uri=f"sip:dev{i}@h", expires_at=now + 3600, registered_at=now))

def acked(_):
    print("FLUSHED", flush=True)
    # bindings that never get a batch before the kill: allowed to be lost
    store.add_or_update(make_binding(uri="sip:late@h", expires_at=now + 3600, registered_at=now))

def batch_passed():
    store.flush().addCallback(acked)

reactor.callLater(0.06, batch_passed)  # one batch interval after the 200 OKs
reactor.run()
"""


def test_kill_9_loses_nothing_older_than_a_batch(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    path = tmp_path / "loc.sqlite"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        cwd=repo,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == b"FLUSHED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    import time

    clock = Clock()
    clock.advance(time.time())
    store = _open(path, clock)
    uris = {b.contact_uri for b in store.lookup("sip:alice@example.com")}
    assert {f"sip:dev{i}@h" for i in range(50)} <= uris
    store.stop()


# -- bytes that are not UTF-8, and one bad row among good ones -------------------------------------


class Manual:
    """A run_in_thread whose batches run when the test says so: a commit "in flight" is visible."""

    def __init__(self) -> None:
        self.queued: list[tuple[Any, tuple, defer.Deferred]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.queued.append((f, args, d))
        return d

    def run_one(self) -> None:
        f, args, d = self.queued.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


def _manual(path: Path, clock: Clock, interval: float = 0.002) -> tuple[LocationStore, SqliteBindingStore, Manual]:
    runner = Manual()
    persistence = SqliteBindingStore(str(path), clock, flush_interval=interval, run_in_thread=runner)
    store = LocationStore(clock, persistence)
    store.start()
    return store, persistence, runner


def refuse_rows_of(path: Path, aor: str) -> None:
    """Make SQLite itself refuse every row of ``aor`` (as a constraint would), from another connection."""
    db = sqlite3.connect(str(path))
    db.execute(
        f"CREATE TRIGGER refuse BEFORE INSERT ON bindings WHEN NEW.aor = '{aor}' "
        "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
    )
    db.commit()
    db.close()


def _outcome(d: defer.Deferred | None) -> list[Any]:
    seen: list[Any] = []
    assert d is not None
    d.addBoth(seen.append)
    return seen


def test_non_utf8_bytes_are_stored_losslessly_and_never_block_the_batch(tmp_path: Path) -> None:
    # what the parser makes of "Contact: <sip:m\xff@127.0.0.1:5062>" and "To: <sip:b%FF@example.com>"
    odd_uri = b"sip:m\xff@127.0.0.1:5062".decode("utf-8", "surrogateescape")
    odd_aor = "sip:b\udcff@example.com"
    clock = Clock()
    clock.advance(1000)
    path = tmp_path / "loc.sqlite"
    store = _open(path, clock)
    store.add_or_update(make_binding(uri=odd_uri, expires_at=5000.0, user_agent="Ph\udce9ne"))
    store.add_or_update(make_binding(aor=odd_aor, uri="sip:b@h", expires_at=5000.0))
    store.add_or_update(make_binding(uri="sip:good@h", expires_at=5000.0))
    clock.advance(0.2)
    assert _rows(path) == 3
    restored = _open(path, clock)
    by_uri = {b.contact_uri: b for b in restored.lookup("sip:alice@example.com")}
    assert set(by_uri) == {odd_uri, "sip:good@h"}
    assert by_uri[odd_uri].key == f"uri:{odd_uri}" and by_uri[odd_uri].user_agent == "Ph\udce9ne"
    [b] = restored.lookup(odd_aor)
    assert b.aor == odd_aor
    # and it can be deleted again (the same bytes address the same row)
    restored.remove(by_uri[odd_uri], "unregistered")
    restored.remove(b, "unregistered")
    clock.advance(0.2)
    assert _rows(path) == 1
    restored.stop()
    store.stop()


def test_a_row_that_fails_alone_is_skipped_and_the_rest_of_the_batch_commits(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "loc.sqlite"
    store, persistence, runner = _manual(path, clock)
    refuse_rows_of(path, "sip:bad@example.com")
    store.add_or_update(make_binding(aor="sip:bad@example.com", uri="sip:bad@h", expires_at=5000.0))
    bad = _outcome(store.when_durable("sip:bad@example.com"))
    for i in range(3):
        store.add_or_update(make_binding(uri=f"sip:ok{i}@h", expires_at=5000.0))
    good = _outcome(store.when_durable("sip:alice@example.com"))
    clock.advance(0.002)
    runner.run_one()
    assert _rows(path) == 3
    assert good == [None]
    assert len(bad) == 1 and isinstance(bad[0].value, NotStored) and "refused for the test" in str(bad[0].value)
    assert persistence.rows_skipped == 1 and persistence.rows_written == 3
    assert persistence.pending() == 0 and runner.queued == []  # skipped, not retried forever
    # and the next batch is written as usual
    store.add_or_update(make_binding(uri="sip:later@h", expires_at=5000.0))
    clock.advance(0.002)
    runner.run_one()
    assert _rows(path) == 4


def test_group_commit_changes_during_a_write_share_the_next_commit(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "loc.sqlite"
    store, persistence, runner = _manual(path, clock)
    store.add_or_update(make_binding(aor="sip:a@example.com", uri="sip:a@h", expires_at=5000.0))
    first = _outcome(store.when_durable("sip:a@example.com"))
    assert runner.queued == []
    clock.advance(0.002)  # the flush interval: the first commit starts
    assert len(runner.queued) == 1
    for user in ("b", "c"):
        store.add_or_update(make_binding(aor=f"sip:{user}@example.com", uri=f"sip:{user}@h", expires_at=5000.0))
    later = [_outcome(store.when_durable(f"sip:{u}@example.com")) for u in ("b", "c")]
    clock.advance(1.0)
    assert len(runner.queued) == 1  # one commit at a time
    assert first == [] and _rows(path) == 0
    runner.run_one()
    assert first == [None] and later == [[], []]
    assert len(runner.queued) == 1  # the next one started as soon as the first returned, no wait
    runner.run_one()
    assert later == [[None], [None]] and _rows(path) == 3
    assert persistence.commits == 2
    assert store.when_durable("sip:a@example.com") is None  # nothing left to wait for


def test_under_load_commits_are_one_flush_interval_apart(tmp_path: Path) -> None:
    clock = Clock()
    store, persistence, runner = _manual(tmp_path / "loc.sqlite", clock, interval=0.005)
    store.add_or_update(make_binding(uri="sip:0@h", expires_at=5000.0))
    clock.advance(0.005)
    store.add_or_update(make_binding(uri="sip:1@h", expires_at=5000.0))
    clock.advance(0.001)
    runner.run_one()  # a commit that took 1 ms: the next waits until 5 ms after the first began
    assert runner.queued == []
    clock.advance(0.003)
    assert runner.queued == []
    clock.advance(0.0015)
    assert len(runner.queued) == 1
    runner.run_one()
    assert persistence.commits == 2 and persistence.pending() == 0


def test_failed_database_fails_the_waiters_and_retries_the_rows(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "loc.sqlite"
    store, persistence, runner = _manual(path, clock)
    store.add_or_update(make_binding(expires_at=5000.0))
    waiting = _outcome(store.when_durable("sip:alice@example.com"))
    clock.advance(0.002)
    _, _, d = runner.queued.pop(0)
    d.errback(sqlite3.OperationalError("disk I/O error"))
    assert isinstance(waiting[0].value, NotStored)
    assert persistence.rows_retried == 1 and persistence.pending() == 1
    clock.advance(0.5)
    runner.run_one()
    assert _rows(path) == 1 and persistence.pending() == 0


def test_a_stopped_store_refuses_to_promise(tmp_path: Path) -> None:
    clock = Clock()
    store = _open(tmp_path / "loc.sqlite", clock)
    store.stop()
    store.add_or_update(make_binding(expires_at=5000.0))
    [failure] = _outcome(store.when_durable("sip:alice@example.com"))
    assert isinstance(failure.value, StoreClosed)
