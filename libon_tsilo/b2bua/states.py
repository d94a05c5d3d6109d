"""Call states, one small class each (after Sippy's UaState*): each overrides the event methods
of CallState that make sense in it and ignores the rest. The mechanics (sending, cancelling, cleaning up)
live on the Call; a state only decides."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from libon_tsilo import logflags
from libon_tsilo.b2bua.forking import (
    REASON_RING_TIMEOUT,
    best_final,
    caller_status,
    is_global_failure,
    reason_for,
)

if TYPE_CHECKING:
    from libon_tsilo.registrar.binding import Binding
    from libon_tsilo.b2bua.call import Call
    from libon_tsilo.b2bua.legs import BLeg
    from libon_tsilo.sip.message import Response

__all__ = ["CallState", "Parked", "Forking", "Diverted", "Connected", "Ended"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib


class CallState:
    """What a call does with each thing that can happen to it: one method per event, so a reader
    (and a type checker) follows a REGISTER from the silo through Call.add_branch into
    `binding_appeared` of the state the call is in. A state overrides the events that mean
    something in it; the others are ignored here."""

    name = "?"
    final = False  # the caller has its final response (no more branches may be added)

    def _ignored(self, call: Call, event: str) -> None:
        if logflags.debug_enabled:  # see libon_tsilo/logflags.py: a filtered event still costs µs
            log.debug("{state}: {event} ignored", state=self.name, event=event, call_id=call.call_id)

    def binding_appeared(self, call: Call, binding: Binding) -> None:
        """A device of the callee registered (the silo's late fork)."""
        self._ignored(call, "binding_appeared")

    def provisional(self, call: Call, branch: BLeg, response: Response, reliable: bool) -> None:
        """A device sent a 1xx (`reliable`: with 100rel, RFC 3262)."""
        self._ignored(call, "provisional")

    def answered(self, call: Call, branch: BLeg, response: Response) -> None:
        """A device sent a 2xx. It can race any teardown: the device is in a call nobody will take,
        so ACK and BYE it."""
        call.ack_and_bye(branch, response)

    def failed(self, call: Call, branch: BLeg, response: Response) -> None:
        """A branch ended with a final failure."""
        self._ignored(call, "failed")

    def caller_cancel(self, call: Call, reason: str | None) -> None:
        """The caller CANCELled (`reason`: its Reason header, passed on to the branches)."""
        self._ignored(call, "caller_cancel")

    def ring_timeout(self, call: Call) -> None:
        self._ignored(call, "ring_timeout")

    def wake_done(self, call: Call) -> None:
        """The waker's pushes settled (call.wake_result says how)."""
        self._ignored(call, "wake_done")


class _Ringing(CallState):
    """Shared by Parked and Forking: the caller is still waiting for a final response."""

    def caller_cancel(self, call: Call, reason: str | None) -> None:
        call.finish_unanswered(487, "Request Terminated", branch_reason=reason, why="caller cancelled")

    def ring_timeout(self, call: Call) -> None:
        call.unanswered(480, "Temporarily Unavailable", branch_reason=REASON_RING_TIMEOUT,
                        why="ring timeout", ring_timeout=True)

    def wake_done(self, call: Call) -> None:
        call.check_exhausted()


class Parked(_Ringing):
    """No branch is running: waiting for a binding to appear (resume) or for the ring timeout."""

    name = "parked"

    def binding_appeared(self, call: Call, binding: Binding) -> None:
        call.resume(binding)


class Forking(_Ringing):
    """Branches are running; more may be added as devices register."""

    name = "forking"

    def binding_appeared(self, call: Call, binding: Binding) -> None:
        call.fork(binding)

    def provisional(self, call: Call, branch: BLeg, response: Response, reliable: bool) -> None:
        call.relay_provisional(branch, response, reliable)

    def answered(self, call: Call, branch: BLeg, response: Response) -> None:
        call.connect(branch, response)

    def failed(self, call: Call, branch: BLeg, response: Response) -> None:
        status = response.status
        if not branch.cancelled:
            # a 487 to our own CANCEL (a reconnected device) says nothing about the callee
            call.failures.append(status)
        if is_global_failure(status):
            # §16.7 step 5: a 6xx ends the fork at once
            call.unanswered(status, response.reason, reason_for(status, response.reason),
                            why=f"{status} from a device")
            return
        call.check_exhausted()


class Diverted(CallState):
    """The devices failed and the call went to voicemail (b2bua/voicemail.py): one B-leg, ``leg``,
    rings the voicemail server. The caller still waits; if voicemail fails too, the caller gets
    the failure the devices gave (``status``), not voicemail's."""

    name = "voicemail"

    def __init__(self, status: int, reason: str | None, why: str) -> None:
        self.status = status
        self.reason = reason
        self.why = why
        self.leg: BLeg | None = None

    def provisional(self, call: Call, branch: BLeg, response: Response, reliable: bool) -> None:
        call.relay_provisional(branch, response, reliable)

    def answered(self, call: Call, branch: BLeg, response: Response) -> None:
        # a device that answered as its CANCEL crossed wins too: the user did pick up
        call.connect(branch, response)

    def failed(self, call: Call, branch: BLeg, response: Response) -> None:
        if branch is not self.leg:
            return  # a device branch cancelled when the call was forwarded: its 487
        call.voicemail_failed(self, f"voicemail answered {response.status}")

    def caller_cancel(self, call: Call, reason: str | None) -> None:
        call.finish_unanswered(487, "Request Terminated", branch_reason=reason, why="caller cancelled")

    def ring_timeout(self, call: Call) -> None:
        call.voicemail_failed(self, "voicemail did not answer")


class Connected(CallState):
    """The caller got our 2xx: from now on the call relays in-dialog requests between two dialogs."""

    name = "connected"
    final = True


class Ended(CallState):
    name = "ended"
    final = True


def exhausted_status(failures: list[int]) -> int:
    """What the caller gets when every branch failed and nothing else can come."""
    return caller_status(best_final(failures))
