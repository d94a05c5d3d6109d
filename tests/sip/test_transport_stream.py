"""TCP transport: framing (driven byte-exactly through a StringTransport) and real loopback connections."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import DeferredQueue
from twisted.internet.error import ConnectionDone
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.message import Request, make_response, parse_message
from libon_tsilo.sip.transport import Target, TransportLayer
from libon_tsilo.sip.twisted_io import ServerFactory
from tests.sip.tlsutil import StreamPeer, sip_request, wait

VIA = "SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bK-s"


# -- framing, byte-exact, on a StringTransport ---------------------------------------------------


class Fed:
    """One inbound TCP connection on a StringTransport; messages given to the sink land in ``got``."""

    def __init__(self, max_size: int = 4096) -> None:
        self.clock = Clock()
        self.layer = TransportLayer([], self.clock, 60, max_size)
        self.got: list = []
        self.layer.sink = lambda msg, flow: self.got.append((msg, flow))
        self.proto = ServerFactory(self.layer, "tcp").buildProtocol(None)
        self.wire = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 5060), peerAddress=IPv4Address("TCP", "10.1.2.3", 40000)
        )
        self.proto.makeConnection(self.wire)
        self.flow = self.proto.flow

    def feed(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def written(self) -> bytes:
        out = self.wire.value()
        self.wire.clear()
        return out


def test_flow_key_and_id_of_inbound_connection() -> None:
    f = Fed()
    assert f.flow.key.local == ("127.0.0.1", 5060) and f.flow.key.remote == ("10.1.2.3", 40000)
    assert f.flow.id.startswith("tcp:127.0.0.1:5060-10.1.2.3:40000#")
    assert f.layer.flows.get(f.flow.id) is f.flow


def test_split_message_byte_by_byte() -> None:
    f = Fed()
    raw = sip_request(via=VIA, body=b"hello")
    for i in range(len(raw)):
        assert f.got == []
        f.feed(raw[i:i + 1])
    [(msg, flow)] = f.got
    assert msg.body == b"hello" and flow is f.flow
    assert msg.top_via.received == "10.1.2.3"  # the Via said 127.0.0.1, the peer is 10.1.2.3


def test_coalesced_messages_and_keepalives() -> None:
    f = Fed()
    a = sip_request(via=VIA, call_id="a", body=b"1")
    b = sip_request(method="INFO", via=VIA, call_id="b")
    f.feed(b"\r\n\r\n" + a + b + b"\r\n\r\n" + b"\r\n")
    assert [m.call_id for m, _ in f.got] == ["a", "b"]
    assert f.written() == b"\r\n\r\n"  # one CRLF answer per ping; the lone CRLF (pong) is not answered
    assert not f.wire.disconnecting


def test_missing_content_length_answers_400_and_closes() -> None:
    f = Fed()
    closed: list = []
    f.layer.flows.subscribe_close(closed.append)
    f.feed(sip_request(via=VIA, content_length=None))
    resp = parse_message(f.written())
    assert resp.status == 400 and "Content-Length" in resp.reason
    assert f.wire.disconnecting and f.got == []
    f.feed(sip_request(via=VIA))  # whatever still arrives is ignored
    assert f.got == [] and f.written() == b""
    f.proto.connectionLost(Failure(ConnectionDone()))
    assert closed == [f.flow] and f.layer.flows.live_count() == 0


def test_messages_framed_before_a_framing_error_are_delivered() -> None:
    good = sip_request(via=VIA, call_id="good")
    bad = sip_request(via=VIA, content_length=None)

    class Framer:  # a framer that hands over what it framed before failing
        incomplete = False

        def __len__(self) -> int:
            return 0

        def feed(self, data: bytes):
            err = ParseError("missing Content-Length on a stream")
            err.framed = [("msg", good), ("ping", b"")]
            err.data = bad
            raise err

    f = Fed()
    f.proto.framer = Framer()
    f.feed(good + bad)
    assert [m.call_id for m, _ in f.got] == ["good"]
    out = f.written()
    assert out.startswith(b"\r\n") and parse_message(out[2:]).status == 400
    assert f.wire.disconnecting


def test_oversize_message_closes_with_513() -> None:
    f = Fed(max_size=1500)
    f.feed(sip_request(via=VIA, body=b"x" * 2000))
    resp = parse_message(f.written())
    assert resp.status == 513
    assert f.wire.disconnecting and f.got == []


def test_endless_header_section_closes() -> None:
    f = Fed(max_size=1500)
    f.feed(b"OPTIONS sip:x SIP/2.0\r\n" + b"X-Junk: " + b"a" * 2000)
    assert f.wire.disconnecting and f.got == []


def test_bad_header_in_framed_message_answers_400_and_keeps_connection() -> None:
    f = Fed()
    bad = sip_request(via=VIA).replace(b"CSeq: 1 OPTIONS", b"CSeq: x OPTIONS")
    f.feed(bad + sip_request(method="INFO", via=VIA))
    assert parse_message(f.written()).status == 400
    assert [m.method for m, _ in f.got] == ["INFO"]  # framing was intact: the next message still counts
    assert not f.wire.disconnecting


def test_idle_timeout_closes_connection() -> None:
    f = Fed()
    f.feed(sip_request(via=VIA))  # (a connection that never sends a message is closed sooner)
    f.clock.advance(59)
    f.feed(b"\r\n\r\n")  # activity resets the idle clock
    f.clock.advance(59)
    assert not f.wire.disconnecting
    f.clock.advance(1)
    assert f.wire.disconnecting


# -- real loopback connections -------------------------------------------------------------------


class Server:
    def __init__(self, listen: list[str], idle: float = 60) -> None:
        self.clock = Clock()
        self.layer = TransportLayer(listen, self.clock, idle, 4096)
        self.inbox: DeferredQueue = DeferredQueue()
        self.layer.sink = lambda msg, flow: self.inbox.put((msg, flow))
        self.closed: DeferredQueue = DeferredQueue()
        self.layer.flows.subscribe_close(self.closed.put)
        self.layer.startService()

    def port(self, transport: str = "tcp") -> int:
        return next(p for t, _, p in self.layer.bound if t == transport)

    def next(self):
        return wait(self.inbox.get())


@pytest.fixture
def server():
    made: list[Server] = []

    def make(listen: list[str] | None = None, **kw) -> Server:
        s = Server(listen or ["tcp:127.0.0.1:0"], **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        pytest_twisted.blockon(s.layer.stopService())
        assert s.layer.flows.live_count() == 0 and s.layer._protos == {}
        assert s.clock.getDelayedCalls() == []


@pytest.fixture
def listener():
    """A plain TCP server whose accepted connections are StreamPeers, put in a queue."""
    ports: list = []

    def make() -> tuple[DeferredQueue, int]:
        accepted: DeferredQueue = DeferredQueue()

        def build(addr):
            peer = StreamPeer()
            accepted.put(peer)
            return peer

        port = reactor.listenTCP(0, _Fn(build), interface="127.0.0.1")
        ports.append(port)
        return accepted, port.getHost().port

    yield make
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


class _Fn(Factory):
    def __init__(self, build) -> None:
        self._build = build

    def buildProtocol(self, addr):
        return self._build(addr)


async def connect(port: int, host: str = "127.0.0.1") -> StreamPeer:
    endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port)
    return await wait(connectProtocol(endpoint, StreamPeer()))


@pytest_twisted.ensureDeferred
async def test_request_response_and_flow_reuse(server) -> None:
    s = server()
    client = await connect(s.port())
    client.transport.write(sip_request(method="REGISTER", via=VIA + ";rport"))
    reg, flow = await s.next()
    assert flow.transport == "tcp" and flow.live
    assert reg.top_via.rport == client.transport.getHost().port
    s.layer.send_response(make_response(reg, 200), flow)
    kind, data = await client.next()
    assert kind == "msg" and parse_message(data).status == 200
    # later, the server sends a request to the binding over the very same connection, by flow id
    invite = parse_message(sip_request(method="INVITE", via="SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-i"))
    again = s.layer.flows.get(flow.id)
    used = s.layer.send_request(invite, Target("tcp", "192.0.2.1", 5060), again)
    assert used is flow
    kind, data = await client.next()
    assert parse_message(data).method == "INVITE"
    # and a target equal to the connection's remote address reuses it too (RFC 3261 §18.1.1)
    remote = flow.remote
    assert s.layer.send_request(invite, Target("tcp", remote[0], remote[1])) is flow
    kind, data = await client.next()
    assert parse_message(data).method == "INVITE"
    assert s.layer.flows.live_count() == 1


@pytest_twisted.ensureDeferred
async def test_close_notification_and_missing_content_length(server) -> None:
    s = server()
    client = await connect(s.port())
    client.transport.write(sip_request(via=VIA))
    _, flow = await s.next()
    notified: list = []
    flow.on_close(notified.append)
    client.transport.write(sip_request(via=VIA, content_length=None))
    kind, data = await client.next()
    assert kind == "msg" and parse_message(data).status == 400
    assert (await client.next())[0] == "closed"
    assert await wait(s.closed.get()) is flow
    assert notified == [flow] and not flow.live and s.layer.flows.get(flow.id) is None


@pytest_twisted.ensureDeferred
async def test_split_over_the_wire_and_ping(server) -> None:
    s = server()
    client = await connect(s.port())
    raw = sip_request(via=VIA, body=b"split body")
    client.transport.write(raw[:30])
    client.transport.write(b"")
    client.transport.write(raw[30:] + b"\r\n\r\n")
    msg, _ = await s.next()
    assert msg.body == b"split body"
    assert await wait(client.raw.get()) == b"\r\n"  # the CRLF answer to the ping


@pytest_twisted.ensureDeferred
async def test_idle_timeout_with_clock_closes_real_connection(server) -> None:
    s = server(idle=120)
    client = await connect(s.port())
    client.transport.write(sip_request(via=VIA))
    _, flow = await s.next()
    s.clock.advance(119)
    assert flow.live
    s.clock.advance(1)
    assert (await client.next())[0] == "closed"
    assert await wait(s.closed.get()) is flow


@pytest_twisted.ensureDeferred
async def test_outbound_connection_queues_until_connected(server, listener) -> None:
    s = server()
    accepted, port = listener()
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-o"))
    flow = s.layer.send_request(req, Target("tcp", "127.0.0.1", port))
    second = s.layer.send_request(req, Target("tcp", "127.0.0.1", port))  # same pending connection
    assert flow is second and flow.live
    peer = await wait(accepted.get())
    for _ in range(2):
        kind, data = await peer.next()
        assert kind == "msg" and parse_message(data).method == "MESSAGE"
    assert flow.key.local[1] != 0  # rekeyed with the real local address once connected
    peer.transport.write(make_response(parse_message(data), 200).to_bytes())
    resp, rflow = await s.next()
    assert resp.status == 200 and rflow is flow
    assert s.layer.flows.live_count() == 1


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_connect_failure_reported_to_on_send_error(server) -> None:
    s = server()
    errors: DeferredQueue = DeferredQueue()
    s.layer.on_send_error = lambda target, reason: errors.put((target, reason))
    target = Target("tcp", "127.0.0.1", _dead_port())
    req = parse_message(sip_request(via="SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-f"))
    flow = s.layer.send_request(req, target)
    # a second request handed the still-pending flow is told about the failure too
    other = Target("tcp", "127.0.0.1", target.port)
    assert s.layer.send_request(req, other, flow) is flow
    got = [await wait(errors.get()), await wait(errors.get())]
    assert [t for t, _ in got] == [target, other] and got[0][0] is target and got[1][0] is other
    assert all("connect" in reason for _, reason in got)
    assert not flow.live and s.layer.flows.live_count() == 0


@pytest_twisted.ensureDeferred
async def test_response_reopens_connection_to_sent_by_when_gone(server, listener) -> None:
    s = server()
    accepted, port = listener()
    client = await connect(s.port())
    client.transport.write(sip_request(via=f"SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bK-g"))
    req, flow = await s.next()
    client.transport.loseConnection()
    assert await wait(s.closed.get()) is flow
    s.layer.send_response(make_response(req, 486), flow)  # §18.2.2: received + sent-by port
    peer = await wait(accepted.get())
    kind, data = await peer.next()
    assert parse_message(data).status == 486


@pytest_twisted.ensureDeferred
async def test_ipv6_tcp(server) -> None:
    s = server(["tcp:[::1]:0"])
    client = await connect(s.port(), "::1")
    client.transport.write(sip_request(via="SIP/2.0/TCP [::1]:5099;rport;branch=z9hG4bK-6"))
    msg, flow = await s.next()
    assert isinstance(msg, Request)
    assert flow.remote[0] == "::1" and msg.top_via.received == "::1"
    s.layer.send_response(make_response(msg, 200), flow)
    kind, data = await client.next()
    assert parse_message(data).status == 200


@pytest_twisted.ensureDeferred
async def test_stop_service_closes_connections(server) -> None:
    s = server()
    client = await connect(s.port())
    client.transport.write(sip_request(via=VIA))
    await s.next()
    await s.layer.stopService()
    assert (await client.next())[0] == "closed"
    assert s.layer.flows.live_count() == 0 and s.layer.bound == []


# -- the protocols' entry points into the layer ---------------------------------------------------


class _Watched:
    """Stands for the layer in a protocol's eyes: records what the protocol reads of it, and passes it on."""

    def __init__(self, layer: TransportLayer, seen: list[str]) -> None:
        self._layer = layer
        self._seen = seen

    def __getattr__(self, name: str):
        self._seen.append(name)
        return getattr(self._layer, name)


def test_protocols_enter_the_layer_through_its_public_entry_points() -> None:
    f = Fed()
    calls: list[str] = []
    f.proto.layer = _Watched(f.layer, calls)
    f.feed(sip_request(via=VIA))
    f.proto.connectionLost(Failure(ConnectionDone()))
    assert calls == ["stream_data", "connection_lost"] and len(f.got) == 1
    assert f.layer.flows.get(f.flow.id) is None


def test_no_protocol_calls_a_private_method_of_the_layer() -> None:
    import ast
    from pathlib import Path

    import libon_tsilo.sip

    # the Twisted classes, and the compiled UDP endpoint beside the layer (source files: compiled
    # modules have no source for inspect)
    here = Path(libon_tsilo.sip.__file__).parent
    private = [
        f"{name} line {node.lineno}: .layer.{node.attr}"
        for name in ("twisted_io.py", "transport.py")
        for node in ast.walk(ast.parse((here / name).read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and isinstance(node.value, ast.Attribute) and node.value.attr == "layer"
    ]
    assert not private, private
