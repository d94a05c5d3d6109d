"""What a request URI is for (routing/destinations.py), routes (routing/routes.py), trunk targets."""

from __future__ import annotations

import pytest

from libon_tsilo.dialplan import DialPlan
from libon_tsilo.registrar.users import UserRecord
from libon_tsilo.routing.destinations import LOCAL_USER, NO_ROUTE, OUT, Destinations
from libon_tsilo.routing.numbers import e164_of
from libon_tsilo.routing.routes import Route, RouteTable
from libon_tsilo.routing.trunks import Trunk, parse_target
from libon_tsilo.sip.uri import URI

FR = DialPlan(country_code="33")


class Users:
    def __init__(self) -> None:
        self.records = {"alice": UserRecord("alice", "r", number="+33111111111"),
                        "1001": UserRecord("1001", "r")}

    def by_number(self, e164: str) -> UserRecord | None:
        return next((r for r in self.records.values() if r.number == e164), None)

    def exists(self, name: str) -> bool:
        return name in self.records


def trunk(name: str) -> Trunk:
    return Trunk(name, (parse_target("sip:127.0.0.1:5099"),))


def table() -> RouteTable:
    return RouteTable(
        [Route("uk", prefix="+44"), Route("partner", domain="partner.example"), Route("world", prefix="")],
        [trunk("uk"), trunk("world"), trunk("partner")])


def dests(routes: RouteTable | None = None) -> Destinations:
    users = Users()
    return Destinations(FR, routes if routes is not None else table(), users,
                        is_local=lambda uri: uri.host == "example.com", user_exists=users.exists)


@pytest.mark.parametrize("text", [
    "tel:+33-1-23-45-67-89", "tel:01-23-45-67-89;phone-context=+33", "sip:+33123456789@example.com",
    "sip:0033123456789@example.com", "sip:0123456789@example.com;user=phone",
    "sip:+33.1.23.45.67.89@elsewhere.example", "tel:0123456789;phone-context=example.com",
])
def test_numbers_normalised(text: str) -> None:
    assert e164_of(URI.parse(text), FR) == "+33123456789"


def test_phone_context_names_the_country() -> None:
    assert e164_of(URI.parse("tel:020-7946-0000;phone-context=+44"), FR) == "+442079460000"


@pytest.mark.parametrize("text", ["sip:alice@example.com", "sip:1001@example.com", "sip:bob@example.com",
                                  "sip:bob@elsewhere.example"])
def test_not_a_number_takes_the_local_path(text: str) -> None:
    assert dests().classify(URI.parse(text)) is None


def test_a_users_number_is_a_local_call_whatever_the_domain() -> None:
    for text in ("tel:+33111111111", "sip:0111111111@example.com", "sip:+33111111111@elsewhere.example"):
        dest = dests().classify(URI.parse(text))
        assert dest is not None and dest.kind == LOCAL_USER and dest.user == "alice"


def test_first_matching_route_wins() -> None:
    d = dests()
    uk = d.classify(URI.parse("tel:+442079460000"))
    fr = d.classify(URI.parse("sip:0123456789@example.com"))
    assert uk is not None and uk.kind == OUT and uk.trunk is not None and uk.trunk.name == "uk"
    assert fr is not None and fr.trunk is not None and fr.trunk.name == "world" and fr.number == "+33123456789"


def test_domain_route_and_no_route() -> None:
    d = dests()
    partner = d.classify(URI.parse("sip:carol@partner.example"))
    assert partner is not None and partner.kind == OUT and partner.domain == "partner.example"
    assert partner.trunk is not None and partner.trunk.name == "partner"
    only_uk = dests(RouteTable([Route("uk", prefix="+44")], [trunk("uk")]))
    dest = only_uk.classify(URI.parse("tel:+33123456789"))
    assert dest is not None and dest.kind == NO_ROUTE and dest.number == "+33123456789"


@pytest.mark.parametrize("text, expected", [
    ("sip:192.0.2.7", ("udp", "192.0.2.7", 5060, "192.0.2.7:5060")),
    ("sip:trunk.example:5080;transport=tcp", ("tcp", "trunk.example", 5080, "trunk.example:5080")),
    ("sips:[2001:db8::1]", ("tls", "2001:db8::1", 5061, "[2001:db8::1]:5061")),
])
def test_trunk_targets(text: str, expected: tuple[str, str, int, str]) -> None:
    t = parse_target(text)
    assert (t.transport, t.host, t.port, t.uri_host) == expected
    assert t.request_uri("+33123456789") == f"sip:+33123456789@{expected[3]};user=phone"


@pytest.mark.parametrize("text", ["sip:user@host", "sip:host;transport=sctp", "http://x", "sip:"])
def test_bad_trunk_targets(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)


def test_a_user_name_is_decided_without_the_users_database() -> None:
    asked: list[str] = []
    d = Destinations(FR, table(), Users(), is_local=lambda uri: True, user_exists=lambda n: asked.append(n) or True)
    assert d.classify(URI.parse("sip:alice@example.com")) is None
    assert asked == []  # every INVITE to a user would otherwise cost a database query
    assert d.classify(URI.parse("sip:1001@example.com")) is None
    assert asked == ["1001"]


def test_a_registered_number_like_user_of_ours_is_that_user() -> None:
    """Without a users database, a device may register as sip:+33123456789@our domain: calls to that
    URI stay local while it is registered."""
    registered = {"sip:+33123456789@example.com"}
    d = Destinations(FR, table(), None, is_local=lambda uri: uri.host == "example.com",
                     registered=lambda uri: f"sip:{uri.user}@{uri.host}" in registered)
    assert d.classify(URI.parse("sip:+33123456789@example.com")) is None
    dest = d.classify(URI.parse("sip:+33999999999@example.com"))
    assert dest is not None and dest.kind == OUT
    dest = d.classify(URI.parse("tel:+33123456789"))  # tel: names no domain of ours: a number
    assert dest is not None and dest.kind == OUT
