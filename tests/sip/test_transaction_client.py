"""Client transactions (RFC 3261 §17.1, RFC 6026) and CANCEL (§9.1) on a Clock with a fake transport."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.message import Request, Response, new_branch, parse_message
from libon_tsilo.sip.transaction import (
    InviteClientTransaction,
    NonInviteClientTransaction,
    State,
    build_cancel,
)
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, FakeTarget, request_text, response_text, run_until

UDP_TARGET = FakeTarget("udp")
TCP_TARGET = FakeTarget("tcp")
PEER = FakeFlow("udp", ("192.0.2.9", 5060))


def _request(method: str = "INVITE", branch: str | None = None, transport: str = "UDP", **kw) -> Request:
    """A request as we send it: by default its branch is a fresh one of ours (sip/branch.py)."""
    msg = parse_message(request_text(
        method, branch=branch or new_branch(), via_host="127.0.0.1:5060", transport=transport, **kw
    ).encode())
    assert isinstance(msg, Request)
    return msg


class Collector(list):
    def __call__(self, resp: Response) -> None:
        self.append(resp)

    def statuses(self) -> list[int]:
        return [r.status for r in self]


def _send(env: Env, method: str = "INVITE", target=UDP_TARGET, **kw):
    got = Collector()
    transport = "TCP" if target.transport == "tcp" else "UDP"
    ctx = env.layer.send_request(_request(method, transport=transport, **kw), target, None, got)
    return ctx, got


def _answer(env: Env, ctx, status: int, to_tag: str | None = "rtag1") -> None:
    env.feed(response_text(ctx.request, status, to_tag=to_tag), PEER)


# -- INVITE client ------------------------------------------------------------------------------


def test_timer_A_retransmits_invite_doubling_without_T2_cap():
    env = Env()
    ctx, got = _send(env)
    assert isinstance(ctx, InviteClientTransaction) and ctx.state is State.CALLING
    times = run_until(env.clock, 31.9, lambda: len(env.transport.requests))
    assert times == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert got == []
    env.layer.stop()
    env.assert_clean()


def test_timer_B_gives_408_to_the_tu_after_64_T1():
    env = Env()
    ctx, got = _send(env)
    env.clock.advance(31.99)
    assert got == []
    env.clock.advance(0.01)
    assert got.statuses() == [408]
    assert got[0].call_id == ctx.request.call_id and got[0].cseq.method == "INVITE"
    assert ctx.state is State.TERMINATED
    env.assert_clean()


def test_timer_A_not_used_on_reliable_transport():
    env = Env()
    _, got = _send(env, target=TCP_TARGET)
    env.clock.advance(31)
    assert env.transport.methods() == ["INVITE"]
    env.clock.advance(1)
    assert got.statuses() == [408]
    env.assert_clean()


def test_provisional_stops_A_and_B():
    env = Env()
    ctx, got = _send(env)
    _answer(env, ctx, 180)
    env.clock.advance(100)
    assert env.transport.methods() == ["INVITE"]
    assert got.statuses() == [180] and ctx.state is State.PROCEEDING
    _answer(env, ctx, 183)
    assert got.statuses() == [180, 183]
    env.layer.stop()
    env.assert_clean()


def test_timer_D_non2xx_final_is_acked_and_retransmissions_absorbed():
    env = Env()
    ctx, got = _send(env, routes=("<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"))
    _answer(env, ctx, 180)
    _answer(env, ctx, 486, to_tag="busy1")
    assert got.statuses() == [180, 486] and ctx.state is State.COMPLETED
    ack, target, flow = env.transport.requests[-1]
    assert ack.method == "ACK" and target is UDP_TARGET and flow is not None
    assert ack.raw_uri == ctx.request.raw_uri
    assert ack.branch == ctx.request.branch and len(ack.vias) == 1
    assert ack.to.tag == "busy1" and ack.from_.tag == "ftag1"
    assert (ack.cseq.seq, ack.cseq.method) == (1, "ACK")
    assert ack.call_id == ctx.request.call_id
    assert ack.header_values("Route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    _answer(env, ctx, 486, to_tag="busy1")  # retransmission: ACK again, TU not told
    assert env.transport.methods() == ["INVITE", "ACK", "ACK"]
    assert got.statuses() == [180, 486]
    env.clock.advance(31.9)
    assert ctx.state is State.COMPLETED
    env.clock.advance(0.1)  # timer D = 32 s
    assert ctx.state is State.TERMINATED
    env.assert_clean()


def test_timer_D_is_zero_on_reliable_transport():
    env = Env()
    ctx, got = _send(env, target=TCP_TARGET)
    _answer(env, ctx, 603)
    assert env.transport.methods() == ["INVITE", "ACK"]
    assert got.statuses() == [603]
    env.assert_clean()


def test_timer_M_accepted_passes_every_2xx_then_strays_go_to_tu():
    env = Env()
    ctx, got = _send(env)
    _answer(env, ctx, 200, to_tag="fork1")
    _answer(env, ctx, 200, to_tag="fork2")  # another fork
    _answer(env, ctx, 486)  # a non-2xx in Accepted is ignored
    assert [r.to.tag for r in got] == ["fork1", "fork2"]
    assert ctx.state is State.ACCEPTED
    assert env.transport.methods() == ["INVITE"]  # the TU ACKs 2xx, not the transaction
    env.clock.advance(31.9)
    assert ctx.state is State.ACCEPTED
    env.clock.advance(0.1)  # timer M = 64*T1
    assert ctx.state is State.TERMINATED
    _answer(env, ctx, 200, to_tag="fork1")
    assert [r.status for r, _ in env.tu.strays] == [200]
    assert len(got) == 2
    env.assert_clean()


def test_stray_non2xx_response_is_dropped():
    env = Env()
    env.feed(response_text(_request(), 486), PEER)
    env.feed(response_text(_request("OPTIONS"), 200), PEER)
    assert env.tu.strays == []
    env.assert_clean()


# -- CANCEL ------------------------------------------------------------------------------------


def test_build_cancel_follows_rfc3261_9_1():
    invite = _request(routes=("<sip:p1.example.com;lr>",), cseq=7)
    cancel = build_cancel(invite, [("Reason", 'SIP;cause=200;text="Call completed elsewhere"')])
    assert cancel.method == "CANCEL" and cancel.raw_uri == invite.raw_uri
    assert str(cancel.top_via) == str(invite.top_via) and len(cancel.vias) == 1
    assert cancel.header("To") == invite.header("To")
    assert cancel.header("From") == invite.header("From")
    assert cancel.call_id == invite.call_id
    assert (cancel.cseq.seq, cancel.cseq.method) == (7, "CANCEL")
    assert cancel.header_values("Route") == ["<sip:p1.example.com;lr>"]
    assert cancel.header("Reason") == 'SIP;cause=200;text="Call completed elsewhere"'
    assert cancel.body == b""


def test_cancel_before_provisional_waits_for_it():
    env = Env()
    ctx, got = _send(env)
    cancel_got = Collector()
    ctx.cancel([("Reason", "SIP;cause=487")], cancel_got)
    assert env.transport.methods() == ["INVITE"]
    env.clock.advance(0.5)  # timer A still runs: the INVITE is retransmitted, no CANCEL yet
    assert env.transport.methods() == ["INVITE", "INVITE"]
    _answer(env, ctx, 180)
    assert env.transport.methods() == ["INVITE", "INVITE", "CANCEL"]
    cancel = env.transport.requests[-1][0]
    assert cancel.branch == ctx.request.branch and cancel.header("Reason") == "SIP;cause=487"
    assert len(env.layer) == 2  # the CANCEL runs in its own non-INVITE transaction
    env.feed(response_text(ctx.cancel_request, 200), PEER)
    _answer(env, ctx, 487)
    assert cancel_got.statuses() == [200]
    assert got.statuses() == [180, 487]
    assert env.transport.methods()[-1] == "ACK"
    env.clock.advance(32)
    env.assert_clean()


def test_cancel_after_provisional_is_sent_at_once_and_only_once():
    env = Env()
    ctx, _ = _send(env)
    _answer(env, ctx, 183)
    ctx.cancel()
    ctx.cancel()
    assert env.transport.methods() == ["INVITE", "CANCEL"]
    env.layer.stop()
    env.assert_clean()


def test_cancel_not_sent_when_final_response_came_first():
    env = Env()
    ctx, got = _send(env)
    ctx.cancel()
    _answer(env, ctx, 200)
    ctx.cancel()
    assert env.transport.methods() == ["INVITE"]
    assert got.statuses() == [200]
    env.clock.advance(32)
    env.assert_clean()


def test_cancel_without_final_response_ends_invite_after_64_T1():
    env = Env()
    ctx, got = _send(env, target=TCP_TARGET)
    _answer(env, ctx, 180)
    ctx.cancel()
    env.feed(response_text(ctx.cancel_request, 200), PEER)
    env.clock.advance(32)
    assert got.statuses() == [180, 487]
    env.assert_clean()


def test_cancel_on_non_invite_is_a_noop():
    env = Env()
    ctx, _ = _send(env, "OPTIONS")
    ctx.cancel()
    assert env.transport.methods() == ["OPTIONS"]
    env.layer.stop()
    env.assert_clean()


# -- non-INVITE client ------------------------------------------------------------------------


def test_timer_E_doubles_to_T2_in_trying_then_fixed_T2_in_proceeding():
    env = Env()
    ctx, got = _send(env, "OPTIONS")
    assert isinstance(ctx, NonInviteClientTransaction) and ctx.state is State.TRYING
    times = run_until(env.clock, 12, lambda: len(env.transport.requests))
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5]
    _answer(env, ctx, 100)
    assert ctx.state is State.PROCEEDING
    times = run_until(env.clock, 24, lambda: len(env.transport.requests))
    assert times == [15.5, 19.5, 23.5]
    env.layer.stop()
    env.assert_clean()


def test_timer_F_gives_408_after_64_T1():
    env = Env()
    ctx, got = _send(env, "BYE")
    _answer(env, ctx, 100)
    env.clock.advance(31.99)
    assert got.statuses() == [100]
    env.clock.advance(0.01)
    assert got.statuses() == [100, 408]
    env.assert_clean()


def test_timer_K_absorbs_retransmitted_finals_for_T4_on_udp():
    env = Env()
    ctx, got = _send(env, "OPTIONS")
    _answer(env, ctx, 404)
    _answer(env, ctx, 404)
    assert got.statuses() == [404] and ctx.state is State.COMPLETED
    env.clock.advance(4.9)
    assert ctx.state is State.COMPLETED
    assert env.transport.methods() == ["OPTIONS"]  # timer E stopped
    env.clock.advance(0.1)
    assert ctx.state is State.TERMINATED
    env.assert_clean()


def test_timer_K_is_zero_on_reliable_transport():
    env = Env()
    ctx, got = _send(env, "MESSAGE", target=TCP_TARGET)
    _answer(env, ctx, 202)
    assert got.statuses() == [202]
    env.assert_clean()


# -- transport errors and misuse -------------------------------------------------------------


def test_transport_error_on_first_send_is_a_503_on_the_next_turn():
    env = Env()
    env.transport.fail = True
    ctx, got = _send(env)
    assert got == []  # not before send_request returned
    env.clock.advance(0)
    assert got.statuses() == [503]
    assert ctx.state is State.TERMINATED
    env.assert_clean()


def test_transport_error_on_retransmission_is_a_503():
    env = Env()
    _, got = _send(env, "OPTIONS")
    env.transport.fail = True
    env.clock.advance(0.5)
    assert got.statuses() == [503]
    env.assert_clean()


def test_tu_exception_in_callback_does_not_break_the_layer():
    env = Env()

    def boom(resp: Response) -> None:
        raise RuntimeError("TU bug")

    ctx = env.layer.send_request(_request("OPTIONS"), UDP_TARGET, None, boom)
    _answer(env, ctx, 200)
    assert ctx.state is State.COMPLETED
    env.clock.advance(5)
    env.assert_clean()


def test_request_without_cookie_branch_is_refused():
    env = Env()
    with pytest.raises(ValueError):
        env.layer.send_request(_request(branch="oldstyle"), UDP_TARGET, None, Collector())
    with pytest.raises(ValueError):
        env.layer.send_request(_request("ACK"), UDP_TARGET, None, Collector())
    env.assert_clean()


def test_duplicate_branch_is_refused():
    env = Env()
    _send(env, "OPTIONS", branch="z9hG4bKsame")
    with pytest.raises(ValueError):
        _send(env, "OPTIONS", branch="z9hG4bKsame")
    env.layer.stop()
    env.assert_clean()


def test_late_connect_failure_reported_by_transport_is_a_503():
    env = Env()
    ctx, got = _send(env, target=FakeTarget("tcp", "192.0.2.9", 5060))
    answered, answered_got = _send(env, "OPTIONS", branch="z9hG4bKout2", target=FakeTarget("tcp", "192.0.2.9", 5060))
    _answer(env, answered, 100)
    other, other_got = _send(env, "OPTIONS", branch="z9hG4bKout3", target=FakeTarget("tcp", "192.0.2.8", 5060))
    env.transport.on_send_error(FakeTarget("TCP", "192.0.2.9", 5060), "connect refused")
    assert got.statuses() == [503] and ctx.state is State.TERMINATED
    assert answered_got.statuses() == [100]  # it had an answer: the connection worked
    assert other_got == []
    env.layer.stop()
    env.assert_clean()
    assert env.layer._by_target == {}


def test_target_index_is_emptied_when_transactions_end():
    env = Env()
    ctx, _ = _send(env, "OPTIONS", target=TCP_TARGET)
    _answer(env, ctx, 200)
    env.assert_clean()
    assert env.layer._by_target == {}


def test_first_timer_A_and_E_arm_no_delayed_call_of_their_own():
    """Timers A and E first fire T1 after the request, the same delay for every transaction: they wait
    in the layer's T1 queue, whose one DelayedCall all its queues share, so a request answered before
    T1 neither arms nor cancels a DelayedCall while a final wait (here a 64*T1 timer M) is pending."""
    env = Env()
    accepted, _ = _send(env, branch="z9hG4bKaccepted")
    _answer(env, accepted, 200)  # Accepted: timer M waits 64*T1
    assert accepted.state is State.ACCEPTED
    assert len(env.clock.getDelayedCalls()) == 1
    invite, got_invite = _send(env, branch="z9hG4bKringing")
    [shared] = env.clock.getDelayedCalls()  # moved sooner, for the T1 queue's head
    assert shared.getTime() == 0.5
    options, got_options = _send(env, "OPTIONS")
    assert env.clock.getDelayedCalls() == [shared]
    _answer(env, invite, 180)
    _answer(env, options, 200)
    assert got_invite.statuses() == [180] and got_options.statuses() == [200]
    assert env.clock.getDelayedCalls() == [shared]
    env.clock.advance(0.5)  # a wake-up with nothing due: nothing resent
    assert env.transport.methods() == ["INVITE", "INVITE", "OPTIONS"]
    env.layer.stop()
    env.assert_clean()


def test_first_timer_E_still_fires_at_T1_then_backs_off_to_T2():
    env = Env()
    _send(env, "OPTIONS")
    times = run_until(env.clock, 31.9, lambda: len(env.transport.requests))
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    env.clock.advance(0.1)
    env.assert_clean()
