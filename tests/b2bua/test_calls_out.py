"""Calls out through a trunk (b2bua/outbound.py) on the call layer's fakes: routing and dial plan
use, the caller policy, limits, digest answers to the trunk, failover between targets."""

from __future__ import annotations

from typing import Any

import pytest

from libon_tsilo.b2bua.identity import CallerTrust
from libon_tsilo.b2bua.outbound import CallsOut
from libon_tsilo.dialplan import DialPlan
from libon_tsilo.registrar.users import UserRecord
from libon_tsilo.routing.destinations import Destinations
from libon_tsilo.routing.policy import CallOutPolicy
from libon_tsilo.routing.routes import Route, RouteTable
from libon_tsilo.routing.trunks import Trunk, parse_target
from libon_tsilo.sip import digest
from tests.b2bua.helpers import SDP_B, Env, binding, in_dialog, reply
from tests.fakes.sip import FakeStx

NUMBER = "sip:+33-1-23-45-67-89@example.com;user=phone"


class Users:
    def __init__(self) -> None:
        self.records = {
            "alice": UserRecord("alice", "r", number="+33611111111"),
            "bob": UserRecord("bob", "r", number="+33622222222"),
            "uk_only": UserRecord("uk_only", "r", allowed_prefixes=("+44",)),
        }

    def get(self, name: str) -> UserRecord | None:
        return self.records.get(name)

    def by_number(self, e164: str) -> UserRecord | None:
        return next((r for r in self.records.values() if r.number == e164), None)

    def exists(self, name: str) -> bool:
        return name in self.records


def make_trunk(**kw: Any) -> Trunk:
    fields: dict[str, Any] = {
        "targets": (parse_target("sip:192.0.2.50:5060"), parse_target("sip:192.0.2.51:5070;transport=tcp")),
        "username": "acct", "password": "pw", "from_domain": "voip.example", "pai": True,
        "headers": (("X-Account", "42"),),
    }
    fields.update(kw)
    return Trunk("carrier", **fields)


class OutEnv(Env):
    def __init__(self, trunk: Trunk | None = None, trust: Any = None, max_per_user: int = 0) -> None:
        self.trust = trust if trust is not None else CallerTrust(identity="sip:alice@example.com", user="alice")
        super().__init__()
        self.trunk = trunk or make_trunk()
        self.users = Users()
        routes = RouteTable([Route("carrier", prefix="+33")], [self.trunk])
        self.policy = CallOutPolicy(self.clock, max_per_user)
        dests = Destinations(DialPlan("33"), routes, self.users, is_local=lambda uri: uri.host == "example.com",
                             user_exists=self.users.exists)
        self.mgr.calls_out = CallsOut(dests, self.policy, self.users, ring_timeout=60.0, home_domain="example.com")
        self.mgr.authorize = lambda request, stx, flow: self.trust
        self.mgr.user_exists = self.users.exists

    def assert_clean(self) -> None:
        super().assert_clean()
        # a place in the counts that outlives its call locks the user (or the trunk) out for good
        assert self.policy.active_calls() == 0 and self.policy.active() == {}
        assert self.policy._by_user == {}

    def call_out(self, ruri: str = NUMBER, call_id: str = "call-1@10.0.0.1") -> FakeStx:
        _, stx = self.invite(ruri=ruri, call_id=call_id)
        return stx


def test_call_out_reaches_the_trunk_with_the_normalised_number() -> None:
    env = OutEnv()
    stx = env.call_out()
    [ctx] = env.port.invites()
    req = ctx.request
    assert req.raw_uri == "sip:+33123456789@192.0.2.50:5060;user=phone"
    assert (ctx.hop.transport, ctx.hop.host, ctx.hop.port) == ("udp", "192.0.2.50", 5060)
    assert str(req.from_.uri) == "sip:+33611111111@voip.example" and req.from_.tag
    assert str(req.to.uri) == "sip:+33123456789@192.0.2.50:5060;user=phone"
    assert req.header_values("P-Asserted-Identity") == ["<sip:+33611111111@voip.example;user=phone>"]
    assert req.header("X-Account") == "42"
    assert stx.statuses == []
    assert env.policy.active() == {"carrier": 1}
    assert len(env.silo) == 0  # no parking, no push
    assert env.waker.calls == []
    ctx.respond(180)
    ctx.respond(200, body=SDP_B)
    assert stx.statuses == [180, 200]
    env.mgr.handle_ack(in_dialog("ACK", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                                 f"<sip:bob@example.com>;tag={stx.last.to.tag}", 10), env.caller_flow)
    bye = in_dialog("BYE", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                    f"<sip:bob@example.com>;tag={stx.last.to.tag}", 11)
    bye_stx = FakeStx(bye)
    env.mgr.request_received(bye, bye_stx, env.caller_flow)
    assert bye_stx.statuses == [200]
    out_bye = env.port.last("BYE")
    assert out_bye.request.call_id == req.call_id and out_bye.hop.host == "192.0.2.50"
    out_bye.respond(200)
    assert env.policy.active() == {}
    env.assert_clean()


def test_no_pai_unless_the_trunk_asks_and_no_internal_identity() -> None:
    env = OutEnv(make_trunk(pai=False, from_domain=""))
    env.call_out()
    req = env.port.invites()[0].request
    assert req.header("P-Asserted-Identity") is None
    assert str(req.from_.uri) == "sip:+33611111111@192.0.2.50"


def test_a_users_number_is_a_local_call_parked_as_any_other() -> None:
    env = OutEnv()
    env.location.add(binding(1, aor="sip:bob@example.com"))
    env.call_out(ruri="tel:+33622222222")
    [ctx] = env.port.invites()
    assert ctx.request.raw_uri == "sip:bob@10.0.0.2:5080;transport=tcp"
    assert env.policy.active() == {}
    env.trust = CallerTrust(trusted=True)  # a gateway may dial our users' numbers
    env.call_out(ruri="sip:+33622222222@example.com;user=phone", call_id="c2")
    assert len(env.port.invites()) == 2


def test_an_outsider_cannot_dial_a_users_number() -> None:
    """Only our users and trusted peers: the internet calls our users by name and does not learn
    which number is whose."""
    env = OutEnv(trust=True)
    env.location.add(binding(1, aor="sip:bob@example.com"))
    stx = env.call_out(ruri="tel:+33622222222")
    assert stx.statuses == [403] and env.port.sent == []
    assert env.policy.limit_hits()["call_out_unauthenticated"] == 1
    env.assert_clean()


def test_unauthenticated_caller_gets_403_and_the_trunk_nothing(logged) -> None:
    env = OutEnv(trust=True)  # the authorize hook's "go on" for a caller it did not authenticate
    stx = env.call_out()
    assert stx.statuses == [403] and env.port.sent == []
    assert env.policy.limit_hits()["call_out_unauthenticated"] == 1
    assert any(e.get("reason") == "unauthenticated" and e.get("status") == 403 for e in logged)
    env.assert_clean()


def test_trusted_gateway_cannot_reach_a_trunk() -> None:
    env = OutEnv(trust=CallerTrust(trusted=True))
    stx = env.call_out()
    assert stx.statuses == [403] and env.port.sent == []
    assert env.policy.limit_hits()["call_out_from_gateway"] == 1


def test_user_limited_by_prefix_and_no_route() -> None:
    env = OutEnv(trust=CallerTrust(identity="sip:uk_only@example.com", user="uk_only"))
    assert env.call_out().statuses == [403]
    env.trust = CallerTrust(identity="sip:alice@example.com", user="alice")
    assert env.call_out(ruri="tel:+4420794600", call_id="c2").statuses == [404]  # no route to +44
    assert env.port.sent == []
    hits = env.policy.limit_hits()
    assert hits["call_out_prefix_not_allowed"] == 1 and hits["call_out_no_route"] == 1


def test_per_user_and_per_trunk_limits() -> None:
    env = OutEnv(make_trunk(max_calls=2), max_per_user=1)
    env.call_out(call_id="c1")
    assert env.call_out(call_id="c2").statuses == [403]  # alice's one call is up
    env.trust = CallerTrust(identity="sip:bob@example.com", user="bob")
    env.call_out(call_id="c3")
    env.trust = CallerTrust(identity="sip:uk_only@example.com", user="uk_only")
    env.users.records["uk_only"] = UserRecord("uk_only", "r")
    busy = env.call_out(call_id="c4")
    assert busy.statuses == [503] and busy.last.header("Retry-After")
    assert len(env.port.invites()) == 2
    env.mgr.calls["c1"].caller_cancel(None)  # a call ends: its place is free again
    env.port.invites()[0].respond(487)
    env.trust = CallerTrust(identity="sip:alice@example.com", user="alice")
    env.call_out(call_id="c5")
    assert len(env.port.invites()) == 3


def test_digest_challenge_answered_once_with_the_same_dialog() -> None:
    env = OutEnv()
    stx = env.call_out()
    ctx = env.port.invites()[0]
    challenge = ctx.request
    nonce = "abc123"
    r = reply(challenge, 407, to_tag="t1")
    r.add_header("Proxy-Authenticate", digest.challenge_header("carrier.example", nonce))
    ctx.on_response(r)
    second = env.port.invites()[1].request
    assert second.call_id == challenge.call_id and second.from_.tag == challenge.from_.tag
    assert second.cseq.seq == challenge.cseq.seq + 1
    creds = digest.parse_authorization(second.header("Proxy-Authorization"))
    assert creds["username"] == "acct" and creds["uri"] == second.raw_uri
    assert creds["response"] == digest.expected_response(
        digest.ha1("acct", "carrier.example", "pw"), "INVITE", second.raw_uri, nonce, creds["nc"],
        creds["cnonce"], "auth")
    # a second challenge (wrong password): no third INVITE, the caller gets the failure
    again = reply(second, 407, to_tag="t2")
    again.add_header("Proxy-Authenticate", digest.challenge_header("carrier.example", "n2"))
    env.port.invites()[1].on_response(again)
    assert len(env.port.invites()) == 2
    assert stx.statuses == [480]  # a challenge meant for us never reaches the caller
    env.assert_clean()


def test_challenge_from_another_realm_is_not_answered() -> None:
    env = OutEnv(make_trunk(realm="carrier.example"))
    stx = env.call_out()
    ctx = env.port.invites()[0]
    r = reply(ctx.request, 401, to_tag="t1")
    r.add_header("WWW-Authenticate", digest.challenge_header("evil.example", "n"))
    ctx.on_response(r)
    assert len(env.port.invites()) == 1 and stx.statuses == [480]
    env.assert_clean()


def test_failover_on_503_then_answer_from_the_second_target() -> None:
    env = OutEnv()
    stx = env.call_out()
    env.port.invites()[0].respond(503)
    second = env.port.invites()[1]
    assert (second.hop.transport, second.hop.host, second.hop.port) == ("tcp", "192.0.2.51", 5070)
    assert second.request.raw_uri == "sip:+33123456789@192.0.2.51:5070;user=phone"
    assert stx.statuses == []
    second.respond(200, body=SDP_B)
    assert stx.statuses == [200]


def test_failover_on_timeout_and_transport_error() -> None:
    env = OutEnv()
    stx = env.call_out()
    env.port.invites()[0].fail_locally(408)
    env.port.invites()[1].fail_locally(503)
    assert len(env.port.invites()) == 2  # no third target
    assert stx.statuses == [480]
    env.assert_clean()


def test_no_failover_once_the_caller_heard_ringing() -> None:
    env = OutEnv()
    stx = env.call_out()
    first = env.port.invites()[0]
    first.respond(180)
    first.respond(503)
    assert len(env.port.invites()) == 1
    assert stx.statuses[0] == 180 and stx.statuses[-1] >= 500
    env.assert_clean()


def test_ring_timeout_of_calls_out() -> None:
    env = OutEnv()
    stx = env.call_out()
    env.clock.advance(59)
    assert stx.statuses == []
    env.clock.advance(1)
    assert env.port.invites()[0].cancelled
    assert stx.statuses == [480]


def test_domain_route_keeps_the_domain_and_goes_to_the_target() -> None:
    env = OutEnv()
    env.mgr.calls_out.destinations.routes = RouteTable([Route("carrier", domain="partner.example")], [env.trunk])
    stx = env.call_out(ruri="sip:carol@partner.example")
    [ctx] = env.port.invites()
    assert ctx.request.raw_uri == "sip:carol@partner.example"
    assert (ctx.hop.host, ctx.hop.port) == ("192.0.2.50", 5060)
    assert str(ctx.request.to.uri) == "sip:carol@partner.example"
    assert stx.statuses == []
    env.trust = CallerTrust(identity="sip:uk_only@example.com", user="uk_only")  # a user limited to +44 numbers
    assert env.call_out(ruri="sip:carol@partner.example", call_id="c2").statuses == [403]


def test_stats_show_calls_out() -> None:
    env = OutEnv()
    env.call_out()
    env.trust = True
    env.call_out(call_id="c2")
    assert env.mgr.stats()["calls_out"] == {"placed": 1, "active": {"carrier": 1},
                                            "refused": {"unauthenticated": 1}}


def test_a_silent_target_is_given_up_after_failover_timeout() -> None:
    env = OutEnv(make_trunk(failover_timeout=4.0))
    stx = env.call_out()
    first = env.port.invites()[0]
    env.clock.advance(3.9)
    assert len(env.port.invites()) == 1
    env.clock.advance(0.1)
    second = env.port.invites()[1]
    assert second.hop.host == "192.0.2.51" and first.cancelled  # its CANCEL waits for a provisional
    first.respond(200, body=SDP_B, to_tag="late")  # the silent one answers after all: ACK and BYE
    assert env.port.last("BYE").hop.host == "192.0.2.50"
    second.respond(200, body=SDP_B)
    assert stx.statuses == [200]


def test_a_target_that_says_trying_is_not_given_up() -> None:
    env = OutEnv(make_trunk(failover_timeout=4.0))
    stx = env.call_out()
    env.port.invites()[0].respond(100)
    env.clock.advance(10)
    assert len(env.port.invites()) == 1
    env.port.invites()[0].respond(486)
    assert stx.statuses == [486]
    env.assert_clean()


def test_the_last_target_has_no_failover_timer() -> None:
    env = OutEnv(make_trunk(failover_timeout=4.0, targets=(parse_target("sip:192.0.2.50"),)))
    env.call_out()
    assert [c.getTime() for c in env.clock.getDelayedCalls()] == [env.clock.seconds() + 60.0]  # ring timeout only


def test_a_bug_in_the_trunk_logic_ends_the_call_with_500(monkeypatch, logged) -> None:
    env = OutEnv()
    stx = env.call_out()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")

    # raised while failing over to the trunk's next target (the branch it sends there): the call
    # layer is compiled (mypyc), a patched OutboundCall method would not be what it calls
    monkeypatch.setattr(env.port, "send_request", broken)
    env.port.invites()[0].respond(503)
    assert stx.statuses == [500]
    assert any(e.get("log_failure") is not None for e in logged)
    env.assert_clean()


def test_the_retried_invite_is_watched_for_silence_too() -> None:
    env = OutEnv(make_trunk(failover_timeout=4.0))
    env.call_out()
    ctx = env.port.invites()[0]
    r = reply(ctx.request, 401, to_tag="t1")
    r.add_header("WWW-Authenticate", digest.challenge_header("carrier.example", "n1"))
    ctx.on_response(r)
    assert len(env.port.invites()) == 2
    env.clock.advance(4)
    third = env.port.invites()[2]
    assert third.hop.host == "192.0.2.51"


def test_a_trunk_that_asks_for_tel_uris() -> None:
    env = OutEnv(make_trunk(tel_uri=True))
    env.call_out()
    [ctx] = env.port.invites()
    assert ctx.request.raw_uri == "tel:+33123456789" and str(ctx.request.to.uri) == "tel:+33123456789"
    assert (ctx.hop.host, ctx.hop.port) == ("192.0.2.50", 5060)
    r = reply(ctx.request, 407, to_tag="t1")
    r.add_header("Proxy-Authenticate", digest.challenge_header("carrier.example", "n1"))
    ctx.on_response(r)
    creds = digest.parse_authorization(env.port.invites()[1].request.header("Proxy-Authorization"))
    assert creds["uri"] == "tel:+33123456789"


def test_the_trunk_hangs_up_and_the_cdr_names_it(logged) -> None:
    env = OutEnv()
    stx = env.call_out()
    ctx = env.port.invites()[0]
    ctx.respond(200, body=SDP_B, to_tag="trunk-tag")
    env.mgr.handle_ack(in_dialog("ACK", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                                 f"<sip:bob@example.com>;tag={stx.last.to.tag}", 10), env.caller_flow)
    env.clock.advance(61)  # longer than the ring timeout: an answered call has none
    req = ctx.request
    bye = in_dialog("BYE", req.call_id, "<sip:+33123456789@192.0.2.50>;tag=trunk-tag", str(req.from_), 5)
    bye_stx = FakeStx(bye)
    env.mgr.request_received(bye, bye_stx, env.caller_flow)
    assert bye_stx.statuses == [200]
    caller_bye = env.port.last("BYE")
    assert caller_bye.request.call_id == "call-1@10.0.0.1"
    caller_bye.respond(200)
    [cdr] = [e for e in logged if e.get("cdr")]
    assert (cdr["trunk"], cdr["callee"], cdr["reason"], cdr["duration"]) == (
        "carrier", "tel:+33123456789", "BYE from the callee", 61)
    assert cdr["caller"] == "sip:alice@example.com"
    env.assert_clean()


def _answered_call_out(env: OutEnv) -> tuple[FakeStx, Any]:
    stx = env.call_out()
    ctx = env.port.invites()[0]
    ctx.respond(200, body=SDP_B)
    env.mgr.handle_ack(in_dialog("ACK", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                                 f"<sip:bob@example.com>;tag={stx.last.to.tag}", 10), env.caller_flow)
    return stx, ctx


def test_a_trunk_leg_cannot_be_transferred_out_of_the_counts() -> None:
    # alice REFERs the trunk's party to a colleague: the call out would end "transferred" and free
    # its place in the per-user and per-trunk counts while the trunk leg stays up (billed) in a new
    # local call: REFER after REFER, a user could hold any number of trunk calls past max_calls_out
    env = OutEnv(make_trunk(max_calls=1), max_per_user=1)
    env.mgr.is_local = lambda uri: uri.host == "example.com"
    env.location.add(binding(3, aor="sip:bob@example.com"))
    stx, _ = _answered_call_out(env)
    refer = in_dialog("REFER", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                      f"<sip:bob@example.com>;tag={stx.last.to.tag}", 11,
                      extra="Refer-To: <sip:bob@example.com>\n")
    refer_stx = FakeStx(refer)
    env.mgr.request_received(refer, refer_stx, env.caller_flow)
    assert refer_stx.statuses == [403]
    assert env.policy.active() == {"carrier": 1} and env.policy.active_calls() == 1
    assert "call-1@10.0.0.1" in env.mgr.calls


def _end_by_trunk_status(status: int, ringing: bool = False) -> Any:
    def end(env: OutEnv, stx: FakeStx) -> None:
        ctx = env.port.invites()[0]
        if ringing:
            ctx.respond(180)
        ctx.respond(status)
    return end


def _end_failover_then_486(env: OutEnv, stx: FakeStx) -> None:
    env.port.invites()[0].respond(503)
    env.port.invites()[1].respond(486)


def _end_by_cancel(env: OutEnv, stx: FakeStx) -> None:
    env.port.invites()[0].respond(183)
    env.mgr.calls["call-1@10.0.0.1"].caller_cancel(None)
    env.port.invites()[0].respond(487)


def _end_by_ring_timeout(env: OutEnv, stx: FakeStx) -> None:
    env.port.invites()[0].respond(180)
    env.clock.advance(60)
    env.port.invites()[0].respond(487)


def _end_by_transport_errors(env: OutEnv, stx: FakeStx) -> None:
    env.port.invites()[0].fail_locally(503)
    env.port.invites()[1].fail_locally(408)


def _end_by_caller_connection_lost(env: OutEnv, stx: FakeStx) -> None:
    _answer(env, stx)
    env.mgr.flow_closed(env.caller_flow)
    for bye in [c for c in env.port.sent if c.request.method == "BYE"]:
        bye.respond(200)


def _end_by_max_call_duration(env: OutEnv, stx: FakeStx) -> None:
    _answer(env, stx)
    env.clock.advance(env.mgr.settings.max_call_duration + 1)
    for bye in [c for c in env.port.sent if c.request.method == "BYE"]:
        bye.respond(200)


def _answer(env: OutEnv, stx: FakeStx) -> None:
    env.port.invites()[0].respond(200, body=SDP_B)
    env.mgr.handle_ack(in_dialog("ACK", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                                 f"<sip:bob@example.com>;tag={stx.last.to.tag}", 10), env.caller_flow)


END_PATHS = {
    "trunk 404": _end_by_trunk_status(404), "trunk 603 after ringing": _end_by_trunk_status(603, True),
    "trunk 500": _end_by_trunk_status(500), "failover then 486": _end_failover_then_486,
    "CANCEL": _end_by_cancel, "ring timeout": _end_by_ring_timeout, "transport errors": _end_by_transport_errors,
    "caller's connection lost": _end_by_caller_connection_lost, "max_call_duration": _end_by_max_call_duration,
}


@pytest.mark.parametrize("path", sorted(END_PATHS))
def test_every_end_path_gives_the_places_back(path: str) -> None:
    env = OutEnv(make_trunk(max_calls=1), max_per_user=1)
    stx = env.call_out()
    assert env.policy.active() == {"carrier": 1}
    END_PATHS[path](env, stx)
    assert env.mgr.calls == {}
    env.assert_clean()
    env.call_out(call_id="call-2")  # the user and the trunk can call again
    assert env.policy.active() == {"carrier": 1}
