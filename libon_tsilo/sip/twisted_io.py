"""Twisted's side of the SIP transport: the UDP port, the protocols and the factories (interpreted).

These classes subclass Twisted's, which are interpreted Python classes, so they stay out of the
modules setup.py compiles with mypyc (sip/transport.py): they only adapt Twisted's callbacks to
the layer's entry points and hand each datagram or chunk on at once. Every decision, and all the
per-datagram work (the read loop, the Via fix, the flow lookup, the sends), is in sip/transport.py.
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, error, udp
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from libon_tsilo.sip.framing import StreamFramer
from libon_tsilo.sip.udp_send import udp_sendto

if TYPE_CHECKING:
    from libon_tsilo.sip.flow import Flow
    from libon_tsilo.sip.transport import Target, TransportLayer, UDPEndpoint

__all__ = ["UDPPort", "UDPProtocol", "StreamProtocol", "ServerFactory", "TLSServerFactory",
           "OutboundFactory", "size_buffer", "UDP_SOCKET_BUFFER"]

log = Logger()

# A loopback datagram costs ~2 KiB of receive-buffer memory whatever its size, so the default
# buffer (rmem_default, often 208 KiB) holds only ~100 SIP messages: any short stall of the
# reactor under load drops the burst behind it. Ask for more ([sip] udp_receive_buffer). The read
# loop (UDPEndpoint.drain) reads until EAGAIN, at most 256 KiB per wake-up, so a burst is drained in
# few wake-ups while streams still get their turn.
UDP_SOCKET_BUFFER = 4 * 1024 * 1024

# Linux stamps each datagram with its arrival time when SO_TIMESTAMPNS is on (SCM_TIMESTAMPNS has the
# same number): the oldest datagram's wait is the queueing delay a reactor timer cannot see
_SO_TIMESTAMPNS = 35


def size_buffer(sock: socket.socket, option: int, size: int, what: str) -> None:
    """Set a socket buffer to ``size``; past net.core.[rw]mem_max only with CAP_NET_ADMIN (FORCE).

    Linux grants twice what is asked (the bookkeeping share) and reports that doubled figure."""
    force = 33 if option == socket.SO_RCVBUF else 32  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, size)
        if sock.getsockopt(socket.SOL_SOCKET, option) // 2 < size:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            except OSError:
                pass  # not privileged: the cap stays
        got = sock.getsockopt(socket.SOL_SOCKET, option) // 2
    except OSError as e:
        log.warn("cannot size the UDP {what} buffer: {error}", what=what, error=str(e))
        return
    if got < size:
        log.warn(
            "UDP {what} buffer is {got} bytes, not the {size} asked for: raise net.core.{sysctl}",
            what=what, got=got, size=size, sysctl="rmem_max" if option == socket.SO_RCVBUF else "wmem_max",
        )


class UDPProtocol(DatagramProtocol):
    """A UDP listener's protocol: gives the compiled endpoint its port and socket, and passes on the
    datagrams of a port that reads them itself (a test double's listenUDP)."""

    def __init__(self, endpoint: UDPEndpoint, receive_buffer: int) -> None:
        self.endpoint = endpoint
        self.receive_buffer = receive_buffer

    def startProtocol(self) -> None:
        sock = getattr(self.transport, "socket", None)
        if sock is not None:
            size_buffer(sock, socket.SO_RCVBUF, self.receive_buffer, "receive")
            size_buffer(sock, socket.SO_SNDBUF, UDP_SOCKET_BUFFER, "send")
        self.endpoint.opened(self.transport, sock)

    def stopProtocol(self) -> None:
        self.endpoint.closed()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.endpoint.received(data, addr)


class UDPPort(udp.Port):
    """Twisted's UDP port, whose reads and writes are the compiled endpoint's: one call per wake-up
    reads every queued datagram (and, with overload control, the first one's kernel arrival stamp)."""

    _stamped = False
    reuse_port = False  # SO_REUSEPORT: several workers bind this port, the kernel spreads by 4-tuple

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    def startListening(self) -> None:
        super().startListening()
        if sys.platform.startswith("linux"):
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                self._stamped = True
            except OSError:
                pass

    def write(self, datagram: bytes, addr: Any = None) -> None:
        # what udp_sendto refuses (a name, a scoped IPv6 address, a connected port) takes Twisted's path
        if addr is None or not udp_sendto(self.socket, self.addressFamily, datagram, addr):
            super().write(datagram, addr)

    def doRead(self) -> None:
        protocol = self.protocol
        if isinstance(protocol, UDPProtocol):
            protocol.endpoint.drain(self.socket, self.maxPacketSize, self._stamped)
        else:  # a plain DatagramProtocol (tests of the port alone): Twisted's own loop
            super().doRead()


@implementer(IHandshakeListener)
class StreamProtocol(Protocol):
    """One TCP or TLS connection, inbound or outbound."""

    # a TCP transport, or TLS over one: what connectionMade gives (Protocol says ITransport | None)
    transport: Any

    def __init__(self, layer: TransportLayer, name: str, outbound: Target | None = None) -> None:
        self.layer = layer
        self.name = name
        self.outbound = outbound
        self.flow: Flow | None = None
        self.framer = StreamFramer(layer.max_message_size)
        self.queue: list[bytes] = []
        self.up = False
        self.failed = False  # a framing error: ignore whatever still arrives
        self.handshake_done = name != "tls"
        self.targets: list[Target] = []  # outbound: who to tell when the connection fails
        self.connector: Any = None
        self.lost: defer.Deferred[None] = defer.Deferred()
        # limits (decided by the layer): admission key, deadlines, bytes held for an incomplete message
        self.source: str | None = None  # inbound: the key ConnectionAdmission counts it under
        self.made_at = 0.0
        self.awaiting_first = False  # inbound, no complete message yet
        self.partial_since: float | None = None  # when the first byte of the incomplete message came
        self.deadline: Any = None  # IDelayedCall
        self.held = 0

    def connectionMade(self) -> None:
        self.up = True
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not a TCP socket (a test's in-memory transport), or already gone
        if self.handshake_done:
            self.targets.clear()
        self.layer.connection_made(self)
        queued, self.queue = self.queue, []
        for data in queued:
            self.transport.write(data)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.targets.clear()
        self.layer.handshake_completed(self)

    @property
    def pending(self) -> bool:
        """Not yet known to work: still connecting, or the TLS handshake is not done."""
        return not (self.up and self.handshake_done)

    def dataReceived(self, data: bytes) -> None:
        self.layer.stream_data(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.up = False
        self.layer.connection_lost(self, reason)
        if not self.lost.called:
            self.lost.callback(None)

    # Flow plumbing
    def send(self, data: bytes) -> None:
        if self.up:
            self.transport.write(data)
        else:
            self.queue.append(data)

    def close(self) -> None:
        if self.up:
            self.transport.loseConnection()
        elif self.connector is not None:
            connector, self.connector = self.connector, None
            try:
                connector.stopConnecting()
            except error.NotConnectingError:
                pass  # already failed; clientConnectionFailed does the bookkeeping

    def abort(self) -> None:
        if self.up:
            self.transport.abortConnection()


class ServerFactory(Factory):
    def __init__(self, layer: TransportLayer, name: str) -> None:
        self.layer = layer
        self.name = name

    def buildProtocol(self, addr: Any) -> Protocol | None:
        # None: over a cap, and Twisted closes the accepted socket at once
        source = self.layer.admission.admit(addr.host) if addr is not None else None
        if source is None and addr is not None:
            return None
        proto = StreamProtocol(self.layer, self.name)
        proto.source = source
        return proto


class TLSServerFactory(TLSMemoryBIOFactory):
    """TLS around ``ServerFactory`` that passes a refusal on (the stock wrapper would wrap None)."""

    def buildProtocol(self, addr: Any) -> Any:
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)


class OutboundFactory(ClientFactory):
    """Hands out the protocol created (and queued into) before the connection exists."""

    def __init__(self, proto: StreamProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.proto.layer.connect_failed(self.proto, reason)
