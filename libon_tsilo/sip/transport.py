"""SIP over UDP, TCP and TLS: listening ports, inbound parsing, response routing, outbound connections.

TransportLayer is a twisted Service. Every inbound message is parsed, validated and handed to
``sink(msg, flow)``; the transaction layer sets ``sink`` and ``on_send_error``. Public surface:
``bound`` (the (transport, host, port) actually listened on, port 0 resolved), ``flows`` (FlowTable),
``send_request``, ``send_response``, ``local_via(transport, remote_host=None)`` (IPv6 hosts bracketed)
and ``Target(transport, host, port, server_name=None)``. The protocol classes (sip/twisted_io.py) are
thin adapters that call the layer's inbound entry points (``datagram_received``, ``connection_made``,
``stream_data``, ``handshake_completed``, ``connection_lost``, ``connect_failed``), as twisted.names'
protocols call ``controller.messageReceived``.

This module is compiled by mypyc (setup.py; pure Python where it cannot be): per datagram, the read
loop of a wake-up (``UDPEndpoint.drain``), the parse hand-off, the Via fix, the flow lookup and the
sends run without an interpreted frame of ours. So its classes are final and their methods read-only:
``send_request`` and ``send_response`` are attributes (ops/metrics.py wraps them), the Service
contract is written out, and a test's in-memory UDP socket comes in through ``add_udp_endpoint``.

Choices (and where they differ from a plain reading of the RFCs):

- Inbound requests (every transport): ``received`` is set on the top Via when the source IP differs
  from the sent-by host, always when ``rport`` is present, and over any ``received`` the client wrote
  itself (the registrar stores it as the device's address: it must be the source's); ``rport``
  present is (re)set to the source port. RFC 3581 only asks to fill an empty rport; overwriting a
  client-supplied value too keeps a client from steering our responses to another port.
- Responses (RFC 3261 §18.2.2 + RFC 3581 §4): over a stream, the connection the request came on when
  it is still open, else a connection to ``received`` (or sent-by host) at the sent-by port. Over UDP:
  ``maddr`` first (when it is an IP literal), then ``received`` with ``rport`` (or the sent-by port),
  then sent-by. No DNS is resolved for responses: a sent-by name without ``received`` goes to the
  flow's remote address, or is dropped when there is no flow.
- Unparseable input: when Via and CSeq can be read (a client matches a response by those two), the
  400 (or the ParseError's status, e.g. 505/513) goes straight back to the packet's source over the
  flow it came on: never to an address taken from a header we could not fully parse. Responses and
  ACKs are never answered. A stream
  framing error (missing Content-Length, oversize, endless header section) also closes the connection.
- Keep-alives: CRLFCRLF on a stream is answered with CRLF (RFC 5626 §3.5.1); a CRLF-only datagram just
  refreshes the UDP pseudo-flow.
- Outbound (send_request): a given live flow is used as is. Otherwise UDP sends from the listening
  socket of the target's address family; TCP/TLS reuse any live connection to the target address
  (RFC 3261 §18.1.1), else open one. Data written before the connection is up is queued. The TLS client
  verifies the server (service_identity) against ``Target.server_name`` or ``Target.host``.
- Errors: what is known synchronously (no listener for the address family, a UDP write that fails,
  an unsupported transport) raises TransportError from send_request, which the transaction layer
  turns into a 503. What is only known later (connect refused or timed out, TLS handshake or
  certificate failure, DNS failure for a UDP target name) is reported through ``on_send_error(target,
  reason)`` once per target that queued data on the failed connection. A UDP target given by name is
  resolved asynchronously (never the response path) and send_request returns None for it.
- Limits (``ConnectionLimits``, sip/connlimits.py): inbound connections are capped in total and per
  source, and refused at accept, before any protocol object exists. A connection must finish its TLS
  handshake within ``tls_handshake_timeout``; an accepted one must send its first complete message
  within ``message_timeout`` of the accept, and every message must be complete within
  ``message_timeout`` of its first byte (slowloris): otherwise the connection is aborted. Keep-alives
  neither start nor satisfy these clocks. The bytes held for incomplete messages, over all
  connections, are capped by ``max_buffered_bytes``: the connection whose data passes it is closed.
  Every limit that bites is counted (``counters``, ``admission.refused``, ``flows.evicted``) and
  logged at most once per 10 s per kind.
- Every stream socket, accepted or connected, TCP or TLS, has TCP_NODELAY: a SIP message is written
  whole, and Nagle would hold its last segment until the peer's delayed ACK (~40 ms per message).
- UDP pseudo-flows: created by a datagram that carries a message (a CRLF keep-alive only refreshes
  a flow that exists), expired after the unbound idle timeout unless a binding or a call needs them,
  and capped (the oldest unneeded one is evicted): see sip/flow.py.
- Pins (sip/udp_pins.py, ``pin_udp``): on a UDP listener bound with ``reuse_port``, a socket
  connected to one device, read as that listener, through which every send to the device goes; it
  brings the device's datagrams to this process rather than the one the kernel's hash picks.
- Overload control (sip/overload.py) gets two hooks on UDP: ``on_queue_delay(seconds)`` per
  wake-up (the kernel's arrival stamp of the oldest datagram, Linux), and ``early(data, local,
  remote)``, which sees each datagram before the parse and may answer its source (a stateless 503)
  or drop it; and one on every transport, ``on_read()``, one-shot (cleared before it is called):
  the next datagram, connection or stream bytes read, whatever they hold, so that its timer can
  stop on an idle server and start again with the first message.
- Idle timers run on the injected ``clock``; sockets run on ``reactor`` (the global one by default).
  stopService closes every port and connection, cancels every timer, and returns a Deferred that
  fires when all ports and connections are gone.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from twisted.application.service import IService, IServiceCollection
from twisted.internet import defer
from twisted.internet.tcp import makeBinding
from twisted.internet.interfaces import IReactorTime
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from libon_tsilo import logflags
from libon_tsilo.sip.connlimits import (
    ConnectionAdmission,
    ConnectionLimits,
    effective_backlog,
    raise_fd_limit,
)
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip import stun
from libon_tsilo.sip.flow import Flow, FlowKey
from libon_tsilo.sip.flow_table import FlowTable
from libon_tsilo.sip.headers import Via
from libon_tsilo.sip.listen import (
    DEFAULT_PORTS,
    ListenSpec,
    is_ip_literal,
    is_ipv6,
    parse_listen_spec,
    same_ip,
    strip_brackets,
)
from libon_tsilo.sip.message import (
    log_call_id,
    Message,
    Request,
    Response,
    extract_for_error_response,
    make_response,
    parse_message,
)
from libon_tsilo.sip.ratelog import RateLimitedLog
from libon_tsilo.sip.twisted_io import (
    UDP_SOCKET_BUFFER,
    OutboundFactory,
    ServerFactory,
    StreamProtocol,
    TLSServerFactory,
    UDPPort,
    UDPProtocol,
)
from libon_tsilo.sip.udp_pins import UdpPins
from libon_tsilo.sip.udp_send import udp_sendto

__all__ = ["Target", "TransportLayer", "TransportError", "ConnectionLimits", "DatagramEndpoint",
           "UDPEndpoint", "fix_via"]

# compiled by mypyc (setup.py): Logger() would take its namespace from the importing frame
log = Logger(namespace="libon_tsilo.sip.transport")

HostPort = tuple[str, int]
Sink = Callable[[Message, Flow], None]
SendErrorCallback = Callable[["Target", str], None]

_STREAMS = ("tcp", "tls")
_SHUTDOWN_GRACE = 5.0  # seconds for connections to close before they are aborted


class TransportError(Exception):
    """A message could not be handed to the network (known at once, while sending)."""


@dataclass(init=False)
class Target:
    transport: str  # "udp" | "tcp" | "tls" (case-insensitive)
    host: str  # IP literal (IPv6 with or without brackets) or a name
    port: int
    server_name: str | None = None  # TLS: the identity to verify, when it is not ``host``
    # UDP: the listener (bound host, port) to send from, when it is not the first of the family
    # (a cluster node reaches its peers from its internal listener, ops/cluster wiring)
    local: HostPort | None = None

    # written out: compiled with mypyc, the generated __init__ stays interpreted (three per call)
    def __init__(self, transport: str, host: str, port: int, server_name: str | None = None,
                 local: HostPort | None = None) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.server_name = server_name
        self.local = local


# The hosts the per-message paths normalise (each datagram's source, each request's target): a dict
# read each, not an lru_cache call (a key tuple, its hash and the cache's own bookkeeping, ~1.2k
# instructions: a forked call sent ~12 of them on a node forking to another node's binding, for the
# two checks per request sent without a flow). Cleared when full: a source that changes address
# with every datagram costs a parse each, never memory.
_HOSTS_MAX: Final = 4096
_norm_hosts: Final[dict[str, str]] = {}  # host -> _norm_host(host)
_ip_texts: Final[dict[str, str]] = {}  # host -> _ip_text(host)


def _canonical(host: str) -> str:
    host = strip_brackets(host)
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _norm_host(host: str) -> str:
    """Canonical text of an IP literal (bare IPv6), lower-case name otherwise; used in flow keys."""
    norm = _norm_hosts.get(host)
    if norm is None:
        norm = _canonical(host)
        if len(_norm_hosts) >= _HOSTS_MAX:
            _norm_hosts.clear()
        _norm_hosts[host] = norm
    return norm


def _ip_text(host: str) -> str:
    """Canonical text of an IP literal (bare IPv6, brackets allowed), "" for a name."""
    text = _ip_texts.get(host)
    if text is None:
        text = _canonical(host) if is_ip_literal(host) else ""
        if len(_ip_texts) >= _HOSTS_MAX:
            _ip_texts.clear()
        _ip_texts[host] = text
    return text


def _via_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def fix_via(via: Via, source: HostPort) -> bool:
    """Set ``received`` and ``rport`` on a received request's top Via from its source (RFC 3261
    §18.2.1, RFC 3581); True when it changed. The stateless forwarder of bytes does it too."""
    has_rport = "rport" in via.params
    changed = False
    if has_rport and via.params["rport"] != str(source[1]):
        via.set_param("rport", str(source[1]))
        changed = True
    # a received the client wrote itself is a lie we must not route by (RFC 3261 §18.2.1 has us
    # set it): it would point the device's binding, and our responses, at a host of its choosing
    claimed = via.params.get("received")
    if (has_rport or claimed is not None or not same_ip(via.host, source[0])) and claimed != source[0]:
        via.set_param("received", source[0])
        changed = True
    return changed


def _call_id_of(data: bytes) -> str | None:
    """The Call-ID of a message held as bytes, for a log line (None when it does not parse)."""
    try:
        return log_call_id(parse_message(data))
    except ParseError:
        return None


class DatagramEndpoint(Protocol):
    """What the layer needs of a UDP listener: its bound address and a send. ``UDPEndpoint`` is the
    real one; tests and benchmarks give an in-memory one (``TransportLayer.add_udp_endpoint``)."""

    local: HostPort
    v6: bool

    def send_to(self, data: bytes, addr: HostPort) -> None: ...


# Linux: SO_TIMESTAMPNS's control message (SCM_TIMESTAMPNS has the same number), a struct timespec
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")
# what one wake-up reads at most (Twisted's udp.Port.maxThroughput): a burst is drained in few
# wake-ups while the streams and timers still get their turn
_MAX_READ_PER_WAKEUP = 256 * 1024


class UDPEndpoint:
    """One UDP listener's per-datagram work, compiled: the read loop of a wake-up and the sends.

    The Twisted port and protocol (sip/twisted_io.py, interpreted) own the socket and call
    ``drain`` once per wake-up; ``drain`` reads every queued datagram and hands each to
    ``TransportLayer.datagram_received`` without an interpreted frame in between. Sends go straight
    to ``sendto`` (``udp_sendto``); a port without a socket of its own (a test double) gets ``write``.
    """

    def __init__(self, layer: TransportLayer, spec: ListenSpec) -> None:
        self.layer = layer
        self.local: HostPort = (spec.host, spec.port)
        self.v6 = is_ipv6(spec.host)
        self.port: Any = None  # Twisted's port (or a test reactor's): write(data, addr)
        self.sock: Any = None  # its socket, when it has one
        self.family = socket.AF_INET6 if self.v6 else socket.AF_INET
        self.used = False  # a datagram went out (or, for a pin, came in) since a sweep (udp_pins.py)

    def opened(self, port: Any, sock: Any) -> None:
        self.port = port
        self.sock = sock
        if sock is not None:
            self.family = sock.family

    def closed(self) -> None:
        self.port = None
        self.sock = None

    def send_to(self, data: bytes, addr: HostPort) -> None:
        port = self.port
        if port is None:
            raise TransportError(f"UDP socket {self.local} is closed")
        self.used = True
        try:
            sock = self.sock
            if sock is None or not udp_sendto(sock, self.family, data, addr):
                port.write(data, addr)
        except Exception as e:  # OSError, MessageLengthError, InvalidAddressError
            raise TransportError(f"UDP send to {addr[0]}:{addr[1]} failed: {e}") from e

    def received(self, data: bytes, addr: Any) -> None:
        """A datagram a test reactor's port read itself."""
        self.layer.datagram_received(self, data, (addr[0], addr[1]))

    def drain(self, sock: Any, max_size: int, stamped: bool) -> None:
        """Read what the socket holds (up to ``_MAX_READ_PER_WAKEUP`` bytes) and handle each datagram.

        With overload control on, the first read also takes the kernel's arrival stamp: the oldest
        datagram's wait is the queueing delay a reactor timer cannot see (it runs after one read
        batch, however long the queue behind it is)."""
        layer = self.layer
        report = layer.on_queue_delay
        read = 0
        if report is not None and stamped:
            read = self._read_oldest(sock, max_size, report)
        while read < _MAX_READ_PER_WAKEUP:
            try:
                data, addr = sock.recvfrom(max_size)
            except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                return  # drained; a signal (the reactor comes back); an ICMP error of an earlier send
            read += len(data)
            try:
                layer.datagram_received(self, data, (addr[0], addr[1]))
            except Exception:
                log.failure("UDP datagram handling failed")

    def _read_oldest(self, sock: Any, max_size: int, report: Callable[[float], None]) -> int:
        """The first datagram with its arrival stamp; its size (0 when there was none)."""
        try:
            data, ancdata, _flags, addr = sock.recvmsg(max_size, 64)
        except OSError:
            return 0  # EAGAIN, or an ICMP error: the loop deals with what follows
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(payload)
                # the kernel stamps with the wall clock: compare with the wall clock
                try:
                    report(max(0.0, time.time() - sec - nsec / 1e9))
                except Exception:  # escaping doRead, it would close the port (the reactor's verdict)
                    log.failure("the queue-delay hook failed")
        try:
            self.layer.datagram_received(self, data, (addr[0], addr[1]))
        except Exception:
            log.failure("UDP datagram handling failed")
        return len(data)


# -- the layer --------------------------------------------------------------------------------------


class _SendRequest(Protocol):
    def __call__(self, req: Request, target: Target, flow: Flow | None = None) -> Flow | None: ...


class TransportLayer:
    """Listening ports, flows, inbound dispatch to ``sink`` and outbound sends.

    A twisted Service (IService, declared below the class), written out: compiled, it cannot
    subclass Service, an interpreted class (mypyc's instances of such a subclass crash the cyclic
    garbage collector). ``send_request`` and ``send_response`` are attributes holding the send
    functions, so that ops/metrics.py can wrap them per instance, as it could the methods before.
    """

    name: str | None = None
    parent: Any = None
    running = 0
    send_request: _SendRequest
    send_response: Callable[[Response, Flow | None], None]

    def __init__(
        self,
        listen: list[str],
        clock: IReactorTime,
        flow_idle_timeout: float,
        max_message_size: int,
        tls_context_factory: Any = None,
        reactor: Any = None,
        advertised_host: str | None = None,
        limits: ConnectionLimits | None = None,
        udp_receive_buffer: int = UDP_SOCKET_BUFFER,
        reuse_port: Iterable[str] = (),
        max_udp_pins: int = 0,
    ) -> None:
        self.specs = [parse_listen_spec(s) for s in listen]
        if any(s.transport == "tls" for s in self.specs) and tls_context_factory is None:
            raise ValueError("a tls: listener needs a TLS context factory (tls.certificate, tls.private_key)")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.clock = clock
        self.max_message_size = max_message_size
        self.udp_receive_buffer = udp_receive_buffer
        # the listen specs whose port other processes share (SO_REUSEPORT): the public ones of N
        # workers; never a node's own internal address, which must fail to bind when taken
        self.reuse_port = frozenset(parse_listen_spec(s) for s in reuse_port)
        self.tls_context_factory = tls_context_factory
        self.advertised_host = advertised_host or None
        self.limits = limits = limits or ConnectionLimits()
        self.flows = FlowTable(clock, flow_idle_timeout, limits.unbound_idle_timeout, limits.max_udp_flows)
        self.admission = ConnectionAdmission(limits, clock)
        # connections closed by a limit: "message_timeout", "tls_handshake_timeout", "max_buffered_bytes"
        self.counters: Counter[str] = Counter()
        self.buffered = 0  # bytes held for incomplete messages, all connections
        self._warn = RateLimitedLog(log, clock)
        self._evicted_logged = 0
        self.sink: Sink = self._no_sink
        self.on_send_error: SendErrorCallback | None = None
        # overload control (sip/overload.py): told, per UDP wake-up, how long the oldest queued
        # datagram waited; ``early`` sees each datagram before the parse: bytes to answer its
        # source with, b"" to drop it, None to handle it as usual
        self.on_queue_delay: Callable[[float], None] | None = None
        self.early: Callable[[bytes, HostPort, HostPort], bytes | None] | None = None
        # one-shot: called for the next datagram, connection or stream bytes read, on any listener,
        # and cleared first (whoever wants the one after sets it again). One `is None` test per read:
        # overload control parks its timer on an idle node and sets this to hear the next message
        self.on_read: Callable[[], None] | None = None
        # a stateless forwarder (RFC 3261 §16.11: it "takes messages, both requests and responses,
        # directly from the transport layer"; ops sets the cluster relay's): offered each parsed
        # message, a request with its top Via fixed (§18.2.1), before it is validated: a proxy reads
        # only what it routes by (§16.3 step 1). True: it took the message, nothing else sees it
        self.forward: Callable[[Message, Flow], bool] | None = None
        # the same, offered each message as received, before the parse: a forwarder that routes by
        # a few bytes (a response under its own Via) edits them and passes the rest on unread.
        # True: it took the message and passed it on (ops/metrics.py counts it in and out)
        self.forward_bytes: Callable[[bytes, Flow], bool] | None = None
        self.bound: list[tuple[str, str, int]] = []
        self._ports: list[Any] = []
        self._udp: list[DatagramEndpoint] = []
        self._udp_by_local: dict[HostPort, DatagramEndpoint] = {}
        # connected sockets on our SO_REUSEPORT UDP listeners, by the device they pin (udp_pins.py):
        # the UDP sends read ``_pinned`` (empty: one truth test), ``pin_udp`` fills it
        self.pins = UdpPins(reactor, clock, max_udp_pins)
        self._pinned: dict[HostPort, Any] = self.pins.endpoints
        self._shared_udp: dict[HostPort, UDPEndpoint] = {}  # the listeners bound with reuse_port
        self._protos: dict[str, StreamProtocol] = {}  # flow id -> connection (pending ones too)
        self._pending_resolves: set[defer.Deferred[Any]] = set()
        self._primary_ip: dict[bool, str] = {}
        # (transport, want_v6, advertised_host) -> local_via() answer; cleared when listeners change
        self._via_cache: dict[tuple[str, bool | None, str | None], tuple[str, int]] = {}
        self._backlog = self.limits.listen_backlog
        self.name = None
        self.parent = None
        self.running = 0
        self.send_request = self._send_request
        self.send_response = self._send_response_safely

    # -- service ---------------------------------------------------------------------------------

    # -- service (IService) ------------------------------------------------------------------------

    def setName(self, name: str) -> None:
        if self.parent is not None:
            raise RuntimeError("cannot change the name of a service that has a parent")
        self.name = name

    def setServiceParent(self, parent: Any) -> None:
        if self.parent is not None:
            self.disownServiceParent()
        collection = IServiceCollection(parent, parent)
        self.parent = collection
        collection.addService(self)

    def disownServiceParent(self) -> Any:
        d = self.parent.removeService(self)
        self.parent = None
        return d

    def privilegedStartService(self) -> None:
        pass

    def startService(self) -> None:
        self.running = 1
        streams = any(s.transport in _STREAMS for s in self.specs)
        if streams or self.pins.max_pins > 0:
            # a pin is a file descriptor too: room for every connection and every pin at once
            raise_fd_limit(self.limits.max_connections * streams + self.pins.max_pins)
        if streams:
            self._backlog = effective_backlog(self.limits.listen_backlog)
        for spec in self.specs:
            self._listen(spec)

    def _listen(self, spec: ListenSpec) -> None:
        endpoint: UDPEndpoint | None = None
        if spec.transport == "udp":
            endpoint = UDPEndpoint(self, spec)
            port = self._listen_udp(spec, UDPProtocol(endpoint, self.udp_receive_buffer))
        elif spec.transport == "tcp":
            port = self._listen_tcp(spec, ServerFactory(self, "tcp"))
        else:
            tls = TLSServerFactory(self._server_tls(), False, ServerFactory(self, "tls"))
            port = self._listen_tcp(spec, tls)
        self._ports.append(port)
        addr = port.getHost()
        host = strip_brackets(addr.host)
        self.bound.append((spec.transport, host, addr.port))
        self._via_cache.clear()
        if endpoint is not None:
            endpoint.local = (host, addr.port)
            endpoint.v6 = is_ipv6(host)
            self.add_udp_endpoint(endpoint)
            if spec in self.reuse_port:
                self._shared_udp[endpoint.local] = endpoint
        log.info("listening on {spec}", spec=f"{spec.transport}:{host}:{addr.port}")

    def add_udp_endpoint(self, endpoint: DatagramEndpoint) -> None:
        """Send UDP from ``endpoint`` as from a listener of ours (``_listen`` adds each UDP port; tests
        and benchmarks add an in-memory one, and feed ``datagram_received`` with it)."""
        self._udp.append(endpoint)
        self._udp_by_local[endpoint.local] = endpoint

    def _listen_tcp(self, spec: ListenSpec, factory: Any) -> Any:
        where: Any = spec.port
        if spec in self.reuse_port:  # Twisted's own SO_REUSEPORT (a Binding); SO_REUSEADDR as listenTCP
            where = makeBinding(spec.host, spec.port, reuseAddress=True, reusePort=True)
        return self.reactor.listenTCP(where, factory, backlog=self._backlog, interface=spec.host)

    def _listen_udp(self, spec: ListenSpec, proto: UDPProtocol) -> Any:
        if not isinstance(self.reactor, PosixReactorBase):  # a test double: its own listenUDP
            return self.reactor.listenUDP(spec.port, proto, interface=spec.host, maxPacketSize=65535)
        port = UDPPort(spec.port, proto, spec.host, 65535, self.reactor)
        port.reuse_port = spec in self.reuse_port
        port.startListening()
        return port

    def stopService(self) -> defer.Deferred[Any]:
        self.running = 0
        waits: list[defer.Deferred[Any]] = []
        for port in self._ports:
            d = port.stopListening()
            if isinstance(d, defer.Deferred):
                waits.append(d)
        self._ports.clear()
        self.pins.close_all()
        self._udp.clear()
        self._udp_by_local.clear()
        self._shared_udp.clear()
        for d in list(self._pending_resolves):
            d.cancel()
        streams = list(self._protos.values())
        self.flows.close_all()  # closes connections, stops pending connects, cancels idle timers
        waits += [p.lost for p in streams if not p.lost.called]
        self.bound = []
        self._via_cache.clear()
        if not waits:
            return defer.succeed(None)
        # a peer that never lets a connection finish closing must not hang shutdown
        def abort_all() -> None:
            for proto in streams:
                proto.abort()

        guard = self.reactor.callLater(_SHUTDOWN_GRACE, abort_all)
        done = defer.DeferredList(waits, consumeErrors=True)

        def _finished(result: Any) -> None:
            if guard.active():
                guard.cancel()

        done.addBoth(_finished)
        return done

    # -- public API ------------------------------------------------------------------------------

    def local_via(self, transport: str, remote_host: str | None = None) -> tuple[str, int]:
        """Sent-by (host, port) for our own Via; IPv6 hosts come bracketed, ready for a Via or URI.

        With ``remote_host`` (an IP literal), a listener of the same address family is preferred.
        """
        want_v6 = is_ipv6(remote_host) if remote_host and is_ip_literal(remote_host) else None
        ckey = (transport, want_v6, self.advertised_host)
        via = self._via_cache.get(ckey)
        if via is None:
            via = self._via_cache[ckey] = self._local_via(transport.lower(), want_v6)
        return via

    def _local_via(self, name: str, want_v6: bool | None) -> tuple[str, int]:
        candidates = [b for b in self.bound if b[0] == name] or [b for b in self.bound]
        if want_v6 is not None:
            candidates = [b for b in candidates if is_ipv6(b[1]) == want_v6] or candidates
        if not candidates:
            return (self.advertised_host or "127.0.0.1", DEFAULT_PORTS.get(name, 5060))
        _, host, port = candidates[0]
        if candidates[0][0] != name:
            port = DEFAULT_PORTS.get(name, 5060)
        if self.advertised_host:
            host = self.advertised_host
        elif host in ("0.0.0.0", "::"):
            host = self._primary(host == "::")
        return (_via_host(strip_brackets(host)), port)

    def _send_request(self, req: Request, target: Target, flow: Flow | None = None) -> Flow | None:
        """``send_request``: send ``req`` over ``flow`` when live, else towards ``target``; returns the
        flow used."""
        data = req.to_bytes()
        if flow is not None and flow.live:
            self._watch(flow, target)
            self._send_on(flow, data)
            return flow
        name = target.transport.lower()
        if name == "udp":
            return self._send_udp_request(data, target)
        if name in _STREAMS:
            return self._send_stream(data, target, name)
        raise TransportError(f"unsupported transport {target.transport!r}")

    def _send_response_safely(self, resp: Response, flow: Flow | None) -> None:
        """``send_response``: route ``resp`` per RFC 3261 §18.2.2 and RFC 3581 (see the module
        docstring); never raises."""
        try:
            self._send_response(resp, flow)
        except Exception as e:
            log.warn(
                "cannot send {status} response: {err}", status=resp.status, err=e, call_id=log_call_id(resp)
            )

    def forward_response(self, resp: Response) -> None:
        """Pass on a response a stateless proxy took its own Via off (RFC 3261 §16.11): to where its
        top Via now says, over the live flow to that address when there is one (the connection, or
        the UDP socket that address talks to: no transaction remembers the request's flow); never
        raises."""
        try:
            flow = self._flow_to_via(resp.top_via)
        except ParseError as e:
            log.info("response not forwarded: {err}", err=e.reason, call_id=log_call_id(resp))
            return
        self.send_response(resp, flow)

    def forward_response_data(self, data: bytes, via: Via) -> None:
        """``forward_response`` for a response already in bytes (its top Via, parsed, is ``via``);
        never raises."""
        try:
            self._send_response_data(data, via, self._flow_to_via(via))
        except Exception as e:
            log.warn("cannot forward a response: {err}", err=e, call_id=_call_id_of(data))

    def forward_data(self, data: bytes, target: Target, flow: Flow | None = None) -> bool:
        """Send a message a stateless forwarder made of received bytes towards ``target`` (from
        ``target.local``), over ``flow`` when it is live; never raises. False: it could not be sent
        (logged here; a request's forwarder answers its sender)."""
        try:
            name = target.transport.lower()
            if flow is not None and flow.live:
                self._send_on(flow, data)
            elif name == "udp":
                self._send_udp_request(data, target)
            else:
                self._send_stream(data, target, name)
        except Exception as e:
            log.warn("cannot forward a message: {err}", err=e, call_id=_call_id_of(data))
            return False
        return True

    def _flow_to_via(self, via: Via) -> Flow | None:
        name = via.transport.lower()
        port = via.rport or via.port or DEFAULT_PORTS.get(name, 5060)
        received = via.received  # as we wrote it from the request's source: canonical already
        host = received if received is not None else _norm_host(via.host)
        return self.flows.find_remote(name, (host, port))

    def connection_stats(self) -> dict[str, Any]:
        """Connections and what the limits did, for /rpc/stats and /metrics."""
        return {
            "inbound": self.admission.total,
            "refused": dict(self.admission.refused),
            "closed": dict(self.counters),
            "buffered_bytes": self.buffered,
            "udp_flows": self.flows.udp_count(),
            "udp_flows_evicted": self.flows.evicted,
            "udp_pins": self.pins.stats(),
        }

    # -- inbound: the entry points the protocols above call (nothing else in the layer is theirs) ---

    def datagram_received(self, proto: DatagramEndpoint, data: bytes, addr: HostPort) -> None:
        if self.on_read is not None:
            self._read_seen()
        if len(data) > self.max_message_size:
            log.warn("dropping a {n}-byte datagram from {addr} (max_message_size)", n=len(data), addr=addr)
            return
        if self.early is not None:
            try:
                answer = self.early(data, proto.local, addr)
            except Exception:
                log.failure("early hook failed on a datagram from {addr}", addr=addr)
                answer = None
            if answer is not None:
                if answer:
                    try:
                        proto.send_to(answer, addr)
                    except TransportError as e:
                        log.warn("cannot answer {addr}: {err}", addr=addr, err=e)
                return
        if data[:1] == b"\r" and not data.strip(b"\r\n"):
            # CRLF keep-alive over UDP: it refreshes a flow, and creates none (it costs a spoofer nothing)
            flow = self.flows.lookup("udp", proto.local, (_norm_host(addr[0]), addr[1]))
            if flow is not None:
                self.flows.touch(flow)
            return
        remote = (_norm_host(addr[0]), addr[1])
        if data[:1] < b"\x02":  # 0x00/0x01: STUN keep-alive (RFC 5626 §8.4); SIP starts with a letter
            stun.answer(data, remote, lambda: self._udp_flow(proto, remote))
            return
        self._inbound(data, self._udp_flow(proto, remote), stream=False)

    def _read_seen(self) -> None:
        hook, self.on_read = self.on_read, None
        if hook is not None:
            try:
                hook()
            except Exception:  # escaping a read, it would close the port or the connection
                log.failure("the on_read hook failed")

    def _udp_flow(self, proto: DatagramEndpoint, remote: HostPort) -> Flow:
        flow = self.flows.lookup("udp", proto.local, remote)
        if flow is None:
            key = FlowKey("udp", proto.local, remote)
            flow = Flow(key, self.flows.new_id(key), lambda data: proto.send_to(data, remote))
            self.flows.add(flow)
            if self.flows.evicted != self._evicted_logged:
                self._evicted_logged = self.flows.evicted
                self._warn.warn(
                    "udp_evict",
                    "UDP flow table full (connections.max_udp_flows = {cap}): evicting the oldest "
                    "unregistered flows ({n} so far)", cap=self.flows.max_udp_flows, n=self.flows.evicted,
                )
        else:
            self.flows.touch(flow)
        return flow

    def connection_made(self, proto: StreamProtocol) -> None:
        if self.on_read is not None:  # a connection is work before its first byte (a TLS handshake)
            self._read_seen()
        host, peer = proto.transport.getHost(), proto.transport.getPeer()
        key = FlowKey(proto.name, (_norm_host(host.host), host.port), (_norm_host(peer.host), peer.port))
        proto.made_at = self.clock.seconds()
        if proto.flow is None:
            flow = Flow(key, self.flows.new_id(key), proto.send, proto.close)
            proto.flow = flow
            proto.awaiting_first = True  # an accepted connection owes us a message
            self._protos[flow.id] = proto
            self.flows.add(flow)
            if logflags.debug_enabled:
                log.debug("new {transport} flow {flow_id}", transport=proto.name, flow_id=flow.id)
        else:
            self.flows.rekey(proto.flow, key)
            self.flows.touch(proto.flow)
        self._arm_deadline(proto)

    def stream_data(self, proto: StreamProtocol, data: bytes) -> None:
        if self.on_read is not None:
            self._read_seen()
        flow = proto.flow
        if proto.failed or flow is None:
            return
        self.flows.touch(flow)
        failure: ParseError | None = None
        try:
            items = proto.framer.feed(data)
        except ParseError as e:
            # messages framed before the bad one (when the framer hands them over) still count
            items, failure = list(getattr(e, "framed", ())), e
        framer = proto.framer
        if items or len(framer) or proto.held:
            self._track_incomplete(proto, bool(items))
            if proto.failed:
                return  # aborted (too many bytes held): its flow stays live until the abort is reported
        for kind, payload in items:
            if kind == "msg":
                proto.awaiting_first = False
                self._inbound(payload, flow, stream=True)
            elif kind == "ping":
                proto.send(b"\r\n")
            if not flow.live:
                return
        if failure is not None:
            proto.failed = True
            log.warn("framing error on {flow_id}: {why}; closing", flow_id=flow.id, why=failure.reason)
            self._answer_unparseable(getattr(failure, "data", data), failure, flow)
            proto.close()

    def handshake_completed(self, proto: StreamProtocol) -> None:
        # the TLS handshake clock stops; the message clock may start
        self._arm_deadline(proto)

    def connection_lost(self, proto: StreamProtocol, reason: Failure | None) -> None:
        flow = proto.flow
        why = reason.getErrorMessage() if reason is not None else "connection lost"
        self._release(proto)
        if flow is not None:
            self._protos.pop(flow.id, None)
            if logflags.debug_enabled:
                log.debug("flow {flow_id} closed: {why}", flow_id=flow.id, why=why)
            self.flows.closed(flow)
        if proto.targets:  # an outbound TLS connection that never completed its handshake
            self._report_failure(proto, f"TLS handshake failed: {why}")

    # -- connection limits -------------------------------------------------------------------------

    def _track_incomplete(self, proto: StreamProtocol, framed: bool) -> None:
        """After a feed: when the incomplete message started, and the bytes held, against their caps."""
        framer = proto.framer
        held = len(framer)
        grew = held > proto.held
        self.buffered += held - proto.held
        proto.held = held
        if framer.incomplete:
            if proto.partial_since is None or framed:  # a new message began in this chunk
                proto.partial_since = self.clock.seconds()
                self._arm_deadline(proto)
        else:
            proto.partial_since = None
        cap = self.limits.max_buffered_bytes
        if cap and self.buffered > cap and grew:  # whoever adds to the pile over the cap, not all
            self._close_for("max_buffered_bytes", proto, f"{self.buffered} bytes held for incomplete "
                                                         f"messages over all connections, cap {cap}")

    def _deadline(self, proto: StreamProtocol) -> tuple[float, str, str] | None:
        """The earliest of the clocks running on ``proto``: (when, counter name, why)."""
        limits = self.limits
        found: tuple[float, str, str] | None = None
        if not proto.handshake_done and limits.tls_handshake_timeout > 0:
            found = (proto.made_at + limits.tls_handshake_timeout, "tls_handshake_timeout",
                     f"TLS handshake not done in {limits.tls_handshake_timeout:g} s")
        if limits.message_timeout > 0:
            if proto.awaiting_first:
                when = proto.made_at + limits.message_timeout
                why = f"no complete message {limits.message_timeout:g} s after the accept"
            elif proto.partial_since is not None:
                when = proto.partial_since + limits.message_timeout
                why = f"a message still incomplete {limits.message_timeout:g} s after its first byte"
            else:
                return found
            if found is None or when < found[0]:
                found = (when, "message_timeout", why)
        return found

    def _arm_deadline(self, proto: StreamProtocol) -> None:
        # one timer per connection at most; it re-reads the state when it fires (no cancel per message)
        if proto.deadline is not None or not proto.up:
            return
        found = self._deadline(proto)
        if found is not None:
            delay = max(found[0] - self.clock.seconds(), 0.0)
            proto.deadline = self.clock.callLater(delay, self._deadline_reached, proto)

    def _deadline_reached(self, proto: StreamProtocol) -> None:
        proto.deadline = None
        flow = proto.flow
        if not proto.up or flow is None or not flow.live:
            return
        found = self._deadline(proto)
        if found is None:
            return
        if found[0] > self.clock.seconds():
            self._arm_deadline(proto)
            return
        self._close_for(found[1], proto, found[2])

    def _close_for(self, limit: str, proto: StreamProtocol, why: str) -> None:
        """A limit bit: count it, log it (rate-limited) and abort the connection (no lingering)."""
        self.counters[limit] += 1
        flow_id = proto.flow.id if proto.flow is not None else "?"
        self._warn.warn(limit, "closing {flow_id}: {why} (connections.{limit})", flow_id=flow_id, why=why,
                        limit=limit)
        proto.failed = True
        self._drop_held(proto)  # now, not when the abort is reported: others may go on meanwhile
        proto.abort()

    def _release(self, proto: StreamProtocol) -> None:
        """The connection is gone: its admission slot, deadline timer and held bytes go with it."""
        if proto.source is not None:
            self.admission.release(proto.source)
            proto.source = None
        if proto.deadline is not None:
            if proto.deadline.active():
                proto.deadline.cancel()
            proto.deadline = None
        self._drop_held(proto)

    def _drop_held(self, proto: StreamProtocol) -> None:
        self.buffered -= proto.held
        proto.held = 0
        # a connection and its flow refer to each other: only the cyclic collector (which runs
        # rarely, ops/gctune.py) frees them, so what they hold big is dropped now
        proto.framer.clear()

    def connect_failed(self, proto: StreamProtocol, reason: Failure) -> None:
        proto.connector = None
        # the flow is dead before anyone hears of the failure, so a retry opens a new connection
        if proto.flow is not None:
            self._protos.pop(proto.flow.id, None)
            self.flows.closed(proto.flow)
        self._report_failure(proto, f"connect failed: {reason.getErrorMessage()}")
        if not proto.lost.called:
            proto.lost.callback(None)

    def _report_failure(self, proto: StreamProtocol, reason: str) -> None:
        targets, proto.targets = proto.targets, []
        proto.queue.clear()
        for target in targets:
            self._notify_error(target, reason)

    def _inbound(self, data: bytes, flow: Flow, stream: bool) -> None:
        forward = self.forward
        try:
            raw = self.forward_bytes
            if raw is not None and self._forwarded(raw, data, flow):
                return
            msg = parse_message(data, stream=stream)
            if forward is not None:
                if isinstance(msg, Request):
                    self._fix_via(msg, flow.key.remote)
                if self._forwarded(forward, msg, flow):
                    return
            msg.validate()
        except ParseError as e:  # a header the forwarder read, or the validation
            self._answer_unparseable(data, e, flow)
            return
        except Exception:
            log.failure("parser crashed on input from {flow_id}", flow_id=flow.id)
            return
        if isinstance(msg, Request) and forward is None:
            try:
                self._fix_via(msg, flow.key.remote)
            except ParseError as e:  # validate() read the Via; kept for safety
                self._answer_unparseable(data, e, flow)
                return
        try:
            self.sink(msg, flow)
        except Exception:
            log.failure("sink failed on {msg!r}", msg=msg, call_id=log_call_id(msg))
            if isinstance(msg, Request) and msg.method != "ACK":
                self._answer_directly(make_response(msg, 500, "Server Internal Error"), flow)

    @staticmethod
    def _forwarded(forward: Callable[[Any, Flow], bool], msg: Message | bytes, flow: Flow) -> bool:
        """Offer ``msg`` to the stateless forwarder. Its bug is logged and the message dropped: it may
        have sent it already, and the sender's retransmission is the retry."""
        try:
            return forward(msg, flow)
        except ParseError:
            raise
        except Exception:
            log.failure("stateless forward failed on {msg!r}", msg=msg, call_id=log_call_id(msg))
            return True

    def _fix_via(self, req: Request, source: HostPort) -> None:
        via = req.top_via
        if fix_via(via, source):
            req.set_top_via(via)

    def _answer_unparseable(self, data: bytes, err: ParseError, flow: Flow) -> None:
        req = extract_for_error_response(data)
        # an ACK is never answered (RFC 3261 §17): the 400 would go unmatched, and to a spoofed source
        if req is None or req.method == "ACK":
            log.info("dropping unparseable input from {flow_id}: {why}", flow_id=flow.id, why=err.reason)
            return
        log.info(
            "answering {status} to {flow_id}: {reason}",
            status=err.status, flow_id=flow.id, reason=err.reason, call_id=req.header("call-id"),
        )
        self._answer_directly(make_response(req, err.status, err.reason), flow)

    def _answer_directly(self, resp: Response, flow: Flow) -> None:
        try:
            self._send_on(flow, resp.to_bytes())
        except Exception as e:
            log.warn("cannot answer {flow_id}: {err}", flow_id=flow.id, err=e)

    # -- outbound --------------------------------------------------------------------------------

    def _send_on(self, flow: Flow, data: bytes) -> None:
        flow.send(data)
        if flow.live:
            self.flows.touch(flow)

    def _udp_socket(self, host: str, prefer: Flow | None = None) -> DatagramEndpoint:
        if prefer is not None:
            key = prefer.key
            if key.transport == "udp" and key.remote[0] == host:
                # the flow's own socket already talks to this host: same address family
                proto = self._udp_by_local.get(key.local)
                if proto is not None:
                    return proto
        v6 = is_ipv6(host)
        if prefer is not None and prefer.key.transport == "udp":
            proto = self._udp_by_local.get(prefer.key.local)
            if proto is not None and proto.v6 == v6:
                return proto
        for proto in self._udp:
            if proto.v6 == v6:
                return proto
        raise TransportError(f"no UDP listener for {'IPv6' if v6 else 'IPv4'} destination {host}")

    def _send_udp_request(self, data: bytes, target: Target) -> Flow | None:
        host = _ip_text(target.host)
        if not host:
            self._resolve_then_send(data, target)
            return None
        proto = self._udp_by_local.get(target.local) if target.local is not None else None
        if proto is None:
            proto = self._udp_socket(host)
        addr = (host, target.port)
        if self._pinned:
            proto = self._through_pin(proto, addr)
        proto.send_to(data, addr)
        return self._udp_flow(proto, addr)

    def _through_pin(self, proto: DatagramEndpoint, addr: HostPort) -> DatagramEndpoint:
        """The pin of ``addr`` on ``proto``'s socket when there is one (what we send to a pinned
        device goes through its pin), else ``proto``."""
        pin = self._pinned.get(addr)
        if pin is not None and pin.local == proto.local:
            return pin  # type: ignore[no-any-return]
        return proto

    def pin_udp(self, local: HostPort, remote: HostPort) -> bool:
        """Pin the UDP device at ``remote`` to this process on our listener bound with reuse_port to
        ``local`` (sip/udp_pins.py); True when it is pinned. False (nothing changes): no such
        listener, pinning off or full, or a socket error (counted, logged)."""
        shared = self._shared_udp.get(local)
        if shared is None or shared.sock is None:
            return False
        remote = (_norm_host(remote[0]), remote[1])
        return self.pins.pin(shared, remote, lambda: UDPEndpoint(self, ListenSpec("udp", local[0], local[1])))

    def _resolve_then_send(self, data: bytes, target: Target) -> None:
        d = self.reactor.resolve(target.host)
        self._pending_resolves.add(d)

        def sent(address: str) -> None:
            self._pending_resolves.discard(d)
            try:
                self._send_udp_request(data, Target("udp", address, target.port))
            except TransportError as e:
                self._notify_error(target, str(e))

        def failed(f: Failure) -> None:
            self._pending_resolves.discard(d)
            if not f.check(defer.CancelledError):
                self._notify_error(target, f"cannot resolve {target.host}: {f.getErrorMessage()}")

        d.addCallbacks(sent, failed)

    def _notify_error(self, target: Target, reason: str) -> None:
        log.warn("send to {target} failed: {reason}", target=target, reason=reason)
        if self.on_send_error is not None:
            try:
                self.on_send_error(target, reason)
            except Exception:
                log.failure("on_send_error callback failed")

    def _send_stream(self, data: bytes, target: Target, name: str) -> Flow:
        remote = (_norm_host(target.host), target.port)
        flow = self.flows.find_remote(name, remote)
        if flow is None or not flow.live:
            flow = self._connect(target, name, remote)
        self._watch(flow, target)
        self._send_on(flow, data)
        return flow

    def _watch(self, flow: Flow, target: Target) -> None:
        """Remember ``target`` on a connection not yet up, to tell on_send_error if it never comes up."""
        proto = self._protos.get(flow.id)
        if proto is not None and proto.pending and all(t is not target for t in proto.targets):
            proto.targets.append(target)

    def _connect(self, target: Target, name: str, remote: HostPort) -> Flow:
        if not self.running:
            raise TransportError("transport layer is stopped")
        proto = StreamProtocol(self, name, outbound=target)
        key = FlowKey(name, ("", 0), remote)
        flow = Flow(key, self.flows.new_id(key), proto.send, proto.close)
        proto.flow = flow
        self._protos[flow.id] = proto
        self.flows.add(flow)
        factory = OutboundFactory(proto)
        host = strip_brackets(target.host)
        if name == "tls":
            creator = self._client_tls(target.server_name or host)
            proto.connector = self.reactor.connectSSL(host, target.port, factory, creator)
        else:
            proto.connector = self.reactor.connectTCP(host, target.port, factory)
        log.debug("connecting {flow_id}", flow_id=flow.id)
        return flow

    def _send_response(self, resp: Response, flow: Flow | None) -> None:
        via = resp.top_via
        self._send_response_data(resp.to_bytes(), via, flow)

    def _send_response_data(self, data: bytes, via: Via, flow: Flow | None) -> None:
        # The transport the request arrived on decides, not what its Via claims: a request that
        # came over UDP is answered over UDP even if its sent-protocol says TCP (RFC 4475 scalar02).
        name = flow.key.transport if flow is not None else via.transport.lower()
        if name in _STREAMS:
            if flow is not None and flow.live and flow.reliable:
                self._send_on(flow, data)
                return
            host = via.received or via.host
            port = via.port or DEFAULT_PORTS[name]
            if not is_ip_literal(host):
                raise TransportError(f"connection gone and sent-by {host!r} is a name (no DNS for responses)")
            self._send_stream(data, Target(name, host, port, server_name=strip_brackets(via.host)), name)
            return
        if name != "udp":
            raise TransportError(f"unsupported Via transport {via.transport!r}")
        addr = self._udp_response_address(via, flow)
        proto = self._udp_socket(addr[0], prefer=flow)
        if self._pinned:
            proto = self._through_pin(proto, addr)
        # straight from the socket, also when the request's flow is that path (its sender would
        # only call this same socket's send_to, through two more calls)
        proto.send_to(data, addr)
        if flow is not None and flow.live:
            key = flow.key
            if key.transport == "udp" and key.remote == addr and key.local == proto.local:
                self.flows.touch(flow)

    def _udp_response_address(self, via: Via, flow: Flow | None) -> HostPort:
        maddr = via.maddr
        if maddr and (text := _ip_text(maddr)):
            return text, via.port or 5060
        received = via.received
        if received is not None and flow is not None and received == flow.key.remote[0]:
            # the received we wrote from the request's source (fix_via): the flow's remote host,
            # canonical IP text already, so neither cached check (a Python-level call each) can
            # change it
            return received, via.rport or via.port or 5060
        if received and (text := _ip_text(received)):
            return text, via.rport or via.port or 5060
        if text := _ip_text(via.host):
            return text, via.port or 5060
        if flow is not None:
            return flow.key.remote
        raise TransportError(f"no address to send to: sent-by {via.host!r} is a name and there is no flow")

    # -- helpers ---------------------------------------------------------------------------------

    def _server_tls(self) -> Any:
        factory = self.tls_context_factory
        return factory.server_options() if hasattr(factory, "server_options") else factory

    def _client_tls(self, hostname: str) -> Any:
        factory = self.tls_context_factory
        if factory is not None and hasattr(factory, "client_creator"):
            return factory.client_creator(hostname)
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(hostname)

    def _primary(self, v6: bool) -> str:
        """The address the OS would use to reach the outside (a connected UDP socket sends nothing)."""
        if v6 not in self._primary_ip:
            family, probe = (socket.AF_INET6, "2001:db8::1") if v6 else (socket.AF_INET, "192.0.2.1")
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.connect((probe, 9))
                    self._primary_ip[v6] = s.getsockname()[0]
            except OSError:
                self._primary_ip[v6] = "::1" if v6 else "127.0.0.1"
        return self._primary_ip[v6]

    @staticmethod
    def _no_sink(msg: Message, flow: Flow) -> None:
        log.warn("no sink set; dropping {msg!r} from {flow_id}", msg=msg, flow_id=flow.id)


classImplements(TransportLayer, IService)
