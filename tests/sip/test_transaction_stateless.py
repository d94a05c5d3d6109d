"""TransactionLayer's stateless hooks: a stateless forwarder in front of the transactions (RFC 3261
§16.11, the cluster relay's), offered what no transaction takes, on a Clock with a fake transport."""

from __future__ import annotations

from typing import Any

from libon_tsilo.sip.message import make_response
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, request_text, response_text
from tests.sip.test_transaction_client import Collector, _request

UDP = FakeFlow("udp")
PEER = FakeFlow("udp", ("192.0.2.9", 5060))


class Forwarder:
    """Takes what it is offered while ``take`` is True; remembers every offer."""

    def __init__(self, take: bool = True) -> None:
        self.take = take
        self.offered: list[Any] = []

    def request(self, req: Any, flow: Any) -> bool:
        self.offered.append(req.method)
        return self.take

    def response(self, resp: Any, flow: Any) -> bool:
        self.offered.append(resp.status)
        return self.take


def _env(take: bool = True) -> tuple[Env, Forwarder]:
    env, fwd = Env(), Forwarder(take)
    env.layer.stateless_request = fwd.request
    env.layer.stateless_response = fwd.response
    return env, fwd


def test_a_request_it_takes_gets_no_transaction_no_100_and_each_retransmission_is_offered_again():
    env, fwd = _env()
    env.feed(request_text("INVITE"), UDP)
    env.feed(request_text("INVITE"), UDP)  # §16.11: a stateless proxy forwards every retransmission
    assert fwd.offered == ["INVITE", "INVITE"]
    assert env.tu.requests == [] and env.transport.responses == []
    env.assert_clean()


def test_a_request_it_declines_gets_a_transaction_which_absorbs_the_retransmissions():
    env, fwd = _env(take=False)
    env.feed(request_text("INVITE"), UDP)
    env.feed(request_text("INVITE"), UDP)
    assert fwd.offered == ["INVITE"] and len(env.tu.requests) == 1
    assert env.transport.statuses() == [100, 100]
    env.layer.stop()
    env.assert_clean()


def test_a_cancel_is_offered_only_when_no_invite_transaction_of_ours_is_there_to_answer_it():
    env, fwd = _env(take=False)
    env.feed(request_text("INVITE"), UDP)
    fwd.take = True
    env.feed(request_text("CANCEL"), UDP)  # the INVITE's branch: ours to answer hop by hop (§16.10)
    assert fwd.offered == ["INVITE"] and len(env.tu.cancels) == 1
    env.feed(request_text("CANCEL", branch="z9hG4bKother"), UDP)
    assert fwd.offered == ["INVITE", "CANCEL"] and len(env.tu.cancels) == 1
    env.layer.stop()


def test_an_ack_our_invite_transaction_absorbs_is_not_offered_an_ack_for_a_2xx_is():
    env, fwd = _env(take=False)
    env.feed(request_text("INVITE"), UDP)
    stx = env.tu.requests[-1][1]
    stx.respond(make_response(stx.request, 486, to_tag="t1"))
    fwd.take = True
    env.feed(request_text("ACK", to_tag="t1"), UDP)  # the INVITE's branch: hop by hop, for our 486
    assert fwd.offered == ["INVITE"]
    env.feed(request_text("ACK", branch="z9hG4bKack2", to_tag="t2"), UDP)  # an ACK for a 2xx
    assert fwd.offered == ["INVITE", "ACK"] and len(env.tu.requests) == 1
    env.layer.stop()


def test_responses_are_offered_before_they_are_matched_to_a_client_transaction():
    env, fwd = _env()
    got = Collector()
    ctx = env.layer.send_request(_request("OPTIONS"), PEER, None, got)
    env.feed(response_text(ctx.request, 200), PEER)
    assert fwd.offered == [200] and got == []  # taken: the transaction never saw it
    fwd.take = False
    env.feed(response_text(ctx.request, 200), PEER)
    assert fwd.offered == [200, 200] and got.statuses() == [200]
    env.layer.stop()
