"""What a device or a REGISTER may name across the cluster's trust boundary (review of issue 14).

Two nodes in one process as in test_relay_two_nodes.py (real sockets on loopback), and a real
redis-server on loopback standing for the services a node's trusted hosts run besides SIP. A host in
``[cluster] trusted_peers`` (loopback by default) is not a node: only the nodes' internal addresses
are (ours, ``peers``, or seen beating in Redis).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from libon_tsilo.cluster.liveness import TTL, PeerLiveness
from tests.cluster.test_relay_two_nodes import AOR, Pair, _answered_call, _public, in_dialog, invite, register
from tests.cluster.ua import tag, wait_for
from tests.redis_server import RedisServer


def _beating(node: Any, *others: Any) -> PeerLiveness:
    """``node``'s liveness after one beat answered with itself and ``others`` (what Redis answers
    when they all beat)."""
    cluster = node.parts.extra["cluster_node"]
    names = {o.parts.extra["cluster_node"].member() for o in others}
    liveness = PeerLiveness(Clock(), cluster.member, lambda me, ttl: succeed({me, *names}))
    liveness.startService()
    cluster.liveness = liveness
    return liveness


@pytest_twisted.ensureDeferred
async def test_a_devices_in_dialog_request_cannot_reach_another_service_on_a_trusted_host(
        redis_server: RedisServer):
    pair = Pair()
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        _beating(pair.b, pair.a)
        redis_server.cli("SET", "canary", "1")
        rr = inv.header_values("record-route")  # B's entries, with the device's flow token
        body = "FLUSHALL\r\n"
        attack = in_dialog(device, "MESSAGE", f"sip:x@127.0.0.1:{redis_server.port};transport=tcp", rr,
                           f"{inv.header('to')};tag={device_tag}", inv.header("from") or "", inv.call_id, 7)
        attack = attack.replace("Content-Length: 0\r\n\r\n", f"Content-Length: {len(body)}\r\n\r\n{body}")
        device.send(attack)
        relay = pair.b.parts.extra["cluster_relay"]
        await wait_for(lambda: relay.counters["refused_not_peer"] or relay.counters["to_peer"],
                       "B to refuse or relay the request")
        assert relay.counters["to_peer"] == 0, "B relayed a device's request to Redis's port"
        await device.response(403, "MESSAGE")
        assert redis_server.cli("EXISTS", "canary") == b":1"
        # the same dialog's BYE to A's internal address still crosses B
        bye = in_dialog(device, "BYE", str(inv.contacts[0].uri), rr,
                        f"{inv.header('to')};tag={device_tag}", inv.header("from") or "", inv.call_id, 8)
        device.send(bye)
        await caller.request("BYE")
        assert relay.counters["to_peer"] == 1
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_registers_own_path_naming_a_trusted_host_is_not_a_node_to_call_from_the_internal_address(
        redis_server: RedisServer):
    # udp_via_path off: no Path entry of ours on a UDP binding, so the REGISTER's own Path comes first
    pair = Pair(udp_via_path=False)
    pair.start()
    try:
        _beating(pair.a, pair.b)
        redis_server.cli("SET", "canary", "1")
        device = await pair.ua(pair.b)
        bogus = f"Path: <sip:x@127.0.0.1:{redis_server.port};transport=tcp;lr>\r\n"
        device.send(register(device, "Supported: path\r\n" + bogus))
        await device.response(200, "REGISTER")
        assert pair.a.parts.location.lookup(AOR)[0].path[0].startswith("<sip:x@127.0.0.1")
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        # an edge proxy's Path, as on one node: to the device's address, the Path as Route
        inv = await device.request("INVITE")
        assert inv.header_values("route") == [bogus[len("Path: "):-2]]
        assert redis_server.cli("EXISTS", "canary") == b":1"
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_register_never_reaches_a_registrar_through_the_internal_listener():
    """The router sends a REGISTER to the registrar whatever its To tag: with a tag, it passed the
    internal listener's "in-dialog only" rule, from the trusted address of a node ([auth]
    trusted_sources covering the nodes would then skip digest: any user's binding)."""
    pair = Pair()
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        rr = inv.header_values("record-route")
        a_internal = pair.a.parts.extra["cluster_node"].bound
        victim = "sip:victim@127.0.0.1"
        reg = in_dialog(device, "REGISTER", f"sip:127.0.0.1:{a_internal[1]}", rr,
                        f"<{victim}>;tag={tag()}", f"<{victim}>;tag={tag()}", "hijack@x", 1)
        device.send(reg.replace("Content-Length: 0", f"Contact: {device.contact}\r\nExpires: 600\r\n"
                                                    "Content-Length: 0"))
        answer = await device.expect(lambda m: getattr(m, "status", 0) >= 200 and m.call_id == "hijack@x",
                                     "the REGISTER's answer")
        assert answer.status == 403, answer.status
        assert pair.a.parts.location.lookup(victim) == []
        assert pair.a.parts.extra["cluster_relay"].counters["refused_not_relay"] == 1
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_dead_node_we_never_saw_beat_is_still_a_node_by_its_token():
    """A node that died before this one started is in no liveness view of ours, but its bindings
    stay in Redis until they expire: with the nodes' shared [cluster] secret its Path entry still
    proves it a node (a dead one): its TCP device without push is skipped, not dialled directly.
    (udp_via_path off: where a Path's first entry may be a device's, and is_node is asked.)"""
    pair = Pair(secret="shared-by-the-nodes", udp_via_path=False)
    pair.start()
    try:
        device = await pair.ua(pair.b, "tcp")
        device.send(register(device))
        await device.response(200, "REGISTER")
        clock = Clock()
        clock.advance(reactor.seconds() + TTL + 1)  # our first view comes after the bindings
        cluster = pair.a.parts.extra["cluster_node"]
        liveness = PeerLiveness(clock, cluster.member, lambda me, ttl: succeed({me}))
        liveness.startService()
        cluster.liveness = liveness
        pair.a.parts.b2bua.peer_alive = cluster.peer_alive
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        calls = pair.a.parts.b2bua
        await wait_for(lambda: calls.counters["dead_node_bindings"] == 1, "A to skip the binding")
        assert not any(getattr(m, "method", "") == "INVITE" for m in device.received)
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_that_joined_since_our_last_beat_still_gets_its_devices_calls():
    """With udp_via_path (the default) every Path starts with its node's own entry: a node missing
    from our last view (it joined since) is still called through, as liveness.py's "since" rule says."""
    pair = Pair()
    pair.start()
    try:
        clock = Clock()
        clock.advance(reactor.seconds())  # our last view: just before B's first beat
        cluster = pair.a.parts.extra["cluster_node"]
        liveness = PeerLiveness(clock, cluster.member, lambda me, ttl: succeed({me}))
        liveness.startService()
        cluster.liveness = liveness
        pair.a.parts.b2bua.peer_alive = cluster.peer_alive
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        assert pair.b.parts.extra["cluster_relay"].counters["to_device"] >= 2  # through B
        assert len(inv.header_values("via")) == 2
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_flow_token_is_taken_only_from_its_own_flow_not_from_another_port_of_its_ip():
    """RFC 5626 §5.3: the edge proxy matches the token's flow against the request's source address
    *and port*. Behind a carrier-grade NAT many subscribers share one IP (and over UDP an IP is
    spoofed at no cost): another port of the device's IP may not use its token."""
    pair = Pair()
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        _beating(pair.b, pair.a)
        neighbour = await pair.ua(pair.b)  # same IP (loopback), another port
        rr = inv.header_values("record-route")
        to, frm = f"{inv.header('to')};tag={device_tag}", inv.header("from") or ""
        neighbour.send(in_dialog(neighbour, "BYE", str(inv.contacts[0].uri), rr, to, frm, inv.call_id, 8))
        await neighbour.response(403, "BYE")
        relay = pair.b.parts.extra["cluster_relay"]
        assert relay.counters["refused_wrong_flow"] == 1 and relay.counters["to_peer"] == 0
        # the device itself, from its own flow, still hangs up through B
        device.send(in_dialog(device, "BYE", str(inv.contacts[0].uri), rr, to, frm, inv.call_id, 9))
        await caller.request("BYE")
        assert relay.counters["to_peer"] == 1
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_before_the_first_beat_is_answered_a_trusted_host_is_not_yet_a_node(redis_server: RedisServer):
    """Finding 10: while no beat of ours was answered (a few ms after start, or Redis unreachable
    since start) the host alone used to decide: a device's request could reach any port of a
    trusted host. Now a node with a store to beat in waits to see its peers."""
    pair = Pair()
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        cluster = pair.b.parts.extra["cluster_node"]
        first_beat: Deferred[set[str]] = Deferred()
        liveness = PeerLiveness(Clock(), cluster.member, lambda me, ttl: first_beat)
        liveness.startService()
        cluster.liveness = liveness
        redis_server.cli("SET", "canary", "1")
        rr = inv.header_values("record-route")
        to, frm = f"{inv.header('to')};tag={device_tag}", inv.header("from") or ""
        body = "FLUSHALL\r\n"
        attack = in_dialog(device, "MESSAGE", f"sip:x@127.0.0.1:{redis_server.port};transport=tcp", rr,
                           to, frm, inv.call_id, 7)
        device.send(attack.replace("Content-Length: 0\r\n\r\n", f"Content-Length: {len(body)}\r\n\r\n{body}"))
        await device.response(403, "MESSAGE")
        relay = pair.b.parts.extra["cluster_relay"]
        assert relay.counters["to_peer"] == 0 and redis_server.cli("EXISTS", "canary") == b":1"
        # once the beat is answered with A in it, the dialog's BYE to A crosses B
        first_beat.callback({cluster.member(), pair.a.parts.extra["cluster_node"].member()})
        device.send(in_dialog(device, "BYE", str(inv.contacts[0].uri), rr, to, frm, inv.call_id, 8))
        await caller.request("BYE")
        assert relay.counters["to_peer"] == 1
    finally:
        await pair.stop()
