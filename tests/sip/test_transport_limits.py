"""Connection limits: admission caps, the slowloris and TLS handshake clocks, bytes held, UDP flows,
listen backlog and TCP_NODELAY. Timers run on a Clock; sockets (where used) are loopback ones."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from libon_tsilo.sip import connlimits
from libon_tsilo.sip.connlimits import ConnectionAdmission, ConnectionLimits, source_key
from libon_tsilo.sip.message import parse_message
from libon_tsilo.sip.tls import TLSContextFactory
from libon_tsilo.sip.transport import Target, TransportLayer
from libon_tsilo.sip.twisted_io import ServerFactory
from tests.sip.tlsutil import StreamPeer, TestPKI, sip_request, wait

VIA = "SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bK-l"


class Inbox:
    """The layer's sink: keeps what it is handed (the layer, compiled, takes no attribute of a test's)."""

    def __init__(self) -> None:
        self.got: list = []

    def __call__(self, msg, flow) -> None:
        self.got.append(msg)


def layer(idle: float = 3600, **limits) -> TransportLayer:
    t = TransportLayer([], Clock(), idle, 4096, limits=ConnectionLimits(**limits))
    t.sink = Inbox()
    return t


def got(t: TransportLayer) -> list:
    return t.sink.got  # type: ignore[attr-defined]


class Conn:
    """One inbound TCP connection from ``peer`` on a StringTransport, admitted by the layer's factory."""

    def __init__(self, t: TransportLayer, peer: str = "10.1.2.3", port: int = 40000) -> None:
        addr = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, port)
        self.proto = ServerFactory(t, "tcp").buildProtocol(addr)
        if self.proto is None:
            return
        self.wire = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 5060), peerAddress=addr)
        self.proto.makeConnection(self.wire)
        self.flow = self.proto.flow

    @property
    def refused(self) -> bool:
        return self.proto is None

    @property
    def closed(self) -> bool:
        return self.wire.disconnecting

    def feed(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def lost(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


# -- admission ----------------------------------------------------------------------------------------


def test_source_key_counts_ipv6_by_its_64_and_mapped_ipv4_as_ipv4() -> None:
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("[2001:db8:1:2:ffff::9]") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_per_source_cap_refuses_the_next_connection_and_frees_a_slot_on_close() -> None:
    t = layer(max_connections_per_source=2)
    a, b = Conn(t, port=1), Conn(t, port=2)
    assert not a.refused and not b.refused
    assert Conn(t, port=3).refused
    assert not Conn(t, peer="10.9.9.9").refused  # another source is not affected
    assert t.admission.refused == {"max_connections_per_source": 1}
    a.lost()
    assert not Conn(t, port=4).refused
    assert t.connection_stats()["inbound"] == 3


def test_ipv6_sources_share_the_cap_of_their_64() -> None:
    t = layer(max_connections_per_source=1)
    assert not Conn(t, peer="2001:db8:0:1::1").refused
    assert Conn(t, peer="2001:db8:0:1::2").refused
    assert not Conn(t, peer="2001:db8:0:2::1").refused


def test_total_cap() -> None:
    t = layer(max_connections=2, max_connections_per_source=0)
    assert not Conn(t, peer="10.0.0.1").refused and not Conn(t, peer="10.0.0.2").refused
    assert Conn(t, peer="10.0.0.3").refused
    assert t.admission.refused == {"max_connections": 1}


def test_refusals_are_logged_at_most_once_per_interval(caplog_twisted) -> None:
    t = layer(max_connections_per_source=1)
    Conn(t)
    for _ in range(50):
        Conn(t)
    assert t.admission.refused["max_connections_per_source"] == 50
    lines = [e for e in caplog_twisted if "refusing a connection" in e]
    assert len(lines) == 1
    t.clock.advance(10)
    Conn(t)
    lines = [e for e in caplog_twisted if "refusing a connection" in e]
    assert len(lines) == 2 and "49 more since the last such line" in lines[1]


@pytest.fixture
def caplog_twisted():
    """Formatted twisted log events emitted during the test."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observer(event) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def test_admission_release_never_goes_negative() -> None:
    adm = ConnectionAdmission(ConnectionLimits(), Clock())
    key = adm.admit("192.0.2.1")
    adm.release(key)
    adm.release(key)
    assert adm.total == 0 and adm.per_source == {}


# -- slowloris: the message clock -----------------------------------------------------------------------


def test_connection_without_a_complete_message_is_closed_after_message_timeout() -> None:
    t = layer(message_timeout=10)
    c = Conn(t)
    for _ in range(9):  # keep-alives and bytes of a message do not count: only a complete message
        c.feed(b"\r\n\r\n")
        t.clock.advance(1)
    c.feed(b"OPTIONS sip:x SIP/2.0\r\n")
    t.clock.advance(0.9)
    assert not c.closed
    t.clock.advance(0.1)
    assert c.closed and c.wire.disconnected  # aborted, not a graceful close
    assert t.counters == {"message_timeout": 1}
    c.feed(sip_request(via=VIA))  # whatever still arrives is ignored
    assert got(t) == []


def test_message_trickled_byte_by_byte_is_closed_after_message_timeout() -> None:
    t = layer(message_timeout=10)
    c = Conn(t)
    c.feed(sip_request(via=VIA, call_id="first"))
    t.clock.advance(100)
    raw = sip_request(via=VIA, call_id="slow")
    for i in range(10):  # one byte a second: every byte is activity, but the message never ends
        c.feed(raw[i:i + 1])
        assert not c.closed
        t.clock.advance(1)
    assert c.closed and t.counters["message_timeout"] == 1
    assert [m.call_id for m in got(t)] == ["first"]


def test_bare_line_feeds_held_after_a_message_run_the_message_clock() -> None:
    # only a half keep-alive (CR, CRLF, CRLFCR) is not a message: bare LFs held forever would dodge
    # the clock, and the framer keeps them as the start of the next message
    t = layer(message_timeout=10)
    c = Conn(t)
    c.feed(sip_request(via=VIA, call_id="first"))
    c.feed(b"\n" * 1000)
    t.clock.advance(10)
    assert c.closed and t.counters == {"message_timeout": 1}


def test_messages_that_complete_in_time_keep_the_connection() -> None:
    t = layer(message_timeout=10)
    c = Conn(t)
    for n in range(20):  # each message split in two, 8 s apart: slow but within the timeout
        raw = sip_request(via=VIA, call_id=f"m{n}")
        c.feed(raw[:40])
        t.clock.advance(8)
        c.feed(raw[40:])
        t.clock.advance(8)
    assert not c.closed and len(got(t)) == 20 and t.counters == {}
    c.feed(b"\r\n")  # a lone CRLF held (maybe half a keep-alive) is not an incomplete message
    t.clock.advance(30)
    assert not c.closed
    c.lost()
    assert c.proto.deadline is None


def test_a_message_that_starts_in_the_same_chunk_as_a_complete_one_gets_its_own_clock() -> None:
    t = layer(message_timeout=10)
    c = Conn(t)
    c.feed(sip_request(via=VIA)[:30])
    t.clock.advance(9)
    c.feed(sip_request(via=VIA)[30:] + sip_request(via=VIA, call_id="2")[:30])
    t.clock.advance(9)
    assert not c.closed  # 18 s after the first byte of the first message, 9 s into the second
    t.clock.advance(1)
    assert c.closed


# -- bytes held ---------------------------------------------------------------------------------------------


def test_bytes_held_for_incomplete_messages_are_capped_over_all_connections() -> None:
    t = layer(max_buffered_bytes=3000)
    a, b = Conn(t, port=1), Conn(t, port=2)
    a.feed(b"OPTIONS sip:x SIP/2.0\r\nX: " + b"a" * 1800)
    assert t.buffered > 1800 and not a.closed
    b.feed(b"OPTIONS sip:x SIP/2.0\r\nX: " + b"b" * 1800)
    assert b.closed and not a.closed  # the connection whose bytes passed the cap
    assert t.counters == {"max_buffered_bytes": 1}
    assert t.buffered == len(a.proto.framer)  # b's bytes dropped at once, before its abort is reported
    assert len(b.proto.framer) == 0
    a.feed(b"a" * 10)
    assert not a.closed  # under the cap again
    b.lost()
    assert t.buffered == len(a.proto.framer)
    a.feed(b"\r\nContent-Length: 0\r\n\r\n")  # completes: nothing held any more
    assert t.buffered == 0
    a.lost()
    assert t.buffered == 0


def test_messages_framed_with_the_bytes_that_pass_the_cap_are_not_delivered() -> None:
    # the abort is only reported on a later reactor turn: the flow is still "live" meanwhile
    t = layer(max_buffered_bytes=1000)
    c = Conn(t)
    c.feed(sip_request(via=VIA) + b"OPTIONS sip:x SIP/2.0\r\nX: " + b"b" * 1800)
    assert c.closed and t.counters == {"max_buffered_bytes": 1}
    assert got(t) == []
    assert t.buffered == 0


# -- flows: bound and unbound, UDP -------------------------------------------------------------------------


class FakeUDP:
    def __init__(self) -> None:
        self.local = ("127.0.0.1", 5060)
        self.v6 = False
        self.sent: list = []

    def send_to(self, data: bytes, addr) -> None:
        self.sent.append((data, addr))


def test_udp_keepalive_from_an_unknown_source_creates_no_flow() -> None:
    t = layer()
    udp = FakeUDP()
    for port in range(100):
        t.datagram_received(udp, b"\r\n\r\n", ("192.0.2.1", 10000 + port))
    assert t.flows.live_count() == 0
    t.datagram_received(udp, sip_request(), ("192.0.2.1", 10000))
    [flow] = list(t.flows)
    t.clock.advance(50)
    t.datagram_received(udp, b"\r\n\r\n", ("192.0.2.1", 10000))  # refreshes the flow that exists
    assert flow.last_activity == 50


def test_unbound_udp_flow_expires_after_the_short_timeout_and_a_bound_one_lives_on() -> None:
    t = layer(idle=3600, unbound_idle_timeout=60)
    bound: set[str] = set()
    t.flows.add_keeper(bound.__contains__)
    udp = FakeUDP()
    t.datagram_received(udp, sip_request(call_id="spoofed"), ("192.0.2.1", 5060))
    t.datagram_received(udp, sip_request(method="REGISTER", call_id="device"), ("192.0.2.2", 5060))
    device = t.flows.lookup("udp", udp.local, ("192.0.2.2", 5060))
    bound.add(device.id)  # the registrar stored a binding over it
    t.clock.advance(59)
    assert t.flows.live_count() == 2
    t.clock.advance(1)
    assert [f.id for f in t.flows] == [device.id]
    t.clock.advance(3600 - 60 - 1)
    assert device.live
    t.clock.advance(1)  # idle for the bound timeout too
    assert t.flows.live_count() == 0


def test_a_flow_whose_binding_ends_goes_within_the_unbound_timeout() -> None:
    t = layer(idle=3600, unbound_idle_timeout=60)
    bound: set[str] = set()
    t.flows.add_keeper(bound.__contains__)
    c = Conn(t)
    c.feed(sip_request(method="REGISTER", via=VIA))
    bound.add(c.flow.id)
    t.clock.advance(600)
    assert not c.closed
    bound.clear()  # the binding expired or was removed: the registrar's side tells the table
    t.flows.recheck(c.flow.id)
    t.clock.advance(0)  # idle for 600 s already: it goes at once
    assert c.closed


def test_a_needed_flow_with_keepalives_wakes_its_timer_once_per_long_timeout() -> None:
    t = layer(idle=3600, unbound_idle_timeout=60)
    asked: list[str] = []
    t.flows.add_keeper(lambda flow_id: asked.append(flow_id) or True)
    c = Conn(t)
    c.feed(sip_request(method="REGISTER", via=VIA))
    for _ in range(240):  # two hours of RFC 5626 keep-alives every 30 s
        t.clock.advance(30)
        c.feed(b"\r\n\r\n")
    assert not c.closed
    assert len(asked) <= 3  # not one wake-up per unbound timeout (120 of them)


def test_udp_flow_table_is_capped_evicting_the_oldest_unneeded_flow() -> None:
    t = layer(max_udp_flows=3)
    bound: set[str] = set()
    t.flows.add_keeper(bound.__contains__)
    udp = FakeUDP()
    for i in range(3):
        t.datagram_received(udp, sip_request(), (f"192.0.2.{i}", 5060))
    first = t.flows.lookup("udp", udp.local, ("192.0.2.0", 5060))
    bound.add(first.id)
    closed: list = []
    t.flows.subscribe_close(closed.append)
    for i in range(3, 10):  # a flood from new sources
        t.datagram_received(udp, sip_request(), (f"192.0.2.{i}", 5060))
    assert t.flows.udp_count() == 3 and first.live
    assert {f.remote[0] for f in t.flows} == {"192.0.2.0", "192.0.2.8", "192.0.2.9"}
    assert len(closed) == 7 and t.flows.evicted == 7
    assert t.connection_stats()["udp_flows_evicted"] == 7


# -- listen backlog ------------------------------------------------------------------------------------------


class RecordingReactor:
    """The real reactor, with the arguments of each listenTCP call recorded."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        self.calls.append({"backlog": backlog, "factory": factory})
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)

    def __getattr__(self, name):
        return getattr(reactor, name)


@pytest.fixture
def pki(tmp_path) -> TestPKI:
    return TestPKI(tmp_path / "pki")


def tls_factory(pki: TestPKI) -> TLSContextFactory:
    leaf = pki.issue("server")
    return TLSContextFactory(str(leaf.cert), str(leaf.key), ca_file=str(pki.ca_file))


@pytest_twisted.ensureDeferred
async def test_listen_backlog_is_set_on_tcp_and_tls_listeners(pki, monkeypatch) -> None:
    monkeypatch.setattr(connlimits, "somaxconn", lambda: 4096)
    rec = RecordingReactor()
    t = TransportLayer(["tcp:127.0.0.1:0", "tls:127.0.0.1:0"], Clock(), 60, 4096, reactor=rec,
                       tls_context_factory=tls_factory(pki), limits=ConnectionLimits(listen_backlog=1024))
    t.startService()
    try:
        assert [c["backlog"] for c in rec.calls] == [1024, 1024]
    finally:
        await t.stopService()


@pytest_twisted.ensureDeferred
async def test_listen_backlog_is_capped_by_somaxconn(monkeypatch, caplog_twisted) -> None:
    monkeypatch.setattr(connlimits, "somaxconn", lambda: 128)
    rec = RecordingReactor()
    t = TransportLayer(["tcp:127.0.0.1:0"], Clock(), 60, 4096, reactor=rec,
                       limits=ConnectionLimits(listen_backlog=1024))
    t.startService()
    try:
        assert [c["backlog"] for c in rec.calls] == [128]
        assert any("listen_backlog 1024 is capped" in line for line in caplog_twisted)
    finally:
        await t.stopService()


# -- real loopback sockets: TCP_NODELAY, TLS handshake clock, refusal ----------------------------------------


class Server:
    def __init__(self, listen: list[str], tls=None, **limits) -> None:
        self.clock = Clock()
        self.layer = TransportLayer(listen, self.clock, 60, 4096, tls_context_factory=tls,
                                    limits=ConnectionLimits(**limits))
        self.inbox: DeferredQueue = DeferredQueue()
        self.layer.sink = lambda msg, flow: self.inbox.put((msg, flow))
        self.layer.startService()

    def port(self, transport: str) -> int:
        return next(p for t, _, p in self.layer.bound if t == transport)

    def next(self):
        return wait(self.inbox.get())


@pytest.fixture
def server():
    made: list[Server] = []

    def make(listen: list[str], **kw) -> Server:
        s = Server(listen, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        pytest_twisted.blockon(s.layer.stopService())
        assert s.layer.flows.live_count() == 0 and s.layer._protos == {}
        assert s.layer.admission.total == 0 and s.layer.buffered == 0
        assert s.clock.getDelayedCalls() == []


@pytest.fixture
def listener():
    """A plain TCP (or TLS) server whose accepted connections are StreamPeers, put in a queue."""
    ports: list = []

    def make(tls_options=None) -> tuple[DeferredQueue, int]:
        from twisted.internet.protocol import Factory

        accepted: DeferredQueue = DeferredQueue()

        class F(Factory):
            def buildProtocol(self, addr):
                peer = StreamPeer()
                accepted.put(peer)
                return peer

        if tls_options is None:
            port = reactor.listenTCP(0, F(), interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, F(), tls_options, interface="127.0.0.1")
        ports.append(port)
        return accepted, port.getHost().port

    yield make
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def tcp_socket(proto) -> socket.socket:
    """The kernel socket under a stream protocol's transport (under the TLS layer for TLS)."""
    transport = proto.transport
    inner = getattr(transport, "transport", None)  # TLSMemoryBIOProtocol wraps the TCP transport
    return (inner if inner is not None else transport).getHandle()


def only_proto(s: Server):
    [proto] = s.layer._protos.values()
    return proto


@pytest_twisted.ensureDeferred
async def test_tcp_nodelay_on_accepted_and_outgoing_tcp_connections(server, listener) -> None:
    s = server(["tcp:127.0.0.1:0"])
    client = await wait(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", s.port("tcp")), StreamPeer()))
    client.transport.write(sip_request(via=VIA))
    _, flow = await s.next()
    assert nodelay(tcp_socket(only_proto(s)))
    client.transport.loseConnection()
    await wait(client.closed)
    accepted, port = listener()
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-n"))
    out = s.layer.send_request(req, Target("tcp", "127.0.0.1", port))
    peer = await wait(accepted.get())
    await peer.next()
    assert nodelay(tcp_socket(s.layer._protos[out.id]))
    peer.transport.loseConnection()
    await wait(peer.closed)


@pytest_twisted.ensureDeferred
async def test_tcp_nodelay_on_accepted_and_outgoing_tls_connections(server, listener, pki) -> None:
    from twisted.internet import ssl
    from twisted.internet.endpoints import wrapClientTLS

    tls = tls_factory(pki)
    s = server(["tls:127.0.0.1:0"], tls=tls)
    creator = ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate.loadPEM(pki.ca_file.read_bytes()))
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", s.port("tls")))
    client = await wait(connectProtocol(endpoint, StreamPeer()))
    client.transport.write(sip_request(via="SIP/2.0/TLS 127.0.0.1:5099;branch=z9hG4bK-t"))
    await s.next()
    assert nodelay(tcp_socket(only_proto(s)))
    client.transport.loseConnection()
    await wait(client.closed)
    accepted, port = listener(tls.server_options())
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-m"))
    out = s.layer.send_request(req, Target("tls", "127.0.0.1", port))
    peer = await wait(accepted.get())
    await peer.next()
    assert nodelay(tcp_socket(s.layer._protos[out.id]))
    peer.transport.loseConnection()
    await wait(peer.closed)


@pytest_twisted.ensureDeferred
async def test_outbound_connection_owes_no_first_message(server, listener) -> None:
    s = server(["tcp:127.0.0.1:0"], message_timeout=10)
    accepted, port = listener()
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-q"))
    out = s.layer.send_request(req, Target("tcp", "127.0.0.1", port))
    peer = await wait(accepted.get())
    await peer.next()
    s.clock.advance(30)  # the peer sent nothing: it only answers what we send
    assert out.live and s.layer.counters == {}
    peer.transport.write(sip_request(via=VIA)[:50])  # but a message it starts must end in time
    await _until(lambda: s.layer._protos[out.id].partial_since is not None)
    s.clock.advance(10)
    await wait(peer.closed)
    assert s.layer.counters == {"message_timeout": 1}


@pytest_twisted.ensureDeferred
async def test_tls_handshake_must_complete_within_its_timeout(server, pki) -> None:
    s = server(["tls:127.0.0.1:0"], tls=tls_factory(pki), tls_handshake_timeout=5, message_timeout=30)
    # a plain TCP client on the TLS port: it never says hello
    client = await wait(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", s.port("tls")), StreamPeer()))
    await _until(lambda: s.layer.admission.total == 1)
    s.clock.advance(4.9)
    assert not client.closed.called
    s.clock.advance(0.1)
    await wait(client.closed)
    assert s.layer.counters == {"tls_handshake_timeout": 1}


@pytest_twisted.ensureDeferred
async def test_outbound_tls_handshake_timeout_is_reported_to_on_send_error(server, listener, pki) -> None:
    s = server(["tcp:127.0.0.1:0"], tls=tls_factory(pki), tls_handshake_timeout=5)
    errors: DeferredQueue = DeferredQueue()
    s.layer.on_send_error = lambda target, reason: errors.put((target, reason))
    accepted, port = listener()  # a plain TCP server: it never answers the ClientHello
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-h"))
    target = Target("tls", "127.0.0.1", port)
    s.layer.send_request(req, target)
    peer = await wait(accepted.get())
    await _until(lambda: only_proto(s).up)
    s.clock.advance(5)
    got, reason = await wait(errors.get())
    assert got is target and "TLS handshake" in reason
    await wait(peer.closed)


@pytest_twisted.ensureDeferred
async def test_per_source_cap_on_real_sockets_closes_the_extra_connection_at_once(server) -> None:
    s = server(["tcp:127.0.0.1:0"], max_connections_per_source=2)
    clients = [await wait(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", s.port("tcp")), StreamPeer()))
               for _ in range(3)]
    await wait(clients[2].closed)  # refused at accept: closed without a byte
    for c in clients[:2]:
        c.transport.write(sip_request(via=VIA))
        await s.next()
        assert not c.closed.called
    assert s.layer.admission.refused == {"max_connections_per_source": 1}
    for c in clients[:2]:
        c.transport.loseConnection()
        await wait(c.closed)
    await _until(lambda: s.layer.admission.total == 0)


async def _until(pred, timeout: float = 5.0) -> None:
    """Wait for real socket events (not for time on the test's Clock) until ``pred()`` holds."""
    from twisted.internet.task import deferLater

    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached")
