"""A UDP wake-up: the compiled endpoint (transport.UDPEndpoint.drain) reads every queued datagram and
hands each to the layer itself, without Twisted's read loop or the protocol's datagramReceived
(issue 15, round 4); what goes wrong with one datagram, or with the overload hook, stays with it."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock

from libon_tsilo.sip.transport import TransportLayer, UDPEndpoint
from libon_tsilo.sip.twisted_io import UDPPort, UDPProtocol
from tests.sip.tlsutil import sip_request


class Started:
    """A listening layer on the global reactor whose port the test reads by hand: the reactor does
    not run during a synchronous test, so each ``port.doRead()`` is one wake-up of the test's making."""

    def __init__(self) -> None:
        self.layer = TransportLayer(["udp:127.0.0.1:0"], Clock(), 60, 4096)
        self.got: list[str] = []
        self.layer.sink = lambda msg, flow: self.got.append(msg.call_id)
        self.layer.startService()
        [self.port] = self.layer._ports
        _, host, port = self.layer.bound[0]
        self.server = (host, port)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(5)

    def send(self, call_id: str) -> None:
        self.client.sendto(sip_request(call_id=call_id), self.server)

    def queued(self) -> int:
        """Bytes waiting in the server socket (FIONREAD: the first datagram's size, 0 when none)."""
        import fcntl
        import struct
        import termios

        raw = fcntl.ioctl(self.port.socket.fileno(), termios.FIONREAD, struct.pack("i", 0))
        return int(struct.unpack("i", raw)[0])

    def wait_queued(self) -> None:
        # loopback delivers at once, but wait for the socket to be readable rather than guess
        import select

        select.select([self.port.socket], [], [], 5)


@pytest.fixture
def started() -> Iterator[Started]:
    s = Started()
    yield s
    s.client.close()
    s.layer.stopService()


def test_the_port_and_its_endpoint_are_wired(started: Started) -> None:
    assert isinstance(started.port, UDPPort)
    assert isinstance(started.port.protocol, UDPProtocol)
    endpoint = started.port.protocol.endpoint
    assert isinstance(endpoint, UDPEndpoint) and endpoint.sock is started.port.socket
    assert started.layer._udp == [endpoint]


def test_one_wake_up_reads_every_queued_datagram_without_the_protocols_callback(started: Started) -> None:
    def not_this_way(data: bytes, addr: object) -> None:
        raise AssertionError("the wake-up went through the protocol's datagramReceived")

    started.port.protocol.datagramReceived = not_this_way  # type: ignore[method-assign]
    for n in range(3):
        started.send(f"burst-{n}")
    started.wait_queued()
    started.port.doRead()
    assert started.got == ["burst-0", "burst-1", "burst-2"]
    assert started.queued() == 0
    started.port.doRead()  # nothing queued: EAGAIN ends the wake-up quietly
    assert len(started.got) == 3


def test_a_datagram_whose_handling_fails_does_not_end_the_wake_up(started: Started) -> None:
    def sink(msg: object, flow: object) -> None:
        started.got.append(msg.call_id)  # type: ignore[attr-defined]
        if msg.call_id == "bad":  # type: ignore[attr-defined]
            raise RuntimeError("a bug above the transport")

    started.layer.sink = sink
    for call_id in ("bad", "good"):
        started.send(call_id)
    started.wait_queued()
    started.port.doRead()
    assert started.got == ["bad", "good"]
    # the bug's datagram was answered 500 (the layer's guard), the next one handled all the same
    data, _ = started.client.recvfrom(65535)
    assert data.startswith(b"SIP/2.0 500 ")


def test_an_overload_hook_that_fails_costs_neither_the_datagram_nor_the_port(started: Started) -> None:
    # the wait of the wake-up's first datagram goes to on_queue_delay (overload control); a bug there
    # must not escape doRead: the reactor would take it for the port's failure and close the port
    def broken(delay: float) -> None:
        raise RuntimeError("overload detector bug")

    started.layer.on_queue_delay = broken
    started.send("first")
    started.send("second")
    started.wait_queued()
    started.port.doRead()
    assert started.got == ["first", "second"]
    assert started.port.connected
