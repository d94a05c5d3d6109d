"""Two nodes (two real twistd processes, node ids "a" and "b") on one real redis-server.

- a REGISTER on node B is in node A's ``ul.dump`` (with ``node = "b"``) and its unREGISTER leaves it;
- a UDP call parked on A (SIPp caller) is late-forked when the device (SIPp device) registers on B:
  A's silo hears B's change from Redis and sends the INVITE straight to the device's address;
- Redis restarts (empty): while it is down a REGISTER gets 500 with Retry-After and A still serves
  the binding it knows (ul.dump); both nodes reconnect by themselves (``stats`` says so), B writes
  its binding back, and a new REGISTER on B reaches A again;
- while Redis is down, a call arriving on A reaches a device registered on B (A's copy), and once
  Redis is back the device's unREGISTER on B reaches A.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, admin_rpc, free_port
from tests.e2e.regload import exchange, register_bytes
from tests.e2e.sipp import Sipp, sipp_available, stop_all
from tests.e2e.test_calls_sipp import add_device, assert_caller_ok, assert_no_leaked_state, silo_branches, wait_parked
from tests.redis_server import RedisServer
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(not sipp_available(), reason="sipp is missing (package sip-tester)")


def _node_config(redis: RedisServer, node_id: str) -> dict[str, dict[str, Any]]:
    return {
        "auth": {"enabled": False},
        "location": {"backend": "redis", "url": redis.url, "key_prefix": "e2e:"},
        "cluster": {"node_id": node_id},
        "calls": {"ring_timeout": 10, "invite_cancel_grace": 0},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
        "log": JSON_LOG,
    }


def _redis_state(server: ServerProcess) -> dict[str, Any]:
    return admin_rpc(server, "stats")["usrloc"]["redis"]


@pytest.fixture
def cluster(start_sip_server, redis_server: RedisServer) -> tuple[ServerProcess, ServerProcess]:
    a = start_sip_server(extra=_node_config(redis_server, "a"), tls=False)
    b = start_sip_server(extra=_node_config(redis_server, "b"), tls=False)
    for node in (a, b):
        wait_until(lambda n=node: _redis_state(n)["up"], 10, "the node to load from redis")
    return a, b


@pytest.fixture
def procs() -> Iterator[list]:
    started: list = []
    yield started
    stop_all(started)


def _contacts(server: ServerProcess, aor: str) -> list[dict[str, Any]]:
    return admin_rpc(server, "ul.dump")["aors"].get(aor, [])


def test_a_register_on_b_is_seen_on_a(cluster, procs, tmp_path: Path) -> None:
    a, b = cluster
    device = add_device(procs, b, tmp_path, "carol")
    device.wait_registered()
    aor = f"sip:carol@{HOST}"
    seen = wait_until(lambda: _contacts(a, aor), 5, "carol's binding on node a")
    assert [x["node"] for x in seen] == ["b"] and f":{device.port}" in seen[0]["contact_uri"]
    assert admin_rpc(a, "ul.dump")["redis"]["node"] == "a"
    device.stop()  # unregisters on b
    wait_until(lambda: not _contacts(a, aor), 5, "carol's binding to leave node a")


def test_a_call_parked_on_a_is_forked_when_the_device_registers_on_b(cluster, procs, tmp_path: Path) -> None:
    a, b = cluster
    caller = Sipp(a, "caller_answered.xml", tmp_path, service="bob", pause_ms=100)
    procs.append(caller)
    wait_parked(a, "bob")
    assert silo_branches(a) == 0
    device = add_device(procs, b, tmp_path, "bob")  # registers on b, never talks to a first
    assert_caller_ok(caller, a)
    device.stop()
    device.assert_no_failures()
    assert len(device.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, device.sipp.explain()
    assert silo_branches(a) == 1  # a's silo added the branch out of b's REGISTER
    assert_no_leaked_state(a, 1)  # the unREGISTER on b removed a's copy too


def test_both_nodes_ride_out_a_redis_restart(cluster, procs, tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = cluster
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    try:
        status, _ = exchange(b.sip_port, register_bytes(b.sip_port, port, "dora", "reg-dora-1"), sock)
        assert status == 200
        aor = f"sip:dora@{HOST}"
        wait_until(lambda: _contacts(a, aor), 5, "dora's binding on node a")

        redis_server.stop()
        for node in (a, b):
            wait_until(lambda n=node: _redis_state(n)["state"] == "down", 10, "the node to see redis down")
        status, answer = exchange(b.sip_port, register_bytes(b.sip_port, port, "erin", "reg-erin-1"), sock)
        assert status == 500 and b"\r\nRetry-After: " in answer, answer
        assert _contacts(a, aor)  # a still serves what it knew

        redis_server.start()  # empty: it lost everything
        for node in (a, b):
            wait_until(lambda n=node: _redis_state(n)["up"], 15, "the node to reconnect")
        # b writes back the bindings it holds: dora's, and erin's (refused with 500 but reachable
        # through b); with the epoch key, b's write counter and each node's claims on its node id and
        # its change channel, eight
        wait_until(lambda: redis_server.cli("DBSIZE") == b":8", 5, "b to write its bindings back")
        assert _contacts(a, aor)
        status, _ = exchange(b.sip_port, register_bytes(b.sip_port, port, "erin", "reg-erin-2"), sock)
        assert status == 200
        wait_until(lambda: _contacts(a, f"sip:erin@{HOST}"), 5, "erin's binding on node a")
    finally:
        sock.close()
    for node in (a, b):
        assert _redis_state(node)["loads"] == 2
        assert not node.tracebacks(), node.output()[-4000:]


def test_calls_to_known_devices_go_on_while_redis_is_down(
    cluster, procs, tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = cluster
    device = add_device(procs, b, tmp_path, "frank")  # registered on b, known to a through Redis
    device.wait_registered()
    wait_until(lambda: _contacts(a, f"sip:frank@{HOST}"), 5, "frank's binding on node a")
    redis_server.stop()
    wait_until(lambda: _redis_state(a)["state"] == "down", 10, "node a to see redis down")
    caller = Sipp(a, "caller_answered.xml", tmp_path, service="frank", pause_ms=100)
    procs.append(caller)
    assert_caller_ok(caller, a)  # a reaches the device from its own copy of the binding
    assert len(device.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, device.sipp.explain()
    redis_server.start()
    wait_until(lambda: _redis_state(a)["up"] and _redis_state(b)["up"], 15, "both nodes to reconnect")
    device.stop()  # its unREGISTER on b reaches a again
    device.assert_no_failures()
    wait_until(lambda: not _contacts(a, f"sip:frank@{HOST}"), 5, "frank's binding to leave node a")
