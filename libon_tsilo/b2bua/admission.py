"""Unanswered calls per caller source: one address must not fill the server with parked calls.

A call counts against its caller's source (the IP address of the A-leg's flow; IPv6 per /64, as
the per-source request limits count it) from the moment it is stored until the caller has its
answer (2xx or failure) or the call ends. Exempt sources (trusted peers, loopback) are not counted.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from libon_tsilo.sip.limits import source_key

__all__ = ["CallerSources"]


class CallerSources:
    def __init__(self, limit: int, exempt: Container[str] = ()) -> None:
        if limit < 1:
            raise ValueError("CallerSources: limit must be >= 1")
        self.limit = limit
        self.exempt = exempt
        self._counts: dict[str, int] = {}
        self._source_of: dict[str, str] = {}  # Call-ID -> source key

    def source_of(self, flow: Any) -> str | None:
        """The key ``flow``'s calls count under, or None for an exempt (or unknown) source."""
        key = getattr(flow, "key", None)
        host = key.remote[0] if key is not None else None
        # a ".invalid" host (RFC 6761) is no peer but us: a transfer's call, paid for by the referrer's
        if not host or host in self.exempt or host.endswith(".invalid"):
            return None
        return source_key(host)

    def admit(self, call_id: str, flow: Any) -> bool:
        """Count the call against its source; False (nothing counted) when the source is at its limit."""
        source = self.source_of(flow)
        if source is None or call_id in self._source_of:
            return True
        n = self._counts.get(source, 0)
        if n >= self.limit:
            return False
        self._counts[source] = n + 1
        self._source_of[call_id] = source
        return True

    def release(self, call_id: str) -> None:
        """The caller has its answer, or the call ended (idempotent)."""
        source = self._source_of.pop(call_id, None)
        if source is None:
            return
        n = self._counts[source] - 1
        if n:
            self._counts[source] = n
        else:
            del self._counts[source]

    def __len__(self) -> int:
        """Calls counted now (tests assert it returns to 0)."""
        return len(self._source_of)
