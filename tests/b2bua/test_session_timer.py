"""RFC 4028 session timers on both legs, the maximum call duration, and answered calls leaving the
silo's pending count: on a Clock with the recording port of tests/b2bua/helpers.py."""

from __future__ import annotations

from typing import Any

import pytest

from libon_tsilo.b2bua.capabilities import supported
from libon_tsilo.b2bua.session_timer import (
    GLARE_RETRY,
    REASON_EXPIRED,
    REASON_INTERNAL,
    REASON_MAX_DURATION,
    REASON_REFRESH_FAILED,
    parse_min_se,
    parse_session_expires,
)
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.message import parse_message
from tests.fakes.sip import FakeStx
from tests.b2bua.helpers import AOR, SDP_A, SDP_B, SDP_C, Env, FakeCtx, binding, in_dialog, reply

CALLER = "<sip:alice@example.com>;tag=a-tag"
CALL_ID = "call-1@10.0.0.1"
DEVICE_ALLOW = "Allow: INVITE, ACK, CANCEL, BYE, UPDATE"
NO_TIMER = "100rel"  # a caller's Supported without "timer"
# a caller that refreshes its own leg, hourly: a test on the device's leg can run past 1768 s
LONG_CALLER = "Session-Expires: 3600;refresher=uac\n"

# our own Supported on both legs (capabilities.py): whatever the caller says
OURS = supported(True).split(", ")


def respond(ctx: FakeCtx, status: int, headers: tuple[str, ...] = (), **kw: Any) -> Any:
    """A device's (or caller's) response to a request we sent, with extra header lines."""
    resp = reply(ctx.request, status, **kw)
    for line in headers:
        name, _, value = line.partition(":")
        resp.add_header(name.strip(), value.strip())
    resp = parse_message(resp.to_bytes())
    ctx.on_response(resp)
    return resp


class Answered:
    """A call answered by device 1; `caller` are extra INVITE header lines, `device` extra 2xx lines."""

    def __init__(self, caller: str = "", supported: str = "100rel, timer", device: tuple[str, ...] = (),
                 ack: bool = True, caller_body: bytes = SDP_A, **settings: Any) -> None:
        self.env = env = Env(**settings)
        env.location.add(binding(1))
        _, self.stx = env.invite(extra=caller, supported=supported, body=caller_body)
        self.b = env.port.invites()[0]
        self.b_req = self.b.request
        self.b_ok = respond(self.b, 200, device, body=SDP_B)
        self.ok = self.stx.responses[-1]
        assert self.ok.status == 200
        self.a_tag = self.ok.to.tag
        self.a_seq = 10
        self.b_seq = 100
        self.start = env.clock.seconds()
        if ack:
            self.from_a("ACK", seq=10)

    @property
    def clock(self) -> Any:
        return self.env.clock

    def at(self, t: float) -> None:
        """Advance the clock to `t` seconds after the answer."""
        self.clock.advance(self.start + t - self.clock.seconds())

    def from_a(self, method: str, body: bytes = b"", seq: int | None = None, extra: str = "") -> FakeStx | None:
        if seq is None:
            self.a_seq += 1
            seq = self.a_seq
        req = in_dialog(method, CALL_ID, CALLER, f"<sip:bob@example.com>;tag={self.a_tag}", seq, body,
                        extra=extra)
        if method == "ACK":
            self.env.mgr.handle_ack(req, self.env.caller_flow)
            return None
        stx = FakeStx(req)
        self.env.mgr.request_received(req, stx, self.env.caller_flow)
        return stx

    def sent(self, method: str) -> list[FakeCtx]:
        return [c for c in self.env.port.sent if c.request.method == method]

    def to_caller(self, method: str) -> list[FakeCtx]:
        return [c for c in self.sent(method) if c.request.call_id == CALL_ID]

    def to_device(self, method: str) -> list[FakeCtx]:
        return [c for c in self.sent(method) if c.request.call_id == self.b_req.call_id]

    def byes(self) -> dict[str, str | None]:
        return {c.request.call_id: c.request.header("Reason") for c in self.sent("BYE")}

    def assert_hung_up_both(self, reason: str) -> None:
        assert self.byes() == {CALL_ID: reason, self.b_req.call_id: reason}
        self.env.assert_clean()


# -- header grammar -----------------------------------------------------------------------------------


def test_parse_session_expires_and_min_se() -> None:
    se = parse_session_expires("1800;refresher=UAC")
    assert (se.interval, se.refresher) == (1800, "uac")
    se = parse_session_expires(" 90 ;x=1")
    assert (se.interval, se.refresher) == (90, None)
    assert parse_min_se("120;foo") == 120
    for bad in ("", "abc", "-5", "12345678901", "4294967296", "１２", "90;refresher=me"):
        with pytest.raises(ParseError):
            parse_session_expires(bad)
    with pytest.raises(ParseError):
        parse_min_se("9" * 5000)


@pytest.mark.parametrize("header", ["Session-Expires: soon", "Session-Expires: " + "9" * 5000,
                                    "Min-SE: x", "x: 1800;refresher=both"])
def test_malformed_timer_headers_get_400(header: str) -> None:
    env = Env()
    env.location.add(binding(1))
    with pytest.raises(ParseError):  # the transaction layer's guard answers 400 (test_integration_txn.py)
        env.invite(extra=header + "\n")
    assert env.port.invites() == []
    env.assert_clean()


# -- negotiation toward the caller (we are the UAS, §9) --------------------------------------------


def test_too_small_interval_from_a_timer_capable_caller_gets_422() -> None:
    env = Env(min_se=120)
    env.location.add(binding(1))
    _, stx = env.invite(extra="Session-Expires: 100\nMin-SE: 95\n")
    assert stx.statuses == [422]
    assert stx.responses[0].header("Min-SE") == "120"
    assert env.port.invites() == [] and env.mgr.counters["rejected"] == 1
    env.assert_clean()
    # the retry with the larger interval goes through (§7.3)
    _, stx = env.invite(extra="Session-Expires: 120\nMin-SE: 120\n", call_id="call-2@10.0.0.1")
    assert env.port.invites() and stx.statuses == []


def test_too_small_interval_from_a_caller_without_timer_is_raised_not_refused() -> None:
    # it could not retry: §9 (with its erratum) raises the interval to our minimum instead
    c = Answered(caller="Session-Expires: 60\n", supported=NO_TIMER)
    assert c.ok.header("Session-Expires") == "90;refresher=uas"
    assert c.ok.header("Require") is None  # it would not understand Require: timer


@pytest.mark.parametrize("caller, supported, expected, require", [
    # supports timers, no preference: it refreshes, we watch
    ("", "timer", "1800;refresher=uac", "timer"),
    ("Session-Expires: 600;refresher=uas\n", "timer", "600;refresher=uas", "timer"),
    ("Session-Expires: 600;refresher=uac\n", "timer", "600;refresher=uac", "timer"),
    # longer than ours: lowered to ours; a Min-SE above ours: raised to it
    ("Session-Expires: 7200\n", "timer", "1800;refresher=uac", "timer"),
    ("Min-SE: 2000\n", "timer", "2000;refresher=uac", "timer"),
    ("Min-SE: 4294967295\n", "timer", "86400;refresher=uac", "timer"),  # not a way to turn timers off
    # no timer support: we refresh it
    ("", NO_TIMER, "1800;refresher=uas", None),
    ("Session-Expires: 600;refresher=uac\n", NO_TIMER, "600;refresher=uas", None),
])
def test_caller_leg_interval_and_refresher(caller: str, supported: str, expected: str, require: str | None) -> None:
    c = Answered(caller=caller, supported=supported)
    assert c.ok.header("Session-Expires") == expected
    assert c.ok.header("Require") == require
    assert c.ok.header_values("Supported") == OURS  # our own capabilities (capabilities.py)
    c.from_a("BYE")
    c.env.assert_clean()


# -- negotiation toward the device (we are the UAC, §7) --------------------------------------------


def test_branch_invite_offers_timers() -> None:
    c = Answered(supported="replaces")
    req = c.b_req
    assert req.header_values("Supported") == OURS  # ours, not the caller's "replaces"
    assert req.header("Session-Expires") == "1800"  # the device picks the refresher
    assert req.header("Min-SE") is None  # absent means the RFC's 90 (§5)
    c2 = Answered(min_se=120)  # "timer" once, whatever the caller's Supported says
    assert c2.b_req.header_values("Supported") == OURS
    assert c2.b_req.header("Min-SE") == "120"


@pytest.mark.parametrize("device, we_refresh_at", [
    (("Session-Expires: 1200;refresher=uac", "Require: timer"), 600),  # uac = us
    (("Session-Expires: 1200;refresher=uas", "Require: timer"), None),  # the device refreshes
    ((), 1800),  # no timer support: we refresh it at half our own interval
    (("Session-Expires: 30;refresher=uac",), 45),  # below our Min-SE: held to 90
    (("Session-Expires: 7200;refresher=uac",), 1800),  # above what we asked (3600): held to it
])
def test_device_leg_refresher_from_its_2xx(device: tuple[str, ...], we_refresh_at: float | None) -> None:
    c = Answered(device=(DEVICE_ALLOW, *device), caller="Session-Expires: 3600;refresher=uac\n",
                 session_expires=3600)
    if we_refresh_at is None:
        c.at(1200 - 32 - 0.001)
        assert c.to_device("UPDATE") == [] and c.byes() == {}
        c.at(1200 - 32)  # §10: it never refreshed
        c.assert_hung_up_both(REASON_EXPIRED)
        return
    c.at(we_refresh_at - 0.001)
    assert c.to_device("UPDATE") == []
    c.at(we_refresh_at)
    (update,) = c.to_device("UPDATE")
    assert update.request.body == b""
    c.from_a("BYE")
    c.env.assert_clean()


# -- refreshes we send ------------------------------------------------------------------------------


def test_refresh_update_sent_at_half_the_interval_and_rearmed() -> None:
    c = Answered(caller="Allow: INVITE, ACK, BYE, UPDATE\n", supported=NO_TIMER, device=(DEVICE_ALLOW,))
    c.at(899.999)
    assert c.sent("UPDATE") == []
    c.at(900)
    (to_a,) = c.to_caller("UPDATE")
    (to_b,) = c.to_device("UPDATE")
    for ctx in (to_a, to_b):
        req = ctx.request
        assert req.body == b"" and req.header("Session-Expires") == "1800;refresher=uac"
        assert req.header("Min-SE") is None and "timer" in req.header_values("Supported")
    assert to_a.request.from_.tag == c.a_tag and to_a.request.to.tag == "a-tag"
    assert to_a.hop.flow_id == "tcp:caller#1" and to_b.hop.flow_id == "tcp:dev1#1"
    respond(to_a, 200, ("Session-Expires: 1800;refresher=uac",), to_tag="a-tag")
    respond(to_b, 200)
    c.at(1799.999)
    assert len(c.sent("UPDATE")) == 2
    c.at(1800)
    assert len(c.to_caller("UPDATE")) == 2 and len(c.to_device("UPDATE")) == 2
    assert c.byes() == {}
    c.from_a("BYE")
    c.env.assert_clean()


def test_refresh_reinvite_carries_the_last_sdp_and_is_acked() -> None:
    # neither side allows UPDATE: re-INVITEs, one at a time (the second waits out the first)
    c = Answered(supported=NO_TIMER)
    c.at(900)
    (to_a,) = c.to_caller("INVITE")
    assert to_a.request.body == SDP_B  # what our 2xx carried to the caller: the session is unchanged
    assert c.to_device("INVITE") == [c.b]  # glare avoided: the device's refresh waits
    # meanwhile an offer from the caller is refused with 491 (ours is in flight)
    glare = c.from_a("INVITE", body=SDP_C)
    assert glare is not None and glare.statuses == [491]
    respond(to_a, 200, to_tag="a-tag", body=SDP_A)
    ack, hop = c.env.port.acks[-1]
    assert ack.call_id == CALL_ID and ack.cseq.seq == to_a.request.cseq.seq and hop.flow_id == "tcp:caller#1"
    respond(to_a, 200, to_tag="a-tag", body=SDP_A)  # a retransmitted 2xx: ACKed again, nothing else
    assert c.env.port.acks[-1][0].cseq.seq == ack.cseq.seq and len(c.to_caller("INVITE")) == 1
    c.at(900 + GLARE_RETRY)
    to_b = c.to_device("INVITE")[-1]
    assert to_b is not c.b and to_b.request.body == SDP_A and to_b.request.cseq.seq == 2
    respond(to_b, 200, body=SDP_B)
    assert c.env.port.acks[-1][0].call_id == c.b_req.call_id
    c.from_a("BYE")
    c.env.assert_clean()


def test_late_offer_device_refresh_resends_the_answer_from_the_ack() -> None:
    c = Answered(supported=NO_TIMER, caller_body=b"", ack=False)
    c.from_a("ACK", seq=10, body=SDP_A)  # the answer to the device's offer
    c.at(900)
    respond(c.to_caller("INVITE")[-1], 200, to_tag="a-tag", body=SDP_A)
    c.at(900 + GLARE_RETRY)
    assert c.to_device("INVITE")[-1].request.body == SDP_A
    c.from_a("BYE")
    c.env.assert_clean()


@pytest.mark.parametrize("status", [408, 481])
def test_refresh_timeout_or_481_ends_both_legs(status: int) -> None:
    c = Answered(supported=NO_TIMER, caller="Allow: UPDATE\n", device=(DEVICE_ALLOW,))
    c.at(900)
    respond(c.to_device("UPDATE")[0], status)
    assert c.env.mgr.counters["session_expired"] == 1
    c.assert_hung_up_both(REASON_REFRESH_FAILED)  # §10: the refresher sends BYE; the caller gets one too
    respond(c.to_caller("UPDATE")[0], 200, to_tag="a-tag")  # too late: nothing happens
    c.env.assert_clean()


def test_update_refused_falls_back_to_reinvite() -> None:
    c = Answered(caller=LONG_CALLER, session_expires=3600, device=(DEVICE_ALLOW, "Session-Expires: 1800;refresher=uac"))
    c.at(900)
    respond(c.to_device("UPDATE")[0], 501)
    reinvite = c.to_device("INVITE")[-1]
    assert reinvite is not c.b and reinvite.request.body == SDP_A
    respond(reinvite, 200, body=SDP_B)
    c.at(1800)
    assert len(c.to_device("UPDATE")) == 1 and len(c.to_device("INVITE")) == 3  # re-INVITEs from now on
    c.from_a("BYE")
    c.env.assert_clean()


def test_422_to_a_refresh_retries_with_its_min_se() -> None:
    c = Answered(caller=LONG_CALLER, session_expires=3600, device=(DEVICE_ALLOW, "Session-Expires: 1800;refresher=uac"))
    c.at(900)
    respond(c.to_device("UPDATE")[0], 422, ("Min-SE: 2400",))
    retry = c.to_device("UPDATE")[-1].request
    assert retry.header("Session-Expires") == "2400;refresher=uac"
    respond(c.to_device("UPDATE")[-1], 200, ("Session-Expires: 2400;refresher=uac",))
    c.at(900 + 1199.999)
    assert len(c.to_device("UPDATE")) == 2
    c.at(900 + 1200)
    assert len(c.to_device("UPDATE")) == 3
    c.from_a("BYE")
    c.env.assert_clean()


def test_491_to_a_refresh_retries_soon_and_other_errors_wait_a_half_interval() -> None:
    c = Answered(caller=LONG_CALLER, session_expires=3600, device=(DEVICE_ALLOW, "Session-Expires: 1800;refresher=uac"))
    c.at(900)
    respond(c.to_device("UPDATE")[0], 491)
    c.at(900 + GLARE_RETRY)
    assert len(c.to_device("UPDATE")) == 2
    respond(c.to_device("UPDATE")[1], 500)  # it answered: alive; the next try is a half interval on
    c.at(900 + GLARE_RETRY + 899.999)
    assert len(c.to_device("UPDATE")) == 2
    c.at(900 + GLARE_RETRY + 900)
    assert len(c.to_device("UPDATE")) == 3 and c.byes() == {}
    c.from_a("BYE")
    c.env.assert_clean()


# -- refreshes from the parties ---------------------------------------------------------------------


def test_silent_caller_expiry_ends_both_legs_with_a_reason() -> None:
    c = Answered(device=(DEVICE_ALLOW,))  # the caller supports timers: it refreshes, we watch
    assert c.ok.header("Session-Expires") == "1800;refresher=uac"
    c.at(900)
    respond(c.to_device("UPDATE")[0], 200)  # the device is alive, the caller says nothing
    c.at(1800 - 32 - 0.001)
    assert c.byes() == {}
    c.at(1800 - 32)
    c.assert_hung_up_both(REASON_EXPIRED)
    assert c.env.mgr.counters["session_expired"] == 1
    assert c.env.mgr.stats()["total_session_expired"] == 1


def test_relayed_refresh_resets_the_timer_on_both_legs() -> None:
    c = Answered(device=("Session-Expires: 1800;refresher=uas", "Require: timer"), min_se=100)
    # both parties refresh; at 1000 s the caller does, by re-INVITE (relayed to the device)
    c.at(1000)
    stx = c.from_a("INVITE", body=SDP_A, extra="Session-Expires: 1800;refresher=uac\nSupported: timer\n")
    out = c.to_device("INVITE")[-1]
    assert out.request.header("Session-Expires") == "1800;refresher=uas"  # the device keeps refreshing
    assert out.request.header("Min-SE") == "100"
    respond(out, 200, ("Session-Expires: 1800;refresher=uas", "Require: timer"), body=SDP_B)
    assert stx is not None and stx.statuses == [200]
    assert stx.responses[0].header("Session-Expires") == "1800;refresher=uac"
    assert stx.responses[0].header("Require") == "timer"
    c.from_a("ACK", seq=c.a_seq)
    c.at(1000 + 1768 - 0.001)  # the first expiry (1768 s) is long gone: both legs were refreshed
    assert c.byes() == {}
    c.at(1000 + 1768)
    c.assert_hung_up_both(REASON_EXPIRED)


def test_bodyless_update_refreshes_its_own_leg_and_is_answered_here() -> None:
    # the device does not allow UPDATE: relaying the caller's refresh would fail it
    c = Answered(device=("Session-Expires: 1800;refresher=uas", "Require: timer"))
    c.at(1000)
    stx = c.from_a("UPDATE", extra="Session-Expires: 1800;refresher=uac\nSupported: timer\n"
                                   "Contact: <sip:alice@10.0.0.7:5070;transport=tcp>\n")
    assert stx is not None and stx.statuses == [200]
    ok = stx.responses[0]
    assert ok.header("Session-Expires") == "1800;refresher=uac" and ok.header("Require") == "timer"
    assert ok.to.tag == c.a_tag and ok.contacts
    assert c.to_device("UPDATE") == []  # nothing for the device
    # the device's leg was not refreshed by it: the device's own silence ends the call at 1768 s
    c.at(1768)
    assert c.byes() == {CALL_ID: REASON_EXPIRED, c.b_req.call_id: REASON_EXPIRED}
    # the UPDATE's Contact was a target refresh: the BYE goes there
    assert [x.request.raw_uri for x in c.to_caller("BYE")] == ["sip:alice@10.0.0.7:5070;transport=tcp"]
    c.env.assert_clean()


def test_bodyless_update_keeps_the_caller_leg_alive() -> None:
    c = Answered(device=(DEVICE_ALLOW,))  # we refresh the device; the caller refreshes itself
    for t in (900, 1800, 2700):
        c.at(t)
        respond(c.to_device("UPDATE")[-1], 200)
        stx = c.from_a("UPDATE", extra="Session-Expires: 1800;refresher=uac\nSupported: timer\n")
        assert stx is not None and stx.statuses == [200]
    c.at(2700 + 1768 - 0.001)
    assert c.byes() == {} and len(c.to_device("UPDATE")) == 4  # ours, every 900 s
    c.from_a("BYE")
    c.env.assert_clean()


def test_relayed_refresh_may_hand_the_refresh_to_us() -> None:
    c = Answered(device=(DEVICE_ALLOW, "Session-Expires: 1800;refresher=uas", "Require: timer"))
    c.at(100)
    stx = c.from_a("INVITE", body=SDP_C, extra="Session-Expires: 1200;refresher=uas\nSupported: timer\n")
    out = c.to_device("INVITE")[-1]
    respond(out, 200, body=SDP_B)  # no Session-Expires: the device stops doing timers
    assert stx is not None and stx.responses[0].header("Session-Expires") == "1200;refresher=uas"
    c.from_a("ACK", seq=c.a_seq)
    c.at(100 + 600)
    assert c.to_caller("INVITE")[-1].request.body == SDP_B  # our refresh, with our last SDP to it
    assert c.to_device("UPDATE") == []
    c.at(100 + 900)  # ours to the device, at half of what we asked for
    assert len(c.to_device("UPDATE")) == 1
    c.from_a("BYE")
    c.env.assert_clean()


def test_relayed_offer_with_too_small_interval_gets_422() -> None:
    c = Answered()
    stx = c.from_a("UPDATE", extra="Session-Expires: 30\nSupported: timer\n")
    assert stx is not None and stx.statuses == [422] and stx.responses[0].header("Min-SE") == "90"
    assert c.to_device("UPDATE") == []
    c.from_a("BYE")
    c.env.assert_clean()


# -- maximum call duration, timers off ----------------------------------------------------------------


def test_max_call_duration_ends_the_call() -> None:
    c = Answered(max_call_duration=60)
    c.at(59.999)
    assert c.byes() == {}
    c.at(60)
    c.assert_hung_up_both(REASON_MAX_DURATION)
    assert c.env.mgr.counters["duration_limit"] == 1


def test_max_call_duration_with_session_timers_off() -> None:
    c = Answered(max_call_duration=7200, session_expires=0)
    assert c.b_req.header("Session-Expires") is None and c.b_req.header("Min-SE") is None
    assert c.ok.header("Session-Expires") is None
    c.at(3600)
    assert c.env.port.sent == [c.b]  # no refresh, no expiry
    c.at(7200)
    c.assert_hung_up_both(REASON_MAX_DURATION)


def test_timers_off_without_limit_arm_nothing() -> None:
    c = Answered(session_expires=0, max_call_duration=0)
    assert c.clock.getDelayedCalls() == [] and c.env.call().timers is None
    c.from_a("BYE")
    c.env.assert_clean()


def test_session_timers_cancelled_when_the_call_ends() -> None:
    c = Answered(max_call_duration=14_400)
    assert len(c.clock.getDelayedCalls()) == 1  # one per call: the earliest of both legs and the limit
    stx = c.from_a("BYE")
    assert stx is not None and stx.statuses == [200]
    assert c.byes() == {c.b_req.call_id: None}  # a normal hang-up: no Reason of ours
    c.env.assert_clean()


# -- answered calls are not pending -------------------------------------------------------------------


def test_answered_calls_do_not_count_against_max_pending_per_aor() -> None:
    env = Env(max_pending=2)
    env.location.add(binding(1))
    for n in (1, 2):
        _, stx = env.invite(call_id=f"call-{n}@10.0.0.1")
        env.port.invites()[-1].respond(200, body=SDP_B)
        assert stx.statuses[-1] == 200
    assert env.silo.pending_count(AOR) == 0
    _, stx = env.invite(call_id="call-3@10.0.0.1")  # a third call rings: it is the only pending one
    assert stx.statuses == [] and len(env.port.invites()) == 3
    assert env.silo.pending_count(AOR) == 1
    _, stx = env.invite(call_id="call-4@10.0.0.1")
    _, stx = env.invite(call_id="call-5@10.0.0.1")
    assert stx.statuses == [486]  # pending (ringing) calls still count
    for n in (1, 2):
        call = env.call(f"call-{n}@10.0.0.1")
        bye = in_dialog("BYE", call.call_id, CALLER, f"<sip:bob@example.com>;tag={call.a.dialog.local_tag}", 11)
        env.mgr.request_received(bye, FakeStx(bye), env.caller_flow)
    for n in (3, 4):
        env.call(f"call-{n}@10.0.0.1").caller_cancel(None)
    env.assert_clean()


def test_device_hop_of_a_refresh_follows_a_target_refresh() -> None:
    c = Answered(device=(DEVICE_ALLOW,))
    stx = c.from_a("INVITE", body=SDP_C)
    respond(c.to_device("INVITE")[-1], 200, body=SDP_B, contact="<sip:bob@10.0.0.9:5080;transport=tcp>")
    c.from_a("ACK", seq=c.a_seq)
    assert stx is not None and stx.statuses == [200]
    c.at(900)
    assert c.to_device("UPDATE")[-1].request.raw_uri == "sip:bob@10.0.0.9:5080;transport=tcp"
    c.from_a("BYE")
    c.env.assert_clean()


def test_device_422_is_retried_with_its_min_se() -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    first = env.port.invites()[0]
    (leg,) = env.call().branches.values()
    leg.invite.add_header("Via", "SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bKfirst", first=True)  # as stamped
    respond(first, 422, ("Min-SE: 3600",))
    second = env.port.invites()[-1]
    assert second is not first and stx.statuses == []  # the caller sees nothing of it
    req = second.request
    assert (req.call_id, req.from_.tag) == (first.request.call_id, first.request.from_.tag)
    assert req.cseq.seq == first.request.cseq.seq + 1 and req.cseq.method == "INVITE"
    assert req.header("Session-Expires") == "3600" and req.header("Min-SE") == "3600"
    assert req.body == SDP_A and req.header("Subject") == "lunch?"
    assert req.header("Via") is None  # the port stamps a new one; the first INVITE's is not reused
    respond(second, 422, ("Min-SE: 3600",))  # asks for nothing more: that branch has failed
    assert len(env.port.invites()) == 2
    # a 422 about our leg to the device means nothing to the caller (and would lack its Min-SE)
    assert stx.statuses == [480]
    env.assert_clean()


def test_device_422_then_answer_negotiates_its_interval() -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    respond(env.port.invites()[0], 422, ("Min-SE: 2400",))
    respond(env.port.invites()[-1], 200, ("Session-Expires: 2400;refresher=uac",), body=SDP_B)
    assert stx.statuses == [200]
    ack, _ = env.port.acks[-1]
    assert ack.cseq.seq == 2  # for the INVITE that was answered
    start = env.clock.seconds()
    env.clock.advance(1200 - 0.001)
    reinvites = [c for c in env.port.sent if c.request.method == "INVITE"]
    assert len(reinvites) == 2
    env.clock.advance(0.001)  # we refresh at half its 2400 s (it allows no UPDATE: re-INVITE)
    refresh = [c for c in env.port.sent if c.request.method == "INVITE"][-1].request
    assert refresh.cseq.seq == 3 and refresh.header("Session-Expires") == "2400;refresher=uac"
    assert env.clock.seconds() == start + 1200
    env.call().in_dialog(env.call().a, in_dialog("BYE", CALL_ID, CALLER, f"<sip:bob@example.com>;tag={stx.final.to.tag}", 11),
                         FakeStx(None))  # type: ignore[arg-type]
    env.assert_clean()


def test_a_bug_in_a_refresh_ends_the_call_instead_of_leaving_it_up() -> None:
    c = Answered(supported=NO_TIMER)
    send = c.env.port.send_request

    def broken_refresh(req: Any, hop: Any, on_response: Any) -> Any:
        if req.method != "BYE":
            raise RuntimeError("boom")
        return send(req, hop, on_response)

    c.env.port.send_request = broken_refresh  # type: ignore[method-assign]
    c.at(900)
    # logged with its traceback, and hung up both ways rather than left without a timer
    c.assert_hung_up_both(REASON_INTERNAL)
