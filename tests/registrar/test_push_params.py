"""RFC 8599 in REGISTER: 555, capability queries, Feature-Caps, §5.3 matching."""

from __future__ import annotations

import pytest

from libon_tsilo.registrar.push_params import feature_caps, parse_push_params, pn_triple_match
from libon_tsilo.sip.headers import NameAddr
from tests.registrar.helpers import make_binding
from tests.registrar.test_registrar import AOR, Env

APNS = "pn-provider=apns;pn-prid=00fc13adff78512;pn-param=ABCD1234.com.example.app.voip"


@pytest.fixture
def env() -> Env:
    return Env(push_providers=["apns", "fcm"], pnsreg_interval=130)


def test_parse_uri_and_header_params() -> None:
    pp = parse_push_params(NameAddr.parse(f"<sip:a@h;{APNS}>;+sip.pnsreg"))
    assert (pp.provider, pp.prid, pp.param, pp.pnsreg) == (
        "apns", "00fc13adff78512", "ABCD1234.com.example.app.voip", True)
    assert pp.complete and not pp.is_query
    query = parse_push_params(NameAddr.parse("<sip:a@h;pn-provider>"))
    assert query.provider == "" and query.is_query
    hdr = parse_push_params(NameAddr.parse('<sip:a@h>;pn-provider=FCM;pn-prid="tok:1%3A"'))
    assert (hdr.provider, hdr.prid) == ("fcm", "tok:1:")
    assert not parse_push_params(NameAddr.parse("<sip:a@h>")).present


def test_feature_caps_text() -> None:
    assert feature_caps("apns") == '*;+sip.pns="apns"'
    assert feature_caps("fcm", 130) == '*;+sip.pns="fcm";+sip.pnsreg="130"'


def test_pn_triple_match_rules() -> None:
    a = make_binding(pn_provider="apns", pn_prid="t", pn_param="p")
    assert pn_triple_match(a, make_binding(uri="sip:x@y", pn_provider="APNS", pn_prid="t", pn_param="p"))
    assert not pn_triple_match(a, make_binding(pn_provider="apns", pn_prid="t", pn_param="other"))
    assert not pn_triple_match(a, make_binding(pn_provider="apns", pn_prid="t"))  # param on one side only
    assert not pn_triple_match(a, make_binding(pn_provider="apns", pn_prid="u", pn_param="p"))
    assert not pn_triple_match(make_binding(), make_binding())


def test_push_registration_stored(env: Env) -> None:
    resp = env.register([f"<sip:a@192.0.2.10:40000;{APNS}>"])
    assert resp.status == 200
    assert resp.header_values("Feature-Caps") == ['*;+sip.pns="apns"']
    [b] = env.store.lookup(AOR)
    assert (b.pn_provider, b.pn_prid, b.pn_param, b.pnsreg) == (
        "apns", "00fc13adff78512", "ABCD1234.com.example.app.voip", False)
    assert b.push_capable
    assert "pn-prid=00fc13adff78512" in b.contact_uri  # the R-URI of a later INVITE carries them


def test_pnsreg_feature_caps(env: Env) -> None:
    resp = env.register([f"<sip:a@h;{APNS}>;+sip.pnsreg"])
    assert resp.header_values("Feature-Caps") == ['*;+sip.pns="apns";+sip.pnsreg="130"']
    assert env.store.lookup(AOR)[0].pnsreg


def test_unsupported_provider_555(env: Env) -> None:
    resp = env.register(["<sip:a@h;pn-provider=webpush;pn-prid=https://push.example/x>"])
    assert resp.status == 555 and resp.reason == "Push Notification Service Not Supported"
    assert env.store.lookup(AOR) == []


def test_no_providers_configured_555() -> None:
    env = Env()
    assert env.register([f"<sip:a@h;{APNS}>"]).status == 555
    assert env.register(["<sip:a@h;pn-provider>"]).status == 555


def test_capability_query_one_and_all(env: Env) -> None:
    resp = env.register(["<sip:a@h;pn-provider=fcm>"])
    assert resp.status == 200
    assert resp.header_values("Feature-Caps") == ['*;+sip.pns="fcm"']
    resp = env.register(["<sip:a@h;pn-provider>"], cseq=2)
    assert resp.header_values("Feature-Caps") == ['*;+sip.pns="apns"', '*;+sip.pns="fcm"']
    # a query registers the contact, but not for push
    assert not env.store.lookup(AOR)[0].push_capable


def test_prid_without_provider_400(env: Env) -> None:
    assert env.register(["<sip:a@h;pn-prid=tok>"]).status == 400


def test_refresh_matches_pn_triple_after_address_change(env: Env) -> None:
    env.register([f"<sip:a@192.0.2.10:40000;{APNS}>"])
    # the device woke up on another network: new host/port, same push triple
    resp = env.register([f"<sip:a@198.51.100.20:5555;{APNS}>"], cseq=2)
    assert resp.status == 200
    [b] = env.store.lookup(AOR)
    assert b.contact_uri.startswith("sip:a@198.51.100.20:5555")
    assert env.obs.kinds() == ["added", "refreshed"]


def test_refresh_matches_instance_when_token_changed(env: Env) -> None:
    inst = '+sip.instance="<urn:uuid:1>"'
    env.register([f"<sip:a@h1;{APNS}>;{inst}"])
    resp = env.register([f"<sip:a@h1;pn-provider=apns;pn-prid=NEWTOKEN;pn-param=X.y.voip>;{inst}"], cseq=2)
    assert resp.status == 200
    [b] = env.store.lookup(AOR)
    assert b.pn_prid == "NEWTOKEN"
    assert env.obs.kinds() == ["added", "refreshed"]


def test_pn_param_mismatch_is_another_binding(env: Env) -> None:
    env.register(["<sip:a@h1;pn-provider=apns;pn-prid=t;pn-param=A.b.voip>"])
    env.register(["<sip:a@h1;pn-provider=apns;pn-prid=t;pn-param=A.c.voip>"], cseq=2)
    assert len(env.store.lookup(AOR)) == 2
    # pn params on one side only: no match even with the same host (§5.3)
    env.register(["<sip:a@h1>"], cseq=3)
    assert len(env.store.lookup(AOR)) == 3


def test_unregister_by_pn_triple(env: Env) -> None:
    env.register([f"<sip:a@192.0.2.10:40000;{APNS}>"])
    resp = env.register([f"<sip:a@10.9.9.9;{APNS}>;expires=0"], cseq=2)
    assert resp.status == 200 and env.store.lookup(AOR) == []
