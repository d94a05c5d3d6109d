"""The one record of push outcomes and latencies.

The PushWaker fills one `PushStats` as each push ends and as each woken device registers; the
admin RPC and the manhole read it through ``PushWaker.stats()``, and ops/metrics turns the same
object into the /metrics families at scrape time. Nothing else counts pushes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

from libon_tsilo.latency import LatencyWindow

from libon_tsilo.push.base import OUTCOMES

__all__ = ["PUSH_BUCKETS", "WAKE_BUCKETS", "Histogram", "PushStats"]

# a push is one HTTP/2 POST (APNs/FCM) plus retries; push-to-REGISTER is a phone waking up
PUSH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, float("inf"))
WAKE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, float("inf"))


class Histogram:
    """Counts per bucket (``le`` bounds, the last one +inf) and the sum: Prometheus' histogram."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, float(value))
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound), as /metrics exposes them."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((bound, running))
        return out


class PushStats:
    """Outcomes per provider and per kind, latency histograms per provider, push-to-REGISTER.

    ``latency`` (every outcome, retries included) feeds /metrics; ``delivered_window`` keeps the
    recent delivered pushes for the percentiles the RPC shows.
    """

    def __init__(self) -> None:
        self.by_provider: dict[str, Counter[str]] = {}
        self.by_kind: dict[str, Counter[str]] = {}
        self.latency: dict[str, Histogram] = {}
        self.delivered_window = LatencyWindow()
        self.push_to_register = Histogram(WAKE_BUCKETS)
        self.push_to_register_window = LatencyWindow()

    def record_push(self, provider: str, kind: str, outcome: str, latency: float) -> None:
        self.by_provider.setdefault(provider, Counter())[outcome] += 1
        self.by_kind.setdefault(kind, Counter())[outcome] += 1
        histogram = self.latency.get(provider)
        if histogram is None:
            histogram = self.latency[provider] = Histogram(PUSH_BUCKETS)
        histogram.observe(latency)
        if outcome == "delivered":
            self.delivered_window.add(latency)

    def record_push_to_register(self, latency: float) -> None:
        self.push_to_register.observe(latency)
        self.push_to_register_window.add(latency)

    def outcomes(self) -> dict[str, dict[str, dict[str, int]]]:
        """{"by_provider": {provider: {outcome: n}}, "by_kind": {...}}, every outcome listed."""

        def table(t: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
            return {k: {o: c.get(o, 0) for o in OUTCOMES} for k, c in sorted(t.items())}

        return {"by_provider": table(self.by_provider), "by_kind": table(self.by_kind)}
