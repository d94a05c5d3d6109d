"""/metrics shows the location db's group commit: commits, rows written, skipped (bad data, logged)
and retried (database errors), and the changes still queued."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.ops.metrics import make_registry
from libon_tsilo.registrar.location import LocationStore
from libon_tsilo.registrar.sqlite_store import SqliteBindingStore
from tests.ops.test_metrics import samples
from tests.ops.test_rpc import binding, build
from tests.registrar.helpers import run_sync
from tests.registrar.test_sqlite_store import refuse_rows_of


def test_location_db_counters(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    parts = root.parts
    db_clock = Clock()
    parts.location = LocationStore(
        db_clock, SqliteBindingStore(str(tmp_path / "loc.sqlite"), db_clock, flush_interval=0.002,
                                     run_in_thread=run_sync)
    )
    parts.location.start()
    registry = make_registry(parts, None)
    assert samples(registry)[("libon_tsilo_location_db_commits_total", ())] == 0
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1", clock))
    refuse_rows_of(tmp_path / "loc.sqlite", "bob")  # SQLite refuses bob's row: it is skipped
    parts.location.add_or_update(binding("bob", "sip:bob@10.0.0.2", clock))
    assert samples(registry)[("libon_tsilo_location_db_pending", ())] == 2
    db_clock.advance(0.002)
    s = samples(registry)
    assert s[("libon_tsilo_location_db_commits_total", ())] == 1
    assert s[("libon_tsilo_location_db_rows_written_total", ())] == 1
    assert s[("libon_tsilo_location_db_rows_skipped_total", ())] == 1
    assert s[("libon_tsilo_location_db_rows_retried_total", ())] == 0
    assert s[("libon_tsilo_location_db_pending", ())] == 0
    parts.location.stop()


def test_memory_backend_has_no_location_db_metrics(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    assert not any(name.startswith("libon_tsilo_location_db") for name, _ in samples(make_registry(root.parts)))
