"""The transaction silo: pending calls indexed by AOR key, late-forked on binding events.

This is Kamailio's TSILO rebuilt for a B2BUA. A stored entry is a call object (the `SiloCall`
protocol) instead of tm's (tindex, tlabel); "append" asks the call to add a B-leg per binding.
The silo knows nothing of SIP or push: it only decides *which* stored calls a binding event
concerns, keeps the statistics operators know, and measures how long a REGISTER takes to turn
into a forked INVITE.

Keys are the registrar's `aor_key(uri, use_domain)` strings; the call layer and the registrar
must produce them the same way (the usual TSILO pitfall: a key mismatch parks a call no REGISTER can find).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from libon_tsilo.latency import LatencyWindow
from libon_tsilo.registrar.binding import Binding, LocationObserver
from libon_tsilo.silo.stats import SiloCounters
from libon_tsilo.sip.timers import cancel_expiry

if TYPE_CHECKING:
    from libon_tsilo.sip.flow import Flow
    from libon_tsilo.sip.timers import ExpiryQueue

__all__ = [
    "Silo",
    "SiloCall",
    "LateBindingCall",
    "BindingSource",
    "NOT_FOUND",
    "NO_RECORD",
    "CANNOT_APPEND",
]

log = Logger(namespace=__name__)  # compiled (mypyc): Logger() would name the importer

# a binding event comes at most this long after its REGISTER; an older registered_at is not one
_MAX_EVENT_DELAY = 60.0

# ts_append_to() return codes, as Kamailio operators know them (the tsilo module documentation)
NOT_FOUND = -1
NO_RECORD = -2
CANNOT_APPEND = -3


class SiloCall(Protocol):
    """What the silo needs from a stored call (the B2BUA's Call implements it)."""

    call_id: str
    aor: str

    def can_append(self) -> bool:
        """False once the caller got a final response or sent CANCEL."""

    def add_branch(self, binding: Binding) -> bool:
        """Fork to `binding`; False when the call declines (duplicate, limit reached...)."""

    def describe(self) -> dict[str, Any]:
        """Call-ID, caller, AOR, age, state and branches, for dump()/lookup()."""


class LateBindingCall(Protocol):
    """Optional: an ended call that still wants to hear about pushed devices waking up (Invite/Cancel)."""

    call_id: str
    aor: str

    def late_binding_after_end(self, binding: Binding) -> bool:
        """Send the woken device its INVITE and an immediate CANCEL; True if a branch went out."""


class BindingSource(Protocol):
    """The part of the registrar's LocationStore the silo uses."""

    def lookup(self, aor: str) -> list[Binding]: ...


class Silo(LocationObserver):
    """Pending calls per AOR key; the location store's observer that late-forks them."""

    def __init__(
        self,
        clock: IReactorTime,
        location: BindingSource | None = None,
        max_pending_per_aor: int = 8,
        latency_window: int = 1024,
        max_total: int = 0,
    ) -> None:
        if max_pending_per_aor < 1:
            raise ValueError("Silo: max_pending_per_aor must be >= 1")
        self.clock = clock
        self.location = location
        self.max_pending_per_aor = max_pending_per_aor
        self.max_total = max_total  # pending calls in the whole silo ([limits] max_parked_total); 0 = none
        self.counters = SiloCounters(latency=LatencyWindow(latency_window))
        # aor key -> calls in arrival order; a dict keeps order and gives O(1) removal
        self._by_aor: dict[str, dict[str, SiloCall]] = {}
        self._by_call_id: dict[str, SiloCall] = {}
        # ended calls kept for a grace period so that a late-waking pushed device still gets
        # its INVITE + CANCEL (iOS PushKit must always be able to report a call to CallKit)
        self._lingering: dict[str, dict[str, LateBindingCall]] = {}
        # call id -> its DelayedCall, or its entry in the caller's ExpiryQueue (see linger)
        self._linger_timers: dict[str, IDelayedCall | list[Any]] = {}

    # -- storing and removing ------------------------------------------------------------

    def at_capacity(self) -> bool:
        """True when the silo holds ``max_total`` pending calls: a new one must be refused."""
        return 0 < self.max_total <= len(self._by_call_id)

    def store(self, call: SiloCall) -> bool:
        """Index `call` under its AOR key. False when that AOR already has max_pending_per_aor calls,
        or the silo is at capacity (the call layer asks `at_capacity()` first to tell them apart).

        Only calls still waiting for an answer are stored: the call layer removes a call as soon
        as the caller has its final response, so answered calls never count against the limit.

        Storing the same call twice is accepted and ignored, as ts_store() does.
        """
        key = call.aor
        calls = self._by_aor.get(key)
        if calls is not None and call.call_id in calls:
            return True
        if self.at_capacity():
            self.counters.rejected_capacity += 1
            return False
        if calls is not None and len(calls) >= self.max_pending_per_aor:
            self.counters.rejected_full += 1
            log.warn(
                "silo: {aor} already has {n} pending calls, refusing {call_id}",
                aor=key,
                n=len(calls),
                call_id=call.call_id,
            )
            return False
        if calls is None:
            calls = self._by_aor[key] = {}
            self.counters.total_ruris += 1
        calls[call.call_id] = call
        self._by_call_id[call.call_id] = call
        self.counters.total_transactions += 1
        return True

    def remove(self, call: SiloCall) -> None:
        """Drop `call` (it ended). Idempotent, so every end path may call it."""
        if self._by_call_id.get(call.call_id) is call:
            del self._by_call_id[call.call_id]
        calls = self._by_aor.get(call.aor)
        if calls is not None and calls.get(call.call_id) is call:
            del calls[call.call_id]
            if not calls:
                del self._by_aor[call.aor]

    def linger(self, call: LateBindingCall, grace: float, queue: ExpiryQueue | None = None) -> None:
        """Keep an ended call for `grace` seconds for the Invite/Cancel of late pushed devices.

        `queue` (the call layer's fixed-delay queue for `grace`, sip/timers.ExpiryQueue) takes the
        grace period instead of a DelayedCall of its own: every such call waits the same configured
        delay, and arming a DelayedCall costs the reactor heap's Python-level comparisons."""
        self.remove(call)  # type: ignore[arg-type]
        if grace <= 0:
            return
        self._lingering.setdefault(call.aor, {})[call.call_id] = call
        self._cancel_linger(call.call_id)
        if queue is not None:
            self._linger_timers[call.call_id] = queue.add(lambda: self.unlinger(call))
        else:
            self._linger_timers[call.call_id] = self.clock.callLater(grace, self.unlinger, call)

    def _cancel_linger(self, call_id: str) -> None:
        timer = self._linger_timers.pop(call_id, None)
        if timer is None:
            return
        if isinstance(timer, list):
            cancel_expiry(timer)
        elif timer.active():
            timer.cancel()

    def unlinger(self, call: LateBindingCall) -> None:
        """End the grace period of `call` now (idempotent)."""
        self._cancel_linger(call.call_id)
        calls = self._lingering.get(call.aor)
        if calls is not None and calls.get(call.call_id) is call:
            del calls[call.call_id]
            if not calls:
                del self._lingering[call.aor]

    def stop(self) -> None:
        """Service stop: end every grace period now (their timers are cancelled)."""
        for calls in list(self._lingering.values()):
            for call in list(calls.values()):
                self.unlinger(call)
        for call_id in list(self._linger_timers):  # none left unless a call changed its aor
            self._cancel_linger(call_id)

    # -- appending -----------------------------------------------------------------------

    def append(self, aor: str) -> int:
        """Fork every pending call of `aor` to all of its current bindings.

        Returns the number of branches added, or NO_RECORD when nothing is stored for `aor`.
        """
        calls = self._by_aor.get(aor)
        if not calls:
            return NO_RECORD
        added = 0
        for call in list(calls.values()):  # add_branch may end (and remove) a call
            added += max(self.append_to(call.call_id, aor), 0)
        return added

    def append_to(self, call_id: str, aor: str) -> int:
        """Fork one call to every binding of `aor` (ts_append_to).

        Returns the number of branches added, NOT_FOUND or CANNOT_APPEND.
        """
        call = self._by_call_id.get(call_id)
        if call is None:
            return NOT_FOUND
        if not call.can_append():
            return CANNOT_APPEND
        if self.location is None:
            return 0
        added = 0
        for binding in self.location.lookup(aor):
            if not call.can_append():
                break
            added += self._add(call, binding, started=None)
        return added

    def append_by_contact(self, aor: str, binding: Binding, started: float | None = None) -> int:
        """Fork every pending call of `aor` to this one binding (ts_append_by_contact).

        `started` is when the binding event arrived, for the REGISTER->INVITE latency.
        Returns the number of branches added, or NO_RECORD when nothing is stored for `aor`.
        """
        calls = self._by_aor.get(aor)
        if not calls:
            return NO_RECORD
        added = 0
        for call in list(calls.values()):
            if call.can_append():
                added += self._add(call, binding, started)
        return added

    def _add(self, call: SiloCall, binding: Binding, started: float | None) -> int:
        try:
            ok = call.add_branch(binding)
        except Exception:
            # one broken call must not stop the REGISTER or the other calls
            log.failure("silo: add_branch failed", call_id=call.call_id)
            return 0
        if not ok:
            return 0
        self.counters.added_branches += 1
        if started is not None:
            # add_branch hands the INVITE to the transaction layer synchronously, so "now" is
            # the moment it was sent
            self.counters.latency.add(self.clock.seconds() - started)
        return 1

    # -- LocationObserver ----------------------------------------------------------------

    def binding_added(self, binding: Binding, flow: Flow | None = None) -> None:
        self._binding_event(binding)

    def binding_refreshed(self, binding: Binding, flow: Flow | None = None) -> None:
        # the call decides whether a refresh deserves a new branch (changed contact or flow)
        self._binding_event(binding)

    def binding_removed(self, binding: Binding, reason: str) -> None:
        # a branch already sent keeps running until its own transaction ends
        pass

    def _binding_event(self, binding: Binding) -> None:
        # the event follows the REGISTER's 200 OK, which waits for the binding to be on disk: the
        # latency counts from when the REGISTER was processed, so that wait shows
        now = self.clock.seconds()
        started = getattr(binding, "registered_at", None)
        if not isinstance(started, (int, float)) or not 0.0 <= now - started <= _MAX_EVENT_DELAY:
            started = now
        aor = binding.aor
        self.append_by_contact(aor, binding, started=started)
        for call in list(self._lingering.get(aor, {}).values()):
            try:
                if call.late_binding_after_end(binding):
                    self.counters.late_after_end += 1
            except Exception:
                log.failure("silo: late_binding_after_end failed", call_id=call.call_id)

    # -- inspection ----------------------------------------------------------------------

    def get(self, call_id: str) -> SiloCall | None:
        return self._by_call_id.get(call_id)

    def lookup(self, aor: str) -> list[dict[str, Any]]:
        """Descriptions of the pending calls of `aor` ([] when none; the admin API answers 404)."""
        return [self._describe(c) for c in self._by_aor.get(aor, {}).values()]

    def dump(self, brief: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"stats": self.stats()}
        if not brief:
            out["aors"] = {
                aor: [self._describe(c) for c in calls.values()] for aor, calls in self._by_aor.items()
            }
            out["lingering"] = {aor: sorted(calls) for aor, calls in self._lingering.items()}
        return out

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "stored_ruris": len(self._by_aor),
            "stored_transactions": len(self._by_call_id),
            "total_ruris": c.total_ruris,
            "total_transactions": c.total_transactions,
            "added_branches": c.added_branches,
            "rejected_full": c.rejected_full,
            "rejected_capacity": c.rejected_capacity,
            "lingering": len(self._linger_timers),
            "late_after_end": c.late_after_end,
            "register_to_invite": c.latency.summary(),
        }

    def pending_count(self, aor: str) -> int:
        return len(self._by_aor.get(aor, {}))

    def __len__(self) -> int:
        """Every entry the silo holds, lingering ones included (tests assert it drops to 0)."""
        return len(self._by_call_id) + len(self._linger_timers)

    @staticmethod
    def _describe(call: SiloCall) -> dict[str, Any]:
        try:
            return call.describe()
        except Exception:
            log.failure("silo: describe failed", call_id=call.call_id)
            return {"call_id": call.call_id, "aor": call.aor, "state": "unknown"}
