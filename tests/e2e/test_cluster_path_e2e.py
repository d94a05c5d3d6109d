"""Two nodes (two real twistd processes) on one real redis-server, each with its internal listener
([cluster] node_address): a device is reached through the node that holds its flow (RFC 3327 Path
with RFC 5626 flow tokens, libon_tsilo/cluster/).

- a call parked on A is forked when the device registers on B, and goes through B: over UDP (the
  caller hangs up: A's BYE goes through B) and over TCP (the device's connection ends on B; the
  device hangs up: its BYE goes to B, which relays it to A);
- a binding made on A is used by a call arriving on B (B forks through A);
- kill -9 node A, with the default ``udp_via_path = true`` (the bindings A took name A in their
  Path): once B sees that A stopped beating in Redis (``stats`` ``cluster_peers``), B sends to a UDP
  binding made on A itself, pushes a push-capable one (webhook fake) which then registers on B and
  answers, and still takes registrations and calls; with ``udp_via_path = false`` (workers sharing one
  public address) as well.

SIPp plays caller and device; the device scenarios copy Record-Route as a UAS must. Each test waits
on SIPp's exit status and on the nodes' counters (admin RPC ``stats``: ``cluster_relay``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.proc import HOST, ServerProcess, admin_rpc, free_port, start_server
from tests.e2e.pushdevice import DeviceConfig, PushDevice, push_records
from tests.e2e.sipp import Sipp, sipp_available, stop_all
from tests.e2e.test_calls_sipp import add_device, assert_caller_ok, wait_parked
from tests.fakes import webhook_fake
from tests.redis_server import RedisServer
from tests.waiting import wait_until

PRID = "frank-token-0123456789"

pytestmark = pytest.mark.skipif(not sipp_available(), reason="sipp is missing (package sip-tester)")


def _node_config(redis: RedisServer, node_id: str, internal: str, **cluster: Any) -> dict[str, dict[str, Any]]:
    return {
        "auth": {"enabled": False},
        "location": {"backend": "redis", "url": redis.url, "key_prefix": "path-e2e:"},
        "cluster": {"node_id": node_id, "node_address": f"{internal}:{HOST}:{free_port()}",
                    "secret": f"e2e-secret-{node_id}", **cluster},
        "calls": {"ring_timeout": 10, "invite_cancel_grace": 0},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
    }


def _wait_redis(node: ServerProcess) -> None:
    wait_until(lambda: admin_rpc(node, "stats")["usrloc"]["redis"]["up"], 10, "the node to load from redis")


def _relay(node: ServerProcess) -> dict[str, int]:
    return admin_rpc(node, "stats")["cluster_relay"]


@pytest.fixture
def procs() -> Iterator[list]:
    started: list = []
    yield started
    stop_all(started)


def _cluster(start_sip_server, redis_server: RedisServer, internal: str = "udp") -> tuple[ServerProcess, ...]:
    a = start_sip_server(extra=_node_config(redis_server, "a", internal), tls=False)
    b = start_sip_server(extra=_node_config(redis_server, "b", internal), tls=False)
    for node in (a, b):
        _wait_redis(node)
    return a, b


def test_udp_device_on_b_takes_a_call_parked_on_a_and_the_caller_hangs_up(
    start_sip_server, redis_server, procs, tmp_path: Path
) -> None:
    a, b = _cluster(start_sip_server, redis_server)
    caller = Sipp(a, "caller_answered.xml", tmp_path, service="bob", pause_ms=100)
    procs.append(caller)
    wait_parked(a, "bob")
    device = add_device(procs, b, tmp_path, "bob", answer="device_answer_rr.xml")
    assert_caller_ok(caller, a)
    wait_until(lambda: device.sipp.log_lines("ANSWERED-AND-HUNG-UP "), 10, "the device to get A's BYE",
               explain=device.sipp.explain)
    relay = _relay(b)
    assert relay["to_device"] >= 3, relay  # INVITE, ACK, BYE of A, all through B
    assert _relay(a).get("to_device", 0) == 0
    device.stop()
    device.assert_no_failures()


def test_tcp_device_on_b_hangs_up_through_b(start_sip_server, redis_server, procs, tmp_path: Path) -> None:
    a, b = _cluster(start_sip_server, redis_server, internal="tcp")
    caller = Sipp(a, "caller_waits_bye.xml", tmp_path, service="bob")
    procs.append(caller)
    wait_parked(a, "bob")
    device = add_device(procs, b, tmp_path, "bob", answer="device_answer_rr_bye.xml", transport="t1")
    assert_caller_ok(caller, a)  # the caller got the device's BYE, relayed by B to A, then by A
    wait_until(lambda: device.sipp.log_lines("HUNG-UP "), 10, "the device's BYE to be answered",
               explain=device.sipp.explain)
    relay = _relay(b)
    assert relay["to_peer"] == 1 and relay["to_device"] >= 2, relay
    device.stop()
    device.assert_no_failures()


def test_a_binding_made_on_a_is_used_by_a_call_arriving_on_b(
    start_sip_server, redis_server, procs, tmp_path: Path
) -> None:
    a, b = _cluster(start_sip_server, redis_server)
    device = add_device(procs, a, tmp_path, "carol", answer="device_answer_rr.xml")
    device.wait_registered()
    wait_until(lambda: admin_rpc(b, "ul.dump")["aors"].get(f"sip:carol@{HOST}"), 5, "carol's binding on B")
    caller = Sipp(b, "caller_answered.xml", tmp_path, service="carol", pause_ms=100)
    procs.append(caller)
    assert_caller_ok(caller, b)
    wait_until(lambda: device.sipp.log_lines("ANSWERED-AND-HUNG-UP "), 10, "the device to get B's BYE")
    assert _relay(a)["to_device"] >= 3
    device.stop()
    device.assert_no_failures()


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    record = tmp_path / "webhook.jsonl"
    proc, port = webhook_fake.spawn(["--port", "0", "--record", str(record)])
    yield f"http://{HOST}:{port}/push", record
    proc.terminate()
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _peers_alive(node: ServerProcess) -> list[str]:
    return admin_rpc(node, "stats")["cluster_peers"]["alive"]


@pytest.mark.parametrize("udp_via_path", [True, False], ids=["udp-via-path", "udp-direct"])
def test_node_b_serves_on_after_node_a_is_killed(
    start_sip_server, redis_server, procs, webhook, tmp_path: Path, udp_via_path: bool
) -> None:
    url, record = webhook
    push = {"providers": ["webhook"], "webhook": [{"name": "webhook", "url": url, "timeout": 2.0}]}
    node_a_dir = tmp_path / "node-a"
    node_a_dir.mkdir()
    a = start_server(node_a_dir, {**_node_config(redis_server, "a", "udp", udp_via_path=udp_via_path),
                                  "push": push})
    phone: PushDevice | None = None
    try:
        b = start_sip_server(extra={**_node_config(redis_server, "b", "udp", udp_via_path=udp_via_path),
                                    "push": push}, tls=False)
        for node in (a, b):
            _wait_redis(node)
        wait_until(lambda: len(_peers_alive(b)) == 2, 5, "B to see A beat")
        erin = add_device(procs, a, tmp_path, "erin", answer="device_answer_rr.xml")
        erin.wait_registered()
        phone = PushDevice((HOST, a.sip_port), DeviceConfig(user="frank", provider="webhook", prid=PRID,
                                                            param="frank-phone", record=record))
        assert phone.register().status == 200
        for user in ("erin", "frank"):
            wait_until(lambda u=user: admin_rpc(b, "ul.dump")["aors"].get(f"sip:{u}@{HOST}"), 5, f"{user} on B")
        assert bool(admin_rpc(b, "ul.dump")["aors"][f"sip:erin@{HOST}"][0]["path"]) == udp_via_path
        a.proc.kill()  # kill -9: no drain, no unregistration, nothing flushed
        a.proc.wait(10)
        wait_until(lambda: len(_peers_alive(b)) == 1, 10, "B to see A stop beating")
        # a UDP binding made on A: B reaches the device itself
        caller = Sipp(b, "caller_answered.xml", tmp_path, service="erin", pause_ms=100)
        procs.append(caller)
        assert_caller_ok(caller, b)
        wait_until(lambda: erin.sipp.log_lines("ANSWERED-AND-HUNG-UP "), 10, "erin to get B's BYE")
        # a push-capable binding made on A: B pushes it; the phone registers on B and answers there
        phone.server = (HOST, b.sip_port)
        phone.start()
        caller = Sipp(b, "caller_answered.xml", tmp_path, service="frank", pause_ms=100)
        procs.append(caller)
        phone.wait("push", 10)
        phone.wait("answered", 10)
        assert_caller_ok(caller, b)
        assert [r["token"] for r in push_records(record, "webhook")] == [PRID]
        # a device registering on B now
        device = add_device(procs, b, tmp_path, "dave", answer="device_answer_rr.xml")
        device.wait_registered()
        caller = Sipp(b, "caller_answered.xml", tmp_path, service="dave", pause_ms=100)
        procs.append(caller)
        assert_caller_ok(caller, b)
        wait_until(lambda: device.sipp.log_lines("ANSWERED-AND-HUNG-UP "), 10, "the device to get B's BYE")
        assert b.alive() and not b.tracebacks(), b.output()[-4000:]
        device.stop()
        device.assert_no_failures()
    finally:
        if phone is not None:
            phone.stop()
        if a.alive():
            a.proc.kill()
            a.proc.wait(10)
