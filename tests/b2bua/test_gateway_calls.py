"""Issue 13, calls in from gateways (b2bua/manager.py `_callee`): a dialled number reaches the user who
owns it when the caller is a gateway (never a trunk) or an authenticated user, and parks/pushes/forks
like any call; anyone else gets 403 and its identity headers never reach a device. The call layer has
its calls out (b2bua/outbound.py) as ops wires it, with a route for +44 to a trunk."""

from __future__ import annotations

from typing import Any

from libon_tsilo.b2bua.identity import CallerTrust
from libon_tsilo.b2bua.manager import CallManager, authorizer_from_peers, authorizer_from_policy
from libon_tsilo.dialplan import DialPlan
from libon_tsilo.registrar.auth import AuthPolicy
from libon_tsilo.b2bua.outbound import CallsOut
from libon_tsilo.registrar.peers import Gateway, TrustedPeers
from libon_tsilo.registrar.users import UsersDB
from libon_tsilo.routing.destinations import Destinations
from libon_tsilo.routing.numbers import e164_of, owner_of
from libon_tsilo.routing.policy import CallOutPolicy
from libon_tsilo.routing.routes import Route, RouteTable
from libon_tsilo.routing.trunks import Trunk, parse_target
from tests.b2bua.helpers import Env, binding, caller_invite, flow
from tests.fakes.sip import FakeStx

PSTN = Gateway("pstn", ("192.0.2.0/28",))
GATEWAY = CallerTrust(trusted=True, gateway=PSTN)
PAI = 'P-Asserted-Identity: "Carol" <tel:+442079460000>\n'


def _env(trust: Any = GATEWAY, users: UsersDB | None = None) -> tuple[Env, UsersDB]:
    env = Env(header_allowlist=("Subject", "P-Asserted-Identity"))
    if users is None:
        users = UsersDB(":memory:")
        users.add("bob", "pw", "example.com")
        users.set_number("bob", "+33123456789")
        users.add("1000", "pw", "example.com")  # a user named like a number
    plan = DialPlan(country_code="33")

    def lookup(uri: Any, gateway: Any) -> str | None:  # as ops/service.py builds it
        record = owner_of(e164_of(uri, plan, gateway.rewrite if gateway is not None else None), users)
        return record.username if record is not None else None

    trunk = Trunk("carrier", targets=(parse_target("sip:192.0.2.50:5060"),))
    dests = Destinations(plan, RouteTable([Route("carrier", prefix="+44")], [trunk]), users,
                         is_local=lambda uri: uri.host == "example.com", user_exists=users.exists)
    calls_out = CallsOut(dests, CallOutPolicy(env.clock), users, ring_timeout=60.0, home_domain="example.com")
    env.mgr = CallManager(env.clock, env.port, env.silo, env.location, env.waker, env.mgr.settings,
                          user_exists=users.exists, user_of_number=lookup, calls_out=calls_out,
                          authorize=lambda request, stx, flow: trust)
    return env, users


def test_gateway_call_to_a_number_reaches_its_owner() -> None:
    env, _ = _env()
    env.location.add(binding(1))  # bob's device, AOR sip:bob@example.com
    _, stx = env.invite(ruri="sip:+33123456789@example.com;user=phone", extra=PAI)
    [branch] = env.port.invites()
    assert branch.request.raw_uri == "sip:bob@10.0.0.2:5080;transport=tcp"
    assert str(branch.request.to.uri) == "sip:bob@example.com"
    # the gateway's identity is believed (RFC 3325 trust domain)
    assert branch.request.header("P-Asserted-Identity") == '"Carol" <tel:+442079460000>'
    assert env.call().aor == "sip:bob@example.com"
    assert env.mgr.gateway_calls == {"pstn": 1}


def test_gateway_tel_uri_and_national_spelling() -> None:
    env, _ = _env()
    env.location.add(binding(1))
    env.invite(ruri="tel:+33-1-23-45-67-89")
    env.invite(call_id="call-2", ruri="sip:0123456789@example.com")
    assert [str(c.request.to.uri) for c in env.port.invites()] == ["sip:bob@example.com"] * 2


def test_gateway_call_to_a_sleeping_user_parks_and_late_forks() -> None:
    env, _ = _env()
    env.location.add(binding(1, live=False, push="apns"))
    _, stx = env.invite(ruri="sip:+33123456789@example.com;user=phone")
    assert env.port.invites() == []  # parked, a push asked for
    [(call, bindings, _)] = env.waker.calls
    assert call.aor == "sip:bob@example.com" and len(bindings) == 1
    env.register(binding(1, push="apns"))  # the woken device registers
    [branch] = env.port.invites()
    assert str(branch.request.to.uri) == "sip:bob@example.com"


def test_unknown_number_gets_404() -> None:
    env, _ = _env()
    _, stx = env.invite(ruri="sip:+33999999999@example.com;user=phone")
    assert stx.statuses == [404] and env.mgr.limit_hits()["unknown_number"] == 1
    env.assert_clean()


def test_a_gateway_never_reaches_a_trunk() -> None:
    env, _ = _env()
    _, stx = env.invite(ruri="tel:+442079460000")  # routed to the trunk for our users, not for a gateway
    assert stx.statuses == [404] and env.port.sent == []
    assert env.mgr.limit_hits()["unknown_number"] == 1


def test_gateway_prefix_rules_apply_before_the_dial_plan() -> None:
    env, _ = _env()
    env.mgr.authorize = lambda request, stx, flow: CallerTrust(trusted=True, gateway=Gateway(
        "pstn", ("192.0.2.0/28",), strip_prefix="99"))
    env.location.add(binding(1))
    env.invite(ruri="sip:990123456789@example.com")
    [branch] = env.port.invites()
    assert str(branch.request.to.uri) == "sip:bob@example.com"


def test_untrusted_caller_may_not_dial_a_number() -> None:
    env, _ = _env(trust=CallerTrust())  # from the internet (a foreign From, no digest)
    env.location.add(binding(1))
    _, stx = env.invite(ruri="sip:+33123456789@example.com;user=phone", extra=PAI)
    assert stx.statuses == [403] and env.port.invites() == []
    # one refusal for calls in and out (b2bua/outbound.py: CallsOut.may_dial_number)
    assert env.mgr.calls_out.policy.limit_hits()["call_out_unauthenticated"] == 1
    env.assert_clean()


def test_untrusted_caller_reaching_a_user_by_name_loses_its_pai() -> None:
    env, _ = _env(trust=CallerTrust())
    env.location.add(binding(1))
    env.invite(extra=PAI)
    [branch] = env.port.invites()
    assert branch.request.header("P-Asserted-Identity") is None


def test_authenticated_user_may_dial_a_colleagues_number() -> None:
    env, _ = _env(trust=CallerTrust(identity="sip:alice@example.com", user="alice"))
    env.location.add(binding(1))
    env.invite(ruri="sip:+33123456789@example.com")
    [branch] = env.port.invites()
    assert str(branch.request.to.uri) == "sip:bob@example.com"
    assert env.mgr.gateway_calls == {}


def test_a_user_named_like_a_number_is_called_by_name() -> None:
    env, _ = _env(trust=CallerTrust())
    env.location.add(binding(1, aor="sip:1000@example.com"))
    _, stx = env.invite(ruri="sip:1000@example.com")
    assert len(env.port.invites()) == 1 and stx.statuses == []


def test_without_a_number_lookup_tel_is_still_416() -> None:
    env = Env()
    _, stx = env.invite(ruri="tel:+33123456789")
    assert stx.statuses == [416]


def test_authorizer_from_a_policy_names_the_gateway() -> None:
    from twisted.internet.task import Clock

    users = UsersDB(":memory:")
    policy = AuthPolicy(Clock(), users, "example.com", "s", local_domains=["example.com"],
                        peers=TrustedPeers(["10.9.0.0/16"], [PSTN]))
    authorize = authorizer_from_policy(policy)
    invite = caller_invite()
    trust = authorize(invite, FakeStx(invite), flow(remote=("192.0.2.1", 5060)))
    assert trust == CallerTrust(trusted=True, gateway=PSTN)
    trust = authorize(invite, FakeStx(invite), flow(remote=("10.9.1.1", 5060)))
    assert trust == CallerTrust(trusted=True)


def test_authorizer_without_digest_still_knows_peers() -> None:
    authorize = authorizer_from_peers(TrustedPeers(["10.9.0.0/16"], [PSTN]))
    invite = caller_invite()
    assert authorize(invite, FakeStx(invite), flow(remote=("192.0.2.1", 5060))) == \
        CallerTrust(trusted=True, gateway=PSTN)
    assert authorize(invite, FakeStx(invite), flow(remote=("10.9.1.1", 5060))) == CallerTrust(trusted=True)
    assert authorize(invite, FakeStx(invite), flow(remote=("198.51.100.1", 5060))) is True



def test_a_number_owner_is_called_at_the_domain_the_uri_named() -> None:
    """With [registrar] use_domain the AOR is per domain: the owner is called where the URI said (one
    of ours), not at our first domain; a tel: URI has no domain, so it is the first one."""
    env, _ = _env()
    env.location.add(binding(1, aor="sip:bob@127.0.0.1"))
    env.invite(ruri="sip:+33123456789@127.0.0.1;user=phone")
    [branch] = env.port.invites()
    assert str(branch.request.to.uri) == "sip:bob@127.0.0.1"
    assert env.call().aor == "sip:bob@127.0.0.1"
