"""cluster/relay.py: what a worker passes on to the worker sharing its public UDP socket
(``udp_via_path = "auto"``; the two-worker end to end: tests/e2e/test_cluster_shared_socket_e2e.py).

Node B here is a real service on loopback with OS-picked ports; the "sibling" is a plain socket
standing for the other worker's internal listener (127.0.0.1 is in ``trusted_peers``, and with no
``peers`` nor liveness a trusted host's address is a node). B is told it shares its socket (the
config check wants the Redis store for reuse_port, which this test does not need).
"""

from __future__ import annotations

import base64

import pytest
import pytest_twisted

from libon_tsilo.sip.message import Request, Response
from tests.cluster.test_relay_two_nodes import Pair, _answered_call, _node, _public, in_dialog
from tests.cluster.ua import response_to
from tests.cluster.ua import UA, branch, tag, wait_for


def _mark(where: str) -> str:
    return base64.urlsafe_b64encode(where.encode()).decode().rstrip("=")


def _response(device: UA, mark: str, status: int = 180) -> str:
    return (
        f"SIP/2.0 {status} Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch={branch()};rport=5060;nd={mark}\r\n"
        f"From: <sip:carol@127.0.0.1>;tag=a1\r\nTo: <sip:bob@127.0.0.1>;tag=d1\r\nCall-ID: {tag()}@a\r\n"
        f"CSeq: 1 INVITE\r\nContact: {device.contact}\r\nContent-Length: 0\r\n\r\n"
    )


def _bye(device: UA, target: str, to_tag: str | None = "a1") -> str:
    to = "<sip:carol@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    return (
        f"BYE {target} SIP/2.0\r\nVia: {device.via}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:bob@127.0.0.1>;tag=d1\r\nTo: {to}\r\nCall-ID: {tag()}@a\r\nCSeq: 2 BYE\r\n"
        f"Content-Length: 0\r\n\r\n"
    )


async def _setup() -> tuple[object, UA, UA, str]:
    b = _node("b")
    b.startService()
    relay = b.parts.extra["cluster_relay"]
    relay._shares = True
    sibling = await UA("udp").start(("127.0.0.1", 9))
    device = await UA("udp").start(_public(b, "udp"))
    return b, sibling, device, _mark(f"udp:127.0.0.1:{sibling.port}")


@pytest_twisted.ensureDeferred
async def test_a_response_marked_for_a_sibling_goes_there_as_it_came():
    b, sibling, device, mark = await _setup()
    try:
        relay = b.parts.extra["cluster_relay"]
        text = _response(device, mark)
        device.send(text)
        got = await sibling.response(180, "INVITE")
        assert got.to_bytes() == text.encode()  # not even our Via added: the sibling's own transaction takes it
        assert relay.counters["to_sibling_responses"] == 1
    finally:
        device.stop()
        sibling.stop()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_a_mark_naming_no_node_or_ourselves_or_on_the_internal_listener_is_not_passed_on():
    b, sibling, device, mark = await _setup()
    try:
        relay = b.parts.extra["cluster_relay"]
        node = b.parts.extra["cluster_node"]
        layer = b.parts.transactions
        device.send(_response(device, _mark("udp:192.0.2.1:6379")))  # not a trusted host: no node
        device.send(_response(device, _mark(node.member())))  # ourselves
        peer = await UA("udp").start(node.bound)  # a trusted peer, on the internal listener
        peer.send(_response(peer, mark))
        # each reached B's transaction layer instead: a stray response, dropped and counted
        await wait_for(lambda: layer.strays_dropped == 3, "three strays dropped")
        assert relay.counters["to_sibling_responses"] == 0 and not sibling.received
        peer.stop()
    finally:
        device.stop()
        sibling.stop()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_a_devices_in_dialog_request_to_a_siblings_contact_crosses_the_stateless_relay():
    b, sibling, device, mark = await _setup()
    try:
        relay = b.parts.extra["cluster_relay"]
        public = _public(b, "udp")
        target = f"sip:b2bua@127.0.0.1:{public[1]};nd={mark}"
        device.send(_bye(device, target, to_tag=None))  # outside a dialog: not passed on (B answers it)
        await device.expect(lambda m: isinstance(m, Response) and m.cseq.method == "BYE", "B's own answer")
        device.send(_bye(device, target))
        bye = await sibling.request("BYE")
        assert isinstance(bye, Request)
        vias = bye.header_values("via")
        # B's Via (its internal address, a stateless branch) on top of the device's, received/rport set
        assert len(vias) == 2 and vias[0].startswith(f"SIP/2.0/UDP 127.0.0.1:{b.parts.extra['cluster_node'].bound[1]};")
        assert bye.branch.startswith("z9hG4bKsl") and "received=127.0.0.1" in vias[1]
        assert int(bye.header("max-forwards") or 0) == 69
        ok = "\r\n".join(["SIP/2.0 200 OK", *[f"Via: {v}" for v in vias], f"From: {bye.header('from')}",
                          f"To: {bye.header('to')}", f"Call-ID: {bye.call_id}", "CSeq: 2 BYE",
                          "Content-Length: 0", "", ""])
        sibling.send(ok, b.parts.extra["cluster_node"].bound)
        await device.response(200, "BYE")  # B took its own Via off and passed it on to the device
        assert relay.counters["to_sibling"] == 1 and relay.counters["stateless_responses"] == 1
    finally:
        device.stop()
        sibling.stop()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_our_own_mark_is_known_at_once_without_reading_it_again():
    # a device pinned to this worker (sip/udp_pins.py) answers our own marked Via: each of those
    # messages costs no decoding of the mark once the first one was read
    b, sibling, device, _ = await _setup()
    try:
        node = b.parts.extra["cluster_node"]
        layer = b.parts.transactions
        own = _mark(node.member())
        device.send(_response(device, own))
        await wait_for(lambda: layer.strays_dropped == 1, "a stray dropped")  # ours: not passed on
        assert node.own_mark == own
        decoded: list[str] = []
        real = node.sibling
        node.sibling = lambda mark: decoded.append(mark) or real(mark)
        device.send(_response(device, own))
        device.send(_response(device, own, status=200))
        await wait_for(lambda: layer.strays_dropped == 3, "three strays dropped")
        assert decoded == [] and b.parts.extra["cluster_relay"].counters["to_sibling_responses"] == 0
    finally:
        device.stop()
        sibling.stop()
        await b.stopService()


@pytest.mark.parametrize("path", ["bytes", "parsed"])
@pytest_twisted.ensureDeferred
async def test_an_answer_to_what_a_sibling_relayed_goes_to_it_as_it_came(path):
    # the sibling relayed a request to the device (its stateless branch, which only the sibling's
    # key checks, under its marked Via); the device is pinned to us (we forked it a call), so the
    # kernel gives us its answer: passed on by the mark, not refused as a branch we did not give.
    # "parsed": the relay's byte path declines (as it does for what it cannot read for sure), and
    # the parsed path (Relay.forward) must pass it on the same way
    b, sibling, device, mark = await _setup()
    if path == "parsed":
        b.parts.transport.forward_bytes = None
    try:
        relay = b.parts.extra["cluster_relay"]
        layer = b.parts.transactions
        for status in (180, 200):
            text = (
                f"SIP/2.0 {status} OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKsl{'ab' * 12};rport=5060;"
                f"nd={mark}\r\nVia: SIP/2.0/UDP 10.0.0.9:5071;branch={branch()};rport=5071\r\n"
                f"From: <sip:carol@127.0.0.1>;tag=a1\r\nTo: <sip:bob@127.0.0.1>;tag=d1\r\nCall-ID: {tag()}@a\r\n"
                f"CSeq: 1 INVITE\r\nContact: {device.contact}\r\nContent-Length: 0\r\n\r\n"
            )
            device.send(text)
            got = await sibling.response(status, "INVITE")
            assert got.to_bytes() == text.encode()
        assert relay.counters["to_sibling_responses"] == 2 and relay.counters["refused_bad_branch"] == 0
        assert layer.strays_dropped == 0
    finally:
        device.stop()
        sibling.stop()
        await b.stopService()


@pytest.mark.parametrize("internal", ["udp", "tcp"])
@pytest_twisted.ensureDeferred
async def test_what_we_relay_to_a_udp_device_carries_our_mark_and_its_answers_still_come_to_us(internal):
    # a sibling the device is pinned to gets its answers to what we relay: our mark leads them back
    # (the test above); here, what we relay says who we are, and its answers that reach us are ours
    # (the bytes path, the parsed path and the stateful one: a TCP internal listener to a UDP device)
    pair = Pair(internal=internal)
    b_relay = pair.b.parts.extra["cluster_relay"]
    b_node = pair.b.parts.extra["cluster_node"]
    pair.start()
    try:
        own = _mark(b_node.member())
        b_relay._shares, b_relay._mark = True, f";nd={own}"
        b_node.own_mark = own
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        assert inv.header_values("via")[0].endswith(f";nd={own}")  # B's Via, on top of A's
        caller.send(in_dialog(caller, "BYE", str(answer.contacts[0].uri), [], answer.header("from") or "",
                              answer.header("to") or "", answer.call_id, 2))
        bye = await device.request("BYE")
        assert bye.header_values("via")[0].endswith(f";nd={own}")
        device.send(response_to(bye, 200, "OK"))
        await caller.response(200, "BYE")
        assert b_relay.counters["to_sibling_responses"] == 0 and b_relay.counters["refused_bad_branch"] == 0
    finally:
        await pair.stop()
