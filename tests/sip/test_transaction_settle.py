"""What transactions keep during their final 64*T1 (or T4) wait: bytes, not parsed messages, and
never the TU's callback. A completed transaction must not keep a whole call alive, and what it
still does (resend a response, resend an ACK, hand a late 2xx up) must not change."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from libon_tsilo.sip.message import Response, make_response
from libon_tsilo.sip.transaction import InviteServerTransaction, NonInviteServerTransaction, State
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, request_text, response_text
from tests.sip.test_transaction_client import PEER, UDP_TARGET, Collector, _request

UDP = FakeFlow("udp")


# -- server side ---------------------------------------------------------------------------------


def _answered(env: Env, method: str, cls: type) -> Any:
    """A server transaction for a new `method` request, answered 200 by the TU."""
    env.feed(request_text(method), UDP)
    stx = env.tu.requests[-1][1]
    assert isinstance(stx, cls)
    stx.respond(make_response(stx.request, 200, to_tag="srv1"))
    return stx


def test_completed_non_invite_keeps_bytes_and_resends_the_same_response():
    env = Env()
    stx = _answered(env, "BYE", NonInviteServerTransaction)
    assert stx.state is State.COMPLETED
    assert stx.request.compacted and stx.last_response.compacted
    first = env.transport.responses[0][0].to_bytes()
    env.feed(request_text("BYE"), UDP)  # a retransmission: absorbed, answered again
    assert len(env.tu.requests) == 1
    assert env.transport.statuses() == [200, 200]
    assert env.transport.responses[1][0].to_bytes() == first
    # the compacted request still reads as before
    assert stx.request.method == "BYE" and stx.request.cseq.method == "BYE"
    env.clock.advance(64 * 0.5)
    env.assert_clean()


def test_accepted_invite_drops_its_2xx_and_still_absorbs_retransmissions():
    env = Env()
    stx = _answered(env, "INVITE", InviteServerTransaction)
    assert stx.state is State.ACCEPTED and stx.last_response is None
    env.feed(request_text("INVITE"), UDP)
    assert env.transport.statuses() == [100, 200]  # the TU, not the transaction, resends 2xx
    stx.respond(make_response(stx.request, 200, to_tag="srv1"))  # RFC 6026: passes through
    assert env.transport.statuses() == [100, 200, 200]
    env.clock.advance(64 * 0.5)
    env.assert_clean()


# -- client side ---------------------------------------------------------------------------------


class _TU:
    """Stands for a call: the transaction must forget it once the TU can hear nothing more."""

    def __init__(self) -> None:
        self.got = Collector()

    def on_response(self, resp: Response) -> None:
        self.got(resp)


def _gone(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


def _completed_without_its_tu(method: str, status: int) -> tuple[Env, Any]:
    """A client transaction answered with a final `status`: Completed, and its TU already gone."""
    env = Env()
    tu = _TU()
    ctx = env.layer.send_request(_request(method), UDP_TARGET, None, tu.on_response)
    env.feed(response_text(ctx.request, status, to_tag="rtag1"), PEER)
    assert tu.got.statuses() == [status] and ctx.state is State.COMPLETED
    ref = weakref.ref(tu)
    del tu
    assert _gone(ref), f"a Completed {method} client transaction kept its TU alive"
    assert ctx.request.compacted
    return env, ctx


def test_completed_non_invite_client_forgets_its_tu():
    env, ctx = _completed_without_its_tu("BYE", 200)
    env.feed(response_text(ctx.request, 200, to_tag="rtag1"), PEER)  # absorbed, nobody called
    env.clock.advance(5.0)
    env.assert_clean()


def test_completed_invite_client_forgets_its_tu_and_still_resends_its_ack():
    env, ctx = _completed_without_its_tu("INVITE", 486)
    assert env.transport.methods() == ["INVITE", "ACK"]
    ack = env.transport.requests[1][0].to_bytes()
    env.feed(response_text(ctx.request, 486, to_tag="rtag1"), PEER)  # our ACK got lost
    assert env.transport.methods() == ["INVITE", "ACK", "ACK"]
    assert env.transport.requests[2][0].to_bytes() == ack
    env.clock.advance(32.0)
    env.assert_clean()


def test_detached_accepted_invite_hands_a_late_2xx_to_the_stray_path():
    env = Env()
    tu = _TU()
    ctx = env.layer.send_request(_request("INVITE"), UDP_TARGET, None, tu.on_response)
    env.feed(response_text(ctx.request, 200, to_tag="rtag1"), PEER)
    assert ctx.state is State.ACCEPTED and tu.got.statuses() == [200]
    env.feed(response_text(ctx.request, 200, to_tag="rtag1"), PEER)  # before detach: to the TU
    assert tu.got.statuses() == [200, 200] and env.tu.strays == []
    ctx.detach()
    # ended at once: timer M would only hand 2xx to a TU that wants none
    assert ctx.state is State.TERMINATED and len(env.layer) == 0
    ref = weakref.ref(tu)
    del tu
    assert _gone(ref), "a detached transaction kept its TU alive"
    env.feed(response_text(ctx.request, 200, to_tag="rtag1"), PEER)
    assert [(r.status, f) for r, f in env.tu.strays] == [(200, PEER)]
    env.assert_clean()


def test_detach_outside_accepted_changes_nothing():
    env = Env()
    tu = _TU()
    ctx = env.layer.send_request(_request("INVITE"), UDP_TARGET, None, tu.on_response)
    ctx.detach()  # still Calling: the TU must hear the answer
    env.feed(response_text(ctx.request, 180, to_tag="rtag1"), PEER)
    assert tu.got.statuses() == [180] and env.tu.strays == []
    env.layer.stop()
    env.assert_clean()


def test_transactions_in_their_final_wait_hold_no_idle_timer_set():
    env = Env()
    stx = _answered(env, "BYE", NonInviteServerTransaction)
    assert stx._timers is None and stx._expiry is not None
    ctx = env.layer.send_request(_request("OPTIONS"), UDP_TARGET, None, lambda r: None)
    assert ctx._first is not None  # retransmitting: timer E's first firing waits in the T1 queue
    env.feed(response_text(ctx.request, 200, to_tag="rtag1"), PEER)
    assert ctx.state is State.COMPLETED and ctx._timers is None
    env.clock.advance(64 * 0.5)
    env.assert_clean()
