"""Which node answers (issue 14): ts.dump, ul.dump, stats, health and /metrics name the node."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.metrics import make_registry
from libon_tsilo.ops.rpc import Rpc
from libon_tsilo.ops.service import make_service
from tests.ops.test_metrics import samples
from tests.ops.test_rpc import binding


def _tree(tmp_path: Any, cluster: dict[str, Any]) -> Any:
    clock = Clock()
    clock.advance(1000)
    # reuse_port needs the Redis store: built, never started here (its client connects lazily)
    location = {"backend": "redis" if cluster.get("reuse_port") else "memory"}
    cfg = config_from_dict(
        {"location": location, "auth": {"enabled": False}, "cluster": cluster,
         "admin": {"listen": "tcp:26090:interface=127.0.0.1"}},
        base_dir=tmp_path,
    )
    return make_service(cfg, clock=clock)


@pytest.mark.parametrize("method", ["ts.dump", "ul.dump", "stats", "health"])
def test_every_dump_names_the_configured_node(tmp_path, method):
    root = _tree(tmp_path, {"node_id": "edge-a"})
    assert root.parts.node_id == "edge-a"
    assert Rpc(root.parts, root).call(method)["node"] == "edge-a"


def test_a_reuse_port_worker_derives_its_node_id(tmp_path, monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "sip7.example.net")
    root = _tree(tmp_path, {"reuse_port": True})
    assert root.parts.node_id == "sip7-26090"
    assert Rpc(root.parts, root).call("stats")["node"] == "sip7-26090"


def test_a_single_server_answers_as_before(tmp_path):
    root = _tree(tmp_path, {})
    assert "node" not in Rpc(root.parts, root).call("ul.dump")


def test_ul_dump_shows_each_bindings_node_and_counts_per_node(tmp_path):
    root = _tree(tmp_path, {"node_id": "edge-a"})
    parts = root.parts
    assert parts.location.node_id == "edge-a"  # what the registrar stamps on the bindings it makes
    parts.location.add_or_update(binding("alice", "sip:alice@192.0.2.1:5060", parts.clock, node="edge-a"))
    # a binding another node made, as the Redis replica holds it
    parts.location.apply_remote(binding("bob", "sip:bob@192.0.2.2:5060", parts.clock, node="edge-b"))
    parts.location.apply_remote(binding("carol", "sip:carol@192.0.2.3:5060", parts.clock, node="edge-b"))
    dump = Rpc(parts, root).call("ul.dump")
    assert dump["node"] == "edge-a" and dump["binding_count"] == 3
    assert dump["nodes"] == {"edge-a": 1, "edge-b": 2}
    assert [b["node"] for b in dump["aors"]["bob"]] == ["edge-b"]
    assert [b["node"] for b in Rpc(parts, root).call("ul.lookup", {"aor": "alice"})["bindings"]] == ["edge-a"]


@pytest.mark.parametrize("cluster, node", [({"node_id": "edge-b"}, "edge-b"), ({}, "")])
def test_metrics_node_info(tmp_path, cluster, node):
    root = _tree(tmp_path, cluster)
    s = samples(make_registry(root.parts, None))
    assert s[("libon_tsilo_node_info", (("node", node),))] == 1
    assert [k for k in s if k[0] == "libon_tsilo_node_info"] == [("libon_tsilo_node_info", (("node", node),))]
