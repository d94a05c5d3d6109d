"""Issue 11 item 4: identity headers reach a device only from a trusted source; for an
authenticated caller the B-leg asserts the identity we verified (b2bua/identity.py)."""

from __future__ import annotations

from typing import Any

import pytest

from libon_tsilo.b2bua.identity import CallerTrust
from libon_tsilo.b2bua.capabilities import DEFAULT_ALLOWLIST
from libon_tsilo.b2bua.manager import authorizer_from_policy
from libon_tsilo.registrar.auth import AuthPolicy
from libon_tsilo.registrar.users import UsersDB
from tests.fakes.sip import FakeStx
from tests.b2bua.helpers import Env, binding, caller_invite, flow
from tests.registrar.helpers import digest_authorization

SPOOFED = (
    'P-Asserted-Identity: "Your Bank" <sip:bank@bank.example>\n'
    "P-Preferred-Identity: <sip:ceo@example.com>\n"
    'Remote-Party-ID: "Your Bank" <sip:bank@bank.example>;party=calling;screen=yes\n'
    "P-Charging-Vector: icid-value=1234\n"
)
TRUST_HEADERS = ("P-Asserted-Identity", "P-Preferred-Identity", "Remote-Party-ID", "P-Charging-Vector",
                 "Identity")
# an operator who allow-lists every identity header: what passes must still depend on trust
ALLOW_ALL = DEFAULT_ALLOWLIST + ("P-Preferred-Identity", "Remote-Party-ID", "P-Charging-Vector")


def _b_leg(trust: Any, allowlist: tuple[str, ...] = ALLOW_ALL) -> Any:
    env = Env(header_allowlist=allowlist)
    env.location.add(binding(1))
    env.mgr.authorize = lambda request, stx, flow: trust
    env.invite(extra=SPOOFED)
    [ctx] = env.port.invites()
    return env, ctx.request


@pytest.mark.parametrize("trust", [True, CallerTrust()], ids=["auth-off", "foreign-domain"])
def test_untrusted_caller_identity_headers_are_removed(trust: Any) -> None:
    env, req = _b_leg(trust)
    for name in TRUST_HEADERS:
        assert req.header(name) is None, name
    assert req.header("Subject") == "lunch?"  # the rest of the allow-list still passes
    # From is the caller's own claim about its own domain: copied as it came
    assert req.from_.display == "Alice Liddell" and str(req.from_.uri) == "sip:alice@example.com"


def test_trusted_source_identity_headers_pass_except_ppi() -> None:
    _, req = _b_leg(CallerTrust(trusted=True))
    assert req.header("P-Asserted-Identity") == '"Your Bank" <sip:bank@bank.example>'
    assert req.header("Remote-Party-ID").startswith('"Your Bank"')
    assert req.header("P-Charging-Vector") == "icid-value=1234"
    # a UA's preference for its proxy, turned into PAI by that proxy, never forwarded (RFC 3325 §9.2)
    assert req.header("P-Preferred-Identity") is None


def test_trusted_source_headers_still_need_the_allowlist() -> None:
    _, req = _b_leg(CallerTrust(trusted=True), allowlist=("Subject",))
    for name in TRUST_HEADERS:
        assert req.header(name) is None, name


def test_authenticated_caller_gets_the_identity_we_verified() -> None:
    env, req = _b_leg(CallerTrust(identity="sip:alice@example.com"))
    assert req.header_values("P-Asserted-Identity") == ["<sip:alice@example.com>"]
    for name in ("P-Preferred-Identity", "Remote-Party-ID", "P-Charging-Vector"):
        assert req.header(name) is None, name
    # the display name is the caller's free text, not what digest proved
    assert req.from_.display is None and str(req.from_.uri) == "sip:alice@example.com"
    call = env.call()
    assert (call.caller_uri, call.caller_name) == ("sip:alice@example.com", None)  # the push shows it too


def test_an_asynchronous_authorize_carries_the_trust_too() -> None:
    from twisted.internet.defer import Deferred

    env = Env(header_allowlist=ALLOW_ALL)
    env.location.add(binding(1))
    pending: Deferred[Any] = Deferred()
    env.mgr.authorize = lambda request, stx, flow: pending
    env.invite(extra=SPOOFED)
    assert env.port.invites() == []
    pending.callback(CallerTrust(identity="sip:alice@example.com"))
    [ctx] = env.port.invites()
    assert ctx.request.header_values("P-Asserted-Identity") == ["<sip:alice@example.com>"]


def _policy(**kw: Any) -> AuthPolicy:
    from twisted.internet.task import Clock

    users = UsersDB(":memory:")
    users.add("alice", "wonderland", "example.com")
    return AuthPolicy(Clock(), users, "example.com", "s", local_domains=["example.com", "127.0.0.1"], **kw)


def test_authorizer_from_a_real_policy_sets_the_trust() -> None:
    env = Env(header_allowlist=ALLOW_ALL)
    env.location.add(binding(1))
    policy = _policy(trusted_sources=["192.0.2.0/24"])
    env.mgr.authorize = authorizer_from_policy(policy)
    # a local user spelled differently is challenged (item 3), then authenticated
    first = caller_invite(call_id="c1", extra=SPOOFED)
    first.set_header("From", '"Your Bank" <sip:alice@127.1>;tag=a-tag')
    stx = FakeStx(first)
    env.mgr.handle_invite(first, stx, env.caller_flow)
    assert stx.statuses == [407]
    challenge = stx.responses[0].header_values("Proxy-Authenticate")[0]
    auth = digest_authorization(challenge, "alice", "wonderland", "INVITE", "sip:bob@example.com")
    second = caller_invite(call_id="c2", extra=SPOOFED + f"Proxy-Authorization: {auth}\n")
    second.set_header("From", '"Your Bank" <sip:alice@127.1>;tag=a-tag')
    env.mgr.handle_invite(second, FakeStx(second), env.caller_flow)
    b_leg = env.port.invites()[-1].request
    # the configured spelling of the domain, not the caller's
    assert b_leg.header_values("P-Asserted-Identity") == ["<sip:alice@127.0.0.1>"]
    assert str(b_leg.from_).startswith("<sip:alice@127.0.0.1>")
    # from the trusted network: the headers pass
    third = caller_invite(call_id="c3", extra=SPOOFED)
    env.mgr.handle_invite(third, FakeStx(third), flow(remote=("192.0.2.7", 5060)))
    assert env.port.invites()[-1].request.header("P-Asserted-Identity") == '"Your Bank" <sip:bank@bank.example>'
    # from another domain, unauthenticated: they do not
    fourth = caller_invite(call_id="c4", extra=SPOOFED)
    fourth.set_header("From", '"Your Bank" <sip:eve@evil.example>;tag=e')
    env.mgr.handle_invite(fourth, FakeStx(fourth), env.caller_flow)
    assert env.port.invites()[-1].request.header("P-Asserted-Identity") is None
