"""Issue 11 item 8 at the transaction layer: a response that matches no transaction is dropped unless
it is a 2xx to an INVITE we sent, which our branch ids prove (sip/branch.py)."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.branch import MAGIC_COOKIE, is_our_branch, new_branch
from tests.sip import rfc4475
from tests.sip.fakes import Env, request_text, response_text
from tests.sip.test_transaction_client import PEER, UDP_TARGET, Collector, _request


def test_our_branches_verify_and_others_do_not() -> None:
    ours = new_branch()
    assert ours.startswith(MAGIC_COOKIE) and is_our_branch(ours)
    assert new_branch() != ours
    flipped = ours[:-1] + ("0" if ours[-1] != "0" else "1")
    for other in (None, "", MAGIC_COOKIE, "z9hG4bK776asdhds", flipped, ours[:-1], ours + "0",
                  ours.upper(), MAGIC_COOKIE + "\udcff" * (len(ours) - len(MAGIC_COOKIE)),
                  MAGIC_COOKIE + "é" * (len(ours) - len(MAGIC_COOKIE))):
        assert not is_our_branch(other), other


@pytest.mark.parametrize("branch", ["z9hG4bKnotours", "z9hG4bK" + "0" * 28, None])
def test_unsolicited_2xx_to_invite_is_dropped_silently(branch: str | None) -> None:
    env = Env()
    invite = _request("INVITE", branch=branch or new_branch())
    if branch is None:  # a branch of ours, tampered with: the MAC no longer matches
        invite = _request("INVITE", branch=invite.branch[:-4] + "beef")
    env.feed(response_text(invite, 200), PEER)
    assert env.tu.strays == []
    assert env.transport.requests == [] and env.transport.responses == []
    assert env.layer.strays_dropped == 1
    env.assert_clean()


@pytest.mark.skipif(not rfc4475.available(), reason="RFC 4475 corpus missing")
@pytest.mark.parametrize("name", ["bcast", "unreason"])
def test_rfc4475_stray_200s_are_dropped(name: str) -> None:
    env = Env()
    env.feed(rfc4475.load(name), PEER)
    assert env.tu.strays == [] and env.transport.requests == []
    assert env.layer.strays_dropped == 1


def test_late_2xx_to_our_invite_still_reaches_the_tu() -> None:
    env = Env()
    got = Collector()
    ctx = env.layer.send_request(_request("INVITE"), UDP_TARGET, None, got)
    env.feed(response_text(ctx.request, 200, to_tag="fork1"), PEER)
    env.clock.advance(64 * 0.5)  # timer M: the transaction is gone
    assert len(env.layer) == 0
    env.feed(response_text(ctx.request, 200, to_tag="fork2"), PEER)
    assert [(r.status, r.to.tag) for r, _ in env.tu.strays] == [(200, "fork2")]
    assert env.layer.strays_dropped == 0
    env.assert_clean()


def test_stray_non_2xx_of_ours_is_counted_and_dropped() -> None:
    env = Env()
    env.feed(response_text(_request("INVITE"), 486), PEER)
    env.feed(response_text(_request("OPTIONS"), 200), PEER)
    assert env.tu.strays == [] and env.layer.strays_dropped == 2


def test_requests_do_not_care_about_branch_macs() -> None:
    env = Env()
    env.tu.auto_status = 200
    env.feed(request_text("OPTIONS", branch="z9hG4bKanybody"), PEER)
    assert env.transport.statuses() == [200]
