"""ServerTransaction.compact(): a parked call's INVITE transaction keeps its request as bytes only
and rebuilds its 100 Trying when the request is retransmitted."""

from __future__ import annotations

from libon_tsilo.sip.message import make_response
from libon_tsilo.sip.transaction import InviteServerTransaction, State
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, request_text

UDP = FakeFlow("udp")


def _invite(env: Env) -> InviteServerTransaction:
    env.feed(request_text("INVITE"), UDP)
    stx = env.tu.requests[-1][1]
    assert isinstance(stx, InviteServerTransaction)
    return stx


def test_compacted_invite_transaction_resends_the_same_100_trying():
    env = Env()
    stx = _invite(env)
    first = env.transport.responses[0][0].to_bytes()
    stx.compact()
    assert stx.last_response is None
    env.feed(request_text("INVITE"), UDP)  # a retransmission
    assert len(env.tu.requests) == 1
    assert env.transport.statuses() == [100, 100]
    assert env.transport.responses[1][0].to_bytes() == first
    stx.respond(make_response(stx.request, 486, to_tag="srv1"))
    assert stx.state is State.COMPLETED and env.transport.statuses() == [100, 100, 486]
    env.layer.stop()
    env.assert_clean()


def test_compact_keeps_a_provisional_the_tu_sent():
    env = Env()
    stx = _invite(env)
    stx.respond(make_response(stx.request, 180, to_tag="srv1"))
    stx.compact()
    env.feed(request_text("INVITE"), UDP)
    assert env.transport.statuses() == [100, 180, 180]
    assert env.transport.responses[2][0].to.tag == "srv1"
    env.layer.stop()
    env.assert_clean()
