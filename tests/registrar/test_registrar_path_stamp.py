"""Registrar.path_stamp (set in a cluster, libon_tsilo/cluster/node.py): this node's own Path entry
goes first in the binding (RFC 3327: the hop nearest the registrar), ``;ob``-aware per Contact,
and never reaches the device: the 200 echoes only the Path the request carried."""

from __future__ import annotations

from typing import Any

from tests.registrar.test_registrar import AOR, INST, Env


def _stamp(flow: Any, outbound: bool) -> str:
    return f"<sip:tok-{flow.id}@10.0.0.1:5070;lr{';ob' if outbound else ''}>"


def test_our_entry_is_first_and_is_not_echoed() -> None:
    env = Env()
    env.registrar.path_stamp = _stamp
    edge = "<sip:edge1.example.net;lr>"
    resp = env.register(["<sip:a@h1>"], extra=[f"Path: {edge}", "Supported: path"])
    assert resp.status == 200 and resp.header_values("Path") == [edge]
    [b] = env.store.lookup(AOR)
    assert b.path == [f"<sip:tok-{env.flow.id}@10.0.0.1:5070;lr>", edge]


def test_outbound_binding_gets_ob() -> None:
    env = Env()
    env.registrar.path_stamp = _stamp
    resp = env.register([f"<sip:a@10.0.0.1;transport=tcp>;{INST};reg-id=1"], extra=["Supported: outbound"])
    assert resp.status == 200 and not resp.header_values("Path")
    [b] = env.store.lookup(AOR)
    assert b.path == [f"<sip:tok-{env.flow.id}@10.0.0.1:5070;lr;ob>"]


def test_a_path_longer_than_any_edge_proxy_writes_is_refused() -> None:
    """Every binding copies the REGISTER's Path (into Redis and every node's replica in a cluster):
    10 contacts with 60 KiB of Path each would be 600 KiB per REGISTER for every node to take."""
    env = Env()
    env.registrar.path_stamp = _stamp
    huge = [f"Path: <sip:hop{i}.example.net;lr;x={'a' * 1000}>" for i in range(60)]
    contacts = [f"<sip:a@h{i}>" for i in range(5)]
    resp = env.register(contacts, extra=huge)
    assert resp.status == 400 and resp.reason == "Path Too Long"
    assert env.store.lookup(AOR) == []
    assert env.registrar.limit_hits() == {"register_path_too_long": 1}
    # two ordinary edge-proxy entries still register
    edges = [f"Path: <sip:{'e' * 120}@edge{i}.example.net;lr;ob>" for i in range(2)]
    assert env.register(contacts, extra=edges, cseq=2).status == 200
    assert len(env.store.lookup(AOR)) == 5
