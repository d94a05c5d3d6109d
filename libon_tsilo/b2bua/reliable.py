"""Reliable provisional responses (RFC 3262, "100rel"), hop by hop: the B2BUA is a UA on each leg.

- Toward a device (our UAC side): a branch INVITE that carries an offer says `Supported: 100rel`
  (never Require: the caller's needs are met on the caller's own leg). A reliable 18x from the
  device (Require: 100rel + RSeq) is PRACKed on that branch's early dialog, in RSeq order
  (retransmissions and out-of-order ones are dropped, §4); the 200 to our PRACK is consumed here.
- Toward the caller (our UAS side): a 18x goes reliably when the caller requires 100rel, or
  supports it and the device's 18x was reliable; else as before. Ours carry our own RSeq, are
  resent after T1, 2*T1, 4*T1... until the caller's PRACK, and give up at 64*T1 with a 5xx to the
  INVITE (§3). They are resent on stream transports too: the mechanism is end to end, and a proxy
  between the caller and us may forward over UDP. One reliable 18x is outstanding at a time; later
  ones queue. The caller's PRACK is answered 200 here, never relayed. The final response stops the
  retransmissions; a 2xx waits for the PRACK of an outstanding 18x with SDP (§3 MUST NOT), and if
  that PRACK never comes, the device that answered gets a BYE and the caller a 500.
- Offer/answer in PRACK is not done: the SDP a reliable 18x carries to the caller is always the
  answer to the caller's offer, copied byte for byte. A late-offer INVITE (no SDP) is not offered
  100rel toward devices, and a reliable 18x we send for it carries no SDP (the offer comes in the
  2xx, as without 100rel). A PRACK with a body gets 488 (its response is acknowledged all the same).
- Forking: the caller sees one early dialog (ours), so only the first device's early SDP reaches
  it. An early answer taken reliably is binding (RFC 3264), and another device's 2xx would bring a
  different one: while more than one branch may answer, a caller that only supports 100rel gets its
  18x unreliably (its SDP a preview), and one that requires it gets them reliably without SDP.
"""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from libon_tsilo.sip.message import Request, Response, make_response

if TYPE_CHECKING:
    from libon_tsilo.b2bua.call import Call
    from libon_tsilo.b2bua.legs import BLeg

__all__ = [
    "TAG", "CallerReliability", "caller_mode", "offers_to_device", "device_provisional", "send_to_caller",
    "handle_prack",
]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

TAG = "100rel"
_MAX_QUEUED = 8  # 18x waiting behind an unacknowledged one; a device ringing that much is broken


def _has_tag(msg: Request | Response, header: str) -> bool:
    return any(v.strip().lower() == TAG for v in msg.header_values(header))


def caller_mode(invite: Request) -> str | None:
    """"require", "supported" or None: what the caller's INVITE says about 100rel."""
    if _has_tag(invite, "Require"):
        return "require"
    if _has_tag(invite, "Supported"):
        return "supported"
    return None


def offers_to_device(caller_invite: Request) -> bool:
    """A branch INVITE with an offer supports 100rel: a device's reliable 18x then carries its answer,
    which we can take. Without an offer its 18x would carry an offer whose answer we do not have.
    (capabilities.py writes the Supported header.)"""
    return bool(caller_invite.body)


# -- the device side ---------------------------------------------------------------------------


def _rseq(resp: Response) -> int | None:
    value = resp.header("RSeq")  # an index lookup: most 18x have none, and Require is a list to split
    if value is None or not _has_tag(resp, "Require"):
        return None
    try:
        rseq = int(value.strip())
    except ValueError:
        return None
    return rseq if 0 < rseq < 2**32 else None


def device_provisional(call: Call, leg: BLeg, resp: Response) -> tuple[bool, bool]:
    """A 1xx (> 100) of a branch: (relay it?, was it reliable?). A reliable one is PRACKed here."""
    rseq = _rseq(resp)
    if rseq is None:
        return True, False
    tag = resp.to.tag or ""
    seen = leg.rseqs
    if seen is None:
        seen = leg.rseqs = {}
    last = seen.get(tag)
    if last is not None and rseq != last + 1:
        return False, True  # a retransmission (our PRACK is on its way or was lost: its txn resends it)
    seen[tag] = rseq
    dialog = leg.dialog
    if dialog.remote.tag is None:
        dialog.set_remote_from(resp)  # the early dialog the PRACK belongs to (§12.1.2)
    prack = dialog.request("PRACK")
    if tag != dialog.remote.tag:
        prack.set_header("To", resp.header("To") or "")  # a second early dialog of the same branch
    prack.add_header("RAck", f"{rseq} {resp.cseq.seq} {resp.cseq.method}")
    call.port.send_request(prack, leg.hop, lambda r: _prack_answered(call, r))
    return True, True


def _prack_answered(call: Call, resp: Response) -> None:
    if resp.status >= 300:
        # the device lost its early dialog; its INVITE transaction will say what happened to it
        log.info("PRACK answered {status}", status=resp.status, call_id=call.call_id)


# -- the caller side ---------------------------------------------------------------------------


class CallerReliability:
    """Our reliable 18x to the caller: RSeq numbering, retransmission, the queue, PRACK matching."""

    __slots__ = ("call", "mode", "next_rseq", "unacked", "queue", "interval", "timer", "deadline", "stopped",
                 "held_final")

    def __init__(self, call: Call, mode: str) -> None:
        self.call = call
        self.mode = mode  # the caller's "require" or "supported"
        self.next_rseq = random.randint(1, 2**30)  # §3: random start, room to count up
        self.unacked: tuple[int, Response] | None = None
        self.queue: deque[Response] = deque()
        self.interval = 0.0
        self.timer: IDelayedCall | None = None
        self.deadline = 0.0
        self.stopped = False
        self.held_final: Callable[[], None] | None = None  # sends our 2xx once the 18x with SDP is PRACKed

    @property
    def t1(self) -> float:
        return float(getattr(self.call.port, "t1", 0.5))

    def send(self, resp: Response) -> None:
        if self.stopped:
            return
        if self.unacked is not None:
            if len(self.queue) >= _MAX_QUEUED:
                dropped = self.queue.popleft()
                # a device can send 18x faster than the caller PRACKs: a limit, so throttled and counted
                self.call.mgr.limit_bit("reliable_18x_dropped",
                                        "caller slow to PRACK: {status} dropped, {n} 18x queued already",
                                        status=dropped.status, n=_MAX_QUEUED, call_id=self.call.call_id)
            self.queue.append(resp)
            return
        rseq = self.next_rseq
        self.next_rseq += 1
        resp.add_header("Require", TAG)
        resp.add_header("RSeq", str(rseq))
        self.unacked = (rseq, resp)
        self.interval = self.t1
        self.deadline = self.call.clock.seconds() + 64 * self.t1
        self._transmit()

    def _transmit(self) -> None:
        assert self.unacked is not None
        call = self.call
        call.port.respond(call.a.stx, self.unacked[1])
        now = call.clock.seconds()
        if now + self.interval >= self.deadline:
            self.timer = call.clock.callLater(max(0.0, self.deadline - now), self._give_up)
        else:
            self.timer = call.clock.callLater(self.interval, self._resend)
            self.interval *= 2  # §3: doubles each time, no T2 cap

    def _resend(self) -> None:
        self.timer = None
        if self.unacked is not None and not self.stopped:
            self._transmit()

    def sdp_unacked(self) -> bool:
        """Is an 18x with SDP waiting for its PRACK? Then a 2xx must wait too (§3)."""
        return not self.stopped and self.unacked is not None and bool(self.unacked[1].body)

    def hold_final(self, send: Callable[[], None]) -> None:
        """Send our 2xx (`send`) once the outstanding 18x is PRACKed; no other 18x goes out."""
        self.queue.clear()
        self.held_final = send

    def release_final(self) -> None:
        """After the PRACK's own answer: the held 2xx goes out."""
        send, self.held_final = self.held_final, None
        if send is not None and self.unacked is None and not self.stopped:  # stopped: the call ended
            send()

    def _give_up(self) -> None:
        self.timer = None
        status = self.unacked[1].status if self.unacked else 0
        log.warn("caller never PRACKed our reliable {status}", status=status, call_id=self.call.call_id)
        self.stop()
        if self.held_final is not None:  # a device answered: it gets a BYE, the caller a 500
            self.held_final = None
            self.call.fail_answered("no PRACK", "Provisional Response Not Acknowledged")
            return
        self.call.finish_unanswered(500, "Provisional Response Not Acknowledged", None, "no PRACK")

    def prack(self, rseq: int, cseq: int, method: str) -> bool:
        """The caller's PRACK: True when it acknowledges our outstanding reliable 18x."""
        unacked = self.unacked
        if unacked is None or unacked[0] != rseq or method != "INVITE" or cseq != self.call.a.invite.cseq.seq:
            return False
        self.unacked = None
        self._cancel_timer()
        if self.held_final is not None:
            return True  # handle_prack sends the held 2xx after the PRACK's answer
        if self.queue and not self.stopped:
            self.send(self.queue.popleft())
        return True

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def stop(self) -> None:
        """The caller has its final response: no more 18x, no retransmission (a late PRACK still matches)."""
        self.stopped = True
        self.queue.clear()
        self._cancel_timer()


def send_to_caller(call: Call, out: Response, device_reliable: bool) -> None:
    """Send a relayed 18x to the caller, reliably when its INVITE asks for it (see the module doc)."""
    a = call.a
    sender = a.reliable
    if sender is None:
        # once per call: False when the caller has no 100rel at all (the common case)
        mode = caller_mode(a.invite)
        sender = a.reliable = CallerReliability(call, mode) if mode is not None else False
    # forking: another device's 2xx may bring another answer than one the caller took reliably
    # (RFC 3264, RFC 6337 §3.1.1), so a reliable 18x carries SDP only when one branch can answer
    # (voicemail, if the devices fail, would be another)
    single = sum(1 for b in call.branches.values() if b.pending) <= 1 and not call.more_possible() \
        and not call.may_divert()
    if sender and (sender.mode == "require" or (device_reliable and single)):
        if out.body and not (a.invite.body and single):
            out.remove_header("Content-Type")  # late offer: an offer in a reliable 18x needs a PRACK answer
            out.body = b""
        sender.send(out)
    else:
        call.port.respond(a.stx, out)


def handle_prack(call: Call, leg: Any, req: Request, stx: Any) -> None:
    """A PRACK inside one of the call's dialogs: only the caller's early dialog expects one."""
    reliable = getattr(leg, "reliable", None) if leg is call.a else None  # False: no 100rel caller
    try:
        rseq_s, cseq_s, method = (req.header("RAck") or "").split()
        rseq, cseq = int(rseq_s), int(cseq_s)
    except ValueError:
        call.port.respond(stx, make_response(req, 400, "Bad RAck"))
        return
    if not leg.dialog.check_remote_seq(req):
        call.port.respond(stx, make_response(req, 500, "CSeq Out Of Order"))
        return
    if not reliable or not reliable.prack(rseq, cseq, method.upper()):
        call.port.respond(stx, make_response(req, 481, "Call/Transaction Does Not Exist"))
        return
    if req.body:
        # offer/answer in PRACK is not supported (module doc); the 18x is acknowledged all the same
        call.port.respond(stx, make_response(req, 488, "Not Acceptable Here"))
    else:
        call.port.respond(stx, make_response(req, 200))
    reliable.release_final()
