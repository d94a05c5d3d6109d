"""UDP transport on real loopback sockets (OS-picked ports): RFC 3581, §18.2.2 routing, bad input."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.task import Clock

from libon_tsilo.sip.message import Request, Response, make_response, parse_message
from libon_tsilo.sip.transport import Target, TransportError, TransportLayer
from tests.sip.tlsutil import UDPPeer, sip_request, wait


class Harness:
    """A started TransportLayer whose inbound messages land in ``inbox`` as (msg, flow)."""

    def __init__(self, listen: list[str], idle: float = 60, max_size: int = 4096) -> None:
        self.clock = Clock()
        self.layer = TransportLayer(listen, self.clock, idle, max_size)
        self.inbox: DeferredQueue = DeferredQueue()
        self.layer.sink = lambda msg, flow: self.inbox.put((msg, flow))
        self.layer.startService()

    def addr(self, transport: str = "udp", v6: bool = False) -> tuple[str, int]:
        for t, host, port in self.layer.bound:
            if t == transport and (":" in host) == v6:
                return host, port
        raise AssertionError(f"no {transport} listener")

    def next(self):
        return wait(self.inbox.get())


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(listen: list[str] | None = None, **kw) -> Harness:
        h = Harness(listen or ["udp:127.0.0.1:0"], **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        pytest_twisted.blockon(h.layer.stopService())
        assert h.layer.flows.live_count() == 0
        assert h.clock.getDelayedCalls() == []


@pytest.fixture
def peer():
    peers: list = []

    def make(host: str = "127.0.0.1") -> tuple[UDPPeer, int]:
        p = UDPPeer()
        port = reactor.listenUDP(0, p, interface=host)
        peers.append(port)
        return p, port.getHost().port

    yield make
    for port in peers:
        pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_rport_and_received_and_response_to_source_port(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    # the Via claims a name and an unrelated port: only received/rport can reach the client
    client.send(sip_request(via="SIP/2.0/UDP phone.invalid:5999;rport;branch=z9hG4bK-r1"), h.addr())
    msg, flow = await h.next()
    assert isinstance(msg, Request) and msg.method == "OPTIONS"
    assert msg.top_via.received == "127.0.0.1"
    assert msg.top_via.rport == cport
    assert b";rport=%d" % cport in msg.to_bytes()
    assert flow.transport == "udp" and flow.remote == ("127.0.0.1", cport)
    assert h.layer.flows.get(flow.id) is flow
    h.layer.send_response(make_response(msg, 200, "OK"), flow)
    data, src = await client.next()
    resp = parse_message(data)
    assert isinstance(resp, Response) and resp.status == 200
    assert src == h.addr()  # answered from the socket the request came to
    assert resp.top_via.rport == cport and resp.top_via.received == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_same_source_without_rport_adds_nothing_and_answers_sent_by(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    raw = sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-s1")
    client.send(raw, h.addr())
    msg, flow = await h.next()
    assert msg.top_via.received is None and "rport" not in msg.top_via.params
    assert msg.to_bytes() == raw  # untouched message is forwarded byte for byte
    h.layer.send_response(make_response(msg, 202), None)  # no flow: routed on the Via alone
    data, _ = await client.next()
    assert parse_message(data).status == 202


@pytest_twisted.ensureDeferred
async def test_received_without_rport_uses_sent_by_port(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    # sent-by is another address: received is set, and the response goes to received:sent-by-port
    client.send(sip_request(via=f"SIP/2.0/UDP 192.0.2.1:{cport};branch=z9hG4bK-x1"), h.addr())
    msg, flow = await h.next()
    assert msg.top_via.received == "127.0.0.1" and "rport" not in msg.top_via.params
    h.layer.send_response(make_response(msg, 200), flow)
    data, _ = await client.next()
    assert parse_message(data).status == 200


@pytest_twisted.ensureDeferred
async def test_maddr_wins_over_received(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    other, oport = peer()
    # maddr + sent-by port name the destination (§18.2.2), even though rport points at the client
    via = f"SIP/2.0/UDP phone.invalid:{oport};maddr=127.0.0.1;rport;branch=z9hG4bK-m1"
    client.send(sip_request(via=via), h.addr())
    msg, flow = await h.next()
    h.layer.send_response(make_response(msg, 200), flow)
    data, _ = await other.next()
    assert parse_message(data).status == 200


@pytest_twisted.ensureDeferred
async def test_name_sent_by_without_received_goes_to_flow_remote(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    client.send(sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-n1"), h.addr())
    msg, flow = await h.next()
    resp = make_response(msg, 200)
    via = resp.top_via
    via.host = "phone.invalid"  # as if someone rewrote it: no DNS lookup, use the flow
    via.port = 1
    via._text = None
    resp.set_top_via(via)
    h.layer.send_response(resp, flow)
    data, _ = await client.next()
    assert parse_message(data).status == 200
    # and without a flow there is nowhere to send it: dropped, never raised
    h.layer.send_response(resp, None)


@pytest_twisted.ensureDeferred
async def test_bad_request_gets_400_with_reason(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    bad = sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-b1").replace(
        b"CSeq: 1 OPTIONS", b"CSeq: one OPTIONS"
    )
    client.send(bad, h.addr())
    data, _ = await client.next()
    resp = parse_message(data)
    assert resp.status == 400 and "CSeq" in resp.reason
    assert resp.call_id == "call-1@test"
    assert h.inbox.pending == []


@pytest_twisted.ensureDeferred
async def test_unparseable_ack_is_dropped_not_answered(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    via = f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-a1"
    client.send(sip_request(method="ACK", via=via).replace(b"CSeq: 1 ACK", b"CSeq: one ACK"), h.addr())
    client.send(sip_request(method="INFO", via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-a2"), h.addr())
    msg, flow = await h.next()
    assert msg.method == "INFO"
    h.layer.send_response(make_response(msg, 200, "OK"), flow)
    # loopback keeps order: a 400 to the ACK would arrive before the INFO's 200
    data, _ = await client.next()
    assert parse_message(data).cseq.method == "INFO"


@pytest_twisted.ensureDeferred
async def test_content_length_beyond_datagram_is_400_and_extra_bytes_ignored(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    via = f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-c1"
    client.send(sip_request(via=via, body=b"abc", content_length=50), h.addr())
    data, _ = await client.next()
    assert parse_message(data).status == 400
    # RFC 4475 dblreq: what follows Content-Length is not a second message
    client.send(sip_request(via=via, body=b"") + sip_request(method="INFO", via=via), h.addr())
    msg, _ = await h.next()
    assert msg.method == "OPTIONS" and msg.body == b""


@pytest_twisted.ensureDeferred
async def test_garbage_oversize_and_bad_responses_are_dropped(harness, peer) -> None:
    h = harness(max_size=1500)
    client, cport = peer()
    client.send(b"\x00\x01garbage that is not SIP\r\n\r\n", h.addr())
    client.send(b"SIP/2.0 200 OK\r\nVia: nonsense\r\n\r\n", h.addr())  # responses are never answered
    client.send(sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-o1", body=b"x" * 2000),
                h.addr())
    client.send(b"\r\n\r\n", h.addr())  # keep-alive: no answer
    client.send(sip_request(method="INFO", via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-o2"), h.addr())
    # loopback keeps order: the first thing to reach the sink is the last, valid request
    msg, _ = await h.next()
    assert msg.method == "INFO"
    assert client.queue.pending == []


@pytest_twisted.ensureDeferred
async def test_sink_crash_answers_500(harness, peer) -> None:
    h = harness()
    client, cport = peer()

    def broken(msg, flow):
        raise RuntimeError("bug in an upper layer")

    h.layer.sink = broken
    client.send(sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-e1"), h.addr())
    data, _ = await client.next()
    assert parse_message(data).status == 500


@pytest_twisted.ensureDeferred
async def test_send_request_to_target_and_over_flow(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-q1"))
    flow = h.layer.send_request(req, Target("udp", "127.0.0.1", cport))
    data, src = await client.next()
    assert parse_message(data).method == "MESSAGE" and src == h.addr()
    assert flow is not None and flow.remote == ("127.0.0.1", cport)
    # the client answers: its response arrives on the same pseudo-flow
    client.send(make_response(parse_message(data), 200).to_bytes(), h.addr())
    resp, rflow = await h.next()
    assert resp.status == 200 and rflow is flow
    # sending "over the flow" reaches the same address whatever the target says
    assert h.layer.send_request(req, Target("udp", "192.0.2.1", 9), flow) is flow
    data, _ = await client.next()
    assert parse_message(data).method == "MESSAGE"


@pytest_twisted.ensureDeferred
async def test_ipv6(harness, peer) -> None:
    h = harness(["udp:[::1]:0"])
    client, cport = peer("::1")
    client.send(sip_request(via="SIP/2.0/UDP [::1]:5999;rport;branch=z9hG4bK-v6"), h.addr(v6=True))
    msg, flow = await h.next()
    assert msg.top_via.received == "::1" and msg.top_via.rport == cport
    assert flow.remote == ("::1", cport)
    h.layer.send_response(make_response(msg, 200), flow)
    data, _ = await client.next()
    assert parse_message(data).status == 200
    assert h.layer.local_via("udp")[0] == "[::1]"
    with pytest.raises(TransportError):  # no IPv4 socket to send from
        h.layer.send_request(msg, Target("udp", "127.0.0.1", 5060))


@pytest_twisted.ensureDeferred
async def test_udp_flow_expires_after_idle_timeout(harness, peer) -> None:
    h = harness(idle=30)
    closed: list = []
    h.layer.flows.subscribe_close(closed.append)
    client, cport = peer()
    client.send(sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-i1"), h.addr())
    _, flow = await h.next()
    h.clock.advance(29)
    assert flow.live
    h.clock.advance(1)
    assert closed == [flow] and h.layer.flows.get(flow.id) is None
    # the same address comes back: same id, new live flow
    client.send(sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-i2"), h.addr())
    _, again = await h.next()
    assert again.id == flow.id and again.live and again is not flow


@pytest_twisted.ensureDeferred
async def test_local_via_and_bad_config() -> None:
    with pytest.raises(ValueError, match="tls"):
        TransportLayer(["tls:127.0.0.1:0"], Clock(), 60, 4096)
    with pytest.raises(ValueError, match="sctp"):
        TransportLayer(["sctp:127.0.0.1:0"], Clock(), 60, 4096)
    layer = TransportLayer(["udp:127.0.0.1:0"], Clock(), 60, 4096, advertised_host="sip.example.com")
    layer.startService()
    try:
        host, port = layer.local_via("udp")
        assert host == "sip.example.com" and port == layer.bound[0][2] != 0
        assert layer.local_via("tls")[1] == 5061  # no tls listener: default port
    finally:
        await layer.stopService()


@pytest_twisted.ensureDeferred
async def test_udp_target_by_name_is_resolved_off_the_send_path(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-d1"))
    # a name: nothing to return yet, the datagram leaves once "localhost" is resolved
    assert h.layer.send_request(req, Target("udp", "localhost", cport)) is None
    data, _ = await client.next()
    assert parse_message(data).method == "MESSAGE"
    with pytest.raises(TransportError, match="sctp"):
        h.layer.send_request(req, Target("sctp", "127.0.0.1", cport))


@pytest_twisted.ensureDeferred
async def test_response_follows_the_arrival_transport_not_the_via(harness, peer) -> None:
    h = harness()
    client, cport = peer()
    # RFC 4475 scalar02-like: the Via claims TCP, but the request came over UDP
    client.send(sip_request(via="SIP/2.0/TCP phone.invalid:5999;rport;branch=z9hG4bK-vt"), h.addr())
    msg, flow = await h.next()
    h.layer.send_response(make_response(msg, 200), flow)
    data, _ = await client.next()
    assert parse_message(data).status == 200


@pytest_twisted.ensureDeferred
async def test_stun_binding_request_on_the_sip_port_is_answered_and_keeps_the_flow(harness, peer) -> None:
    # RFC 5626 §4.4.2: a UDP outbound device keeps its flow (and its NAT binding) with STUN requests
    h = harness(idle=30)
    client, cport = peer()
    tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    client.send(bytes.fromhex("000100002112a442") + tid, h.addr())
    data, _ = await client.next()
    port = bytes([(cport >> 8) ^ 0x21, (cport & 0xFF) ^ 0x12])
    assert data == bytes.fromhex("0101000c2112a442") + tid + bytes.fromhex("00200008" "0001") \
        + port + bytes([127 ^ 0x21, 0 ^ 0x12, 0 ^ 0xA4, 1 ^ 0x42])
    (flow,) = list(h.layer.flows)
    h.clock.advance(20)
    client.send(bytes.fromhex("000100002112a442") + tid, h.addr())
    await client.next()
    h.clock.advance(20)  # 40 s after the first request, 20 s after the last: still there
    assert h.layer.flows.get(flow.id) is flow
    # a Binding Indication (or any other STUN-looking datagram) gets nothing and never reaches the sink
    client.send(bytes.fromhex("001100002112a442") + tid, h.addr())
    client.send(sip_request(method="INFO", via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-s1"), h.addr())
    msg, _ = await h.next()
    assert msg.method == "INFO"
    assert client.queue.pending == []


@pytest_twisted.ensureDeferred
async def test_what_only_starts_like_stun_makes_no_flow(harness, peer) -> None:
    h = harness()
    spoofer, _ = peer()
    client, cport = peer()
    spoofer.send(b"\x00\x01junk that is no STUN request", h.addr())
    spoofer.send(b"", h.addr())
    client.send(sip_request(method="INFO", via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-s1"), h.addr())
    _, flow = await h.next()  # loopback keeps order: the spoofer's datagrams were handled before
    assert list(h.layer.flows) == [flow]


@pytest_twisted.ensureDeferred
async def test_udp_receive_buffer_is_the_configured_size() -> None:
    # [sip] udp_receive_buffer: a burst waits in the kernel instead of being dropped (issue 11, item 13)
    import socket

    sizes = {}
    for size in (256 * 1024, 1024 * 1024):
        layer = TransportLayer(["udp:127.0.0.1:0"], Clock(), 60, 4096, udp_receive_buffer=size)
        layer.startService()
        try:
            sock = layer._udp[0].sock
            sizes[size] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux doubles it
        finally:
            await layer.stopService()
    assert sizes == {256 * 1024: 256 * 1024, 1024 * 1024: 1024 * 1024}


@pytest_twisted.ensureDeferred
async def test_queue_delay_of_the_oldest_datagram_is_reported(harness, peer) -> None:
    # overload control (issue 11, item 13): how long a datagram waited in the kernel, from its arrival
    # stamp; here the reactor is kept busy for 50 ms after the datagram arrived, as a burst would
    import time

    delays: list[float] = []
    clock = Clock()
    layer = TransportLayer(["udp:127.0.0.1:0"], clock, 60, 4096)
    inbox: DeferredQueue = DeferredQueue()
    layer.sink = lambda msg, flow: inbox.put(msg)
    layer.startService()
    layer.on_queue_delay = delays.append  # read at each wake-up: may be set once listening
    try:
        client, _ = peer()
        server = next((host, port) for t, host, port in layer.bound if t == "udp")
        client.transport.write(sip_request("OPTIONS"), server)
        time.sleep(0.05)  # the reactor cannot read meanwhile: a lower bound on the wait, not a timing guess
        msg = await wait(inbox.get())
        assert msg.method == "OPTIONS"
        assert len(delays) == 1 and 0.05 <= delays[0] < 5.0, delays
    finally:
        await layer.stopService()


@pytest_twisted.ensureDeferred
async def test_early_hook_answers_the_source_or_drops_before_the_parse(harness, peer) -> None:
    # overload control (issue 11, item 13): the hook sees the raw datagram first
    h = harness()
    seen: list[bytes] = []
    addresses: set[tuple[tuple[str, int], tuple[str, int]]] = set()

    def early(data: bytes, local: tuple[str, int], remote: tuple[str, int]) -> bytes | None:
        seen.append(data)
        addresses.add((local, remote))
        if b"call-refuse" in data:
            return b"SIP/2.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        return b"" if b"call-drop" in data else None

    h.layer.early = early
    client, _ = peer()
    server = h.addr()
    client.transport.write(sip_request("INVITE", call_id="call-refuse"), server)
    assert (await client.next())[0].startswith(b"SIP/2.0 503 ")
    client.transport.write(sip_request("OPTIONS", call_id="call-drop"), server)
    client.transport.write(sip_request("OPTIONS", call_id="call-pass"), server)
    msg, _ = await h.next()
    assert msg.call_id == "call-pass" and len(seen) == 3  # the other two never reached the sink
    # which listener and which source: overload control exempts a cluster's peers on its internal one
    assert addresses == {(server, ("127.0.0.1", client.transport.getHost().port))}
    assert h.layer.flows.live_count() == 1  # only the datagram that went on made a flow


@pytest_twisted.ensureDeferred
async def test_a_failing_early_hook_is_logged_and_the_datagram_handled_as_usual(harness, peer) -> None:
    from twisted.logger import capturedLogs

    h = harness()

    def early(data: bytes, local: tuple[str, int], remote: tuple[str, int]) -> bytes | None:
        raise RuntimeError("bug in the early hook")

    h.layer.early = early
    client, _ = peer()
    with capturedLogs() as events:
        client.transport.write(sip_request("OPTIONS", call_id="call-bug"), h.addr())
        msg, _ = await h.next()
    assert msg.call_id == "call-bug"
    assert any(e.get("log_failure") is not None and "early hook" in e.get("log_format", "") for e in events)


@pytest_twisted.ensureDeferred
async def test_client_supplied_received_is_replaced_by_the_source(harness, peer) -> None:
    # a phone may not choose where we send: a REGISTER whose Via claims ;received=<a trunk's IP>
    # (sent-by = its real address, no rport) would make the registrar store that IP as the device's
    # address, and every call to the user would go to the trunk (toll fraud), its responses too
    h = harness()
    client, cport = peer()
    client.send(sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};received=192.0.2.99;branch=z9hG4bK-f1"),
                h.addr())
    msg, flow = await h.next()
    assert msg.top_via.received == "127.0.0.1"
    h.layer.send_response(make_response(msg, 200), None)  # routed on the Via alone
    data, _ = await client.next()
    assert parse_message(data).status == 200
