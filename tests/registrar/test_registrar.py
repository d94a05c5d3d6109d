"""REGISTER processing: RFC 3261 §10.3, RFC 3327 Path, RFC 5626 instances, RFC 4475 messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from libon_tsilo.registrar.location import LocationStore
from libon_tsilo.registrar.registrar import Registrar, aor_key
from libon_tsilo.sip.message import parse_message
from libon_tsilo.sip.uri import URI
from tests.fakes.sip import FakeFlow, FakeStx
from tests.registrar.helpers import BrokenObserver, RecordingObserver, make_binding, register_text

RFC4475 = Path(__file__).resolve().parents[1] / "data" / "rfc4475"
AOR = "sip:alice@example.com"


class Env:
    def __init__(self, **kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = LocationStore(self.clock)
        self.obs = RecordingObserver()
        self.store.subscribe(self.obs)
        args: dict[str, Any] = dict(domains=["example.com"], min_expires=60, max_expires=3600, default_expires=600)
        args.update(kw)
        self.registrar = Registrar(self.clock, self.store, **args)
        self.flow = FakeFlow()

    def send(self, data: bytes, flow: Any = None) -> Any:
        stx = FakeStx()
        self.registrar.handle_register(parse_message(data), stx, flow or self.flow)
        assert len(stx.responses) == 1
        # what goes on the wire must parse back
        return parse_message(stx.last.to_bytes())

    def register(self, contacts: list[str] | None = None, flow: Any = None, **kw: Any) -> Any:
        return self.send(register_text(contacts, **kw), flow)


@pytest.fixture
def env() -> Env:
    return Env()


def _contacts(resp: Any) -> dict[str, int]:
    return {str(c.uri): int(c.params["expires"]) for c in resp.contacts}


def test_aor_key() -> None:
    uri = URI.parse("SIPS:Alice@Example.COM:5061;transport=tls")
    assert aor_key(uri, True) == "sip:alice@example.com"
    assert aor_key(uri, False) == "alice"
    assert aor_key(URI.parse("sip:%61lice@example.com"), True) == "sip:alice@example.com"


def test_register_and_binding_fields(env: Env) -> None:
    resp = env.register(["<sip:alice@192.0.2.10:40000>"], extra=["User-Agent: TestPhone/1.0"])
    assert resp.status == 200
    assert _contacts(resp) == {"sip:alice@192.0.2.10:40000": 600}  # default expires
    assert resp.header("Date", ).endswith("GMT")
    assert resp.to.tag
    [b] = env.store.lookup(AOR)
    assert b.flow_id == env.flow.id and b.flow_live
    assert b.received == ("udp", "198.51.100.7", 40000)  # from Via received/rport
    assert b.user_agent == "TestPhone/1.0"
    assert b.registered_at == env.clock.seconds()
    assert b.call_id == "reg-1@192.0.2.10" and b.cseq == 1
    assert env.obs.kinds() == ["added"] and env.obs.events[0][2] is env.flow


def test_received_falls_back_to_flow(env: Env) -> None:
    flow = FakeFlow("tcp", ("203.0.113.5", 5555), id="tcp#3")
    env.register(["<sip:alice@10.0.0.1;transport=tcp>"], flow=flow, via="SIP/2.0/TCP 10.0.0.1;branch=z9hG4bK-2")
    [b] = env.store.lookup(AOR)
    assert b.received == ("tcp", "203.0.113.5", 5555)
    assert b.flow_id == "tcp#3"


def test_expires_param_header_min_max(env: Env) -> None:
    resp = env.register(["<sip:a@h1>;expires=120", "<sip:a@h2>"], expires=7200)
    assert _contacts(resp) == {"sip:a@h1": 120, "sip:a@h2": 3600}  # header value capped at max
    resp = env.register(["<sip:a@h3>;expires=30"], cseq=2)
    assert resp.status == 423 and resp.header("Min-Expires") == "60"
    assert len(env.store.lookup(AOR)) == 2  # a failed REGISTER changes nothing
    resp = env.register(["<sip:a@h3>"], expires=59, cseq=3)
    assert resp.status == 423


def test_refresh_remove_and_query(env: Env) -> None:
    env.register(["<sip:a@h1>"], expires=300)
    env.clock.advance(100)
    resp = env.register(None, cseq=2)  # a query
    assert resp.status == 200 and _contacts(resp) == {"sip:a@h1": 200}
    resp = env.register(["<sip:a@h1>"], expires=300, cseq=3)
    assert _contacts(resp) == {"sip:a@h1": 300}
    resp = env.register(["<sip:a@h1>;expires=0"], cseq=4)
    assert resp.status == 200 and resp.contacts == []
    assert env.obs.kinds() == ["added", "refreshed", "removed"]
    assert env.obs.events[-1][2] == "unregistered"


def test_uri_equality_for_refresh(env: Env) -> None:
    env.register(["<sip:a@H1.example.net;transport=tcp;foo=1>"])
    env.register(["<sip:a@h1.example.net;transport=TCP>"], cseq=2)  # same per RFC 3261 §19.1.4
    assert len(env.store.lookup(AOR)) == 1
    env.register(["<sip:a@h1.example.net>"], cseq=3)  # transport only in one: different
    assert len(env.store.lookup(AOR)) == 2


def test_out_of_order(env: Env) -> None:
    env.register(["<sip:a@h1>"], cseq=5)
    assert env.register(["<sip:a@h1>"], cseq=5).status == 500
    resp = env.register(["<sip:a@h1>"], cseq=4)
    assert resp.status == 500 and resp.reason == "Out of order"
    # another Call-ID may use any CSeq
    assert env.register(["<sip:a@h1>"], cseq=1, call_id="other").status == 200


def test_star(env: Env) -> None:
    env.register(["<sip:a@h1>", "<sip:a@h2>"], cseq=1)
    assert env.register(["*"], cseq=2).status == 400  # no Expires
    assert env.register(["*"], cseq=2, expires=60).status == 400
    assert env.register(["*"], cseq=1, expires=0).status == 500  # not higher than the bindings'
    resp = env.register(["*"], cseq=2, expires=0)
    assert resp.status == 200 and resp.contacts == []
    assert env.store.lookup(AOR) == []
    assert env.obs.kinds() == ["added", "added", "removed", "removed"]


def test_unknown_domain_and_bad_aor(env: Env) -> None:
    assert env.register(["<sip:a@h1>"], to="sip:alice@elsewhere.org").status == 404
    assert env.register(["<sip:a@h1>"], to="tel:+15551234").status == 404
    assert env.register(["<sip:a@h1>"], to="sip:example.com").status == 404


def test_use_domain_false() -> None:
    env = Env(use_domain=False, domains=["example.com", "example.org"])
    env.register(["<sip:a@h1>"])
    env.register(["<sip:a@h2>"], to="sip:Alice@example.org", call_id="x")
    assert len(env.store.lookup("alice")) == 2


def test_q_values_kept_and_ordered(env: Env) -> None:
    resp = env.register(["<sip:a@h1>;q=0.3", "<sip:a@h2>;q=0.9", "<sip:a@h3>"])
    assert [str(c.uri) for c in resp.contacts] == ["sip:a@h3", "sip:a@h2", "sip:a@h1"]
    assert [c.params.get("q") for c in resp.contacts] == [None, "0.9", "0.3"]
    assert [b.q for b in env.store.lookup(AOR)] == [1.0, 0.9, 0.3]


@pytest.mark.parametrize("contact", ["<sip:a@h1>;q=2", "<sip:a@h1>;q=x", "<sip:a@h1>;expires=soon",
                                     "<sip:a@h1>;+sip.instance=\"<urn:uuid:1>\";reg-id=x", "<mailto:a@h1>"])
def test_bad_contacts_get_400(env: Env, contact: str) -> None:
    assert env.register([contact]).status == 400
    assert env.store.lookup(AOR) == []


def test_bad_header_gets_400_not_crash(env: Env) -> None:
    resp = env.register(["<sip:a@h1>"], extra=["Expires: soon"])
    assert resp.status == 400


def test_require_unknown_extension(env: Env) -> None:
    resp = env.register(["<sip:a@h1>"], extra=["Require: foo, path"])
    assert resp.status == 420 and resp.header("Unsupported") == "foo"


def test_max_contacts_reject() -> None:
    env = Env(max_contacts=2)
    env.register(["<sip:a@h1>", "<sip:a@h2>"])
    resp = env.register(["<sip:a@h3>"], cseq=2)
    assert resp.status == 403 and "Too Many Contacts" in resp.reason
    assert len(env.store.lookup(AOR)) == 2
    # refreshing an existing one is fine
    assert env.register(["<sip:a@h1>"], cseq=3).status == 200


def test_max_contacts_replace_oldest() -> None:
    env = Env(max_contacts=2, on_max_contacts="replace_oldest")
    env.register(["<sip:a@h1>"], cseq=1)
    env.clock.advance(1)
    env.register(["<sip:a@h2>"], cseq=2)
    env.clock.advance(1)
    resp = env.register(["<sip:a@h3>"], cseq=3)
    assert resp.status == 200
    assert set(_contacts(resp)) == {"sip:a@h2", "sip:a@h3"}
    removed = [(b.contact_uri, reason) for kind, b, reason in env.obs.events if kind == "removed"]
    assert removed == [("sip:a@h1", "replaced")]
    # a single REGISTER that alone exceeds the limit cannot be satisfied
    assert env.register(["<sip:a@h4>", "<sip:a@h5>", "<sip:a@h6>"], cseq=4).status == 403


def test_path_stored_and_echoed_when_supported(env: Env) -> None:
    extra = ["Path: <sip:edge1.example.net;lr>", "Path: <sip:edge2.example.net;lr>"]
    resp = env.register(["<sip:a@h1>"], extra=extra)
    assert resp.header_values("Path") == []
    [b] = env.store.lookup(AOR)
    assert b.path == ["<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr>"]
    resp = env.register(["<sip:a@h1>"], extra=extra + ["Supported: path"], cseq=2)
    assert resp.header_values("Path") == ["<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr>"]


INST = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"'


def test_rfc5626_instance_replaces(env: Env) -> None:
    env.register([f"<sip:a@10.0.0.1;transport=tcp>;{INST};reg-id=1"], extra=["Supported: outbound, path"])
    flow2 = FakeFlow("tcp", ("203.0.113.9", 6000), id="tcp#2")
    resp = env.register([f"<sip:a@10.0.0.2;transport=tcp>;{INST};reg-id=1"], flow=flow2, cseq=2,
                        call_id="new-call-id", extra=["Supported: outbound"])
    assert resp.status == 200 and resp.header("Require") == "outbound"
    [b] = env.store.lookup(AOR)
    assert b.contact_uri == "sip:a@10.0.0.2;transport=tcp" and b.flow_id == "tcp#2"
    assert b.instance == "<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>" and b.reg_id == 1
    assert env.obs.kinds() == ["added", "refreshed"] and env.obs.events[1][2] is flow2
    assert env.store.by_flow(env.flow.id) == []  # the old flow no longer indexes it
    # a second flow of the same instance (reg-id 2) is a separate binding
    env.register([f"<sip:a@10.0.0.2;transport=tcp>;{INST};reg-id=2"], cseq=3, call_id="new-call-id")
    assert len(env.store.lookup(AOR)) == 2
    # removing by instance
    env.register([f"<sip:a@whatever>;{INST};reg-id=2;expires=0"], cseq=4, call_id="new-call-id")
    assert [b.reg_id for b in env.store.lookup(AOR)] == [1]


def test_flow_closed_marks_bindings(env: Env) -> None:
    env.register(["<sip:a@h1>"])
    env.registrar.flow_closed(env.flow)
    [b] = env.store.lookup(AOR)
    assert b.flow_live is False
    assert env.store.by_flow(env.flow.id) == []


def test_remove_api(env: Env) -> None:
    env.register(["<sip:a@h1>"])
    [b] = env.registrar.lookup(AOR)
    assert env.registrar.remove(b, "dead_token")
    assert env.obs.events[-1][0] == "removed" and env.obs.events[-1][2] == "dead_token"
    assert not env.registrar.remove(b, "dead_token")


def test_broken_observer_never_breaks_register(env: Env) -> None:
    env.store.subscribe(BrokenObserver())
    assert env.register(["<sip:a@h1>"]).status == 200
    assert len(env.store.lookup(AOR)) == 1


def test_expiry_purge_after_register(env: Env) -> None:
    env.register(["<sip:a@h1>"], expires=60)
    env.clock.advance(60)
    assert env.store.lookup(AOR) == []
    assert env.obs.events[-1][2] == "expired"


# -- RFC 4475 REGISTER torture messages ------------------------------------------------------------

def _torture(name: str) -> bytes:
    return (RFC4475 / f"{name}.dat").read_bytes()


def test_rfc4475_cparam01(env: Env) -> None:
    # addr-spec form: ;unknownparam is a Contact header parameter, not part of the URI
    resp = env.send(_torture("cparam01"))
    assert resp.status == 200
    [b] = env.store.lookup("sip:watson@example.com")
    assert b.contact_uri == "sip:+19725552222@gw1.example.net"
    [c] = resp.contacts
    assert str(c.uri) == "sip:+19725552222@gw1.example.net" and "unknownparam" in c.params


def test_rfc4475_cparam02(env: Env) -> None:
    # name-addr form: ;unknownparam is inside <>, so part of the URI
    resp = env.send(_torture("cparam02"))
    assert resp.status == 200
    [b] = env.store.lookup("sip:watson@example.com")
    assert b.contact_uri == "sip:+19725552222@gw1.example.net;unknownparam"
    [c] = resp.contacts
    assert "unknownparam" in c.uri.params and "unknownparam" not in c.params


def test_rfc4475_regescrt(env: Env) -> None:
    # the escaped header in the Contact URI must come back escaped, not decoded into a Route
    resp = env.send(_torture("regescrt"))
    assert resp.status == 200
    [c] = resp.contacts
    assert str(c.uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"
    assert resp.header("Route") is None


def test_rfc4475_regaut01_without_auth(env: Env) -> None:
    # no Contact: a query; the unknown Authorization scheme is ignored
    resp = env.send(_torture("regaut01"))
    assert resp.status == 200 and resp.contacts == []


@pytest.mark.parametrize(
    "header",
    [
        "Contact: <sip:a@h",
        'Contact: "unterminated <sip:a@h>',
        "Contact: *, <sip:a@h>",
        "Expires: -1",
        "Expires: 99999999999999999999",
        "Contact: <sip:a@h>;expires=",
        "Contact: <sip:a@[::1>",
    ],
)
def test_malformed_register_gets_400(env: Env, header: str) -> None:
    contacts = None if header.startswith("Contact") else ["<sip:a@h1>"]
    resp = env.register(contacts, extra=[header])
    assert resp.status == 400
    assert resp.reason and "\n" not in resp.reason
    assert env.store.lookup(AOR) == []


def test_internal_error_gets_500_and_store_survives(env: Env) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("bug")

    # a bug in a collaborator called mid-processing (the cluster's Path hook), not a method patched
    # on the registrar: compiled with mypyc, its methods are read-only
    env.registrar.path_stamp = boom
    assert env.register(["<sip:a@h1>"]).status == 500
    assert env.store.lookup(AOR) == [] and env.obs.kinds() == []
    env.registrar.path_stamp = None
    assert env.register(["<sip:a@h1>"], cseq=2).status == 200
    assert env.obs.kinds() == ["added"]  # the events are no longer held back


@pytest.mark.parametrize("host", ["EXAMPLE.com", "example.com.", "Example.Com."])
def test_domain_spellings_are_one_aor(host: str) -> None:
    env = Env()
    assert env.register(["<sip:alice@192.0.2.10:40000>"], to=f"sip:alice@{host}").status == 200
    assert len(env.store.lookup(AOR)) == 1


@pytest.mark.parametrize("host", ["127.1", "2130706433", "[::ffff:127.0.0.1]", "127.0.0.1."])
def test_ip_domain_spellings_are_served_under_one_key(host: str) -> None:
    env = Env(domains=["127.0.0.1"])
    assert env.register(["<sip:alice@192.0.2.10:40000>"], to=f"sip:alice@{host}").status == 200
    assert len(env.store.lookup("sip:alice@127.0.0.1")) == 1
    assert aor_key(URI.parse(f"sip:alice@{host}"), True) == "sip:alice@127.0.0.1"


def test_ipv6_aor_keys_keep_their_brackets() -> None:
    for host in ("[::1]", "[0:0::1]", "[0:0:0:0:0:0:0:1]"):
        assert aor_key(URI.parse(f"sip:alice@{host}"), True) == "sip:alice@[::1]"
    assert aor_key(URI.parse("sip:alice@[2001:DB8::1]"), True) == "sip:alice@[2001:db8::1]"


TCP_FLOW = FakeFlow("tcp", ("203.0.113.9", 6000), id="tcp#9")
OB_CONTACT = f"<sip:a@10.0.0.1;transport=tcp;ob>;{INST};reg-id=1"


def test_require_outbound_gets_require_and_flow_timer_on_tcp(env: Env) -> None:
    # RFC 5626 §6 / §4.4.1: we are the edge proxy (one Via); the device keeps its flow with keep-alives
    resp = env.register([OB_CONTACT], flow=TCP_FLOW, extra=["Require: outbound", "Supported: outbound, path"])
    assert resp.status == 200
    assert resp.header("Require") == "outbound" and resp.header("Flow-Timer") == "120"


def test_flow_timer_is_configurable_and_not_sent_on_udp() -> None:
    env = Env(flow_timer=90)
    resp = env.register([OB_CONTACT], flow=TCP_FLOW, extra=["Supported: outbound"])
    assert resp.header("Flow-Timer") == "90"
    resp = env.register([OB_CONTACT], cseq=2, extra=["Supported: outbound"])  # UDP: STUN keep-alives
    assert resp.header("Require") == "outbound" and resp.header("Flow-Timer") is None


def test_outbound_through_a_proxy_without_ob_is_439(env: Env) -> None:
    two_vias = ["Via: SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bK-edge"]
    resp = env.register([OB_CONTACT], extra=["Supported: outbound", *two_vias])
    assert resp.status == 439 and env.store.lookup(AOR) == []
    resp = env.register([OB_CONTACT], extra=["Supported: outbound", *two_vias,
                                              "Path: <sip:edge.example.net;lr;ob>"])
    assert resp.status == 200 and resp.header("Require") == "outbound"


def test_registrar_events_carry_the_module_namespace() -> None:
    # compiled with mypyc, Logger() finds no frame of its own and names the importer (importlib):
    # the JSON log's "ns" of every registrar event would say importlib._bootstrap
    from twisted.logger import globalLogPublisher

    from libon_tsilo.registrar import location, registrar

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        env = Env()
        env.register(["<sip:a@h1>"], to="sip:alice@elsewhere.org")  # refused: logged at info
        store = location.LocationStore(Clock())
        store.subscribe(BrokenObserver())
        store.add_or_update(make_binding())  # the observer's failure is logged by the store
    finally:
        globalLogPublisher.removeObserver(seen.append)
    namespaces = {e.get("log_namespace") for e in seen}
    assert registrar.__name__ in namespaces and location.__name__ in namespaces, namespaces
    assert not any(str(ns).startswith("importlib") for ns in namespaces)
    from libon_tsilo.sip import router  # compiled with them: the router a REGISTER crosses

    assert router.log.namespace == router.__name__


def test_date_header_follows_the_clock() -> None:
    # formatted once per second (a cache on the registrar): the next second gets its own date
    import email.utils

    env = Env()
    first = env.register(["<sip:a@h1>"]).header("Date")
    assert first == email.utils.formatdate(int(env.clock.seconds()), usegmt=True)
    assert env.register(["<sip:a@h1>"], cseq=2).header("Date") == first
    env.clock.advance(1)
    assert env.register(["<sip:a@h1>"], cseq=3).header("Date") == email.utils.formatdate(
        int(env.clock.seconds()), usegmt=True) != first
