"""The Waker interface (how the call layer asks for devices to be woken) and a logging one.

b2bua/ never imports push/: the push layer implements this protocol and is handed to the
CallManager by ops/. The objects exchanged are duck-typed so push/ needs no import from here:
- the call is passed as a `CallInfo` (the Call object itself satisfies it);
- the result only has to carry the attributes of `WakeResult` (push/ may return its own class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from libon_tsilo import logflags
from libon_tsilo.util import redact

if TYPE_CHECKING:
    from libon_tsilo.registrar.binding import Binding

__all__ = ["CallInfo", "WakeResult", "Waker", "LoggingWaker", "wake_outcome"]

log = Logger()


class CallInfo(Protocol):
    """What a waker may read about a call (for the push payload and its TTL)."""

    call_id: str
    aor: str
    caller_uri: str
    caller_name: str | None
    ring_deadline: float  # clock time at which the call gives up ringing (push TTL / expiration)

    def device_call_id(self, binding: Binding) -> str:
        """The Call-ID of the INVITE this device will get (decided now, kept for the call's life):
        a push names it so the app can match the INVITE, and the CANCEL of a missed call, to it.
        The caller in the INVITE's From is ``caller_name`` / ``caller_uri``."""


@dataclass
class WakeResult:
    """Outcome of one wake() for one call.

    woken: pushes handed to a provider successfully (the devices may register soon);
    all_failed: every push failed (dead token, config error, or retries given up) and none is in
    flight or planned, so nothing will come: a call with no branch left answers at once.
    """

    woken: int = 0
    all_failed: bool = False
    reason: str = ""


def wake_outcome(result: Any) -> WakeResult:
    """Read any duck-typed result (or None) as a WakeResult; unknown shapes mean "nothing woken"."""
    if isinstance(result, WakeResult):
        return result
    return WakeResult(
        woken=int(getattr(result, "woken", 0) or 0),
        all_failed=bool(getattr(result, "all_failed", False)),
        reason=str(getattr(result, "reason", "") or ""),
    )


class Waker(Protocol):
    def wake(self, call: CallInfo, bindings: list[Binding]) -> Deferred[Any]:
        """Wake these devices for `call`; fires with a WakeResult-like object, never errbacks on purpose."""

    def call_ended(self, call: CallInfo, answered_elsewhere: bool) -> None:
        """The call is over; pending pushes for it can stop (and "missed call" ones may go)."""


class LoggingWaker:
    """Used when no push provider is configured: logs what it would have woken, wakes nothing."""

    def wake(self, call: CallInfo, bindings: list[Binding]) -> Deferred[Any]:
        for b in bindings:
            log.info(
                "no push configured: would wake {provider} device {prid} for {aor}",
                provider=getattr(b, "pn_provider", None),
                prid=redact(getattr(b, "pn_prid", None)),
                aor=call.aor,
                call_id=call.call_id,
            )
        # "not woken" but not "failed for good": a device may still register on its own, so a
        # parked call keeps waiting until its ring timeout, as with Kamailio's t_suspend
        return succeed(WakeResult(woken=0, all_failed=False, reason="no push configured"))

    def call_ended(self, call: CallInfo, answered_elsewhere: bool) -> None:
        if logflags.debug_enabled:  # see libon_tsilo/logflags.py: a filtered event still costs µs
            log.debug("call ended (answered elsewhere: {ae})", ae=answered_elsewhere, call_id=call.call_id)
