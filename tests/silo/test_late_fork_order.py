"""The late-forked INVITE never overtakes the 200 OK of the REGISTER that woke it: the whole service
tree (make_service on a Clock, memory store) with a fake UDP socket recording every datagram sent.

Order matters to the phone: an app woken by a push re-registers and must see its REGISTER succeed
before the call arrives (over TCP both used to leave in one segment, the INVITE first)."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.service import make_service

CALLER = ("127.0.0.1", 16000)
DEVICE = ("127.0.0.1", 17000)
SDP = "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"
INVITE = (
    "INVITE sip:bob@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:16000;branch=z9hG4bK-i1;rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:caller@127.0.0.1:16000>;tag=c1\r\n"
    "To: <sip:bob@127.0.0.1:5060>\r\n"
    "Call-ID: i1@test\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:caller@127.0.0.1:16000>\r\n"
    "Content-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP)}\r\n\r\n{SDP}"
)
REGISTER = (
    "REGISTER sip:127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:17000;branch=z9hG4bK-r1;rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:bob@127.0.0.1>;tag=r1\r\n"
    "To: <sip:bob@127.0.0.1>\r\n"
    "Call-ID: r1@test\r\n"
    "CSeq: 1 REGISTER\r\n"
    "Contact: <sip:bob@127.0.0.1:17000;transport=udp>\r\n"
    "Expires: 600\r\n"
    "Content-Length: 0\r\n\r\n"
)


def _server() -> tuple[Any, list[tuple[bytes, tuple[str, int]]], Any]:
    cfg = config_from_dict({
        "sip": {"listen": ["udp:127.0.0.1:5060"], "domains": ["127.0.0.1"]},
        "auth": {"enabled": False},
        "location": {"backend": "memory"},
        "calls": {"ring_timeout": 30, "invite_cancel_grace": 0},
    })
    clock = Clock()
    clock.advance(1_000_000)
    root = make_service(cfg, clock=clock)
    outbox: list[tuple[bytes, tuple[str, int]]] = []

    class FakeSocket:
        local = ("127.0.0.1", 5060)
        v6 = False

        def send_to(self, data: bytes, addr: tuple[str, int]) -> None:
            outbox.append((data, addr))

    sock = FakeSocket()
    transport = root.parts.transport
    transport.add_udp_endpoint(sock)

    def feed(data: str, addr: tuple[str, int]) -> None:
        transport.datagram_received(sock, data.encode(), addr)

    return root, outbox, feed


def test_the_200_ok_goes_out_before_the_forked_invite() -> None:
    root, outbox, feed = _server()
    feed(INVITE, CALLER)
    assert root.parts.silo.stats()["stored_transactions"] == 1  # parked: bob has no binding
    outbox.clear()
    feed(REGISTER, DEVICE)
    to_device = [data.split(b"\r\n", 1)[0] for data, addr in outbox if addr == DEVICE]
    assert to_device == [b"SIP/2.0 200 OK", b"INVITE sip:bob@127.0.0.1:17000;transport=udp SIP/2.0"]
    assert root.parts.silo.stats()["added_branches"] == 1


def test_over_tcp_the_200_ok_is_written_before_the_invite() -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from libon_tsilo.sip.twisted_io import ServerFactory

    root, _outbox, feed = _server()
    feed(INVITE, CALLER)
    proto = ServerFactory(root.parts.transport, "tcp").buildProtocol(None)
    wire = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 5060), peerAddress=IPv4Address("TCP", "127.0.0.1", 17001)
    )
    proto.makeConnection(wire)
    register = (REGISTER.replace("SIP/2.0/UDP 127.0.0.1:17000", "SIP/2.0/TCP 127.0.0.1:17001")
                .replace("17000;transport=udp", "17001;transport=tcp"))
    proto.dataReceived(register.encode())
    starts = [line for line in wire.value().split(b"\r\n") if line.startswith((b"SIP/2.0 ", b"INVITE "))]
    assert starts == [b"SIP/2.0 200 OK", b"INVITE sip:bob@127.0.0.1:17001;transport=tcp SIP/2.0"]
