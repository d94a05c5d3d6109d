"""Two nodes in one process, on loopback, sharing one LocationStore (issue 14, Path relay).

Node A parks the call; the device registers on node B; A forks the INVITE to B's internal listener
(the binding's first Path entry, B's flow token), B relays it over the device's flow, and the
answer, the ACK and the BYE (from either side) cross B both ways. Real sockets on the reactor,
OS-picked ports; what the tests wait on is a message or a server counter, never a sleep.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.service import make_service
from libon_tsilo.sip.message import Request, parse_message
from tests.cluster.ua import UA, response_to, tag, wait_for

AOR = "sip:bob@127.0.0.1"
SDP = "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"


def _node(name: str, internal: str = "udp", **cluster: Any) -> Any:
    cfg = config_from_dict({
        "sip": {"listen": ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"], "domains": ["127.0.0.1"]},
        "auth": {"enabled": False},
        "location": {"backend": "memory"},
        "calls": {"ring_timeout": 30, "invite_cancel_grace": 0},
        "ops": {"drain_timeout": 0},
        "cluster": {"node_id": name, "node_address": f"{internal}:127.0.0.1:0", "secret": f"secret-{name}",
                    **cluster},
    })
    return make_service(cfg)


def _public(node: Any, transport: str) -> tuple[str, int]:
    return next((h, p) for t, h, p in node.parts.transport.bound if t == transport)


class Pair:
    """Nodes A and B; B's registrar writes into A's store (what the Redis store will share)."""

    def __init__(self, internal: str = "udp", **cluster: Any) -> None:
        self.a = _node("a", internal, **cluster)
        self.b = _node("b", internal, **cluster)
        shared = self.a.parts.location
        self.b.parts.registrar.store = shared
        self.b.parts.b2bua.location = shared
        self.uas: list[UA] = []

    def start(self) -> None:
        self.a.startService()
        self.b.startService()

    async def ua(self, node: Any, transport: str = "udp") -> UA:
        ua = await UA(transport).start(_public(node, transport))
        self.uas.append(ua)
        return ua

    async def stop(self) -> None:
        for ua in self.uas:
            ua.stop()
        await self.a.stopService()
        await self.b.stopService()


def invite(caller: UA, a_port: int) -> str:
    return (
        f"INVITE sip:bob@127.0.0.1:{a_port} SIP/2.0\r\nVia: {caller.via}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:carol@127.0.0.1>;tag={tag()}\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: {tag()}@caller\r\n"
        f"CSeq: 1 INVITE\r\nContact: <sip:carol@127.0.0.1:{caller.port}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}"
    )


def register(device: UA, extra: str = "") -> str:
    return (
        f"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: {device.via}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:bob@127.0.0.1>;tag={tag()}\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: {tag()}@device\r\n"
        f"CSeq: 1 REGISTER\r\nContact: {device.contact}\r\nExpires: 600\r\n{extra}Content-Length: 0\r\n\r\n"
    )


def in_dialog(ua: UA, method: str, target: str, routes: list[str], local: str, remote: str,
              call_id: str, cseq: int) -> str:
    route_lines = "".join(f"Route: {r}\r\n" for r in routes)
    return (
        f"{method} {target} SIP/2.0\r\nVia: {ua.via}\r\nMax-Forwards: 70\r\n{route_lines}"
        f"From: {local}\r\nTo: {remote}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
        f"Content-Length: 0\r\n\r\n"
    )


async def _answered_call(pair: Pair, transport: str) -> tuple[UA, UA, Request, Any, str]:
    """Caller on A, device on B: park, register, relayed INVITE answered; returns the dialog's parts."""
    a, b = pair.a, pair.b
    caller = await pair.ua(a)
    device = await pair.ua(b, transport)
    caller.send(invite(caller, _public(a, "udp")[1]))
    await wait_for(lambda: a.parts.silo.stats()["stored_transactions"] == 1, "the call parked on A")
    device.send(register(device, "Supported: path\r\n"))
    ok = await device.response(200, "REGISTER")
    assert not ok.header_values("path"), "the internal Path entry leaked to the device"
    inv = await device.request("INVITE")
    device_tag = tag()
    contact = f"Contact: {device.contact}"
    device.send(response_to(inv, 180, "Ringing", device_tag))
    device.send(response_to(inv, 200, "OK", device_tag, (contact,), SDP))
    answer = await caller.response(200, "INVITE")
    caller.send(in_dialog(caller, "ACK", str(answer.contacts[0].uri), [], answer.header("from") or "",
                          answer.header("to") or "", answer.call_id, 1))
    await device.request("ACK")
    return caller, device, inv, answer, device_tag


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest_twisted.ensureDeferred
async def test_call_parked_on_a_is_forked_through_b_and_the_device_hangs_up(transport):
    pair = Pair()
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, transport)
        b_internal = pair.b.parts.extra["cluster_node"].bound
        binding = pair.a.parts.location.lookup(AOR)[0]
        assert f"@127.0.0.1:{b_internal[1]};transport=udp;lr" in binding.path[0]
        # B relayed it: its public Via on top of A's internal one, two Record-Route entries of B
        vias = inv.header_values("via")
        assert len(vias) == 2 and f":{_public(pair.b, transport)[1]};" in vias[0]
        rr = inv.header_values("record-route")
        assert len(rr) == 2 and f":{_public(pair.b, transport)[1]}" in rr[0] and f":{b_internal[1]};" in rr[1]
        assert int(inv.header("max-forwards") or 0) < 70
        # the device hangs up: its BYE goes to B (top Route) and from there to A's internal Contact
        bye = in_dialog(device, "BYE", str(inv.contacts[0].uri), rr,
                        f"{inv.header('to')};tag={device_tag}", inv.header("from") or "", inv.call_id, 1)
        device.send(bye)
        bye_in = await caller.request("BYE")
        caller.send(response_to(bye_in, 200, "OK"))
        await device.response(200, "BYE")
        relay = pair.b.parts.extra["cluster_relay"]
        assert relay.counters["to_device"] >= 2 and relay.counters["to_peer"] == 1
        await wait_for(lambda: not pair.a.parts.b2bua.calls, "the call ended on A")
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_bye_from_the_caller_reaches_the_device_through_b():
    pair = Pair(internal="tcp")
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, "tcp")
        caller.send(in_dialog(caller, "BYE", str(answer.contacts[0].uri), [], answer.header("from") or "",
                              answer.header("to") or "", answer.call_id, 2))
        bye = await device.request("BYE")
        assert [r for r in bye.header_values("route")] == []  # B took its own entries off
        device.send(response_to(bye, 200, "OK"))
        await caller.response(200, "BYE")
        await wait_for(lambda: not pair.a.parts.b2bua.calls, "the call ended on A")
    finally:
        await pair.stop()


def _internal(node: Any) -> tuple[str, int]:
    return node.parts.extra["cluster_node"].bound


@pytest_twisted.ensureDeferred
async def test_430_flow_failed_when_the_device_connection_is_gone():
    pair = Pair()
    pair.start()
    try:
        caller = await pair.ua(pair.a)
        device = await pair.ua(pair.b, "tcp")
        device.send(register(device))
        await device.response(200, "REGISTER")
        device.stop()  # the TCP flow on B closes; the binding stays (a device may come back)
        await wait_for(lambda: not any(f.key.transport == "tcp" and f.live for f in pair.b.parts.transport.flows),
                       "B to see the connection close")
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        relay = pair.b.parts.extra["cluster_relay"]
        await wait_for(lambda: relay.counters["flow_failed"] == 1, "B to answer 430")
        final = await caller.expect(lambda m: getattr(m, "status", 0) >= 300, "the caller's final answer")
        assert final.status != 430  # hop by hop: the caller hears of the call, not of B's flow
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_internal_listener_refuses_untrusted_sources_and_foreign_tokens():
    pair = Pair(trusted_peers=["192.0.2.0/24"])  # loopback is not trusted here
    pair.start()
    try:
        b_int = _internal(pair.b)
        peer = await UA("udp").start(b_int)
        pair.uas.append(peer)
        peer.send(in_dialog(peer, "OPTIONS", f"sip:127.0.0.1:{b_int[1]}", [], f"<sip:x@h>;tag={tag()}",
                            "<sip:y@h>", "o1@t", 1))
        answer = await peer.response(403, "OPTIONS")
        assert answer.reason == "Forbidden"
        assert pair.b.parts.extra["cluster_relay"].limit_hits()["cluster_refused_untrusted"] == 1
    finally:
        await pair.stop()
    pair = Pair()
    pair.start()
    try:
        b_int = _internal(pair.b)
        peer = await UA("udp").start(b_int)
        pair.uas.append(peer)
        forged = f"<sip:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@127.0.0.1:{b_int[1]};transport=udp;lr>"
        peer.send(in_dialog(peer, "INVITE", "sip:bob@127.0.0.1:9", [forged], f"<sip:x@h>;tag={tag()}",
                            "<sip:y@h>", "o2@t", 1))
        answer = await peer.response(403, "INVITE")
        assert answer.reason == "Not A Relayed Request"
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_device_cannot_use_its_route_towards_a_host_that_is_not_a_node():
    pair = Pair()
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        rr = inv.header_values("record-route")
        device.send(in_dialog(device, "MESSAGE", "sip:victim@192.0.2.1:5060", rr,
                              f"{inv.header('to')};tag={device_tag}", inv.header("from") or "", inv.call_id, 5))
        await device.response(403, "MESSAGE")
        assert pair.b.parts.extra["cluster_relay"].counters["refused_not_peer"] == 1
    finally:
        await pair.stop()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest_twisted.ensureDeferred
async def test_the_callers_cancel_reaches_the_device_through_b(transport):
    pair = Pair()
    pair.start()
    try:
        a_port = _public(pair.a, "udp")[1]
        caller = await pair.ua(pair.a)
        device = await pair.ua(pair.b, transport)
        text = invite(caller, a_port)
        caller.send(text)
        await wait_for(lambda: pair.a.parts.silo.stats()["stored_transactions"] == 1, "the call parked on A")
        device.send(register(device))
        inv = await device.request("INVITE")
        device.send(response_to(inv, 180, "Ringing", "dev1"))
        await caller.response(180, "INVITE")
        sent = parse_message(text.encode())
        caller.send(
            f"CANCEL sip:bob@127.0.0.1:{a_port} SIP/2.0\r\n"
            f"Via: {sent.header('via')}\r\nMax-Forwards: 70\r\nFrom: {sent.header('from')}\r\n"
            f"To: {sent.header('to')}\r\nCall-ID: {sent.call_id}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
        )
        cancel = await device.request("CANCEL")
        assert cancel.branch == inv.branch  # B's own CANCEL of its own client transaction (RFC 3261 §9.1)
        device.send(response_to(cancel, 200, "OK", "dev1"))
        device.send(response_to(inv, 487, "Request Terminated", "dev1"))
        await caller.response(487, "INVITE")
        await device.request("ACK")  # B's client transaction acknowledges the 487 hop by hop
        assert pair.b.parts.extra["cluster_relay"].counters["cancelled"] == 1
        await wait_for(lambda: not pair.a.parts.b2bua.calls, "the call ended on A")
        await wait_for(lambda: pair.b.parts.extra["cluster_relay"].stats()["pending_invites"] == 0,
                       "B to forget the relayed INVITE")
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_430_from_b_fails_over_to_the_devices_other_flow():
    """RFC 5626 §5.3: an outbound device registered over two connections to B; the newer one is gone,
    B answers 430 to the INVITE A forked over it, and A sends the branch over the other one."""
    pair = Pair()
    pair.start()
    try:
        instance = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-00000000beef>"'
        older = await pair.ua(pair.b, "tcp")
        newer = await pair.ua(pair.b, "tcp")
        for ua, reg_id in ((older, 2), (newer, 1)):
            ua.send(register(ua, "Supported: outbound, path\r\n").replace(
                f"Contact: {ua.contact}", f"Contact: {ua.contact};{instance};reg-id={reg_id}"))
            await ua.response(200, "REGISTER")
        binding = max(pair.a.parts.location.lookup(AOR), key=lambda b: b.registered_at)
        assert binding.reg_id == 1 and binding.path[0].endswith(";lr;ob>")
        newer.stop()
        await wait_for(lambda: sum(f.key.transport == "tcp" and f.live for f in pair.b.parts.transport.flows) == 1,
                       "B to see the newer connection close")
        binding.flow_live = True  # the race: A forks before it hears that the flow closed on B
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        inv = await older.request("INVITE")
        assert pair.b.parts.extra["cluster_relay"].counters["flow_failed"] == 1
        assert pair.a.parts.b2bua.counters["flow_failovers"] == 1
        older.send(response_to(inv, 486, "Busy Here", "dev2"))
        await caller.expect(lambda m: getattr(m, "status", 0) >= 300, "the caller's final answer")
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_relayed_request_with_no_hop_left_gets_483():
    pair = Pair()
    pair.start()
    try:
        node = pair.b.parts.extra["cluster_node"]
        device = await pair.ua(pair.b)
        device.send(register(device))
        await device.response(200, "REGISTER")
        route = pair.a.parts.location.lookup(AOR)[0].path[0]
        peer = await UA("udp").start(node.bound)
        pair.uas.append(peer)
        text = in_dialog(peer, "OPTIONS", f"sip:bob@127.0.0.1:{device.port}", [route], f"<sip:x@h>;tag={tag()}",
                         "<sip:bob@127.0.0.1>", "mf@t", 1).replace("Max-Forwards: 70", "Max-Forwards: 0")
        peer.send(text)
        await peer.response(483, "OPTIONS")
        assert pair.b.parts.extra["cluster_relay"].limit_hits()["cluster_too_many_hops"] == 1
        assert not [m for m in device.received if isinstance(m, Request) and m.method == "OPTIONS"]
    finally:
        await pair.stop()
