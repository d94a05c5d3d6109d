"""RFC 4028 session timers on both legs of a connected call, and the maximum call duration.

A call whose parties went silent (a lost BYE, a phone that died) would otherwise stay connected
for ever. The B2BUA is two user agents, so each leg negotiates its own interval and refresher: on
the caller's leg we are the UAS of the INVITE (§9), on the device's leg its UAC (§7).

- On a leg where we refresh, a refresh goes out at half the interval (§10): an UPDATE without a
  body when the peer allows UPDATE, else a re-INVITE with the last SDP we sent on that leg (the
  same version: nothing changes). A refresh that times out or gets 408/481 ends the call.
- On a leg where the peer refreshes, the call ends when no refresh came by the expiry minus
  min(32, interval/3) (§10).
- A peer without timer support cannot refresh, so we refresh it: a silent peer then shows as a
  timed-out refresh. A re-INVITE/UPDATE relayed with a 2xx refreshes both legs; an UPDATE without
  a body carries nothing for the other party and is answered here, refreshing its own leg.
- `[calls] max_call_duration` ends any answered call at that age, refreshed or not.

Ending a call sends BYE both ways with a Reason. Every timer is on the call's clock and is
cancelled by `stop()` when the call ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from libon_tsilo.b2bua import relay
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.message import Message, Request, Response, make_response
from libon_tsilo.sip.timers import cancel_expiry

if TYPE_CHECKING:
    from libon_tsilo.b2bua.call import Call

__all__ = [
    "SessionExpires", "Negotiated", "SessionTimers", "parse_session_expires", "parse_min_se",
    "supports_timer", "interval_too_small", "refuse_small_interval", "as_uas", "as_uac",
    "add_request_headers", "add_answer_headers", "offer", "retry_branch", "start", "ABSOLUTE_MIN_SE",
    "REASON_EXPIRED", "REASON_REFRESH_FAILED", "REASON_MAX_DURATION",
]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

TIMER = "timer"
ABSOLUTE_MIN_SE = 90  # RFC 4028 §4: no Session-Expires or Min-SE below this
REASON_EXPIRED = 'SIP;cause=408;text="Session timer expired"'
REASON_REFRESH_FAILED = 'SIP;cause=408;text="Session refresh failed"'
REASON_MAX_DURATION = 'Q.850;cause=102;text="Maximum call duration reached"'
REASON_INTERNAL = 'SIP;cause=500;text="Server Internal Error"'
# a refresh re-INVITE waits this long when another offer is in flight or got 491 (RFC 3261 §14.1)
GLARE_RETRY = 2.0
_MAX_DELTA = 2**32 - 1  # RFC 3261 delta-seconds
_MAX_MIN_SE = 86_400  # a Min-SE above a day is not honoured (nor retried for after a 422)


@dataclass(frozen=True, slots=True)
class SessionExpires:
    interval: int
    refresher: str | None  # "uac" | "uas" | None (the other side chooses)


@dataclass(slots=True, init=False)
class Negotiated:
    """One leg's outcome: how long the session lives and who keeps it alive. (Its ``__init__`` is
    written out: compiled with mypyc, a dataclass's generated one stays interpreted, two per call.)"""

    interval: int
    we_refresh: bool
    peer_supports: bool

    def __init__(self, interval: int, we_refresh: bool, peer_supports: bool) -> None:
        self.interval = interval
        self.we_refresh = we_refresh
        self.peer_supports = peer_supports


# -- header parsing (a malformed value is a 400) ------------------------------------------------


def _delta_seconds(text: str, name: str) -> int:
    text = text.strip()
    if not text or len(text) > 10 or not (text.isascii() and text.isdigit()):
        raise ParseError(f"Bad {name}")
    value = int(text)
    if value > _MAX_DELTA:
        raise ParseError(f"Bad {name}")
    return value


def parse_session_expires(value: str) -> SessionExpires:
    """`delta-seconds *(;se-params)`; `refresher` must be uac or uas when present."""
    head, *params = value.split(";")
    interval = _delta_seconds(head, "Session-Expires")
    refresher = None
    for param in params:
        name, _, v = param.partition("=")
        if name.strip().lower() == "refresher":
            refresher = v.strip().lower()
            if refresher not in ("uac", "uas"):
                raise ParseError("Bad Session-Expires refresher")
    return SessionExpires(interval, refresher)


def parse_min_se(value: str) -> int:
    return _delta_seconds(value.split(";", 1)[0], "Min-SE")


def _session_expires(msg: Message) -> SessionExpires | None:
    value = msg.header("Session-Expires")
    return None if value is None else parse_session_expires(value)


def _min_se(msg: Message) -> int:
    value = msg.header("Min-SE")
    return 0 if value is None else parse_min_se(value)


def _has_token(msg: Message, name: str, token: str) -> bool:
    """Is `token` (lower case) one of the values of list header `name`?"""
    if msg.header(name) is None:
        return False  # the usual case, answered at the cost of one index lookup
    return any(v.strip().lower() == token for v in msg.header_values(name))


def supports_timer(msg: Message) -> bool:
    return _has_token(msg, "Supported", TIMER) or _has_token(msg, "Require", TIMER)


def _allows_update(msg: Message) -> bool:
    return _has_token(msg, "Allow", "update")


# -- negotiation -------------------------------------------------------------------------------


def interval_too_small(req: Request, session_expires: int, min_se: int) -> int | None:
    """§9: the Min-SE for a 422 when `req` asks for less than our minimum and can retry, else None.

    Raises ParseError on a malformed Session-Expires or Min-SE. A request without timer support
    cannot retry, so it is never refused: `as_uas` raises its interval instead.
    """
    if not session_expires:
        return None
    se = _session_expires(req)
    _min_se(req)  # a malformed Min-SE is a 400 too, even when unused
    if se is None or se.interval >= min_se or not supports_timer(req):
        return None
    return min_se  # §6: the 422 names our own minimum


def refuse_small_interval(req: Request, settings: Any, port: Any, stx: Any) -> bool:
    """Answer 422 with our Min-SE to a request whose Session-Expires is too small; True if it did."""
    min_se = interval_too_small(req, settings.session_expires, settings.min_se)
    if min_se is None:
        return False
    resp = make_response(req, 422, "Session Interval Too Small")
    resp.add_header("Min-SE", str(min_se))
    port.respond(stx, resp)
    log.info("{method} refused 422: Session-Expires below Min-SE {min_se}", method=req.method,
             min_se=min_se, call_id=req.call_id)
    return True


def as_uas(req: Request, session_expires: int, min_se: int, we_refresh_now: bool | None) -> Negotiated:
    """What we answer (§9) to a session refresh request received on a leg."""
    peer_supports = supports_timer(req)
    try:
        se = _session_expires(req)
        # its Min-SE binds us (§9), up to a day: a huge one must not switch our timers off
        floor = max(min_se, min(_min_se(req), _MAX_MIN_SE))
    except ParseError:  # checked before (400); a compacted INVITE is parsed again here
        se, floor = None, min_se
    if se is None:
        interval, wanted = max(session_expires, floor), None
    else:
        # we may lower the interval to ours, never below the request's Min-SE nor ours
        interval, wanted = max(min(se.interval, session_expires), floor), se.refresher
    if not peer_supports:
        we_refresh = True  # it would not understand being asked to refresh
    elif wanted is not None:
        we_refresh = wanted == "uas"
    elif we_refresh_now is not None:
        we_refresh = we_refresh_now
    else:
        we_refresh = False  # it supports timers and left us the choice: it refreshes, we watch
    return Negotiated(interval, we_refresh, peer_supports)


def as_uac(resp: Response, asked: int, min_se: int) -> Negotiated:
    """The 2xx to a session refresh request we sent (§7.2). Without a Session-Expires the peer does
    no timers; we refresh it anyway at the interval we asked for, to learn when it is gone."""
    try:
        se = _session_expires(resp)
    except ParseError:
        se = None
    if se is None:
        return Negotiated(asked, True, False)
    # a UAS may lower what we asked for, never raise it (§9): a longer one would let a silent peer
    # stay longer than we allow; below our Min-SE would make us (or it) refresh too often
    return Negotiated(max(min(se.interval, asked), min_se), se.refresher != "uas", True)


def add_request_headers(req: Request, interval: int, min_se: int, refresher: str | None) -> None:
    if not _has_token(req, "Supported", TIMER):
        req.add_header("Supported", TIMER)
    req.add_header("Session-Expires", f"{interval};refresher={refresher}" if refresher else str(interval))
    if min_se != ABSOLUTE_MIN_SE:
        req.add_header("Min-SE", str(min_se))  # absent means 90 (§5): one header less per call


def add_answer_headers(resp: Response, n: Negotiated) -> None:
    resp.add_header("Session-Expires", f"{n.interval};refresher={'uas' if n.we_refresh else 'uac'}")
    if n.peer_supports:
        resp.add_header("Require", TIMER)  # §9: the UAC must act on it (and it says we support it)


def offer(req: Request, settings: Any) -> None:
    """A branch INVITE: we support timers and ask for ours; the device picks the refresher. Its
    Supported, our own (capabilities.supported), names "timer" already whenever timers are on: no
    search of it here (a header split per forked INVITE)."""
    if settings.session_expires:
        req.add_header("Session-Expires", str(settings.session_expires))
        if settings.min_se != ABSOLUTE_MIN_SE:
            req.add_header("Min-SE", str(settings.min_se))


_NOT_RESENT = frozenset({"via", "cseq", "session-expires", "min-se"})


def retry_branch(call: Call, leg: Any, resp: Response) -> bool:
    """§7.3: the device answered our branch INVITE 422: rebuild `leg.invite` with the next CSeq and
    its Min-SE as interval, for the call to send again. False when there is nothing to retry."""
    if not call.mgr.settings.session_expires or leg.cancelled or call.state.final or call.ended:
        return False
    old = leg.invite
    try:
        wanted = _min_se(resp)
        asked = _session_expires(old)
    except ParseError:
        return False
    if asked is None or not asked.interval < wanted <= _MAX_MIN_SE:
        return False  # a 422 that asks for nothing more would only loop
    leg.dialog.local_seq += 1
    new = Request("INVITE", old.raw_uri)
    for key, written, value in old.headers():  # as built, in order (a re-parse would cost more)
        if key not in _NOT_RESENT:
            new.add_header(written, value)
    new.add_header("CSeq", f"{leg.dialog.local_seq} INVITE")
    new.add_header("Session-Expires", str(wanted))
    new.add_header("Min-SE", str(wanted))
    new.body = old.body
    leg.invite = new
    leg.asked_se = wanted
    log.info("device answered 422: INVITE again with Session-Expires {se}", se=wanted, call_id=call.call_id)
    return True


# -- the timers of a connected call ------------------------------------------------------------


class _Leg:
    __slots__ = ("leg", "name", "interval", "we_refresh", "peer_supports", "allows_update", "sdp", "due",
                 "refresh_seq")

    def __init__(self, leg: Any, name: str, n: Negotiated, allows_update: bool, sdp: bytes) -> None:
        self.leg = leg
        self.name = name  # "caller" | "callee", for the logs
        self.interval = n.interval
        self.we_refresh = n.we_refresh
        self.peer_supports = n.peer_supports
        self.allows_update = allows_update
        self.sdp = sdp  # the last session description we sent on this leg
        # clock time of this leg's next action (our refresh, or its expiry); None while ours is in flight
        self.due: float | None = None
        self.refresh_seq: int | None = None  # CSeq of our refresh in flight

    def adopt(self, n: Negotiated) -> None:
        self.interval, self.we_refresh, self.peer_supports = n.interval, n.we_refresh, n.peer_supports


def start(call: Call, resp: Response, ok: Response) -> SessionTimers | None:
    """The call is answered by `resp`; `ok` is our 2xx to the caller, not sent yet (headers go in)."""
    settings = call.mgr.settings
    if not settings.session_expires and not settings.max_call_duration:
        return None
    return SessionTimers(call, resp, ok)


class SessionTimers:
    """The session timers of one answered call (both legs) and its duration limit.

    One timer per call, at the earliest of the legs' next actions and the duration limit: every
    answered call sets one up and cancels it at its BYE, so that is the cost to keep small. The usual
    first wait (half the configured interval) takes a place in the call manager's queue for that
    delay (no DelayedCall of its own); any other wait is a DelayedCall, which a refresh that moves
    the action later only resets (cheap when later, RFC-timed when sooner).
    """

    __slots__ = ("call", "a", "b", "_limit_at", "_timer", "_entry")

    def __init__(self, call: Call, resp: Response, ok: Response) -> None:
        self.call = call
        settings = call.mgr.settings
        self.a: _Leg | None = None
        self.b: _Leg | None = None
        self._limit_at: float | None = None
        self._timer: IDelayedCall | None = None
        self._entry: list[Any] | None = None  # the place in a queue of call.mgr.session_queue
        winner = call.winner
        assert winner is not None  # started by Call.connect, once a branch answered
        if settings.session_expires:
            invite = call.a.invite
            n = as_uas(invite, settings.session_expires, settings.min_se, None)
            add_answer_headers(ok, n)
            self.a = _Leg(call.a, "caller", n, _allows_update(invite), ok.body)
            n = as_uac(resp, winner.asked_se or settings.session_expires, settings.min_se)
            self.b = _Leg(winner, "callee", n, _allows_update(resp), invite.body)
            self._set_due(self.a)
            self._set_due(self.b)
        if settings.max_call_duration:
            self._limit_at = call.clock.seconds() + settings.max_call_duration
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._leave_queue()

    def _leave_queue(self) -> None:
        entry = self._entry
        if entry is not None:
            self._entry = None
            cancel_expiry(entry)

    def _of(self, leg: Any) -> _Leg | None:
        return self.a if leg is self.call.a else self.b

    def leg_gone(self, leg: Any) -> None:
        """`leg`'s party left while the call goes on (a referrer after its REFER): no refresh or
        expiry of that leg may end the call; the other leg keeps its timer."""
        ls = self._of(leg)
        if ls is not None:
            ls.due = None
        self._schedule()

    def _gone(self, ls: _Leg) -> bool:
        transfer = getattr(self.call, "transfer", None)
        return transfer is not None and transfer.inert(ls.leg)

    # -- relayed offers (relay.py) -------------------------------------------------------------

    def offer_received(self, leg: Any, req: Request, stx: Any) -> bool:
        """A re-INVITE/UPDATE from `leg`'s peer, before relaying: False if we answered it (422)."""
        if self._of(leg) is None:
            return True
        return not refuse_small_interval(req, self.call.mgr.settings, self.call.port, stx)

    def refresh_received(self, leg: Any, req: Request, stx: Any) -> bool:
        """An UPDATE without a body: nothing for the other party, only this leg's session refresh
        (and target refresh, RFC 3311). Answered here, so the refresh of one party never depends on
        the other one supporting UPDATE. False when this leg has no session timer (it is relayed)."""
        ls = self._of(leg)
        if ls is None:
            return False
        call = self.call
        settings = call.mgr.settings
        if refuse_small_interval(req, settings, call.port, stx):
            return True
        contacts = req.contacts
        if contacts:
            leg.dialog.remote_target = str(contacts[0].uri)
        ls.adopt(as_uas(req, settings.session_expires, settings.min_se, ls.we_refresh))
        if req.has_header("Allow"):
            ls.allows_update = _allows_update(req)
        ok = make_response(req, 200)
        ok.add_header("Contact", leg.dialog.contact)
        add_answer_headers(ok, Negotiated(ls.interval, ls.we_refresh, ls.peer_supports))
        call.port.respond(stx, ok)
        self._arm(ls)
        return True

    def relaying(self, to_leg: Any, out: Request) -> None:
        """Our copy of the offer is a session refresh request on the other leg too (§7.4)."""
        ls = self._of(to_leg)
        if ls is not None:
            add_request_headers(out, ls.interval, self.call.mgr.settings.min_se,
                                "uac" if ls.we_refresh else "uas")

    def relayed(self, from_leg: Any, req: Request, back: Response, to_leg: Any, out: Request,
                resp: Response) -> None:
        """A relayed offer got a 2xx: both legs are refreshed; `back` (ours) is not sent yet."""
        src, dst = self._of(from_leg), self._of(to_leg)
        if src is None or dst is None:
            return
        settings = self.call.mgr.settings
        src.adopt(as_uas(req, settings.session_expires, settings.min_se, src.we_refresh))
        add_answer_headers(back, Negotiated(src.interval, src.we_refresh, src.peer_supports))
        if req.has_header("Allow"):
            src.allows_update = _allows_update(req)
        if back.body:
            src.sdp = back.body
        dst.adopt(as_uac(resp, dst.interval, settings.min_se))
        if out.body:
            dst.sdp = out.body
        self._arm(src)
        self._arm(dst)

    def sent_sdp(self, leg: Any, body: bytes) -> None:
        """A session description went to `leg` outside an offer we relayed (an ACK's answer)."""
        ls = self._of(leg)
        if ls is not None and body:
            ls.sdp = body

    # -- timers ----------------------------------------------------------------------------------

    def _set_due(self, ls: _Leg, delay: float | None = None) -> None:
        if ls.we_refresh:
            wait = ls.interval / 2 if delay is None else delay
        else:
            # §10: end it slightly before the expiry, so the BYE beats the peer's own teardown
            wait = ls.interval - min(32, ls.interval / 3)
        ls.due = self.call.clock.seconds() + wait

    def _arm(self, ls: _Leg, delay: float | None = None) -> None:
        self._set_due(ls, delay)
        self._schedule()

    def _schedule(self) -> None:
        if self.call.ended:  # a late response must not re-arm an ended call
            self.stop()
            return
        at = self._limit_at
        for ls in (self.a, self.b):
            if ls is not None and ls.due is not None and (at is None or ls.due < at):
                at = ls.due
        if at is None:
            self.stop()
            return
        delay = max(0.0, at - self.call.clock.seconds())
        self._leave_queue()
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(delay)
            return
        queue = self.call.mgr.session_queue(delay)
        if queue is not None:
            self._timer = None
            self._entry = queue.add(self._fire)
        else:
            self._timer = self.call.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._entry = None
        if self.call.ended:
            return
        try:
            self._due_now()
        except Exception:
            # a bug here would leave the call without a timer, up for ever: end it instead
            log.failure("session timer failed", call_id=self.call.call_id)
            if not self.call.ended:
                relay.hang_up(self.call, None, "internal error in the session timer", REASON_INTERNAL)

    def _due_now(self) -> None:
        call = self.call
        now = call.clock.seconds() + 1e-6  # what was due now, float rounding included
        if self._limit_at is not None and self._limit_at <= now:
            self._duration_reached()
            return
        for ls in (self.a, self.b):
            if ls is not None and ls.due is not None and ls.due <= now:
                ls.due = None
                if self._gone(ls):
                    continue
                if ls.we_refresh:
                    self._refresh(ls)
                else:
                    self._expired(ls)
                if call.ended:
                    return
        self._schedule()

    def _expired(self, ls: _Leg) -> None:
        call = self.call
        log.info("no session refresh from the {leg} within {interval} s: ending the call", leg=ls.name,
                 interval=ls.interval, call_id=call.call_id)
        call.mgr.counters["session_expired"] += 1
        relay.hang_up(call, None, f"session expired on the {ls.name}'s leg", REASON_EXPIRED)

    def _duration_reached(self) -> None:
        call = self.call
        limit = call.mgr.settings.max_call_duration
        log.info("call reached max_call_duration ({limit} s): ending it", limit=limit, call_id=call.call_id)
        call.mgr.counters["duration_limit"] += 1
        relay.hang_up(call, None, "maximum call duration", REASON_MAX_DURATION)

    # -- our refreshes -----------------------------------------------------------------------------

    def _refresh(self, ls: _Leg) -> None:
        call = self.call
        sdp = ls.sdp or getattr(ls.leg, "ack_body", (b"",))[0]  # a late offer's answer went in an ACK
        method = "UPDATE" if ls.allows_update or not sdp else "INVITE"
        if method == "INVITE" and call.offer_busy:
            # one offer at a time (§14.2): the one in flight refreshes this leg if it succeeds
            self._arm(ls, GLARE_RETRY)
            return
        dialog = ls.leg.dialog
        req = dialog.request(method, sdp if method == "INVITE" else b"", "application/sdp")
        add_request_headers(req, ls.interval, call.mgr.settings.min_se, "uac")
        seq = ls.refresh_seq = dialog.local_seq
        if method == "INVITE":
            call.offer_busy = True
        call.port.send_request(req, ls.leg.hop, lambda r: self._refreshed(ls, method, seq, r))

    def _refreshed(self, ls: _Leg, method: str, seq: int, resp: Response) -> None:
        status = resp.status
        if status < 200:
            return
        call = self.call
        if method == "INVITE" and status < 300:
            # every 2xx, retransmissions too, gets its ACK (RFC 3261 §13.2.2.4)
            call.port.send_ack(ls.leg.dialog.request("ACK", seq=seq), ls.leg.hop)
        if ls.refresh_seq != seq:
            return  # a retransmitted final response: handled already
        ls.refresh_seq = None
        if method == "INVITE":
            call.offer_busy = False
        if call.ended or self._gone(ls):  # a refresh in flight when its party left: no verdict
            return
        if status < 300:
            ls.adopt(as_uac(resp, ls.interval, call.mgr.settings.min_se))
            self._arm(ls)
        elif status in (408, 481):
            # §10: the peer is gone (our own transaction timeout arrives as a local 408)
            log.info("session refresh of the {leg} got {status}: ending the call", leg=ls.name, status=status,
                     call_id=call.call_id)
            call.mgr.counters["session_expired"] += 1
            relay.hang_up(call, None, f"session refresh failed on the {ls.name}'s leg ({status})",
                          REASON_REFRESH_FAILED)
        elif status in (405, 501) and method == "UPDATE" and ls.sdp:
            ls.allows_update = False  # it said it allowed UPDATE, but does not: re-INVITE instead
            self._refresh(ls)
        elif status == 422 and self._raise_interval(ls, resp):
            self._refresh(ls)
        elif status == 491:
            self._arm(ls, GLARE_RETRY)
        else:
            # it answered, so it is alive; try again at the next half interval
            self._arm(ls)

    def _raise_interval(self, ls: _Leg, resp: Response) -> bool:
        """§7.3: a 422 names the Min-SE to retry with."""
        try:
            wanted = _min_se(resp)
        except ParseError:
            return False
        if not ls.interval < wanted <= _MAX_MIN_SE:
            return False
        ls.interval = wanted
        return True
