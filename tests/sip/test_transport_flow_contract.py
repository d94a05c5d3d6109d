"""The transport reads of a Flow what every layer reads (tests/fakes/sip.py: ``key``, ``id`` and
``live``), never the interpreted Flow's convenience properties: each of those was a Python call on
the compiled per-message path (issue 15, round 6), and a flow object without them still works."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.sip.message import make_response, parse_message
from libon_tsilo.sip.transport import TransportLayer
from tests.fakes.sip import FakeFlow
from tests.sip.tlsutil import sip_request


class MemorySocket:
    """An in-memory UDP listener (TransportLayer.add_udp_endpoint): what is sent lands in ``sent``."""

    local = ("127.0.0.1", 5060)
    v6 = False

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def send_to(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def test_a_response_goes_out_over_a_flow_known_by_its_key_only() -> None:
    layer = TransportLayer([], Clock(), 60, 4096)
    sock = MemorySocket()
    layer.add_udp_endpoint(sock)
    req = parse_message(sip_request(via="SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK-k1"))
    flow = FakeFlow("udp", ("192.0.2.1", 5070), local=sock.local)
    layer.send_response(make_response(req, 200), flow)
    assert len(sock.sent) == 1
    data, addr = sock.sent[0]
    assert addr == ("192.0.2.1", 5070) and data.startswith(b"SIP/2.0 200 OK\r\n")


def test_a_response_follows_received_and_rport_whether_or_not_they_name_the_flow() -> None:
    """The short cut for the received the transport wrote itself (the flow's own remote host) sends
    where the full checks send; a received naming another host still goes there (RFC 3581 §4)."""
    layer = TransportLayer([], Clock(), 60, 4096)
    sock = MemorySocket()
    layer.add_udp_endpoint(sock)
    flow = FakeFlow("udp", ("198.51.100.4", 40000), local=sock.local)
    for via, expected in [
        ("SIP/2.0/UDP phone.invalid:5070;branch=z9hG4bK-a;rport=40000;received=198.51.100.4",
         ("198.51.100.4", 40000)),
        ("SIP/2.0/UDP phone.invalid:5070;branch=z9hG4bK-b;received=198.51.100.4", ("198.51.100.4", 5070)),
        ("SIP/2.0/UDP phone.invalid;branch=z9hG4bK-c;received=198.51.100.4", ("198.51.100.4", 5060)),
        ("SIP/2.0/UDP phone.invalid:5070;branch=z9hG4bK-d;rport=41000;received=203.0.113.9",
         ("203.0.113.9", 41000)),
        ("SIP/2.0/UDP 203.0.113.10:5080;branch=z9hG4bK-e", ("203.0.113.10", 5080)),
    ]:
        req = parse_message(sip_request(via=via))
        layer.send_response(make_response(req, 200), flow)
        assert sock.sent[-1][1] == expected, via
    assert len(sock.sent) == 5
