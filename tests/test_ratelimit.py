"""libon_tsilo/ratelimit.py: the sliding window per key and the throttled log line, on a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from libon_tsilo.ratelimit import SlidingWindow, ThrottledLog


def test_sliding_window_allows_limit_events_per_window_per_key():
    clock = Clock()
    w = SlidingWindow(clock, limit=3, window=60)
    allowed = []
    for _ in range(4):
        allowed.append(w.try_add("a"))
        clock.advance(1)
    assert allowed == [True, True, True, False]
    assert w.try_add("b")
    clock.advance(55.9)
    assert not w.try_add("a")
    clock.advance(0.1)  # the first event left the window
    assert w.try_add("a") and not w.try_add("a")


def test_sliding_window_full_without_adding():
    clock = Clock()
    w = SlidingWindow(clock, limit=2, window=10)
    assert not w.full("x")
    w.add("x")
    w.add("x")
    w.add("x")  # add() records even when full (a failure still happened)
    assert w.full("x")
    clock.advance(10)
    assert not w.full("x")


def test_sliding_window_table_is_bounded():
    clock = Clock()
    w = SlidingWindow(clock, limit=2, window=10, max_keys=3)
    for key in "abc":
        w.add(key)
    w.add("a")  # a is the most recently used now
    w.add("d")  # full: b, the least recently used, is evicted
    assert len(w) == 3 and w.evictions == 1
    assert w.full("a") and not w.full("b")
    clock.advance(10)  # everything left the window: the next newcomer clears the table
    w.add("e")
    assert len(w) == 1 and w.evictions == 1


@pytest.mark.parametrize("args", [(0, 10, 1), (1, 0, 1), (1, 10, 0)])
def test_sliding_window_bad_parameters(args):
    with pytest.raises(ValueError):
        SlidingWindow(Clock(), *args)


def test_throttled_log_says_how_many_lines_it_held_back():
    clock = Clock()
    lines: list[tuple[str, dict]] = []
    t = ThrottledLog(clock, interval=10)
    assert t.emit(lambda fmt, **kw: lines.append((fmt, kw)), "hit {n}", n=1)
    for n in range(2, 6):
        clock.advance(1)
        assert not t.emit(lambda fmt, **kw: lines.append((fmt, kw)), "hit {n}", n=n)
    clock.advance(6)
    assert t.emit(lambda fmt, **kw: lines.append((fmt, kw)), "hit {n}", n=6)
    assert [kw["n"] for _, kw in lines] == [1, 6]
    assert lines[1][1]["suppressed"] == 4 and "{suppressed}" in lines[1][0]
