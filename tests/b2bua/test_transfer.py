"""Blind transfer (RFC 3515 REFER) carried out by the B2BUA, on a Clock with a recording port:
202 + NOTIFY sipfrag, the new call through the normal path, the transferee re-INVITEd toward the
new party, the referrer told and hung up; and the refusals that leave the call as it was."""

from __future__ import annotations

from typing import Any

from libon_tsilo.b2bua.waker import WakeResult
from tests.b2bua.helpers import SDP_A, SDP_B, SDP_C, Env, binding, flow, in_dialog
from tests.fakes.sip import FakeStx
from tests.b2bua.test_relay import Connected

CAROL = "sip:carol@example.com"


class Transferable(Connected):
    """An answered call alice -> bob (device 1), with carol (device 3) registered."""

    def __init__(self) -> None:
        super().__init__()
        self.env.location.add(binding(3, aor=CAROL))
        self.env.mgr.is_local = lambda uri: uri.host == "example.com"

    def refer_from_b(self, refer_to: str | None = f"<{CAROL}>", extra: str = "") -> FakeStx:
        self.b_seq += 1
        head = f"Refer-To: {refer_to}\n" if refer_to is not None else ""
        req = in_dialog("REFER", self.b_req.call_id, "<sip:bob@example.com>;tag=dev-tag",
                        str(self.b_req.from_), self.b_seq, extra=head + extra)
        stx = FakeStx(req)
        self.env.mgr.request_received(req, stx, flow("tcp:dev1#1"))
        return stx

    def refer_from_a(self, refer_to: str = f"<{CAROL}>") -> FakeStx:
        stx = self.from_a("REFER", extra=f"Refer-To: {refer_to}\n")
        assert stx is not None
        return stx

    def sent(self, method: str) -> list[Any]:
        return [c for c in self.env.port.sent if c.request.method == method]

    def carol(self) -> Any:
        invites = [c for c in self.env.port.invites() if c.request.raw_uri.startswith("sip:bob@10.0.0.4")]
        assert len(invites) == 1
        return invites[0]


def sipfrag(ctx: Any) -> tuple[str, str, str]:
    req = ctx.request
    assert req.header("Content-Type") == "message/sipfrag;version=2.0"
    return req.body.decode(), req.header("Event"), req.header("Subscription-State")


def test_refer_from_the_callee_moves_the_caller_to_the_target() -> None:
    c = Transferable()
    env = c.env
    old_call = env.call()
    stx = c.refer_from_b()
    assert stx.statuses == [202]
    notify = c.sent("NOTIFY")[0]
    assert notify.request.call_id == c.b_req.call_id  # in the referrer's dialog
    assert notify.request.contacts
    assert sipfrag(notify) == ("SIP/2.0 100 Trying\r\n", f"refer;id={c.b_seq}", "active;expires=120")
    notify.respond(200)
    # the new call: from the transferee (the caller, as bob saw it), no SDP: the target offers
    invite = c.carol()
    req = invite.request
    assert str(req.from_.uri) == "sip:alice@example.com" and req.from_.display == "Alice Liddell"
    assert str(req.to.uri) == CAROL and req.body == b""
    assert req.call_id not in (c.b_req.call_id, "call-1@10.0.0.1")
    invite.respond(180, to_tag="carol-tag")
    assert len(c.sent("NOTIFY")) == 1  # 18x are not notified
    invite.respond(200, to_tag="carol-tag", body=SDP_C)
    env.clock.advance(0)
    # the transferee (the caller) is re-INVITEd in its own dialog with carol's offer
    reinvite = [x for x in c.sent("INVITE") if x.request.call_id == "call-1@10.0.0.1"]
    assert len(reinvite) == 1 and reinvite[0].request.body == SDP_C
    assert reinvite[0].request.to.tag == "a-tag"
    assert env.port.acks == [] or all(a.call_id != req.call_id for a, _ in env.port.acks)
    reinvite[0].respond(200, to_tag="a-tag", body=SDP_A)
    acks = {a.call_id: a for a, _ in env.port.acks}
    assert acks["call-1@10.0.0.1"].cseq.seq == reinvite[0].request.cseq.seq
    assert acks[req.call_id].body == SDP_A  # the caller's answer reaches carol in the ACK
    final = c.sent("NOTIFY")[1]
    assert sipfrag(final) == ("SIP/2.0 200 OK\r\n", f"refer;id={c.b_seq}", "terminated;reason=noresource")
    assert c.sent("BYE") == []  # the referrer is hung up after it took the final NOTIFY
    final.respond(200)
    bye = c.sent("BYE")[0]
    assert bye.request.call_id == c.b_req.call_id
    assert old_call.ended and old_call.end_reason == "transferred"
    assert env.mgr.counters["transfers"] == 1
    # the referrer's own BYE crossing ours is answered 200
    crossing = c.from_b("BYE")
    assert crossing is not None and crossing.statuses == [200]
    bye.respond(200)
    # alice and carol talk through the new call: alice's BYE reaches carol
    (new_call,) = env.mgr.calls.values()
    assert new_call.winner.dialog.call_id == req.call_id
    hang = c.from_a("BYE")
    assert hang is not None and hang.statuses == [200]
    to_carol = c.sent("BYE")[-1]
    assert to_carol.request.call_id == req.call_id
    to_carol.respond(200)
    env.assert_clean()


def test_refer_from_the_caller_moves_the_callee_to_the_target() -> None:
    c = Transferable()
    env = c.env
    stx = c.refer_from_a()
    assert stx.statuses == [202]
    notify = c.sent("NOTIFY")[0]
    assert notify.request.call_id == "call-1@10.0.0.1"
    notify.respond(200)
    req = c.carol().request
    # the callee is the transferee: carol sees bob, our user, asserted
    assert str(req.from_.uri) == "sip:bob@example.com"
    assert req.header("P-Asserted-Identity") == "<sip:bob@example.com>"
    c.carol().respond(200, to_tag="carol-tag", body=SDP_C)
    env.clock.advance(0)
    reinvite = [x for x in c.sent("INVITE") if x.request.call_id == c.b_req.call_id and x is not c.b]
    assert len(reinvite) == 1 and reinvite[0].request.body == SDP_C
    reinvite[0].respond(200, body=SDP_B)
    acks = {a.call_id: a for a, _ in env.port.acks}
    assert acks[req.call_id].body == SDP_B
    final = c.sent("NOTIFY")[1]
    final.respond(200)
    c.sent("BYE")[0].respond(200)  # the caller (referrer) hung up by us
    # bob now talks to carol: a re-INVITE from bob reaches carol
    hold = c.from_b("INVITE", body=SDP_B)
    assert hold is not None
    relayed = c.sent("INVITE")[-1]
    assert relayed.request.call_id == req.call_id
    relayed.respond(200, to_tag="carol-tag", body=SDP_C)
    assert hold.statuses == [200]
    c.from_b("ACK", seq=c.b_seq)
    hang = c.from_b("BYE")
    assert hang is not None and hang.statuses == [200]
    c.sent("BYE")[-1].respond(200)
    env.assert_clean()


def test_refusals_leave_the_call_up() -> None:
    c = Transferable()
    env = c.env
    assert c.refer_from_b("<sip:carol@elsewhere.org>").statuses == [403]  # no open relay
    assert c.refer_from_b("<tel:+33123456789>").statuses == [403]
    assert c.refer_from_b(f"<{CAROL}?Replaces=abc%3Bto-tag%3D1%3Bfrom-tag%3D2>").statuses == [403]
    assert c.refer_from_b(None).statuses == [400]
    assert c.sent("NOTIFY") == [] and c.sent("BYE") == []
    assert env.mgr.counters["transfers_refused"] == 4 and env.mgr.counters["transfers"] == 0
    # the call goes on: INFO relayed, BYE ends it as usual
    info = c.from_a("INFO")
    c.env.port.last("INFO").respond(200)
    assert info is not None and info.statuses == [200]
    c.from_a("BYE")
    c.env.port.last("BYE").respond(200)
    env.assert_clean()


def test_second_refer_while_one_runs_gets_491() -> None:
    c = Transferable()
    assert c.refer_from_b().statuses == [202]
    assert c.refer_from_b().statuses == [491]
    c.from_a("BYE")  # the transferee hangs up: the new call is cancelled, the referrer gets BYE
    assert c.carol().cancelled
    c.carol().respond(487, to_tag="carol-tag")
    for x in c.sent("BYE") + c.sent("NOTIFY"):
        x.respond(200)
    c.env.assert_clean()


def test_failed_new_call_is_notified_and_the_call_goes_on() -> None:
    c = Transferable()
    env = c.env
    c.refer_from_b()
    c.sent("NOTIFY")[0].respond(200)
    c.carol().respond(486, to_tag="carol-tag")
    final = c.sent("NOTIFY")[1]
    assert sipfrag(final)[0] == "SIP/2.0 486 Busy Here\r\n"
    assert sipfrag(final)[2] == "terminated;reason=noresource"
    final.respond(200)
    assert c.sent("BYE") == []
    assert list(env.mgr.calls) == ["call-1@10.0.0.1"] and env.call().transfer is None
    # still connected alice <-> bob: a re-INVITE (unhold) is relayed, and a new REFER is accepted
    unhold = c.from_b("INVITE", body=SDP_B)
    c.sent("INVITE")[-1].respond(200, to_tag="a-tag", body=SDP_A)
    assert unhold is not None and unhold.statuses == [200]
    c.from_b("ACK", seq=c.b_seq)
    c.from_b("BYE")
    c.env.port.last("BYE").respond(200)
    env.assert_clean()


def test_referrer_may_leave_after_202_and_the_transferee_still_gets_the_target() -> None:
    c = Transferable()
    env = c.env
    c.refer_from_b()
    c.sent("NOTIFY")[0].respond(200)
    left = c.from_b("BYE")
    assert left is not None and left.statuses == [200]
    assert c.sent("BYE") == []  # alice is not hung up: she waits for carol
    # meanwhile alice's requests cannot reach anyone
    info = c.from_a("INFO")
    assert info is not None and info.statuses == [500] and info.responses[0].header("Retry-After") == "5"
    c.carol().respond(200, to_tag="carol-tag", body=SDP_C)
    env.clock.advance(0)
    c.sent("INVITE")[-1].respond(200, to_tag="a-tag", body=SDP_A)
    assert len(c.sent("NOTIFY")) == 1 and c.sent("BYE") == []  # nobody to tell
    c.from_a("BYE")
    c.sent("BYE")[-1].respond(200)
    env.assert_clean()


def test_referrer_gone_and_new_call_failed_hangs_up_the_transferee() -> None:
    c = Transferable()
    env = c.env
    c.refer_from_b()
    c.sent("NOTIFY")[0].respond(200)
    c.from_b("BYE")
    c.carol().respond(480, to_tag="carol-tag")
    bye = c.sent("BYE")
    assert len(bye) == 1 and bye[0].request.call_id == "call-1@10.0.0.1"
    bye[0].respond(200)
    env.assert_clean()


def test_transferee_refusing_the_new_session_drops_the_target_and_keeps_the_call() -> None:
    c = Transferable()
    env = c.env
    c.refer_from_b()
    c.sent("NOTIFY")[0].respond(200)
    invite = c.carol()
    invite.respond(200, to_tag="carol-tag", body=SDP_C)
    env.clock.advance(0)
    c.sent("INVITE")[-1].respond(488, to_tag="a-tag")
    acks = {a.call_id: a for a, _ in env.port.acks}
    assert acks[invite.request.call_id].body == b""
    bye = c.sent("BYE")
    assert [b.request.call_id for b in bye] == [invite.request.call_id]  # carol only
    bye[0].respond(200)
    assert sipfrag(c.sent("NOTIFY")[1])[0] == "SIP/2.0 488 Not Acceptable Here\r\n"
    c.sent("NOTIFY")[1].respond(200)
    c.from_a("BYE")
    c.env.port.last("BYE").respond(200)
    env.assert_clean()


def test_refer_sub_false_gets_no_notify() -> None:
    c = Transferable()
    stx = c.refer_from_b(extra="Refer-Sub: false\n")
    assert stx.statuses == [202] and stx.responses[0].header("Refer-Sub") == "false"
    assert c.sent("NOTIFY") == []
    c.carol().respond(200, to_tag="carol-tag", body=SDP_C)
    c.env.clock.advance(0)
    c.sent("INVITE")[-1].respond(200, to_tag="a-tag", body=SDP_A)
    assert c.sent("NOTIFY") == []
    c.sent("BYE")[0].respond(200)  # the referrer
    c.from_a("BYE")
    c.sent("BYE")[-1].respond(200)
    c.env.assert_clean()


def test_glare_on_the_transferee_reinvite_is_retried_once() -> None:
    c = Transferable()
    env = c.env
    c.refer_from_b()
    c.sent("NOTIFY")[0].respond(200)
    invite = c.carol()
    invite.respond(200, to_tag="carol-tag", body=SDP_C)
    env.clock.advance(0)
    first = c.sent("INVITE")[-1]
    first.respond(491, to_tag="a-tag")  # alice re-INVITEd at the same moment
    assert c.sent("BYE") == [] and len(c.sent("NOTIFY")) == 1  # not given up
    env.clock.advance(2.0)  # the caller owns the A dialog's Call-ID: 0-2 s
    second = c.sent("INVITE")[-1]
    assert second is not first and second.request.body == SDP_C
    assert second.request.cseq.seq > first.request.cseq.seq
    second.respond(491, to_tag="a-tag")  # once only: then the transfer fails, the call stays
    assert sipfrag(c.sent("NOTIFY")[1])[0] == "SIP/2.0 491 Request Pending\r\n"
    c.sent("NOTIFY")[1].respond(200)
    c.sent("BYE")[0].respond(200)  # carol, who answered for nothing
    c.from_a("BYE")
    c.sent("BYE")[-1].respond(200)
    env.assert_clean()


def test_target_asleep_is_pushed_and_late_forked_like_any_call() -> None:
    """The new call takes the normal path: carol's only binding is a push one, so the call parks and
    the waker pushes her; when she registers the call forks to her and the transfer completes."""
    c = Connected()
    env = c.env
    env.mgr.is_local = lambda uri: uri.host == "example.com"
    asleep = binding(3, aor=CAROL, push="apns", live=False)
    env.location.add(asleep)
    stx = FakeStx(in_dialog("REFER", c.b_req.call_id, "<sip:bob@example.com>;tag=dev-tag",
                            str(c.b_req.from_), 200, extra=f"Refer-To: <{CAROL}>\n"))
    env.mgr.request_received(stx.request, stx, flow("tcp:dev1#1"))
    assert stx.statuses == [202]
    new = [call for call in env.mgr.calls.values() if call.call_id != "call-1@10.0.0.1"]
    assert len(new) == 1 and new[0].state.name == "parked"
    pushed_call, pushed, d = env.waker.calls[-1]
    assert pushed_call is new[0] and [b.key for b in pushed] == [asleep.key]
    assert str(pushed_call.caller_uri) == "sip:alice@example.com"  # the push shows the transferee
    d.callback(WakeResult(woken=1))
    env.register(binding(3, aor=CAROL, push="apns", flow_id="tcp:dev3#2"), refreshed=True)
    invite = [x for x in env.port.invites() if x.request.raw_uri.startswith("sip:bob@10.0.0.4")][-1]
    invite.respond(200, to_tag="carol-tag", body=SDP_C)
    env.clock.advance(0)
    [x for x in env.port.sent if x.request.method == "INVITE"][-1].respond(200, to_tag="a-tag", body=SDP_A)
    notifies = [x for x in env.port.sent if x.request.method == "NOTIFY"]
    assert sipfrag(notifies[-1])[0] == "SIP/2.0 200 OK\r\n"
    for x in notifies:
        x.respond(200)
    env.port.last("BYE").respond(200)  # bob, the referrer
    c.from_a("BYE")
    env.port.last("BYE").respond(200)  # carol
    env.assert_clean()


def test_refer_before_the_answer_is_refused_without_ending_the_early_dialog() -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    ctx = env.port.invites()[0]
    ctx.respond(180)
    tag = stx.responses[-1].to.tag
    refer = in_dialog("REFER", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                      f"<sip:bob@example.com>;tag={tag}", 11, extra=f"Refer-To: <{CAROL}>\n")
    refer_stx = FakeStx(refer)
    env.mgr.request_received(refer, refer_stx, env.caller_flow)
    assert refer_stx.statuses == [403]  # was 481, which ends the dialog (RFC 5057)
    ctx.respond(200, body=SDP_B)  # the call goes on to its answer
    assert stx.final is not None and stx.final.status == 200
    bye = FakeStx(in_dialog("BYE", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                            f"<sip:bob@example.com>;tag={tag}", 12))
    env.mgr.request_received(bye.request, bye, env.caller_flow)
    env.port.last("BYE").respond(200)
    env.assert_clean()


def test_target_answering_without_an_offer_is_dropped_and_the_call_stays() -> None:
    c = Transferable()
    env = c.env
    c.refer_from_b()
    c.sent("NOTIFY")[0].respond(200)
    invite = c.carol()
    invite.respond(200, to_tag="carol-tag")  # no SDP: invalid for an INVITE without an offer
    env.clock.advance(0)
    assert [x for x in c.sent("INVITE") if x.request.call_id == "call-1@10.0.0.1"] == []  # alice untouched
    bye = c.sent("BYE")
    assert [b.request.call_id for b in bye] == [invite.request.call_id]
    bye[0].respond(200)
    assert sipfrag(c.sent("NOTIFY")[1])[0] == "SIP/2.0 488 Not Acceptable Here\r\n"
    c.sent("NOTIFY")[1].respond(200)
    c.from_a("BYE")
    c.sent("BYE")[-1].respond(200)
    env.assert_clean()


def test_transfer_calls_do_not_share_one_caller_source() -> None:
    from libon_tsilo.b2bua.admission import CallerSources
    from libon_tsilo.b2bua.transfer import _no_flow

    c = Transferable()
    env = c.env
    env.mgr.sources = CallerSources(1)
    env.mgr.sources.admit("some-other-transfer", _no_flow())  # another transfer is ringing
    assert c.refer_from_b().statuses == [202]
    assert not any(sipfrag(n)[0].startswith("SIP/2.0 503") for n in c.sent("NOTIFY"))
    c.carol()  # the target is called


def test_session_refresh_does_not_go_to_a_referrer_that_left() -> None:
    c = Transferable()
    env = c.env
    env.clock.advance(890)  # the refresh of bob's leg (ours, at 900 s) comes while carol rings
    assert c.refer_from_b().statuses == [202]
    c.sent("NOTIFY")[0].respond(200)
    assert c.from_b("BYE").statuses == [200]
    carol = c.carol()
    carol.respond(180, to_tag="carol-tag")
    n = len(env.port.sent)
    env.clock.advance(15)
    to_referrer = [x for x in env.port.sent[n:] if x.request.call_id == c.b_req.call_id
                   and x.request.method in ("UPDATE", "INVITE")]
    assert to_referrer == []
    assert "CANCEL" not in env.port.sent_methods()
    assert "BYE" not in [x.request.method for x in env.port.sent[n:]]
    carol.respond(200, to_tag="carol-tag", body=SDP_C)
    assert env.port.sent[-1].request.method == "INVITE"  # the transferee is re-INVITEd toward carol


def test_target_answering_while_an_offer_is_in_flight_waits_for_it() -> None:
    c = Transferable()
    env = c.env
    c.refer_from_b()
    c.sent("NOTIFY")[0].respond(200)
    carol = c.carol()
    c.from_a("INVITE", SDP_A)  # alice's re-INVITE, relayed to bob, is in flight
    relayed = c.sent("INVITE")[-1]
    assert relayed.request.call_id == c.b_req.call_id
    carol.respond(200, to_tag="carol-tag", body=SDP_C)
    env.clock.advance(0)
    assert c.sent("BYE") == [] and len(c.sent("NOTIFY")) == 1  # not given up
    relayed.respond(200, to_tag="dev-tag", body=SDP_B)
    c.from_a("ACK", seq=c.a_seq)
    env.clock.advance(2.0)
    moved = c.sent("INVITE")[-1]
    assert moved.request.call_id == "call-1@10.0.0.1" and moved.request.body == SDP_C
    moved.respond(200, to_tag="a-tag", body=SDP_A)
    assert sipfrag(c.sent("NOTIFY")[-1])[0] == "SIP/2.0 200 OK\r\n"


def test_target_waits_for_a_busy_offer_a_bounded_time() -> None:
    c = Transferable()
    env = c.env
    c.refer_from_b()
    c.sent("NOTIFY")[0].respond(200)
    carol = c.carol()
    c.from_a("INVITE", SDP_A)  # never answered by bob
    carol.respond(200, to_tag="carol-tag", body=SDP_C)
    env.clock.advance(0)
    env.clock.pump([2.0] * 3)
    assert sipfrag(c.sent("NOTIFY")[-1])[0] == "SIP/2.0 491 Request Pending\r\n"
    assert [x.request.call_id for x in c.sent("BYE")] == [carol.request.call_id]
