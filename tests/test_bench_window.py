"""bench/cluster.py --warmup: the calls a measured window is divided by, from SIPp's statistics."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster import calls_between


def _stats(path: Path, rows: list[tuple[float, int]]) -> Path:
    """A SIPp -trace_stat CSV: CurrentTime is "date<TAB>time<TAB>epoch", counts are cumulative."""
    lines = ["StartTime;CurrentTime;SuccessfulCall(C);"]
    lines += [f"2026-12-07\t22:00:00\t{rows[0][0]};2026-12-07\t22:00:00\t{t};{n};" for t, n in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_calls_of_a_window_are_interpolated_between_the_rows_around_its_ends(tmp_path: Path) -> None:
    stats = _stats(tmp_path / "stats.csv", [(100.0, 0), (101.0, 150), (102.0, 300), (103.0, 420)])
    assert calls_between(stats, 100.5, 102.5) == pytest.approx(360 - 75)


def test_a_window_outside_the_statistics_is_refused(tmp_path: Path) -> None:
    stats = _stats(tmp_path / "stats.csv", [(100.0, 0), (101.0, 150)])
    with pytest.raises(RuntimeError, match="not inside"):
        calls_between(stats, 100.5, 101.5)
