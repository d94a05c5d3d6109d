"""ops/service.py wires [cluster] node_address: the internal listener, the relay before the router,
our Path entries in the registrar, forks through other nodes; nothing of it on a single node."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.metrics import make_registry
from libon_tsilo.ops.service import make_service
from libon_tsilo.sip.message import parse_message
from tests.fakes.sip import FakeFlow
from tests.ops.test_metrics import samples
from tests.sip.fakes import request_text


def _parts(tmp_path, **sections):
    cfg = config_from_dict({"location": {"backend": "memory"}, **sections}, base_dir=tmp_path)
    return make_service(cfg, clock=Clock()).parts


def test_a_single_node_has_no_relay_and_no_internal_listener(tmp_path):
    parts = _parts(tmp_path)
    assert parts.router.proxy is None and parts.registrar.path_stamp is None and parts.b2bua.path_router is None
    assert parts.transport.forward is None  # no stateless forwarder in front of the transactions
    assert [str(s) for s in parts.transport.specs] == list(parts.config.sip.listen)
    assert "cluster_relay" not in parts.extra


def test_cluster_wiring_and_peers_exempt_from_the_source_limits(tmp_path):
    parts = _parts(tmp_path, cluster={"node_address": "udp:127.0.0.1:25071", "trusted_peers": ["10.1.0.0/16"]})
    relay, node = parts.extra["cluster_relay"], parts.extra["cluster_node"]
    assert parts.router.proxy == relay.handle
    assert parts.transport.forward is not None  # the relay's stateless path (counted by the metrics)
    assert parts.registrar.path_stamp == node.path_entry and parts.b2bua.path_router == node.next_hop
    assert relay.register_answered == parts.registrar.when_answered  # cross-node ordering
    assert str(parts.transport.specs[-1]) == "udp:127.0.0.1:25071"  # after the public listeners
    assert relay in parts.extra["limits"]


def _options(i: int) -> object:
    return parse_message(request_text("OPTIONS", branch=f"z9hG4bKlim{i}", call_id=f"lim-{i}",
                                      ruri="sip:example.com").encode())


def test_trusted_peers_skip_the_source_limits_on_the_internal_listener_only(tmp_path):
    parts = _parts(tmp_path, cluster={"node_address": "udp:127.0.0.1:25071", "trusted_peers": ["10.1.0.0/16"]},
                   limits={"requests_per_second": 1, "burst": 2})
    parts.extra["cluster_node"]._bound = ("127.0.0.1", 25071)  # as once the transport listens
    parts.transport.send_response = lambda resp, flow: None  # the limiter's 503: no socket here
    admit = parts.transactions.admit
    # a peer relays every call from one address: never limited on the internal listener
    internal = FakeFlow(remote=("10.1.2.3", 5060), local=("127.0.0.1", 25071))
    assert all(admit(_options(i), internal) for i in range(50))
    # the same range on a public listener (a device, an SNATing balancer) is limited as any source
    public = FakeFlow(remote=("10.1.2.4", 5060), local=("127.0.0.1", 5060))
    assert [admit(_options(i), public) for i in range(4)] == [True, True, False, False]
    # and an untrusted host on the internal listener too (it is refused there anyway)
    stranger = FakeFlow(remote=("10.2.0.1", 5060), local=("127.0.0.1", 25071))
    assert [admit(_options(i), stranger) for i in range(4)] == [True, True, False, False]


def test_a_cluster_on_redis_beats_and_asks_its_liveness_view(tmp_path):
    # the Redis store is built, never started here (its client connects lazily)
    cfg = config_from_dict({"location": {"backend": "redis"},
                            "cluster": {"node_address": "udp:127.0.0.1:25072", "secret": "s"}}, base_dir=tmp_path)
    parts = make_service(cfg, clock=Clock()).parts
    node, liveness = parts.extra["cluster_node"], parts.extra["cluster_liveness"]
    assert node.liveness is liveness and parts.b2bua.peer_alive == node.peer_alive
    assert liveness._beat == parts.location.persistence.heartbeat
    # every device is reached through its node's relay, which holds an INVITE until the 200 is sent
    assert not parts.location.persistence.publish_after_answer
    direct = config_from_dict({"location": {"backend": "redis"}, "cluster": {
        "node_address": "udp:127.0.0.1:25072", "secret": "s", "udp_via_path": False}}, base_dir=tmp_path)
    # a node forking to a UDP device itself hears of the binding after its REGISTER's 200 is sent
    assert make_service(direct, clock=Clock()).parts.location.persistence.publish_after_answer
    liveness.view = {"udp:127.0.0.1:25072", "udp:127.0.0.1:25074"}
    assert samples(make_registry(parts))[("libon_tsilo_cluster_nodes_alive", ())] == 2
    # on memory there is no shared store to beat in: every peer counts as alive
    memory = _parts(tmp_path, cluster={"node_address": "udp:127.0.0.1:25073"})
    assert "cluster_liveness" not in memory.extra and memory.b2bua.peer_alive is None


def test_a_graceful_stop_waits_for_pending_write_backs_as_long_as_the_drain(tmp_path):
    cfg = config_from_dict({"location": {"backend": "redis"}, "ops": {"drain_timeout": 7}}, base_dir=tmp_path)
    assert make_service(cfg, clock=Clock()).parts.location.persistence.stop_wait == 7


def test_metrics_say_when_another_process_holds_our_node_id_and_what_waits_to_be_written_back(tmp_path):
    cfg = config_from_dict({"location": {"backend": "redis"},
                            "cluster": {"node_address": "udp:127.0.0.1:25072", "secret": "s"}}, base_dir=tmp_path)
    parts = make_service(cfg, clock=Clock()).parts
    store = parts.location.persistence
    got = samples(make_registry(parts))
    assert got[("libon_tsilo_redis_node_id_conflict", ())] == 0
    assert got[("libon_tsilo_redis_write_back_pending", ())] == 0
    store.duplicate_of = "0123456789abcdef"  # what the store sets when it stays out (redis_store.py)
    store._write_back[("sip:a@example.com", "k")] = None
    got = samples(make_registry(parts))
    assert got[("libon_tsilo_redis_node_id_conflict", ())] == 1
    assert got[("libon_tsilo_redis_write_back_pending", ())] == 1
    assert parts.location.redis_stats()["duplicate_node_id_of"] == "0123456789abcdef"  # ul.dump's "redis"


def test_reuse_port_workers_pin_the_devices_they_fork_to_unless_max_udp_pins_is_0(tmp_path):
    # the Redis store is built, never started here (its client connects lazily)
    def parts_of(**cluster):
        cfg = config_from_dict({"location": {"backend": "redis"}, "cluster": {
            "node_address": "udp:127.0.0.1:25072", "secret": "s", **cluster}}, base_dir=tmp_path)
        return make_service(cfg, clock=Clock()).parts

    workers = parts_of(reuse_port=True)
    node, transport = workers.extra["cluster_node"], workers.transport
    assert node.pin == transport.pin_udp and transport.pins.max_pins == 4096
    assert workers.b2bua.path_sent == node.branch_sent  # pinned as a branch leaves, not as it is routed
    assert transport.pins in workers.extra["limits"]  # udp_pins_full in /metrics' limit hits
    off = parts_of(reuse_port=True, max_udp_pins=0)
    assert off.extra["cluster_node"].pin is None and off.transport.pins not in off.extra["limits"]
    assert off.b2bua.path_sent is None
    # one worker per socket, or every UDP device through the Path: never a pin
    for parts in (parts_of(), parts_of(reuse_port=True, udp_via_path=True)):
        assert parts.extra["cluster_node"].pin is None
    assert parts_of().transport.pins.max_pins == 0
