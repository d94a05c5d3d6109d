"""TSILO statistics: Kamailio's counter names plus a bounded latency window (libon_tsilo/latency.py).

Operators know Kamailio's `tsilo` group (stored_ruris, stored_transactions, total_ruris,
total_transactions, added_branches), so the same names mean the same things here. The extra
latency figures answer the question TSILO never could: how long after a phone's REGISTER does
its INVITE leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from libon_tsilo.latency import LatencyWindow

__all__ = ["SiloCounters"]


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
