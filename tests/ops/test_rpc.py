"""The Kamailio-style RPC functions (ops/rpc.py) over a real, unstarted service tree on a Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.rpc import Rpc, RpcError, jsonable
from libon_tsilo.ops.service import make_service
from libon_tsilo.registrar.binding import Binding
from tests.fakes.calls import FakeCall


def build(use_domain: bool = False, tmp_path: Any = None) -> tuple[Any, Clock]:
    clock = Clock()
    clock.advance(1000)
    cfg = config_from_dict(
        {
            "location": {"backend": "memory"},
            "auth": {"enabled": False},
            "registrar": {"use_domain": use_domain},
        },
        base_dir=tmp_path,
    )
    root = make_service(cfg, clock=clock)
    return root, clock


def binding(aor: str, contact: str, clock: Clock, **kw: Any) -> Binding:
    now = clock.seconds()
    return Binding(
        aor=aor,
        contact_uri=contact,
        contact=f"<{contact}>",
        expires_at=now + 3600,
        registered_at=now,
        call_id="reg-1",
        cseq=1,
        **kw,
    )


@pytest.fixture
def tree(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    return root, root.parts, clock


def test_methods_are_listed_with_kamailio_names(tree):
    root, parts, _ = tree
    rpc = Rpc(parts, root)
    assert set(rpc.methods) == {"ts.dump", "ts.lookup", "ts.append_to", "ul.dump", "ul.lookup", "ul.rm",
                                "stats", "health", "msg.dump", "msg.stats"}
    assert rpc.methods["ul.rm"].mutating and rpc.methods["ts.append_to"].mutating
    assert not rpc.methods["ts.dump"].mutating


def test_unknown_method_and_parameter(tree):
    root, parts, _ = tree
    rpc = Rpc(parts, root)
    with pytest.raises(RpcError) as err:
        rpc.call("ts.nope")
    assert err.value.status == 404
    with pytest.raises(RpcError) as err:
        rpc.call("ts.dump", {"evil": "1"})
    assert err.value.status == 400 and "evil" in err.value.message


def test_ts_dump_and_lookup(tree):
    root, parts, _ = tree
    rpc = Rpc(parts, root)
    empty = rpc.call("ts.dump")
    assert empty["stats"]["stored_transactions"] == 0
    parts.silo.store(FakeCall("c1@x", "alice"))
    parts.silo.store(FakeCall("c2@x", "alice"))
    dump = rpc.call("ts.dump")
    assert dump["stats"]["stored_ruris"] == 1
    assert dump["stats"]["stored_transactions"] == 2
    assert [c["call_id"] for c in dump["aors"]["alice"]] == ["c1@x", "c2@x"]
    json.dumps(dump)  # JSON-able
    found = rpc.call("ts.lookup", {"aor": "alice"})
    assert found["aor"] == "alice" and len(found["calls"]) == 2
    # a SIP URI is reduced to the registrar's AOR key (use_domain = false: the user part)
    assert rpc.call("ts.lookup", {"aor": "sip:alice@example.com;transport=tcp"})["aor"] == "alice"


def test_ts_lookup_unknown_is_404_like_kamailio(tree):
    root, parts, _ = tree
    rpc = Rpc(parts, root)
    with pytest.raises(RpcError) as err:
        rpc.call("ts.lookup", {"aor": "bob"})
    assert err.value.status == 404
    assert err.value.message == "RURI not found in tsilo table"


def test_ts_append_to_forks_one_call_to_an_aors_bindings(tree):
    root, parts, clock = tree
    rpc = Rpc(parts, root)
    call, other = FakeCall("c1@x", "alice"), FakeCall("c2@x", "alice")
    parts.silo.store(call)
    parts.silo.store(other)
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))  # the silo forks both
    assert (len(call.branches), len(other.branches)) == (1, 1)
    # Kamailio's ts_append_to(..., uri): another AOR's bindings, for this call only
    parts.location.add_or_update(binding("carol", "sip:carol@10.0.0.3:5060", clock))
    result = rpc.call("ts.append_to", {"call_id": "c1@x", "aor": "sip:carol@example.com"})
    assert result == {"call_id": "c1@x", "aor": "carol", "added": 1}
    assert [b.contact_uri for b in call.branches] == ["sip:alice@10.0.0.1:5060", "sip:carol@10.0.0.3:5060"]
    assert len(other.branches) == 1
    # without aor: the call's own AOR
    assert rpc.call("ts.append_to", {"call_id": "c2@x"})["added"] == 1
    assert parts.silo.stats()["added_branches"] == 4


def test_ts_append_to_errors(tree):
    root, parts, _ = tree
    rpc = Rpc(parts, root)
    for params, status in (({}, 400), ({"call_id": " "}, 400), ({"call_id": "nope"}, 404)):
        with pytest.raises(RpcError) as err:
            rpc.call("ts.append_to", params)
        assert err.value.status == status, params
    answered = FakeCall("c3@x", "alice")
    answered.can_append = lambda: False  # type: ignore[method-assign]
    parts.silo.store(answered)
    with pytest.raises(RpcError) as err:
        rpc.call("ts.append_to", {"call_id": "c3@x"})
    assert err.value.status == 409


def test_missing_or_bad_aor_is_400(tree):
    root, parts, _ = tree
    rpc = Rpc(parts, root)
    for params in ({}, {"aor": ""}, {"aor": "   "}, {"aor": "sip:"}, {"aor": "sip:example.com"}):
        with pytest.raises(RpcError) as err:
            rpc.call("ts.lookup", params)
        assert err.value.status == 400, params


def test_aor_key_with_domain(tmp_path):
    root, clock = build(use_domain=True, tmp_path=tmp_path)
    rpc = Rpc(root.parts, root)
    root.parts.location.add_or_update(binding("sip:alice@example.com", "sip:alice@10.0.0.1:5060", clock))
    found = rpc.call("ul.lookup", {"aor": "sip:alice@example.com;transport=udp"})
    assert found["aor"] == "sip:alice@example.com"


def test_ul_dump_lookup_rm(tree):
    root, parts, clock = tree
    rpc = Rpc(parts, root)
    loc = parts.location
    loc.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))
    loc.add_or_update(binding("alice", "sip:alice@10.0.0.2:5060", clock, instance="<urn:uuid:1>"))
    loc.add_or_update(binding("bob", "sip:bob@10.0.0.3:5060", clock))
    clock.advance(100)
    dump = rpc.call("ul.dump")
    assert dump["aor_count"] == 2 and dump["binding_count"] == 3
    alice = {b["contact_uri"]: b for b in dump["aors"]["alice"]}
    assert alice["sip:alice@10.0.0.1:5060"]["expires"] == 3500
    json.dumps(dump)

    found = rpc.call("ul.lookup", {"aor": "alice"})
    assert len(found["bindings"]) == 2
    with pytest.raises(RpcError) as err:
        rpc.call("ul.lookup", {"aor": "carol"})
    assert err.value.status == 404

    # by contact (angle brackets tolerated), by key, then the whole AOR
    out = rpc.call("ul.rm", {"aor": "alice", "contact": "<sip:alice@10.0.0.1:5060>"})
    assert out["removed"] == ["uri:sip:alice@10.0.0.1:5060"]
    assert [b.contact_uri for b in loc.lookup("alice")] == ["sip:alice@10.0.0.2:5060"]
    with pytest.raises(RpcError) as err:
        rpc.call("ul.rm", {"aor": "alice", "key": "uri:nope"})
    assert err.value.status == 404
    with pytest.raises(RpcError) as err:
        rpc.call("ul.rm", {"aor": "alice", "contact": "sip:x@y", "key": "k"})
    assert err.value.status == 400
    out = rpc.call("ul.rm", {"aor": "alice", "key": "instance:<urn:uuid:1>"})
    assert out["removed"] == ["instance:<urn:uuid:1>"]
    assert loc.lookup("alice") == []
    out = rpc.call("ul.rm", {"aor": "bob"})
    assert out["removed"] == ["uri:sip:bob@10.0.0.3:5060"]
    assert loc.all_count() == 0
    with pytest.raises(RpcError) as err:
        rpc.call("ul.rm", {"aor": "bob"})
    assert err.value.status == 404


def test_ul_rm_tells_the_silo(tree):
    """Removal goes through the registrar/location store, so observers (the silo) hear of it."""
    root, parts, clock = tree
    seen = []

    class Observer:
        def binding_added(self, b, flow=None):
            pass

        def binding_refreshed(self, b, flow=None):
            pass

        def binding_removed(self, b, reason):
            seen.append((b.key, reason))

    parts.location.subscribe(Observer())
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))
    Rpc(parts, root).call("ul.rm", {"aor": "alice"})
    assert seen == [("uri:sip:alice@10.0.0.1:5060", "admin")]


def test_stats_and_health(tree):
    root, parts, clock = tree
    rpc = Rpc(parts, root)
    parts.silo.store(FakeCall("c1@x", "alice"))
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))
    clock.advance(5)
    stats = rpc.call("stats")
    assert stats["uptime"] == 5
    assert stats["tsilo"]["stored_transactions"] == 1
    assert set(stats["tsilo"]) >= {
        "stored_ruris",
        "stored_transactions",
        "total_ruris",
        "total_transactions",
        "added_branches",
        "register_to_invite",
    }
    assert stats["usrloc"] == {"registered_aors": 1, "bindings": 1}
    assert stats["transactions"] == {"live": 0, "server": 0, "client": 0, "strays_dropped": 0}
    assert stats["calls"]["calls"] == 0
    assert "silo" not in stats["calls"]
    assert stats["flows"] == {"live": 0}
    assert stats["sip"]["requests_in"] == {}
    assert "push" not in stats  # no push layer: absent, not an error
    json.dumps(stats)

    health = rpc.call("health")
    assert health["status"] == "ok" and health["calls"] == 0
    parts.b2bua.shutdown_parked(480)
    assert rpc.call("health")["status"] == "draining"


def test_push_stats_shapes(tree):
    root, parts, _ = tree
    rpc = Rpc(parts, root)

    class Stats:
        def as_dict(self):
            return {"delivered": 3}

    class Sender:
        stats = Stats()

    parts.extra["push"] = {"apns": Sender(), "fcm": {"delivered": 1}}
    assert rpc.call("stats")["push"] == {"apns": {"delivered": 3}, "fcm": {"delivered": 1}}

    class Engine:
        def stats(self):
            return {"apns": {"delivered": 9}}

    parts.extra["push"] = Engine()
    assert rpc.call("stats")["push"] == {"apns": {"delivered": 9}}

    class Broken:
        def stats(self):
            raise RuntimeError("boom")

    parts.extra["push"] = Broken()
    assert rpc.call("stats")["push"] == {"error": "push statistics failed"}


def test_jsonable():
    assert jsonable({"a": (1, 2), "b": {3}, "c": float("nan"), "d": object}) == {
        "a": [1, 2],
        "b": [3],
        "c": None,
        "d": str(object),
    }
