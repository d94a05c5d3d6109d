"""Call states, one small class each (after Sippy's UaState*): each reacts to the typed events
that make sense in it and ignores the rest. The mechanics (sending, cancelling, cleaning up)
live on the Call; a state only decides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from libon_tsilo.b2bua import events as ev
from libon_tsilo import logflags
from libon_tsilo.b2bua.forking import (
    REASON_RING_TIMEOUT,
    best_final,
    caller_status,
    is_global_failure,
    reason_for,
)

if TYPE_CHECKING:
    from libon_tsilo.b2bua.call import Call

__all__ = ["CallState", "Parked", "Forking", "Connected", "Ended"]

log = Logger()


class CallState:
    name = "?"
    final = False  # the caller has its final response (no more branches may be added)

    def handle(self, call: Call, event: ev.Event) -> Any:
        method = getattr(self, "on_" + type(event).__name__, None)
        if method is None:
            if logflags.debug_enabled:  # see libon_tsilo/logflags.py: a filtered event still costs µs
                log.debug("{state}: {event} ignored", state=self.name, event=type(event).__name__,
                          call_id=call.call_id)
            return None
        return method(call, event)

    # a 2xx can race any teardown: the device is in a call nobody will take, so ACK and BYE it
    def on_Answered(self, call: Call, e: ev.Answered) -> None:
        call.ack_and_bye(e.branch, e.response)


class _Ringing(CallState):
    """Shared by Parked and Forking: the caller is still waiting for a final response."""

    def on_CallerCancel(self, call: Call, e: ev.CallerCancel) -> None:
        call.finish_unanswered(487, "Request Terminated", branch_reason=e.reason, why="caller cancelled",
                               park_error=CallerCancelled())

    def on_RingTimeout(self, call: Call, e: ev.RingTimeout) -> None:
        call.finish_unanswered(480, "Temporarily Unavailable", branch_reason=REASON_RING_TIMEOUT,
                               why="ring timeout", park_error=RingTimeout())

    def on_WakeDone(self, call: Call, e: ev.WakeDone) -> None:
        call.check_exhausted()


class Parked(_Ringing):
    """No branch is running: waiting for a binding to appear (resume) or for the ring timeout."""

    name = "parked"

    def on_BindingAppeared(self, call: Call, e: ev.BindingAppeared) -> None:
        call.resume(e.binding)


class Forking(_Ringing):
    """Branches are running; more may be added as devices register."""

    name = "forking"

    def on_BindingAppeared(self, call: Call, e: ev.BindingAppeared) -> None:
        call.fork(e.binding)

    def on_Provisional(self, call: Call, e: ev.Provisional) -> None:
        call.relay_provisional(e.branch, e.response, e.reliable)

    def on_Answered(self, call: Call, e: ev.Answered) -> None:
        call.connect(e.branch, e.response)

    def on_Failed(self, call: Call, e: ev.Failed) -> None:
        status = e.response.status
        if not e.branch.cancelled:
            # a 487 to our own CANCEL (a reconnected device) says nothing about the callee
            call.failures.append(status)
        if is_global_failure(status):
            # §16.7 step 5: a 6xx ends the fork at once
            call.finish_unanswered(status, e.response.reason, reason_for(status, e.response.reason),
                                   why=f"{status} from a device", park_error=None)
            return
        call.check_exhausted()


class Connected(CallState):
    """The caller got our 2xx: from now on the call relays in-dialog requests between two dialogs."""

    name = "connected"
    final = True


class Ended(CallState):
    name = "ended"
    final = True


class ParkAborted(Exception):
    """Base of the errbacks of a parked call's Deferred."""


class RingTimeout(ParkAborted):
    pass


class CallerCancelled(ParkAborted):
    pass


def exhausted_status(failures: list[int]) -> int:
    """What the caller gets when every branch failed and nothing else can come."""
    return caller_status(best_final(failures))
