"""Server transactions (RFC 3261 §17.2, RFC 6026) driven through TransactionLayer.inbound on a Clock."""

from __future__ import annotations

from libon_tsilo.sip.message import make_response, new_tag
from libon_tsilo.sip.transaction import (
    InviteServerTransaction,
    NonInviteServerTransaction,
    State,
)
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, request_text, run_until

UDP = FakeFlow("udp")
TCP = FakeFlow("tcp")


def _invite(env: Env, flow=UDP, **kw) -> InviteServerTransaction:
    env.feed(request_text("INVITE", **kw), flow)
    stx = env.tu.requests[-1][1]
    assert isinstance(stx, InviteServerTransaction)
    return stx


def _reject(stx, status: int = 486, tag: str = "srv1") -> None:
    stx.respond(make_response(stx.request, status, to_tag=tag))


# -- INVITE server ------------------------------------------------------------------------------


def test_invite_gets_100_trying_at_once_and_reaches_the_tu():
    env = Env()
    stx = _invite(env)
    assert env.transport.statuses() == [100]
    resp, flow = env.transport.responses[0]
    assert flow is UDP and resp.to.tag is None
    assert stx.state is State.PROCEEDING and len(env.layer) == 1
    env.layer.stop()
    env.assert_clean()


def test_invite_retransmission_is_absorbed_and_resends_last_provisional():
    env = Env()
    stx = _invite(env)
    stx.respond(make_response(stx.request, 180, to_tag="srv1"))
    env.feed(request_text("INVITE"), UDP)
    assert len(env.tu.requests) == 1
    assert env.transport.statuses() == [100, 180, 180]
    env.layer.stop()
    env.assert_clean()


def test_timer_G_retransmits_final_doubling_capped_at_T2():
    env = Env()
    stx = _invite(env)
    _reject(stx)
    assert stx.state is State.COMPLETED
    sent_at = run_until(env.clock, 12, lambda: len(env.transport.responses))
    # intervals 0.5, 1, 2, 4 (= T2), 4
    assert sent_at == [0.5, 1.5, 3.5, 7.5, 11.5]
    assert env.transport.statuses()[-1] == 486
    env.layer.stop()
    env.assert_clean()


def test_timer_G_not_used_on_reliable_flow():
    env = Env()
    stx = _invite(env, flow=TCP, transport="TCP")
    _reject(stx)
    env.clock.advance(20)
    assert env.transport.statuses() == [100, 486]
    env.layer.stop()
    env.assert_clean()


def test_timer_H_ends_the_transaction_and_tells_the_tu():
    env = Env()
    stx = _invite(env)
    _reject(stx)
    env.clock.advance(31.9)
    assert len(env.layer) == 1 and env.tu.timeouts == []
    env.clock.advance(0.1)  # 64*T1 = 32 s
    assert env.tu.timeouts == [stx]
    assert stx.state is State.TERMINATED
    env.assert_clean()


def test_ack_for_non2xx_confirms_is_absorbed_and_stops_G():
    env = Env()
    stx = _invite(env)
    _reject(stx, tag="srv1")
    env.feed(request_text("ACK", to_tag="srv1"), UDP)
    assert stx.state is State.CONFIRMED
    assert len(env.tu.requests) == 1  # the ACK did not reach the TU
    sent = len(env.transport.responses)
    env.feed(request_text("INVITE"), UDP)  # retransmission in Confirmed: absorbed silently
    env.feed(request_text("ACK", to_tag="srv1"), UDP)
    env.clock.advance(4.9)
    assert len(env.transport.responses) == sent
    assert len(env.tu.requests) == 1
    env.clock.advance(0.1)
    env.assert_clean()


def test_timer_I_ends_confirmed_after_T4_on_udp():
    env = Env()
    stx = _invite(env)
    _reject(stx)
    env.feed(request_text("ACK", to_tag="srv1"), UDP)
    env.clock.advance(4.9)
    assert stx.state is State.CONFIRMED
    env.clock.advance(0.1)
    assert stx.state is State.TERMINATED
    assert env.tu.timeouts == []
    env.assert_clean()


def test_timer_I_is_zero_on_reliable_flow():
    env = Env()
    stx = _invite(env, flow=TCP, transport="TCP")
    _reject(stx)
    env.feed(request_text("ACK", transport="TCP", to_tag="srv1"), TCP)
    assert stx.state is State.TERMINATED
    env.assert_clean()


def test_timer_L_accepted_absorbs_retransmissions_and_passes_acks_to_tu():
    env = Env()
    stx = _invite(env)
    ok = make_response(stx.request, 200, to_tag="srv1")
    stx.respond(ok)
    assert stx.state is State.ACCEPTED
    env.feed(request_text("INVITE"), UDP)  # absorbed: the TU retransmits its 2xx itself
    assert env.transport.statuses() == [100, 200]
    stx.respond(ok)  # the TU's own 2xx retransmission passes through
    assert env.transport.statuses() == [100, 200, 200]
    # an ACK for 2xx with the INVITE's branch (old UAs) and one with a fresh branch (RFC 3261)
    env.feed(request_text("ACK", to_tag="srv1"), UDP)
    env.feed(request_text("ACK", branch="z9hG4bKack2", to_tag="srv1"), UDP)
    acks = [(r.method, s) for r, s, _ in env.tu.requests[1:]]
    assert acks == [("ACK", None), ("ACK", None)]
    env.clock.advance(31.9)
    assert stx.state is State.ACCEPTED
    env.clock.advance(0.1)  # timer L = 64*T1
    assert stx.state is State.TERMINATED
    env.assert_clean()


def test_final_response_only_once():
    env = Env()
    stx = _invite(env)
    _reject(stx)
    stx.respond(make_response(stx.request, 200, to_tag="x"))  # ignored: already Completed
    assert env.transport.statuses() == [100, 486]
    env.layer.stop()
    env.assert_clean()


# -- non-INVITE server --------------------------------------------------------------------------


def test_non_invite_retransmission_absorbed_while_trying():
    env = Env()
    env.feed(request_text("OPTIONS"), UDP)
    stx = env.tu.requests[0][1]
    assert isinstance(stx, NonInviteServerTransaction) and stx.state is State.TRYING
    env.feed(request_text("OPTIONS"), UDP)
    assert env.transport.responses == [] and len(env.tu.requests) == 1
    stx.respond(make_response(stx.request, 100))
    env.feed(request_text("OPTIONS"), UDP)
    assert env.transport.statuses() == [100, 100]
    env.layer.stop()
    env.assert_clean()


def test_timer_J_keeps_completed_for_64_T1_on_udp_and_resends_final():
    env = Env()
    env.tu.auto_status = 200
    env.feed(request_text("OPTIONS"), UDP)
    stx = env.tu.requests[0][1]
    assert stx.state is State.COMPLETED
    env.clock.advance(10)
    env.feed(request_text("OPTIONS"), UDP)
    assert env.transport.statuses() == [200, 200]
    assert len(env.tu.requests) == 1
    env.clock.advance(21.9)
    assert stx.state is State.COMPLETED
    env.clock.advance(0.1)
    assert stx.state is State.TERMINATED
    env.assert_clean()


def test_timer_J_is_zero_on_reliable_flow():
    env = Env()
    env.tu.auto_status = 200
    env.feed(request_text("OPTIONS", transport="TCP"), TCP)
    assert env.transport.statuses() == [200]
    env.assert_clean()


# -- matching -----------------------------------------------------------------------------------


def test_same_branch_other_sent_by_is_another_transaction():
    env = Env()
    env.feed(request_text("OPTIONS"), UDP)
    env.feed(request_text("OPTIONS", via_host="192.0.2.7:5060"), FakeFlow("udp", ("192.0.2.7", 5060)))
    assert len(env.tu.requests) == 2 and len(env.layer) == 2
    env.layer.stop()
    env.assert_clean()


def test_sent_by_default_port_matches_explicit_5060():
    env = Env()
    env.feed(request_text("OPTIONS", via_host="Host.Example.com"), UDP)
    env.feed(request_text("OPTIONS", via_host="host.example.com:5060"), UDP)
    assert len(env.tu.requests) == 1
    env.layer.stop()
    env.assert_clean()


def test_rfc2543_request_without_branch_matches_retransmission():
    env = Env()
    env.feed(request_text("OPTIONS", branch=None), UDP)
    env.feed(request_text("OPTIONS", branch=None), UDP)
    env.feed(request_text("OPTIONS", branch=None, cseq=2), UDP)
    assert [r.cseq.seq for r, _, _ in env.tu.requests] == [1, 2]
    env.layer.stop()
    env.assert_clean()


def test_bare_magic_cookie_branch_falls_back_to_rfc2543_matching():
    # RFC 4475 §3.2.1 badbranch: "z9hG4bK" alone is not unique, so two callers sharing it must differ
    env = Env()
    env.feed(request_text("OPTIONS", branch="z9hG4bK"), UDP)
    env.feed(request_text("OPTIONS", branch="z9hG4bK", call_id="other@x"), UDP)
    env.feed(request_text("OPTIONS", branch="z9hG4bK"), UDP)
    assert [r.call_id for r, _, _ in env.tu.requests] == ["call-1@example.net", "other@x"]
    env.layer.stop()
    env.assert_clean()


def test_rfc2543_ack_matches_with_the_to_tag_of_our_response():
    env = Env()
    stx = _invite(env, branch=None)
    _reject(stx, tag="srv9")
    env.feed(request_text("ACK", branch=None, to_tag="other"), UDP)  # not ours: goes to the TU
    assert stx.state is State.COMPLETED
    assert [r.method for r, _, _ in env.tu.requests] == ["INVITE", "ACK"]
    env.feed(request_text("ACK", branch=None, to_tag="srv9"), UDP)
    assert stx.state is State.CONFIRMED
    assert len(env.tu.requests) == 2
    env.clock.advance(5)
    env.assert_clean()


def test_ack_without_transaction_goes_to_tu_with_no_stx():
    env = Env()
    env.feed(request_text("ACK", branch="z9hG4bKnew", to_tag="t"), UDP)
    assert env.tu.requests[0][0].method == "ACK" and env.tu.requests[0][1] is None
    env.assert_clean()


# -- CANCEL -------------------------------------------------------------------------------------


def test_cancel_matches_invite_by_branch_and_gets_its_own_transaction():
    env = Env()
    invite_stx = _invite(env)
    env.feed(request_text("CANCEL"), UDP)
    cancel, matched, flow, cancel_stx = env.tu.cancels[0]
    assert matched is invite_stx and flow is UDP and cancel.method == "CANCEL"
    assert isinstance(cancel_stx, NonInviteServerTransaction) and cancel_stx.request is cancel
    assert len(env.layer) == 2
    cancel_stx.respond(make_response(cancel, 200, to_tag=new_tag()))
    _reject(invite_stx, 487, tag="srv1")
    env.feed(request_text("CANCEL"), UDP)  # retransmitted CANCEL: 200 again, TU not called
    assert len(env.tu.cancels) == 1
    assert env.transport.statuses() == [100, 200, 487, 200]
    env.feed(request_text("ACK", to_tag="srv1"), UDP)
    env.clock.advance(64 * 0.5)
    env.assert_clean()


def test_cancel_with_other_branch_matches_nothing():
    env = Env()
    _invite(env)
    env.feed(request_text("CANCEL", branch="z9hG4bKother"), UDP)
    assert env.tu.cancels[0][1] is None
    env.layer.stop()
    env.assert_clean()


def test_cancel_rfc2543_style_matches_on_uri_tags_callid_cseq_and_via():
    env = Env()
    invite_stx = _invite(env, branch=None)
    env.feed(request_text("CANCEL", branch=None, call_id="different@x"), UDP)
    env.feed(request_text("CANCEL", branch=None), UDP)
    assert [m for _, m, _, _ in env.tu.cancels] == [None, invite_stx]
    env.layer.stop()
    env.assert_clean()


# -- errors -------------------------------------------------------------------------------------


def test_tu_exception_becomes_500_and_layer_survives():
    env = Env()
    env.tu.explode = True
    env.feed(request_text("OPTIONS"), UDP)
    assert env.transport.statuses() == [500]
    env.clock.advance(32)
    env.assert_clean()


def test_no_tu_answers_503():
    env = Env()
    env.layer.tu = None
    env.feed(request_text("OPTIONS"), UDP)
    assert env.transport.statuses() == [503]
    env.assert_clean()


def test_request_that_cannot_be_keyed_gets_400():
    env = Env()
    env.feed(request_text("OPTIONS", branch=None).replace("CSeq: 1 OPTIONS", "CSeq: one OPTIONS"), UDP)
    assert env.transport.statuses() == [400]
    assert env.tu.requests == []
    env.assert_clean()


def test_transport_error_on_response_ends_the_transaction_and_tells_the_tu():
    env = Env()
    env.transport.fail = True
    env.feed(request_text("OPTIONS"), UDP)
    stx = env.tu.requests[0][1]
    stx.respond(make_response(stx.request, 200, to_tag="a"))
    assert stx.state is State.TERMINATED
    assert env.tu.transport_errors == [stx]
    env.assert_clean()


def test_stop_cancels_every_timer():
    env = Env()
    _reject(_invite(env))
    env.feed(request_text("OPTIONS", branch="z9hG4bKo"), UDP)
    assert env.clock.getDelayedCalls()
    env.layer.stop()
    env.assert_clean()


def test_the_real_router_answers_an_unmatched_cancel_with_481_on_its_stx():
    from libon_tsilo.sip.router import Router
    from libon_tsilo.sip.uas_core import UASCore

    env = Env()
    env.layer.tu = Router(UASCore())
    env.feed(request_text("CANCEL", branch="z9hG4bKlost"), UDP)
    assert env.transport.statuses() == [481]
    env.clock.advance(32)
    env.assert_clean()


def test_transport_error_in_accepted_keeps_the_transaction_until_timer_L():
    env = Env()
    stx = _invite(env)
    env.transport.fail = True
    stx.respond(make_response(stx.request, 200, to_tag="srv1"))
    assert stx.state is State.ACCEPTED and env.tu.transport_errors == [stx]
    env.feed(request_text("INVITE"), UDP)  # still absorbed
    assert len(env.tu.requests) == 1
    env.clock.advance(32)
    env.assert_clean()
