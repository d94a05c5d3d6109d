"""In-dialog relaying once a call is connected: BYE, re-INVITE/UPDATE (with glare), INFO, MESSAGE,
OPTIONS, the ACKs of relayed re-INVITEs, and teardown when a flow or a transaction dies.

Each leg is its own dialog: a request received on one is re-originated on the other with that
dialog's identifiers and CSeq, and the final response is carried back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from libon_tsilo.b2bua import reliable, transfer
from libon_tsilo.b2bua.capabilities import ALLOW
# imported at run time, not only for the type checker: compiled (mypyc), the dataclass below
# reads its field types when the module loads, and crashed on a name imported under TYPE_CHECKING
from libon_tsilo.b2bua.ports import RetransmitHandle
from libon_tsilo.sip.message import Request, Response, make_response

if TYPE_CHECKING:
    from libon_tsilo.b2bua.call import Call

__all__ = ["request", "ack", "hang_up", "flow_lost", "PendingAck", "RELAYED", "ALLOW"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

RELAYED = frozenset({"INFO", "MESSAGE", "OPTIONS"})
# headers that give the body of a relayed request its meaning
_CONTEXT_HEADERS = ("Info-Package", "Content-Disposition", "Recv-Info")
_DIALOG_ENDING = (408, 481)  # RFC 5057: the dialog is gone


@dataclass
class PendingAck:
    """A relayed re-INVITE whose 2xx we answered: retransmitting until the ACK, which then goes on."""

    retransmit: RetransmitHandle
    to_leg: Any
    out_seq: int
    acked: bool  # we ACKed the far side already (the re-INVITE carried an offer)


def _other(call: Call, leg: Any) -> Any:
    return call.winner if leg is call.a else call.a


def _respond(call: Call, stx: Any, req: Request, status: int, reason: str | None = None,
             extra: tuple[tuple[str, str], ...] = ()) -> None:
    resp = make_response(req, status, reason)
    for name, value in extra:
        resp.add_header(name, value)
    call.port.respond(stx, resp)


def _copy_body(src: Request | Response, dst: Request | Response) -> None:
    if src.body:
        dst.set_header("Content-Type", src.content_type or "application/sdp")
        dst.body = src.body


def request(call: Call, leg: Any, req: Request, stx: Any) -> None:
    """A request inside one of the call's dialogs."""
    method = req.method
    if method == "PRACK":
        reliable.handle_prack(call, leg, req, stx)  # hop by hop: answered here, never relayed
        return
    if call.winner is None or call.ended:
        if method == "REFER" and not call.ended:
            # a refusal that keeps the early dialog (a 481 would end it, RFC 5057)
            _respond(call, stx, req, 403, "REFER Only In An Answered Call")
            return
        if not call.ended and _early_request(call, leg, req, stx):
            return
        _respond(call, stx, req, 481, "Call/Transaction Does Not Exist")
        return
    if not leg.dialog.check_remote_seq(req):
        _respond(call, stx, req, 500, "CSeq Out Of Order")
        return
    t = call.transfer
    if t is not None and method == "BYE" and leg is t.referrer:
        # RFC 5589: a referrer may leave once its REFER is accepted; the transferee stays
        _respond(call, stx, req, 200)
        t.referrer_left()
        return
    other = _other(call, leg)
    if method == "BYE":
        _respond(call, stx, req, 200)
        hang_up(call, leg, f"BYE from the {'caller' if leg is call.a else 'callee'}")
    elif t is not None and t.inert(other):
        # a transfer in progress: the far side has left, or is not bridged yet; try again later
        if method in ("INVITE", "UPDATE"):
            _respond(call, stx, req, 491, "Request Pending")
        else:
            _respond(call, stx, req, 500, "Transfer In Progress", (("Retry-After", "5"),))
    elif method == "REFER":
        transfer.refer(call, leg, req, stx, other)
    elif method in ("INVITE", "UPDATE"):
        if method == "UPDATE" and not req.body and call.timers is not None \
                and call.timers.refresh_received(leg, req, stx):
            return  # a pure session refresh of that leg, answered by us (RFC 4028: legs are separate)
        _offer(call, leg, req, stx, other)
    elif method in RELAYED:
        out = other.dialog.request(method, req.body, req.content_type)
        for name in _CONTEXT_HEADERS:
            for value in req.header_values(name):
                out.add_header(name, value)
        call.port.send_request(out, other.hop, lambda r: _relay_final(call, req, stx, r))
    else:
        _respond(call, stx, req, 501, "Not Implemented", (("Allow", ALLOW),))


def _early_request(call: Call, leg: Any, req: Request, stx: Any) -> bool:
    """UPDATE and INFO in an early dialog are not relayed (which branch would take them?), but a 481
    would end that early dialog (RFC 5057): answer with a code that only fails the transaction."""
    if req.method == "UPDATE":
        if req.body:  # an offer we cannot relay before the answer (RFC 3311 §5.2)
            _respond(call, stx, req, 488, "Not Acceptable Here")
        else:  # nothing to negotiate: accepted on this leg
            _respond(call, stx, req, 200, None, (("Contact", leg.dialog.contact),))
        return True
    if req.method == "INFO":  # RFC 6086: 469 fails only the INFO, the dialog goes on
        _respond(call, stx, req, 469, "Bad Info Package", (("Recv-Info", ""),))
        return True
    return False


def _relay_final(call: Call, req: Request, stx: Any, resp: Response) -> None:
    if resp.status < 200:
        return
    back = make_response(req, resp.status, resp.reason)
    _copy_body(resp, back)
    call.port.respond(stx, back)
    if resp.status in _DIALOG_ENDING and not call.ended:
        hang_up(call, None, f"{resp.status} on in-dialog {req.method}")


def _offer(call: Call, leg: Any, req: Request, stx: Any, other: Any) -> None:
    if call.offer_busy:
        # RFC 3261 §14.2 / RFC 3311: one offer/answer at a time across the whole call
        _respond(call, stx, req, 491, "Request Pending")
        return
    timers = call.timers
    if timers is not None and not timers.offer_received(leg, req, stx):
        return  # answered 422: its Session-Expires was below our Min-SE
    call.offer_busy = True
    out = other.dialog.request(req.method, req.body, req.content_type)
    if timers is not None:
        timers.relaying(other, out)
    call.port.send_request(out, other.hop, lambda r: _offer_final(call, leg, req, stx, other, out, r))


def _offer_final(call: Call, leg: Any, req: Request, stx: Any, other: Any, out: Request,
                 resp: Response) -> None:
    if resp.status < 200:
        return
    call.offer_busy = False
    back = make_response(req, resp.status, resp.reason)
    _copy_body(resp, back)
    if resp.status >= 300:
        call.port.respond(stx, back)
        if resp.status in _DIALOG_ENDING and not call.ended:
            hang_up(call, None, f"{resp.status} on re-{req.method}")
        return
    if resp.contacts:
        other.dialog.remote_target = str(resp.contacts[0].uri)  # a target refresh (§12.2.1.2)
    back.add_header("Contact", leg.dialog.contact)
    if call.timers is not None:
        call.timers.relayed(leg, req, back, other, out, resp)  # RFC 4028: both legs refreshed
    if req.method != "INVITE":
        call.port.respond(stx, back)
        return
    acked = bool(req.body)
    if acked:
        _send_ack(call, other, out.cseq.seq, b"", None)
    if call.ended:
        call.port.respond(stx, back)
        return
    key = (leg.dialog.local_tag, req.cseq.seq)
    handle = call.port.respond_2xx(stx, back, lambda: _no_ack(call, key))
    call.pending_acks[key] = PendingAck(handle, other, out.cseq.seq, acked)


def _no_ack(call: Call, key: tuple[str, int]) -> None:
    call.pending_acks.pop(key, None)
    if not call.ended:
        hang_up(call, None, "no ACK for a re-INVITE 2xx")


def _send_ack(call: Call, leg: Any, seq: int, body: bytes, content_type: str | None) -> None:
    call.port.send_ack(leg.dialog.request("ACK", body, content_type, seq=seq), leg.hop)


def ack(call: Call, leg: Any, ack_req: Request) -> None:
    """An ACK inside one of the call's dialogs: for our answer to the INVITE or to a re-INVITE."""
    seq = ack_req.cseq.seq
    # a relayed re-INVITE first: after a transfer the A-leg's dialog is the transferee's, whose
    # CSeq numbers may meet the (synthetic) INVITE's of the call it now belongs to
    pending = call.pending_acks.pop((leg.dialog.local_tag, seq), None)
    if pending is None:
        if leg is call.a and seq == call.a.invite.cseq.seq:
            call.caller_acked(ack_req)
        return  # else a retransmitted ACK
    pending.retransmit.stop()
    if not pending.acked:
        _send_ack(call, pending.to_leg, pending.out_seq, ack_req.body, ack_req.content_type)
        if call.timers is not None:
            call.timers.sent_sdp(pending.to_leg, ack_req.body)


def hang_up(call: Call, from_leg: Any, why: str, reason: str | None = None) -> None:
    """BYE every connected leg but `from_leg` (which hung up itself), then end the call.
    `reason`: a Reason header value (RFC 3326) for the BYEs, when we are the one ending it."""
    t = call.transfer
    if t is not None:
        t.call_ended(call)
    for leg in (call.a, call.winner):
        if leg is None or leg is from_leg or (t is not None and t.inert(leg)):
            continue
        try:
            bye = leg.dialog.request("BYE")
            if reason:
                bye.add_header("Reason", reason)
            call.port.send_request(bye, leg.hop, _log_bye_result(call))
        except Exception:
            log.failure("cannot send BYE", call_id=call.call_id)
    call.end(why)


def _log_bye_result(call: Call) -> Any:
    def done(resp: Response) -> None:
        if resp.status >= 300:
            log.info("BYE answered {status}", status=resp.status, call_id=call.call_id)
    return done


def flow_lost(call: Call, flow_id: str) -> None:
    """A connection a leg depends on closed."""
    if call.ended:
        return
    if not call.state.final:
        if call.a.hop.flow_id == flow_id:
            call.finish_unanswered(487, "Request Terminated", None, "caller's connection closed")
        else:
            call.branch_flow_lost(flow_id)
        return
    t = call.transfer
    for leg in (call.a, call.winner):
        if leg is not None and leg.hop.flow_id == flow_id:
            if t is not None and leg is t.referrer:
                t.referrer_left()  # as if it had sent BYE: the transferee waits for its new party
                return
            hang_up(call, leg, "connection closed")
            return
