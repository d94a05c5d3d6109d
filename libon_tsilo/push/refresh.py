"""Refresh pushes: wake a device shortly before its binding expires so that it re-REGISTERs.

RFC 8599 §5.4 recommends a push >= 120 s before expiry; OpenSIPS calls this ``pn_trigger_interval``.
Only bindings that asked for it with the ``+sip.pnsreg`` Contact tag and carry pn params get one, at
``expires_at - before`` (``[push] refresh_before_expiry``), and only if no REGISTER came first: every
refresh of the binding re-arms its timer, its removal cancels it. One clock timer per binding,
all cancelled by ``stop()``. A registration shorter than the lead time gets no refresh push.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from libon_tsilo.push.base import PushRequest, PushResult
from libon_tsilo.util import redact

__all__ = ["RefreshScheduler"]

log = Logger()

Ident = tuple[str, str]  # (aor, binding key)
Send = Callable[[Any, PushRequest], Deferred[PushResult]]


def wants_refresh(binding: Any) -> bool:
    return bool(getattr(binding, "pnsreg", False) and binding.pn_provider and binding.pn_prid)


class RefreshScheduler:
    """A LocationObserver that sends kind "refresh" pushes through ``send(binding, request)``."""

    def __init__(self, clock: IReactorTime, send: Send, before: float, min_ttl: float = 1.0) -> None:
        self.clock = clock
        self.send = send
        self.before = float(before)
        self.min_ttl = min_ttl
        self._timers: dict[Ident, tuple[IDelayedCall, Any]] = {}
        self.counters: Counter[str] = Counter()
        self.stopped = False

    # -- LocationObserver ----------------------------------------------------------------------

    def binding_added(self, binding: Any, flow: Any = None) -> None:
        self._arm(binding)

    def binding_refreshed(self, binding: Any, flow: Any = None) -> None:
        self._arm(binding)

    def binding_removed(self, binding: Any, reason: str) -> None:
        ident = (binding.aor, binding.key)
        entry = self._timers.get(ident)
        # a removal of an older object with the same key (replaced already) leaves the new timer
        if entry is not None and entry[1] is binding:
            self._cancel(ident)

    # -- timers --------------------------------------------------------------------------------

    def start(self, location: Any) -> None:
        """Arm timers for the bindings already stored (restored from disk at start)."""
        for bindings in location.dump().values():
            for binding in bindings:
                self._arm(binding)

    def _arm(self, binding: Any) -> None:
        ident = (binding.aor, binding.key)
        self._cancel(ident)
        if self.stopped or not wants_refresh(binding):
            return
        delay = float(binding.expires_at) - self.before - self.clock.seconds()
        if delay <= 0:
            self.counters["too_short"] += 1
            return
        timer = self.clock.callLater(delay, self._fire, ident, binding)
        self._timers[ident] = (timer, binding)

    def _cancel(self, ident: Ident) -> None:
        entry = self._timers.pop(ident, None)
        if entry is not None and entry[0].active():
            entry[0].cancel()

    def _fire(self, ident: Ident, binding: Any) -> None:
        entry = self._timers.get(ident)
        if entry is None or entry[1] is not binding:
            return
        del self._timers[ident]
        ttl = float(binding.expires_at) - self.clock.seconds()
        if ttl < self.min_ttl:
            return
        req = PushRequest(
            provider=binding.pn_provider, prid=binding.pn_prid, param=binding.pn_param, kind="refresh",
            aor=binding.aor, ttl=ttl,
        )
        self.counters["sent"] += 1
        log.info("refresh push to {token} of {aor}, {ttl:.0f}s before expiry", token=redact(binding.pn_prid),
                 aor=binding.aor, ttl=ttl)
        d = self.send(binding, req)
        d.addCallback(self._done)

    def _done(self, result: PushResult) -> None:
        self.counters[result.outcome] += 1

    # -- life cycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopped = True
        for ident in list(self._timers):
            self._cancel(ident)

    def pending(self) -> int:
        return len(self._timers)

    def stats(self) -> dict[str, Any]:
        return {"scheduled": len(self._timers), "before_expiry": self.before, **dict(self.counters)}
