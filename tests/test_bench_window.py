"""bench/cluster.py: the calls a --warmup window is divided by (SIPp's statistics), and the AORs of
case (g)'s two SIPp pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster import calls_between, pair_prefix


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


def test_the_two_pairs_of_the_crossed_case_never_share_an_aor() -> None:
    first, second = pair_prefix("clg-", ""), pair_prefix("clg-", "2")
    assert first == "clg-"
    aors = {f"{first}{n}" for n in range(1, 20_000)}
    assert not aors & {f"{second}{n}" for n in range(1, 20_000)}
