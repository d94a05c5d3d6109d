"""Issue 13, calls in from gateways: the one trust decision (registrar/peers.py, used by the digest
policy) and the number -> user mapping with a gateway's prefix rules (routing/numbers.py)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from libon_tsilo.dialplan import DialPlan
from libon_tsilo.registrar.auth import AuthPolicy
from libon_tsilo.routing.numbers import e164_of, owner_of
from libon_tsilo.registrar.peers import TRUSTED_SOURCE, Gateway, TrustedPeers
from libon_tsilo.registrar.users import UsersDB
from libon_tsilo.sip.uri import URI
from tests.b2bua.helpers import caller_invite
from tests.fakes.sip import FakeFlow

PSTN = Gateway("pstn", ("192.0.2.0/28",), strip_prefix="99", add_prefix="")
PLAN = DialPlan(country_code="33")


def test_a_gateway_is_a_trusted_peer_with_a_name() -> None:
    peers = TrustedPeers(["192.0.2.0/24", "10.0.0.0/8"], [PSTN])
    assert peers.peer_of("192.0.2.3").gateway is PSTN  # in both lists: the gateway, the more specific
    assert peers.peer_of("192.0.2.200") is TRUSTED_SOURCE
    assert peers.peer_of("::ffff:192.0.2.3").gateway is PSTN  # dual stack
    assert peers.peer_of("198.51.100.1") is None and peers.peer_of(None) is None
    assert sorted(peers.networks()) == ["10.0.0.0/8", "192.0.2.0/24", "192.0.2.0/28"]


def _policy(enabled: bool = True) -> AuthPolicy:
    users = UsersDB(":memory:")
    users.add("alice", "wonderland", "example.com")
    return AuthPolicy(Clock(), users, "example.com", "s", local_domains=["example.com"], enabled=enabled,
                      peers=TrustedPeers(["10.0.0.0/8"], [PSTN]))


@pytest.mark.parametrize("enabled", [True, False])
def test_digest_policy_lets_gateways_in_and_says_which(enabled: bool) -> None:
    policy = _policy(enabled)
    invite = caller_invite()  # From: alice@example.com, a local domain: would be challenged
    result = policy.check(invite, FakeFlow("udp", ("192.0.2.5", 5060)), "invite")
    assert result.ok and result.trusted and result.peer is not None and result.peer.gateway is PSTN
    other = policy.check(invite, FakeFlow("udp", ("10.1.2.3", 5060)), "invite")
    assert other.ok and other.trusted and other.peer is TRUSTED_SOURCE
    outsider = policy.check(invite, FakeFlow("udp", ("198.51.100.9", 5060)), "invite")
    assert not outsider.trusted and outsider.peer is None
    if enabled:
        assert outsider.response is not None and outsider.response.status == 407


@pytest.mark.parametrize("ruri, gateway, expected", [
    ("tel:+33123456789", None, "+33123456789"),
    ("tel:+33-1-23-45-67-89", None, "+33123456789"),
    ("sip:+33123456789@example.com;user=phone", None, "+33123456789"),
    ("sip:0033123456789@example.com", None, "+33123456789"),
    ("sip:0123456789@example.com", None, "+33123456789"),  # national, country 33
    ("sip:990123456789@192.0.2.1", PSTN, "+33123456789"),  # the gateway's routing prefix goes first
    ("sip:alice@example.com", None, None),
    ("sip:1000@example.com", None, None),  # an extension, not a number we can place
])
def test_dialled_number(ruri: str, gateway: Gateway | None, expected: str | None) -> None:
    assert e164_of(URI.parse(ruri), PLAN, gateway.rewrite if gateway else None) == expected


def test_gateway_rewrite_adds_a_prefix() -> None:
    gw = Gateway("intl", ("192.0.2.0/28",), add_prefix="+")
    assert e164_of(URI.parse("sip:33123456789@192.0.2.1"), DialPlan(), gw.rewrite) == "+33123456789"
    assert gw.rewrite("123") == "+123" and PSTN.rewrite("99123") == "123" and PSTN.rewrite("123") == "123"


def test_owner_of_a_number() -> None:
    users = UsersDB(":memory:")
    users.add("bob", "pw", "example.com")
    users.set_number("bob", "+33123456789")
    found: Any = owner_of(e164_of(URI.parse("sip:0123456789@example.com;user=phone"), PLAN), users)
    assert found is not None and found.username == "bob"
    assert owner_of(e164_of(URI.parse("tel:+33999999999"), PLAN), users) is None
    assert owner_of(e164_of(URI.parse("sip:bob@example.com"), PLAN), users) is None
