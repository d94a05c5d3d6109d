"""The UDP port's send path (twisted_io.UDPPort.write, udp_send.udp_sendto): sendto with one C-level address check instead of
Twisted's three Python-level ones per datagram (issue 15), the same errors otherwise."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import abstract, error, reactor
from twisted.internet.protocol import DatagramProtocol

from libon_tsilo.sip import twisted_io


@pytest.fixture
def port():
    p = twisted_io.UDPPort(0, DatagramProtocol(), "127.0.0.1", 65535, reactor)
    p.startListening()
    yield p
    p.stopListening()


@pytest.fixture
def receiver():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_an_ip_literal_is_sent_without_twisteds_address_checks(port, receiver, monkeypatch) -> None:
    def no_check(*_args):
        raise AssertionError("Twisted's per-datagram address check ran")

    monkeypatch.setattr(abstract, "isIPAddress", no_check)
    monkeypatch.setattr(abstract, "isIPv6Address", no_check)
    port.write(b"OPTIONS sip:x SIP/2.0\r\n\r\n", receiver.getsockname())
    assert receiver.recvfrom(100) == (b"OPTIONS sip:x SIP/2.0\r\n\r\n", port.socket.getsockname())


@pytest.mark.parametrize("host", ["localhost", "::1", "no.such.name.invalid"])
def test_a_name_or_the_other_family_is_refused_without_a_lookup(port, host) -> None:
    # what Twisted's write did: InvalidAddressError, and never a (blocking) resolution of a name
    with pytest.raises(error.InvalidAddressError):
        port.write(b"x", (host, 5060))


def test_too_long_a_datagram_is_a_message_length_error(port, receiver) -> None:
    with pytest.raises(error.MessageLengthError):
        port.write(b"x" * 70_000, receiver.getsockname())


def test_a_connected_socket_sends_a_datagram_after_an_icmp_refusal_of_an_earlier_one(receiver) -> None:
    # a pin (sip/udp_pins.py) is connected: Linux reports an ICMP port-unreachable on its next send
    # instead of sending it; udp_sendto sends it again
    import select

    from libon_tsilo.sip.udp_send import udp_sendto

    device = receiver.getsockname()
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    gone = closed.getsockname()
    closed.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as pin:
        pin.connect(gone)
        assert udp_sendto(pin, socket.AF_INET, b"1", gone)
        assert select.select([pin], [], [], 5)[0] == [pin]  # the ICMP error is pending
        pin.connect(device)  # the device is back (a new address here: the error stays pending)
        assert udp_sendto(pin, socket.AF_INET, b"2", device)
        assert receiver.recvfrom(10) == (b"2", pin.getsockname())
