"""ops/service.py wires issue 13: [[gateways]] into the digest policy, the limits and the call layer
(numbers -> users), [voicemail] into the call layer with the users database's per-user switch, and
their counters into /metrics."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.metrics import make_registry
from libon_tsilo.ops.service import make_service
from libon_tsilo.registrar.users import UsersDB
from libon_tsilo.sip.uri import URI
from tests.fakes.sip import FakeFlow

GATEWAYS = [{"name": "pstn", "sources": ["192.0.2.0/28"], "strip_prefix": "99"}]


def _parts(tmp_path, **sections):
    cfg = config_from_dict({"location": {"backend": "memory"}, **sections}, base_dir=tmp_path)
    return make_service(cfg, clock=Clock()).parts


def _users(tmp_path) -> UsersDB:
    users = UsersDB(str(tmp_path / "libon-tsilo-users.sqlite"))
    users.add("bob", "pw", "libon-tsilo")
    users.set_number("bob", "+33123456789")
    users.add("carol", "pw", "libon-tsilo")
    users.set_options("carol", voicemail=False)
    return users


def test_gateways_and_voicemail_are_wired(tmp_path):
    users = _users(tmp_path)
    parts = _parts(tmp_path, gateways=GATEWAYS, dialplan={"country_code": "33"},
                   voicemail={"target": "sip:vm@192.0.2.50", "on_busy": [486]})
    auth = parts.extra["auth"]
    peer = auth.peer_of(FakeFlow("udp", ("192.0.2.3", 5060)))
    assert peer is not None and peer.gateway is not None and peer.gateway.name == "pstn"
    assert "192.0.2.3" in parts.extra["limit_exempt"]  # a gateway is a trusted peer: not rate limited
    calls = parts.b2bua
    gateway = peer.gateway
    assert calls.user_of_number(URI.parse("sip:990123456789@192.0.2.1"), gateway) == "bob"
    assert calls.user_of_number(URI.parse("tel:+33999999999"), gateway) is None
    assert calls.home_domain == "localhost"
    vm = calls.voicemail
    assert vm.target == "sip:vm@192.0.2.50" and vm.on_busy == frozenset({486})
    assert vm.user_wants("bob") and not vm.user_wants("carol") and vm.user_wants("not-in-the-db")
    users.close()


def test_gateways_are_trusted_with_digest_off(tmp_path):
    _users(tmp_path).close()
    parts = _parts(tmp_path, gateways=GATEWAYS, auth={"enabled": False})
    from libon_tsilo.b2bua.identity import CallerTrust
    from tests.b2bua.helpers import caller_invite
    from tests.fakes.sip import FakeStx

    invite = caller_invite()
    trust = parts.b2bua.authorize(invite, FakeStx(invite), FakeFlow("udp", ("192.0.2.3", 5060)))
    assert isinstance(trust, CallerTrust) and trust.gateway is not None
    assert parts.b2bua.user_of_number is not None  # the users database still maps numbers


def test_nothing_configured_changes_nothing(tmp_path):
    parts = _parts(tmp_path, auth={"enabled": False})
    assert parts.b2bua.voicemail is None and parts.b2bua.user_of_number is None


def test_metrics_show_gateway_and_voicemail_counters(tmp_path):
    parts = _parts(tmp_path, gateways=GATEWAYS, voicemail={"target": "sip:vm@192.0.2.50"})
    parts.b2bua.voicemail_counts["user-busy"] += 2
    parts.b2bua.gateway_calls["pstn"] = 3
    from prometheus_client import generate_latest

    text = generate_latest(make_registry(parts)).decode()
    assert 'libon_tsilo_gateway_calls_total{gateway="pstn"} 3.0' in text
    assert 'libon_tsilo_voicemail_calls_total{reason="user-busy"} 2.0' in text
    assert 'libon_tsilo_voicemail_calls_total{reason="no-answer"} 0.0' in text
    assert "libon_tsilo_voicemail_failed_total 0.0" in text
