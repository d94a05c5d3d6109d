"""ops/node.py: which node answers (the id in dumps, stats and /metrics)."""

from __future__ import annotations

import pytest

from libon_tsilo.ops.config import ConfigError, config_from_dict
from libon_tsilo.ops.node import resolve_node_id

REDIS = {"backend": "redis"}  # what reuse_port needs (config only: nothing connects here)


def test_single_server_has_no_node_id():
    assert resolve_node_id(config_from_dict({}), hostname="sip1") == ""


def test_configured_node_id_wins():
    cfg = config_from_dict({"cluster": {"node_id": "edge-a", "reuse_port": True}, "location": REDIS})
    assert resolve_node_id(cfg, hostname="sip1") == "edge-a"


@pytest.mark.parametrize(
    "listen, hostname, expected",
    [
        ("tcp:26081:interface=127.0.0.1", "sip1.example.net", "sip1-26081"),
        ("tcp:port=26082", "Sip_Box", "Sip_Box-26082"),
        ("tcp6:26083", "we!rd host", "we-rd-host-26083"),
        ("tcp:26084", "", "node-26084"),
    ],
)
def test_clustered_worker_derives_hostname_and_own_port(listen, hostname, expected):
    cfg = config_from_dict({"cluster": {"reuse_port": True}, "admin": {"listen": listen}, "location": REDIS})
    node = resolve_node_id(cfg, hostname=hostname)
    assert node == expected
    # the derived id passes the [cluster] node_id check, so it can be written back into a config
    assert config_from_dict({"cluster": {"node_id": node}}).cluster.node_id == node


@pytest.mark.parametrize("admin", [{}, {"listen": "unix:/run/x.sock"}, {"listen": "tcp:0"}])
def test_clustered_worker_without_a_port_of_its_own_needs_node_id(admin):
    cfg = config_from_dict({"cluster": {"reuse_port": True}, "admin": admin, "location": REDIS})
    with pytest.raises(ConfigError) as info:
        resolve_node_id(cfg, hostname="sip1")
    assert info.value.key == "cluster.node_id"


def test_a_redis_node_derives_its_id_from_its_own_sip_port():
    cfg = config_from_dict({"location": {"backend": "redis"}, "sip": {"listen": ["udp:127.0.0.1:26070"]}})
    assert resolve_node_id(cfg, hostname="sip2") == "sip2-26070"
    with_admin = config_from_dict({"location": {"backend": "redis"}, "admin": {"listen": "tcp:26091"}})
    assert resolve_node_id(with_admin, hostname="sip2") == "sip2-26091"


def test_reuse_port_shares_the_public_listeners_not_the_internal_one(tmp_path):
    from twisted.internet.task import Clock

    from libon_tsilo.ops.service import make_service
    from libon_tsilo.sip.listen import parse_listen_spec

    public = ["udp:127.0.0.1:26060", "tcp:127.0.0.1:26060"]
    cfg = config_from_dict({
        "sip": {"listen": public}, "location": REDIS,
        "cluster": {"reuse_port": True, "node_id": "w1", "node_address": "udp:127.0.0.1:26061", "secret": "s"},
    }, tmp_path)  # the users' SQLite file in tmp_path, not in the checkout
    transport = make_service(cfg, clock=Clock()).parts.transport
    assert transport.reuse_port == {parse_listen_spec(s) for s in public}


@pytest.mark.parametrize("reuse_port", [True, False])
def test_the_internal_address_port_names_the_node_first(reuse_port):
    cfg = config_from_dict({
        "cluster": {"reuse_port": reuse_port, "node_address": "udp:10.0.0.11:26071", "secret": "s"},
        "admin": {"listen": "tcp:26092"}, "location": REDIS,
    })
    assert resolve_node_id(cfg, hostname="sip3") == "sip3-26071"


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_reuse_port_needs_the_shared_redis_store(backend, tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"cluster": {"reuse_port": True}, "location": {"backend": backend}}, tmp_path)
    assert str(info.value) == 'cluster.reuse_port: needs location.backend = "redis" (workers share the bindings)'


def test_the_readme_cluster_example_is_a_valid_worker_config(tmp_path):
    import tomllib
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**Each node's config**"):]
    example = section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]
    cfg = config_from_dict(tomllib.loads(example.replace("…", "s" * 32)), tmp_path)
    assert cfg.cluster.reuse_port and cfg.location.backend == "redis"
    assert resolve_node_id(cfg, hostname="sip1") == "sip1-w1"
