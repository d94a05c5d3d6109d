"""TSILO statistics: Kamailio's counter names plus a bounded latency window.

Operators know Kamailio's `tsilo` group (stored_ruris, stored_transactions, total_ruris,
total_transactions, added_branches), so the same names mean the same things here. The extra
latency figures answer the question TSILO never could: how long after a phone's REGISTER does
its INVITE leave.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

__all__ = ["LatencyWindow", "SiloCounters", "percentile"]


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted list; None when it is empty."""
    if not sorted_values:
        return None
    if not 0 < pct <= 100:
        raise ValueError("percentile: pct must be in (0, 100]")
    rank = math.ceil(pct / 100.0 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


class LatencyWindow:
    """The last `size` samples (seconds); older ones fall out so memory stays bounded."""

    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ValueError("LatencyWindow: size must be >= 1")
        self._samples: deque[float] = deque(maxlen=size)
        self.count = 0  # every sample ever seen, not only the ones still in the window

    def add(self, seconds: float) -> None:
        # a clock that steps backwards must not produce negative latencies
        self._samples.append(max(seconds, 0.0))
        self.count += 1

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self) -> dict[str, float | int | None]:
        ordered = sorted(self._samples)
        return {
            "samples": len(ordered),
            "p50": percentile(ordered, 50),
            "p99": percentile(ordered, 99),
            "max": ordered[-1] if ordered else None,
        }


@dataclass
class SiloCounters:
    """Monotonic counters (Kamailio: no-reset statistics). The gauges are computed by the silo."""

    total_ruris: int = 0
    total_transactions: int = 0
    added_branches: int = 0
    rejected_full: int = 0  # store() refused: max_pending_per_aor reached
    rejected_capacity: int = 0  # store() refused: max_total ([limits] max_parked_total) reached
    late_after_end: int = 0  # Invite/Cancel branches sent to devices that woke after the call ended
    latency: LatencyWindow = field(default_factory=LatencyWindow)
