"""A cluster node down (issue 14): the other nodes keep serving what does not need its connections.

Two nodes in one process as in test_relay_two_nodes.py (real sockets on loopback). Node A learns
that B is down from its liveness view (cluster/liveness.py, here fed by a beat that answers "only
A": what Redis answers once B stopped beating), or from a branch B failed (per call). A binding
whose Path names B is then reached around B: UDP straight from A, a push-capable one pushed, a
TCP one without push skipped. Each test waits on a message or a counter, never on a sleep.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from libon_tsilo.cluster.liveness import TTL, PeerLiveness
from tests.cluster.test_relay_two_nodes import AOR, Pair, _public, invite, register
from libon_tsilo.sip.message import Request, Response
from tests.cluster.ua import response_to, tag, wait_for

PUSH = ";pn-provider=webhook;pn-prid=device-token-1;pn-param=app"


class RecordingWaker:
    """The call layer's waker: records whom it was asked to wake; the push stays in flight."""

    def __init__(self) -> None:
        self.woken: list[Any] = []

    def wake(self, call: Any, bindings: list[Any]) -> Deferred[Any]:
        self.woken += bindings
        return Deferred()

    def call_ended(self, call: Any, answered_elsewhere: bool) -> None:
        pass


def _sees_only_itself(node: Any, dead: Any) -> PeerLiveness:
    """Node's liveness view after one beat answered by a store where only this node beats, taken
    more than the TTL after the bindings so far: the other node (``dead``, seen beating before)
    died since it took them."""
    cluster = node.parts.extra["cluster_node"]
    clock = Clock()
    clock.advance(reactor.seconds() + TTL + 1)
    liveness = PeerLiveness(clock, cluster.member, lambda me, ttl: succeed({me}))
    liveness.known.add(dead.parts.extra["cluster_node"].member())
    liveness.startService()
    cluster.liveness = liveness
    node.parts.b2bua.peer_alive = cluster.peer_alive
    return liveness


async def _stop_b(pair: Pair) -> None:
    await pair.b.stopService()
    pair.b.startService = lambda: None  # already stopped: pair.stop() must not stop it twice
    pair.b.stopService = lambda: succeed(None)


@pytest_twisted.ensureDeferred
async def test_udp_binding_behind_a_dead_node_is_reached_directly():
    pair = Pair()
    pair.start()
    try:
        device = await pair.ua(pair.b)
        device.send(register(device))
        await device.response(200, "REGISTER")
        assert pair.a.parts.location.lookup(AOR)[0].path  # the default udp_via_path: through B
        _sees_only_itself(pair.a, pair.b)
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        inv = await device.request("INVITE")
        # from A's public socket, not relayed by B: one Via (A's), no Record-Route of B
        vias = inv.header_values("via")
        assert len(vias) == 1 and f":{_public(pair.a, 'udp')[1]};" in vias[0], vias
        assert not inv.header_values("route")
        assert pair.b.parts.extra["cluster_relay"].counters["to_device"] == 0
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_tcp_binding_without_push_behind_a_dead_node_is_skipped():
    pair = Pair()
    pair.start()
    try:
        device = await pair.ua(pair.b, "tcp")
        device.send(register(device))
        await device.response(200, "REGISTER")
        _sees_only_itself(pair.a, pair.b)
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        calls = pair.a.parts.b2bua
        await wait_for(lambda: calls.counters["dead_node_bindings"] == 1, "A to skip the binding")
        await wait_for(lambda: pair.a.parts.silo.stats()["stored_transactions"] == 1, "the call parked")
        assert pair.b.parts.extra["cluster_relay"].counters["to_device"] == 0
        assert not any(getattr(m, "method", "") == "INVITE" for m in device.received)
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_push_capable_binding_behind_a_dead_node_is_pushed_not_forked():
    pair = Pair()
    pair.b.parts.registrar.push_providers = ("webhook",)
    waker = pair.a.parts.b2bua.waker = RecordingWaker()
    pair.start()
    try:
        device = await pair.ua(pair.b, "tcp")
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        await wait_for(lambda: pair.a.parts.silo.stats()["stored_transactions"] == 1, "the call parked on A")
        _sees_only_itself(pair.a, pair.b)
        # the device registers on B, and B dies before A forks: A hears of it from the store
        device.send(register(device).replace(f"Contact: {device.contact}", f"Contact: {device.contact}{PUSH}"))
        await device.response(200, "REGISTER")
        await wait_for(lambda: waker.woken, "A to push the device")
        assert waker.woken[0].pn_prid == "device-token-1"
        assert pair.a.parts.b2bua.counters["dead_node_bindings"] == 1
        assert pair.b.parts.extra["cluster_relay"].counters["to_device"] == 0
        assert not any(getattr(m, "method", "") == "INVITE" for m in device.received)
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_that_fails_a_branch_is_gone_around_for_the_call():
    """B died a moment ago and A's view has not caught up: A's INVITE to B's internal TCP listener
    fails at once (503 of our own), B is suspect for this call, and A sends to the UDP device itself."""
    pair = Pair(internal="tcp")
    pair.start()
    try:
        device = await pair.ua(pair.b)
        device.send(register(device))
        await device.response(200, "REGISTER")
        binding = pair.a.parts.location.lookup(AOR)[0]
        assert ";transport=tcp;lr" in binding.path[0]
        await _stop_b(pair)
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        inv = await device.request("INVITE")
        vias = inv.header_values("via")
        assert len(vias) == 1 and f":{_public(pair.a, 'udp')[1]};" in vias[0], vias
        call = next(iter(pair.a.parts.b2bua.calls.values()))
        assert call.suspects == {("tcp", "127.0.0.1", pair.b.parts.extra["cluster_node"].bound[1])}
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_devices_503_through_a_live_node_is_its_answer_not_the_nodes_failure():
    """The device itself answers 503 through B: B is fine, so A must not go around it and ring the
    device a second time straight from A; the caller gets the call's failure."""
    pair = Pair(internal="tcp")
    pair.start()
    try:
        device = await pair.ua(pair.b)
        device.send(register(device))
        await device.response(200, "REGISTER")
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        inv = await device.request("INVITE")
        device.send(response_to(inv, 503, "Service Unavailable", tag()))
        final = await caller.expect(lambda m: isinstance(m, Response) and m.status >= 300, "the caller's failure")
        assert final.status != 200
        invites = [m for m in device.received if isinstance(m, Request) and m.method == "INVITE"]
        assert len(invites) == 1, [m.header_values("via") for m in invites]
        assert not any(call.suspects for call in pair.a.parts.b2bua.calls.values())
    finally:
        await pair.stop()


def test_liveness_member_names_match_the_path_hosts():
    # a Path's host is bracketed for IPv6, the bound address is not: one name for both
    from libon_tsilo.cluster.liveness import member

    assert member("udp", "[::1]", 5071) == member("udp", "::1", 5071) == "udp:[::1]:5071"


# -- a flow that closed on another node (its flow_live false reached A through the store) ----------


async def _outbound_device_on_b(pair: Pair, push: str = "") -> tuple[Any, Any]:
    """An RFC 5626 device registered over two connections to B; the newer one then closes."""
    instance = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-00000000cafe>"'
    older = await pair.ua(pair.b, "tcp")
    newer = await pair.ua(pair.b, "tcp")
    for ua, reg_id in ((older, 2), (newer, 1)):
        ua.send(register(ua, "Supported: outbound, path\r\n").replace(
            f"Contact: {ua.contact}", f"Contact: {ua.contact}{push};{instance};reg-id={reg_id}"))
        await ua.response(200, "REGISTER")
    newer.stop()
    await wait_for(lambda: sum(b.flow_live for b in pair.a.parts.location.lookup(AOR)) == 1,
                   "A to hear that the newer flow closed on B")
    return older, newer


@pytest_twisted.ensureDeferred
async def test_a_forks_over_the_flow_still_open_on_b_without_a_430():
    pair = Pair()
    pair.start()
    try:
        older, _ = await _outbound_device_on_b(pair)
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        await older.request("INVITE")
        assert pair.b.parts.extra["cluster_relay"].counters["flow_failed"] == 0
        assert pair.a.parts.b2bua.counters["flow_failovers"] == 0
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_pushes_a_device_whose_flow_closed_on_b_instead_of_forking_to_it():
    """The call was parked before the device registered; its connection to B then closed, and a
    binding event reaches the parked call (A's resync after a Redis reconnect): A pushes it."""
    pair = Pair()
    pair.b.parts.registrar.push_providers = ("webhook",)
    waker = pair.a.parts.b2bua.waker = RecordingWaker()
    pair.start()
    try:
        device = await pair.ua(pair.b, "tcp")
        device.send(register(device).replace(f"Contact: {device.contact}", f"Contact: {device.contact}{PUSH}"))
        await device.response(200, "REGISTER")
        device.stop()
        await wait_for(lambda: not pair.a.parts.location.lookup(AOR)[0].flow_live, "the flow closed on B")
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        await wait_for(lambda: len(waker.woken) == 1, "A to push the device for the new call")
        call = next(iter(pair.a.parts.b2bua.calls.values()))
        call.woken.clear()  # as if that push was answered: the device counts as not woken any more
        location = pair.a.parts.location
        binding = location.lookup(AOR)[0]
        location.resync([dataclasses.replace(binding, cseq=binding.cseq + 1)], announce=True)
        await wait_for(lambda: len(waker.woken) == 2, "A to push it again, not fork to its dead flow")
        assert pair.b.parts.extra["cluster_relay"].counters["flow_failed"] == 0
        assert pair.a.parts.b2bua.counters["dead_node_bindings"] == 1
    finally:
        await pair.stop()


# -- overload control on the edge node -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_overloaded_node_still_relays_the_invite_a_peer_admitted():
    """B sheds every new INVITE on its public listeners, not the one A forks to it on its internal
    listener: A admitted that call already (bench/cluster.py saw such 503s on B)."""
    pair = Pair()
    pair.start()
    try:
        device = await pair.ua(pair.b)
        device.send(register(device))
        await device.response(200, "REGISTER")
        detector = pair.b.parts.extra["overload"]
        detector._change(True, 0.0, "test")  # overloaded, admitting nothing new (fraction 0)
        detector.fraction = 0.0
        on_b = await pair.ua(pair.b)
        on_b.send(invite(on_b, _public(pair.b, "udp")[1]))
        assert (await on_b.response(503, "INVITE")).header("retry-after")
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        await device.request("INVITE")  # relayed by B
        assert pair.b.parts.extra["cluster_relay"].counters["to_device"] == 1
    finally:
        await pair.stop()
