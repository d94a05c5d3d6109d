"""The transaction layer and UASCore on the real TransportLayer over loopback UDP.

Sockets run on the reactor; every protocol timer runs on a Clock, so retransmission timing stays
deterministic. This checks the wiring (sink, flows, response routing), not the state machines.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from libon_tsilo.sip.message import Request, make_response, parse_message
from libon_tsilo.sip.transaction import ServerTransaction, TransactionLayer
from libon_tsilo.sip.transport import Target, TransportLayer
from libon_tsilo.sip.uas_core import UASCore
from tests.sip.tlsutil import UDPPeer, sip_request, wait


class CoreTU:
    """A TU that lets UASCore answer what it can and rejects the rest with 480."""

    def __init__(self) -> None:
        self.core = UASCore()
        self.acks: list[Request] = []

    def request_received(self, request: Request, stx: ServerTransaction | None, flow) -> None:
        if stx is None:
            self.acks.append(request)
            return
        resp = self.core.answer(request) or make_response(request, 480, to_tag="tu1")
        stx.respond(resp)

    def cancel_received(self, cancel, invite_stx, flow, stx) -> None:
        raise AssertionError("no CANCEL expected")

    def stray_response(self, response, flow) -> None:
        raise AssertionError("no stray expected")


@pytest.fixture
def stack():
    clock = Clock()
    transport = TransportLayer(["udp:127.0.0.1:0"], clock, 60, 4096)
    layer = TransactionLayer(transport, clock)
    layer.tu = CoreTU()
    transport.startService()
    peer = UDPPeer()
    port = reactor.listenUDP(0, peer, interface="127.0.0.1")
    server_port = next(p for t, _, p in transport.bound if t == "udp")
    yield layer, clock, peer, port.getHost().port, ("127.0.0.1", server_port)
    layer.stop()
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(transport.stopService())
    assert clock.getDelayedCalls() == []


async def _next_response(peer: UDPPeer):
    data, _ = await wait(peer.next())
    return parse_message(data)


@pytest_twisted.ensureDeferred
async def test_options_is_answered_by_uas_core_over_udp(stack) -> None:
    layer, clock, peer, pport, server = stack
    peer.send(sip_request("OPTIONS", via=f"SIP/2.0/UDP 127.0.0.1:{pport};branch=z9hG4bK-i1"), server)
    resp = await _next_response(peer)
    assert resp.status == 200 and "INVITE" in resp.header_values("Allow")
    assert len(layer) == 1  # Completed, waiting out timer J
    clock.advance(64 * layer.t1)
    assert len(layer) == 0


@pytest_twisted.ensureDeferred
async def test_rejected_invite_is_retransmitted_then_acked(stack) -> None:
    layer, clock, peer, pport, server = stack
    via = f"SIP/2.0/UDP 127.0.0.1:{pport};branch=z9hG4bK-i2"
    peer.send(sip_request("INVITE", via=via), server)
    assert (await _next_response(peer)).status == 100
    assert (await _next_response(peer)).status == 480
    clock.advance(layer.t1)  # timer G
    assert (await _next_response(peer)).status == 480
    ack = sip_request("ACK", via=via).replace(b"<sip:bob@example.com>\r\n", b"<sip:bob@example.com>;tag=tu1\r\n")
    peer.send(ack, server)
    # datagrams on loopback arrive in order: once this OPTIONS is answered, the ACK was handled
    peer.send(sip_request("OPTIONS", via=f"SIP/2.0/UDP 127.0.0.1:{pport};branch=z9hG4bK-i3"), server)
    assert (await _next_response(peer)).status == 200
    assert layer.tu.acks == []  # absorbed by the transaction
    clock.advance(layer.t4)  # timer I; timer J of the OPTIONS still runs
    assert len(layer) == 1
    clock.advance(64 * layer.t1)
    assert len(layer) == 0


@pytest_twisted.ensureDeferred
async def test_client_transaction_over_udp_gets_the_peer_response(stack) -> None:
    layer, clock, peer, pport, server = stack
    host, port = layer.transport.local_via("udp")
    req = parse_message(sip_request("OPTIONS", via=f"SIP/2.0/UDP {host}:{port};branch=z9hG4bK-c1;rport"))
    got: Deferred = Deferred()
    layer.send_request(req, Target("udp", "127.0.0.1", pport), None, got.callback)
    data, _ = await wait(peer.next())
    peer.send(make_response(parse_message(data), 200, to_tag="p1").to_bytes(), server)
    assert (await wait(got)).status == 200
    clock.advance(layer.t4)  # timer K
    assert len(layer) == 0

