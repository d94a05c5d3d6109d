"""The two kinds of legs of a call: the caller's (A, UAS side) and one per device branch (B, UAC)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from libon_tsilo.b2bua.dialog import Dialog
from libon_tsilo.b2bua.ports import ClientHandle, Hop, RetransmitHandle, ServerHandle
from libon_tsilo.sip.message import Request, Response

if TYPE_CHECKING:
    from libon_tsilo.registrar.binding import Binding

__all__ = ["ALeg", "BLeg", "BranchState"]


class ALeg:
    """The caller's side: the INVITE's server transaction and the dialog we create by answering."""

    kind = "A"
    __slots__ = ("invite", "stx", "dialog", "retransmit", "reliable")  # one per call, parked ones included

    def __init__(self, invite: Request, stx: ServerHandle, dialog: Dialog) -> None:
        self.invite = invite
        self.stx = stx
        self.dialog = dialog
        self.retransmit: RetransmitHandle | None = None  # our 2xx, until the caller ACKs it
        # reliable.CallerReliability once a 18x was relayed to a caller with 100rel; False: without
        self.reliable: Any = None

    @property
    def hop(self) -> Hop:
        return self.dialog.hop

    def compact(self) -> None:
        """The call parks, maybe for a long time, or has ended while its INVITE transaction waits
        out 64*T1: keep the INVITE (and the 100 Trying its transaction resends) as bytes only; they
        are parsed again, transparently, if read again."""
        compact = getattr(self.stx, "compact", None)  # the real ServerTransaction; test fakes lack it
        if compact is not None:
            compact()
        self.invite.compact()

    def stop_retransmit(self) -> None:
        if self.retransmit is not None:
            self.retransmit.stop()
            self.retransmit = None

    def stop_provisionals(self) -> None:
        """A final response went out: no more reliable 18x retransmissions (RFC 3262 §3)."""
        if self.reliable:
            self.reliable.stop()


class BranchState:
    """Branch states as constants: a branch is a plain UAC INVITE whose life is short and linear."""

    CALLING: Final = "calling"  # INVITE sent, nothing but 100 yet
    EARLY: Final = "early"  # a 1xx > 100 came
    ANSWERED: Final = "answered"  # 2xx came
    CANCELLING: Final = "cancelling"  # we sent (or queued) a CANCEL; a final response is still to come
    FAILED: Final = "failed"  # 3xx-6xx (or a local 408/503, or 487 after our CANCEL)

    PENDING: Final = frozenset({CALLING, EARLY, CANCELLING})


class BLeg:
    """One device branch: its INVITE client transaction and, once it answers, its dialog."""

    kind = "B"
    __slots__ = ("binding", "invite", "dialog", "created_at", "state", "ctx", "last_status", "cancelled",
                 "sent_contact", "sent_flow", "acked", "ack_body", "asked_se", "tried", "rseqs")

    def __init__(self, binding: Binding, invite: Request, dialog: Dialog, created_at: float) -> None:
        self.binding = binding
        self.invite = invite
        self.dialog = dialog
        self.created_at = created_at
        self.state = BranchState.CALLING
        self.ctx: ClientHandle | None = None
        self.last_status: int | None = None
        self.cancelled = False
        # what the branch was sent to, frozen: the registrar may update the binding in place
        self.sent_contact: str = binding.contact_uri
        self.sent_flow: str | None = None
        self.acked = False
        self.ack_body: tuple[bytes, str | None] = (b"", None)  # a late-offer answer is resent with it
        self.asked_se: int | None = None  # Session-Expires asked after a 422 (RFC 4028), else the config's
        # binding keys of the device's flows this branch already failed on (RFC 5626 flow failover)
        self.tried: tuple[str, ...] = ()
        self.rseqs: dict[str, int] | None = None  # last RSeq PRACKed, per early dialog (To tag)

    @property
    def hop(self) -> Hop:
        return self.dialog.hop

    @property
    def key(self) -> str:
        return self.binding.key

    @property
    def pending(self) -> bool:
        return self.state in BranchState.PENDING

    def note(self, resp: Response) -> None:
        self.last_status = resp.status

    def cancel(self, reason: str | None) -> bool:
        """Ask the transaction layer to CANCEL (it waits for a provisional, §9.1). True if asked now."""
        if self.state not in (BranchState.CALLING, BranchState.EARLY) or self.ctx is None:
            return False
        self.state = BranchState.CANCELLING
        self.cancelled = True
        self.ctx.cancel([("Reason", reason)] if reason else [])
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "contact": self.binding.contact_uri,
            "state": self.state,
            "last_response": self.last_status,
            "call_id": self.dialog.call_id,
        }
