"""Blind transfer: an in-dialog REFER (RFC 3515) from either party of an answered call.

The B2BUA carries the transfer out itself (it is the UA both parties talk to):

1. The REFER is checked (one transfer at a time per call, a SIP Refer-To naming one of our users,
   no Replaces: see `refusal`; a call out's trunk leg stays in its call: `Call.transferable`) and
   answered 202; the referrer gets NOTIFY (Event: refer, message/sipfrag) "SIP/2.0 100 Trying".
   RFC 4488 `Refer-Sub: false` is honoured: no NOTIFY.
2. A new call goes to the target through the normal call path (park, push, late fork), from the
   transferee's identity: the caller's own identity as the original call established it, or the
   callee's AOR when the callee is the transferee. It carries no SDP (RFC 3725 flow I): the
   target's 2xx brings the offer.
3. When the target answers, the transferee gets a re-INVITE with that offer; its answer goes to
   the target in the ACK. The transferee's dialog now belongs to the new call, the referrer gets
   the final NOTIFY "SIP/2.0 200 OK" and then our BYE, and the original call ends ("transferred").
4. If the new call fails, the referrer gets the final NOTIFY with its status and the original call
   goes on untouched; if the referrer has hung up meanwhile (allowed once the REFER is accepted),
   the transferee, who has nobody left, gets a BYE.

Only the initial 100 and the final status are notified: 18x progress is optional (RFC 3515
§2.4.5) and the referrer needs the outcome. A foreign target is refused: this server routes calls
to its own users only, so accepting one would make REFER an open relay.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from libon_tsilo.b2bua.identity import CallerTrust
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import NameAddr
from libon_tsilo.sip.message import Request, Response, make_response, new_branch, new_call_id, new_tag
from libon_tsilo.util import redact_uri

if TYPE_CHECKING:
    from libon_tsilo.b2bua.call import Call

__all__ = ["Transfer", "refer", "refusal"]

log = Logger()

SIPFRAG = "message/sipfrag;version=2.0"
_SUBSCRIPTION_EXPIRES = 120  # the new call rings at most [calls] ring_timeout; NOTIFY ends it sooner
# an offer in flight on the transferee's call (a relayed re-INVITE, our session refresh) ends within a
# round trip: the answered target waits for it, well inside its 64*T1 wait for our ACK
_BUSY_RETRY = 2.0
_BUSY_RETRIES = 3


def refusal(call: Call, req: Request) -> tuple[int, str] | NameAddr:
    """(status, reason) when the REFER is refused, else its Refer-To."""
    if call.transfer is not None:
        return 491, "Request Pending"  # one transfer at a time per call
    if call.mgr.shutting_down:
        return 503, "Service Unavailable"
    values = req.header_values("Refer-To")
    if len(values) != 1:
        return 400, "Exactly One Refer-To Required"
    try:
        target = NameAddr.parse(values[0])
        uri = target.uri
    except (ParseError, ValueError):
        return 400, "Bad Refer-To"
    if uri.scheme not in ("sip", "sips"):
        return 403, "Transfer Target Must Be A SIP URI"
    if uri.headers:
        return 403, "Attended Transfer Not Supported"  # Replaces (RFC 3891) and friends
    if (uri.params.get("method") or "INVITE").upper() != "INVITE":
        return 403, "Only INVITE Transfers"
    if not uri.user or not call.mgr.is_local(uri):
        return 403, "Transfer Target Not Served Here"  # no open relay through REFER
    return target


def refer(call: Call, leg: Any, req: Request, stx: Any, other: Any) -> None:
    """An in-dialog REFER from `leg` (the referrer) of an answered call; `other` is the transferee."""
    target = refusal(call, req)
    if isinstance(target, NameAddr) and not call.transferable(other):
        target = 403, "Trunk Leg Not Transferable"
    counters = call.mgr.counters
    if not isinstance(target, NameAddr):
        status, reason = target
        counters["transfers_refused"] += 1
        log.info("REFER refused: {status} {reason}", status=status, reason=reason, call_id=call.call_id)
        call.port.respond(stx, make_response(req, status, reason))
        return
    subscribe = (req.header("Refer-Sub") or "").strip().lower() != "false"
    accepted = make_response(req, 202, "Accepted")
    accepted.add_header("Contact", leg.dialog.contact)
    if not subscribe:
        accepted.add_header("Refer-Sub", "false")
    call.port.respond(stx, accepted)
    t = Transfer(call, leg, other, req.cseq.seq, subscribe)
    call.transfer = t
    counters["transfers"] += 1
    log.info("REFER accepted: transfer to {target}", target=redact_uri(str(target.uri)), call_id=call.call_id)
    t.notify("100 Trying", final=False)
    t.place(target)


def _no_flow() -> Any:
    """The flow of the new call's caller side: none (no flow id, nothing watched): it is us."""
    return SimpleNamespace(id=None, key=SimpleNamespace(transport="udp", remote=("transfer.invalid", 0)))


class _Outcome:
    """Stands for the new call's INVITE server transaction: what the call answers comes to us."""

    reliable = True  # no 2xx retransmission: our own bridging ACKs it

    def __init__(self, transfer: Transfer, request: Request) -> None:
        self.transfer = transfer
        self.request = request

    def respond(self, resp: Response) -> None:
        self.transfer.new_call_response(resp)


class _Leftover:
    """The referrer's dialog after the call was handed over: its BYE is answered until ours ends it."""

    def __init__(self, transfer: Transfer) -> None:
        self.transfer = transfer

    def in_dialog(self, leg: Any, req: Request, stx: Any) -> None:
        port = self.transfer.call.port
        if req.method == "BYE":
            port.respond(stx, make_response(req, 200))
            self.transfer.forget_referrer()
        else:
            port.respond(stx, make_response(req, 481, "Call/Transaction Does Not Exist"))

    def ack_in_dialog(self, leg: Any, ack: Request) -> None:
        return None

    def branch_response(self, leg: Any, resp: Response) -> None:
        return None  # a late 2xx retransmission of the referrer's INVITE: the call it set up is over


class Transfer:
    """One accepted REFER, from the 202 to the final NOTIFY."""

    def __init__(self, call: Call, referrer: Any, transferee: Any, refer_seq: int, subscribe: bool) -> None:
        self.call = call
        self.mgr = call.mgr
        self.referrer = referrer
        self.transferee = transferee
        self.refer_seq = refer_seq
        self.subscribe = subscribe
        self.referrer_gone = False
        self.new_call: Call | None = None
        self.synthetic: Any = None  # the new call's caller-side leg, inert until bridged
        self.bridged = False
        self.done = False
        self.pending: IDelayedCall | None = None
        self.glare_retried = False
        self.busy_retries = 0
        self.leftover: _Leftover | None = None

    # -- what relay.py asks ------------------------------------------------------------------

    def inert(self, leg: Any) -> bool:
        """A leg nothing may be sent to: the referrer once it left, the new call's B2BUA side."""
        return (leg is self.referrer and self.referrer_gone) or (leg is self.synthetic and not self.bridged)

    def referrer_left(self) -> None:
        """The referrer hung up (BYE, lost connection) after the REFER was accepted: the transferee
        stays, waiting for the new call (RFC 5589 blind transfer)."""
        self.referrer_gone = True
        self.mgr.unregister_leg(self.referrer)
        if self.call.timers is not None:
            self.call.timers.leg_gone(self.referrer)

    def call_ended(self, call: Call) -> None:
        """relay.hang_up is ending one of the two calls."""
        if call is self.call:
            self._abort("the transferee's call ended")
        elif call is self.new_call and not self.bridged:
            log.info("transfer target hung up before the transfer completed", call_id=self.call.call_id)

    # -- the new call ------------------------------------------------------------------------

    def place(self, target: NameAddr) -> None:
        call = self.call
        identity, trust = self._transferee_identity()
        uri = target.uri
        invite = Request("INVITE", str(uri))
        invite.add_header("Via", f"SIP/2.0/UDP transfer.invalid;branch={new_branch()}")
        invite.add_header("Max-Forwards", "70")
        invite.add_header("From", str(NameAddr(identity.uri, identity.display, {"tag": new_tag()})))
        invite.add_header("To", f"<{uri}>")
        invite.add_header("Call-ID", new_call_id())
        invite.add_header("CSeq", "1 INVITE")
        invite.add_header("Contact", self.transferee.dialog.contact)
        outcome = _Outcome(self, invite)
        self.mgr.place_call(invite, outcome, _no_flow(), trust)
        new = self.mgr.calls.get(invite.call_id)
        if new is None or new.a.stx is not outcome:
            return  # refused at once: new_call_response has reported it
        self.new_call = new
        self.synthetic = new.a
        new.transfer = self
        log.info("transfer call {new}", new=new.call_id, call_id=call.call_id)

    def _transferee_identity(self) -> tuple[NameAddr, CallerTrust]:
        call = self.call
        if self.transferee is call.a:
            return call.a.invite.from_, call.trust  # shown as the original caller was shown
        # the callee is the transferee: it is our user, reached at its registration
        return NameAddr(call.callee_uri), CallerTrust(trusted=False, identity=call.callee_uri)

    def new_call_response(self, resp: Response) -> None:
        status = resp.status
        if self.done or status < 200:
            return  # 18x are not notified (module doc)
        if status < 300:
            # let Call.connect finish what it is doing before we touch the calls
            self.pending = self.call.clock.callLater(0, self._bridge, resp)
            return
        self._fail(f"{status} {resp.reason}", f"new call failed: {status}")

    def _bridge(self, ok: Response) -> None:
        self.pending = None
        new = self.new_call
        if self.done or new is None:
            return
        if new.ended:
            self._fail("487 Request Terminated", "the target hung up at once")
            return
        if self.call.offer_busy and not self.call.ended and self.busy_retries < _BUSY_RETRIES:
            self.busy_retries += 1
            self.pending = self.call.clock.callLater(_BUSY_RETRY, self._bridge, ok)
            return
        if self.call.offer_busy or self.call.ended:
            self._drop_new_call("the transferee's session is busy")
            self._fail("491 Request Pending", "offer in progress on the transferee's leg")
            return
        if not ok.body:
            # our INVITE had no offer, so its 2xx must: without one there is nothing to bridge
            self._drop_new_call("the target's 2xx has no offer")
            self._fail("488 Not Acceptable Here", "the target answered without SDP")
            return
        self.call.offer_busy = True  # re-INVITEs of either original party wait (491)
        new.offer_busy = True  # and so do the target's
        leg = self.transferee
        out = leg.dialog.request("INVITE", ok.body, ok.content_type)
        self.call.port.send_request(out, leg.hop, lambda r: self._reinvited(out, r, ok))

    def _reinvited(self, out: Request, resp: Response, ok: Response) -> None:
        if resp.status < 200:
            return
        self.call.offer_busy = False
        leg = self.transferee
        new = self.new_call
        assert new is not None
        if resp.status < 300:
            if resp.contacts:
                leg.dialog.remote_target = str(resp.contacts[0].uri)
            self.call.port.send_ack(leg.dialog.request("ACK", seq=out.cseq.seq), leg.hop)
        if self.done:
            return
        if new.ended:
            # the target left while the transferee was being moved to it: nothing to go back to
            self.done = True
            self._detach()
            self.notify("487 Request Terminated", final=True)
            _hang_up(self.call, None, "transfer target hung up")
            return
        if resp.status == 491 and not self.glare_retried:
            # RFC 3261 §14.1: our re-INVITE crossed one of the transferee's; try once more after
            # 2.1-4 s when we chose the dialog's Call-ID (the transferee is our callee), else 0-2 s
            self.glare_retried = True
            delay = random.uniform(0.0, 2.0) if leg is self.call.a else random.uniform(2.1, 4.0)
            self.pending = self.call.clock.callLater(delay, self._bridge, ok)
            return
        if resp.status >= 300:
            self._drop_new_call("the transferee refused the target's session")
            self._fail(f"{resp.status} {resp.reason}", f"re-INVITE to the transferee: {resp.status}")
            return
        self._commit(resp)

    def _commit(self, answer: Response) -> None:
        """The transferee talks to the target: hand its dialog to the new call, end the old one."""
        new = self.new_call
        assert new is not None
        mgr = self.mgr
        self.done = True
        self.bridged = True
        mgr.unregister_leg(new.a)
        new.a.dialog = self.transferee.dialog
        mgr.register_leg(new, new.a)
        hop = new.a.hop
        mgr.watch_flow(new, hop.flow_id, hop.transport)
        new.offer_busy = False
        new.transfer = None
        new.caller_acked(_ack(answer))  # the answer goes to the target in its ACK
        old = self.call
        old.transfer = None
        if not self.referrer_gone:
            self.notify("200 OK", final=True, then_bye=True)
        log.info("transferred to {new}", new=new.call_id, call_id=old.call_id)
        old.end("transferred")
        if not self.referrer_gone:
            # after end(): its cleanup drops the referrer's dialog; the leftover answers a crossing BYE
            self.leftover = _Leftover(self)
            # (a stand-in for the ended call: the dialog table only asks it to answer a BYE)
            mgr.dialogs[self.referrer.dialog.key] = (self.leftover, self.referrer)  # type: ignore[assignment]

    def _fail(self, status_line: str, why: str) -> None:
        log.info("transfer failed: {why}", why=why, call_id=self.call.call_id)
        self.done = True
        self._detach()
        self.notify(status_line, final=True)
        if self.referrer_gone and not self.call.ended:
            _hang_up(self.call, self.referrer, "transfer failed, referrer gone")

    def _drop_new_call(self, why: str) -> None:
        """The target answered but will not be bridged: ACK its offer with no answer and BYE it."""
        new = self.new_call
        if new is None or new.ended:
            return
        new.transfer = None
        new.caller_acked(_ack(None))
        self.bridged = False
        _hang_up(new, new.a, why)

    def _abort(self, why: str) -> None:
        if self.done:
            return
        self.done = True
        self._detach()
        new = self.new_call
        if new is None or new.ended:
            return
        new.transfer = None
        if not new.state.final:
            new.caller_cancel(None)
        else:
            new.caller_acked(_ack(None))
            _hang_up(new, new.a, why)

    def _detach(self) -> None:
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        if self.call.transfer is self:
            self.call.transfer = None
        if self.new_call is not None and self.new_call.transfer is self:
            self.new_call.transfer = None

    # -- the referrer's implicit subscription ------------------------------------------------

    def notify(self, status_line: str, final: bool, then_bye: bool = False) -> None:
        if self.referrer_gone or not self.subscribe:
            if then_bye:
                self._bye_referrer(None)
            return
        leg = self.referrer
        req = leg.dialog.request("NOTIFY", f"SIP/2.0 {status_line}\r\n".encode(), SIPFRAG)
        req.add_header("Event", f"refer;id={self.refer_seq}")
        state = "terminated;reason=noresource" if final else f"active;expires={_SUBSCRIPTION_EXPIRES}"
        req.add_header("Subscription-State", state)
        req.add_header("Contact", leg.dialog.contact)
        self.call.port.send_request(req, leg.hop, lambda r: self._notified(r, then_bye))

    def _notified(self, resp: Response, then_bye: bool) -> None:
        if resp.status < 200:
            return
        if resp.status >= 300:
            log.info("NOTIFY answered {status}", status=resp.status, call_id=self.call.call_id)
        if then_bye:
            self._bye_referrer(resp)

    def _bye_referrer(self, _: Any) -> None:
        if self.referrer_gone:
            self.forget_referrer()
            return
        leg = self.referrer
        self.call.port.send_request(leg.dialog.request("BYE"), leg.hop, lambda r: self.forget_referrer())

    def forget_referrer(self) -> None:
        self.referrer_gone = True
        found = self.mgr.dialogs.get(self.referrer.dialog.key)
        if found is not None and found[0] is self.leftover:
            del self.mgr.dialogs[self.referrer.dialog.key]


def _ack(answer: Response | None) -> Request:
    """What Call.caller_acked reads of an ACK: its body (the answer for the target) and type."""
    ack = Request("ACK", "sip:transfer.invalid")
    if answer is not None and answer.body:
        ack.add_header("Content-Type", answer.content_type or "application/sdp")
        ack.body = answer.body
    return ack


def _hang_up(call: Call, from_leg: Any, why: str) -> None:
    from libon_tsilo.b2bua import relay  # relay imports this module

    relay.hang_up(call, from_leg, why)
