"""A bounded window of recent latencies and its summary: the one used by the silo (REGISTER to
INVITE) and by push/ (push latency, push to REGISTER), so the same key means the same figure in
every admin RPC answer."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["LatencyWindow", "percentile"]


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted list; None when it is empty."""
    if not sorted_values:
        return None
    if not 0 < pct <= 100:
        raise ValueError("percentile: pct must be in (0, 100]")
    rank = math.ceil(pct / 100.0 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


def _rounded(value: float | None) -> float | None:
    # differences of clock readings carry float noise (0.7000000000000028): microseconds are plenty
    return None if value is None else round(value, 6)


class LatencyWindow:
    """The last `size` samples (seconds); older ones fall out so memory stays bounded. Cheap enough
    for every REGISTER: the sort happens when the summary is asked for."""

    __slots__ = ("_samples", "count", "total")

    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ValueError("LatencyWindow: size must be >= 1")
        self._samples: deque[float] = deque(maxlen=size)
        self.count = 0  # every sample ever seen, not only the ones still in the window
        self.total = 0.0

    def add(self, seconds: float) -> None:
        # a clock that steps backwards must not produce negative latencies
        seconds = max(seconds, 0.0)
        self._samples.append(seconds)
        self.count += 1
        self.total += seconds

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self) -> dict[str, float | int | None]:
        """samples (in the window), count and mean (every sample ever), nearest-rank p50/p95/p99
        and max over the window; the figures are None while it is empty."""
        ordered = sorted(self._samples)
        return {
            "samples": len(ordered),
            "count": self.count,
            "mean": _rounded(self.total / self.count) if self.count else None,
            "p50": _rounded(percentile(ordered, 50)),
            "p95": _rounded(percentile(ordered, 95)),
            "p99": _rounded(percentile(ordered, 99)),
            "max": _rounded(ordered[-1]) if ordered else None,
        }
