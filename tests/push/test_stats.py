"""push/stats.py: the one push record (outcomes, latency histograms, push-to-REGISTER)."""

from __future__ import annotations

from libon_tsilo.push.stats import PUSH_BUCKETS, Histogram, PushStats


def test_histogram_buckets_are_upper_bounds_and_cumulative() -> None:
    h = Histogram((0.5, 1.0, float("inf")))
    for v in (0.5, 0.7, 3.0, -1.0):  # a negative latency (clock step) counts as 0
        h.observe(v)
    assert h.cumulative() == [(0.5, 2), (1.0, 3), (float("inf"), 4)]
    assert (h.count, h.sum) == (4, 4.2)


def test_push_stats_counts_each_push_once_per_view() -> None:
    st = PushStats()
    st.record_push("apns", "call", "delivered", 0.2)
    st.record_push("apns", "cancel", "dead_token", 0.4)
    st.record_push("fcm", "call", "retryable", 6.0)
    st.record_push_to_register(1.5)
    out = st.outcomes()
    assert out["by_provider"]["apns"] == {"delivered": 1, "dead_token": 1, "retryable": 0, "config_error": 0}
    assert out["by_kind"]["call"]["retryable"] == 1 and out["by_kind"]["cancel"]["dead_token"] == 1
    assert st.latency["apns"].bounds == PUSH_BUCKETS and st.latency["apns"].count == 2
    assert st.delivered_window.count == 1  # the RPC's percentiles cover delivered pushes only
    assert (st.push_to_register.count, st.push_to_register_window.count) == (1, 1)
