"""The relay without transactions (RFC 3261 §16.11, cluster/relay.py ``forward_request`` and
``forward_response``), on test_relay_two_nodes.py's two nodes and loopback sockets.

Over UDP both ways, B relays a whole call without a transaction of its own; it forwards each
retransmission of the peer's INVITE with the branch the first copy got, and the CANCEL and the
non-2xx ACK with that branch too (the device matches them to its INVITE transaction); it drops a
response whose next Via is not the one it gave our branch to. A request that arrives over a stream
and must leave over UDP keeps the stateful relay (its sender does not retransmit).
"""

from __future__ import annotations

import pytest_twisted

from libon_tsilo.sip import transport as transport_module
from libon_tsilo.sip.headers import Via
from libon_tsilo.sip.message import Request, Response
from libon_tsilo.sip.transport import TransportError
from tests.cluster.test_relay_two_nodes import (
    AOR, SDP, Pair, _answered_call, _public, in_dialog, invite, register,
)
from tests.cluster.ua import UA, response_to, tag, wait_for


@pytest_twisted.ensureDeferred
async def test_b_relays_a_whole_udp_call_without_a_transaction_of_its_own():
    pair = Pair()
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        rr = inv.header_values("record-route")
        device.send(in_dialog(device, "BYE", str(inv.contacts[0].uri), rr,
                              f"{inv.header('to')};tag={device_tag}", inv.header("from") or "", inv.call_id, 1))
        bye = await caller.request("BYE")
        caller.send(response_to(bye, 200, "OK"))
        await device.response(200, "BYE")
        relay = pair.b.parts.extra["cluster_relay"]
        # INVITE, ACK to the device; the device's BYE to A; 180, 200 and the BYE's 200 back
        assert relay.counters["stateless"] == 3 and relay.counters["stateless_responses"] == 3
        layer = pair.b.parts.transactions
        assert layer.client_count == 0
        assert layer.server_count == 1  # the device's REGISTER: B's registrar answered it
        # the device got the INVITE with B's own Via on top of A's, and no 100 Trying reached A from B
        assert inv.branch.startswith("z9hG4bKsl") and len(inv.header_values("via")) == 2
    finally:
        await pair.stop()


async def _device_on_b(pair: Pair) -> tuple[UA, UA, str]:
    """A UDP device registered on B, and a fake peer node on B's internal listener; the binding's
    Path entry (B's, with the device's flow token)."""
    device = await pair.ua(pair.b)
    device.send(register(device))
    await device.response(200, "REGISTER")
    peer = await UA("udp").start(pair.b.parts.extra["cluster_node"].bound)
    pair.uas.append(peer)
    return device, peer, pair.a.parts.location.lookup(AOR)[0].path[0]


def _peer_invite(peer: UA, device: UA, route: str, branch: str, call_id: str) -> str:
    return (
        f"INVITE sip:bob@127.0.0.1:{device.port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch};rport\r\nMax-Forwards: 70\r\n"
        f"Route: {route}\r\nFrom: <sip:carol@127.0.0.1>;tag=p1\r\nTo: <sip:bob@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:carol@127.0.0.1:{peer.port}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}"
    )


async def _answered_through_b(pair: Pair) -> tuple[UA, UA, str, Response, list[str]]:
    """A peer's INVITE relayed by B to its device and answered: the device, the peer, the Call-ID,
    the 200 the peer got and the route set the peer's in-dialog requests take (B's Record-Routes)."""
    device, peer, route = await _device_on_b(pair)
    call_id = f"{tag()}@peer"
    peer.send(_peer_invite(peer, device, route, f"z9hG4bK{tag()}", call_id))
    inv = await device.request("INVITE")
    device.send(response_to(inv, 200, "OK", "dev1"))
    ok = await peer.response(200, "INVITE")
    return device, peer, call_id, ok, list(reversed(ok.header_values("record-route")))


def _received(ua: UA, method: str) -> list[Request]:
    return [m for m in ua.received if isinstance(m, Request) and m.method == method]


@pytest_twisted.ensureDeferred
async def test_retransmissions_cancel_and_the_non_2xx_ack_leave_with_the_invites_branch():
    pair = Pair()
    pair.start()
    try:
        device, peer, route = await _device_on_b(pair)
        branch, call_id = f"z9hG4bK{tag()}", f"{tag()}@peer"
        text = _peer_invite(peer, device, route, branch, call_id)
        peer.send(text)
        await device.request("INVITE")
        peer.send(text)  # Timer A's retransmission: a stateless proxy forwards each one (§16.11)
        await wait_for(lambda: len(_received(device, "INVITE")) == 2, "the retransmission at the device")
        first, again = _received(device, "INVITE")
        assert first.branch == again.branch and first.branch.startswith("z9hG4bKsl")
        assert first.header_values("record-route") == again.header_values("record-route")
        device.send(response_to(first, 180, "Ringing", "dev1"))
        await peer.response(180, "INVITE")  # passed back to the next Via: the peer's
        cancel_vias = f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch};rport\r\n"
        common = (f"Max-Forwards: 70\r\nRoute: {route}\r\nFrom: <sip:carol@127.0.0.1>;tag=p1\r\n"
                  f"Call-ID: {call_id}\r\n")
        peer.send(f"CANCEL sip:bob@127.0.0.1:{device.port} SIP/2.0\r\n{cancel_vias}{common}"
                  f"To: <sip:bob@127.0.0.1>\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n")
        cancel = await device.request("CANCEL")
        assert cancel.branch == first.branch  # the device's INVITE transaction matches it (RFC 3261 §9.2)
        device.send(response_to(cancel, 200, "OK", "dev1"))
        device.send(response_to(first, 487, "Request Terminated", "dev1"))
        await peer.response(200, "CANCEL")
        final = await peer.response(487, "INVITE")
        peer.send(f"ACK sip:bob@127.0.0.1:{device.port} SIP/2.0\r\n{cancel_vias}{common}"
                  f"To: {final.header('to')}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")
        ack = await device.request("ACK")
        assert ack.branch == first.branch  # hop by hop: the device's INVITE transaction absorbs it
        relay = pair.b.parts.extra["cluster_relay"]
        assert relay.counters["cancelled"] == 1 and pair.b.parts.transactions.client_count == 0
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_response_whose_next_via_is_not_the_one_we_relayed_for_is_dropped():
    pair = Pair()
    pair.start()
    try:
        device, peer, route = await _device_on_b(pair)
        victim = await UA("udp").start(("127.0.0.1", 9))
        pair.uas.append(victim)
        peer.send(_peer_invite(peer, device, route, f"z9hG4bK{tag()}", f"{tag()}@peer"))
        inv = await device.request("INVITE")
        # the device rewrites the peer's Via to point at another host: B must not send it there
        genuine = response_to(inv, 180, "Ringing", "dev1")
        forged = genuine.replace(f"rport={peer.port}", f"rport={victim.port}").replace("Ringing", "Forged")
        assert forged != genuine.replace("Ringing", "Forged")
        device.send(forged)
        relay = pair.b.parts.extra["cluster_relay"]
        await wait_for(lambda: relay.limit_hits()["cluster_refused_bad_branch"] == 1, "B to drop it")
        device.send(genuine)
        await peer.response(180, "INVITE")
        assert not victim.received and not [m for m in peer.received if getattr(m, "reason", "") == "Forged"]
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_request_from_a_stream_to_udp_keeps_a_client_transaction_that_retransmits():
    """A peer on a TCP internal listener does not retransmit its INVITE (RFC 3261 §17.1.1.2): B
    relays it towards the UDP device on a client transaction, whose Timer A does."""
    pair = Pair(internal="tcp")
    pair.start()
    try:
        caller = await pair.ua(pair.a)
        device = await pair.ua(pair.b)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        await wait_for(lambda: pair.a.parts.silo.stats()["stored_transactions"] == 1, "the call parked on A")
        device.send(register(device))
        await device.request("INVITE")
        relay = pair.b.parts.extra["cluster_relay"]
        assert relay.counters["stateless"] == 0 and relay.stats()["pending_invites"] == 1
        await wait_for(lambda: len(_received(device, "INVITE")) == 2, "B's Timer A retransmission")
        first, again = _received(device, "INVITE")
        assert first.branch == again.branch and not first.branch.startswith("z9hG4bKsl")
    finally:
        await pair.stop()



@pytest_twisted.ensureDeferred
async def test_an_invite_from_udp_onto_a_tcp_flow_keeps_its_transactions_and_a_bye_does_not():
    """The device over TCP does not repeat its 486 (Timer G is for UDP); B's server transaction
    repeats it towards the peer on UDP until the ACK, which it absorbs. The in-dialog BYE, whose
    UDP sender retransmits until answered, goes statelessly."""
    pair = Pair()  # UDP internal listeners
    pair.start()
    try:
        caller, device, inv, answer, device_tag = await _answered_call(pair, "tcp")
        relay = pair.b.parts.extra["cluster_relay"]
        assert not inv.branch.startswith("z9hG4bKsl")  # B's client transaction's branch
        assert relay.counters["stateless"] == 1  # the ACK only
        caller.send(in_dialog(caller, "BYE", str(answer.contacts[0].uri), [], answer.header("from") or "",
                              answer.header("to") or "", answer.call_id, 2))
        bye = await device.request("BYE")
        assert bye.branch.startswith("z9hG4bKsl") and relay.counters["stateless"] == 2
        device.send(response_to(bye, 200, "OK"))
        await caller.response(200, "BYE")
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_tcp_devices_486_is_repeated_to_the_peer_until_its_ack():
    pair = Pair()
    pair.start()
    try:
        device = await pair.ua(pair.b, "tcp")
        device.send(register(device))
        await device.response(200, "REGISTER")
        peer = await UA("udp").start(pair.b.parts.extra["cluster_node"].bound)
        pair.uas.append(peer)
        route = pair.a.parts.location.lookup(AOR)[0].path[0]
        branch, call_id = f"z9hG4bK{tag()}", f"{tag()}@peer"
        peer.send(_peer_invite(peer, device, route, branch, call_id))
        await peer.response(100, "INVITE")  # B's own: a stateful proxy's duty
        inv = await device.request("INVITE")
        device.send(response_to(inv, 180, "Ringing", "dev1"))
        await peer.response(180, "INVITE")
        device.send(response_to(inv, 486, "Busy Here", "dev1"))
        # not ACKed yet: B's Timer G sends it again (0.5 s on the real reactor)
        await wait_for(lambda: len([m for m in peer.received if getattr(m, "status", 0) == 486]) == 2,
                       "B to repeat the 486")
        final = await peer.response(486, "INVITE")
        peer.send(f"ACK sip:bob@127.0.0.1:{device.port} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch};rport\r\nMax-Forwards: 70\r\n"
                  f"Route: {route}\r\nFrom: <sip:carol@127.0.0.1>;tag=p1\r\nTo: {final.header('to')}\r\n"
                  f"Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")
        await device.request("ACK")  # B's client transaction acknowledges the 486 hop by hop
        relay = pair.b.parts.extra["cluster_relay"]
        assert relay.counters["stateless"] == 0  # the peer's ACK went to B's server transaction
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_relayed_response_goes_on_as_its_own_bytes_less_our_via_never_parsed(monkeypatch):
    """B reads a response's Via lines and nothing else (sip/wire_edit.py): what the peer gets is
    what the device sent but for B's Via, spellings and all, and B's parser never saw it. It still
    counts in and out in /metrics."""
    pair = Pair()
    pair.start()
    try:
        device, peer, route = await _device_on_b(pair)
        peer.send(_peer_invite(peer, device, route, f"z9hG4bK{tag()}", f"{tag()}@peer"))
        inv = await device.request("INVITE")
        parsed: list[bytes] = []
        real_parse = transport_module.parse_message
        monkeypatch.setattr(transport_module, "parse_message",
                            lambda data, stream=False: parsed.append(data) or real_parse(data, stream))
        # the device's own spelling: a re-serialized message would not keep it
        text = response_to(inv, 180, "Ringing", "dev1").replace("\r\nCall-ID: ", "\r\ncall-id:   ", 1)
        ours, rest = text.split("\r\n", 2)[1], text.split("\r\n", 2)[2]
        assert ours.startswith("Via: ") and inv.branch in ours
        device.send(text)
        got = await peer.response(180, "INVITE")
        assert got.to_bytes() == f"{text.split(chr(13))[0]}\r\n{rest}".encode()
        assert not [data for data in parsed if inv.branch.encode() in data]
        counters = pair.b.parts.extra["message_counters"]
        assert counters.responses_in[("INVITE", 180)] == 1 and counters.responses_out[("INVITE", 180)] == 1
        assert pair.b.parts.extra["cluster_relay"].counters["stateless_responses"] == 1
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_datagram_whose_next_hop_is_a_stream_takes_the_parsers_path():
    """Bytes as received go on only where they frame the same: a datagram may carry octets after
    its body (RFC 3261 §18.3), which a stream's next hop would read as the next message."""
    pair = Pair()
    pair.start()
    try:
        relay = pair.b.parts.extra["cluster_relay"]
        flows = pair.b.parts.transport.flows
        device = await pair.ua(pair.b)
        device.send("OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: " + device.via + "\r\nContent-Length: 0\r\n\r\n")
        await wait_for(lambda: next((f for f in flows if f.key.remote[1] == device.port), None), "its flow")
        udp_flow = next(f for f in flows if f.key.remote[1] == device.port)
        for transport, taken in (("TCP", False), ("UDP", True)):
            next_via = f"SIP/2.0/{transport} 127.0.0.1:9;branch=z9hG4bK{tag()};rport=9"
            ours = relay.branches.for_request(Via.parse(next_via))
            data = (f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5071;branch={ours}\r\nVia: {next_via}\r\n"
                    f"From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: c\r\nCSeq: 2 BYE\r\n"
                    f"Content-Length: 0\r\n\r\ntrailing").encode()
            assert relay.forward_bytes(data, udp_flow) is taken, transport
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_our_record_route_entries_are_the_node_uris_with_the_devices_token():
    """RFC 5658 double Record-Route: B's public entry on top (the device routes by it), its internal
    one below (the peer's), each the node's URI with the token of the device's flow; the same for
    every call (the relay keeps what follows the token)."""
    pair = Pair()
    pair.start()
    try:
        device, peer, route = await _device_on_b(pair)
        node = pair.b.parts.extra["cluster_node"]
        token = route[len("<sip:"):route.index("@")]
        for n in range(2):
            peer.send(_peer_invite(peer, device, route, f"z9hG4bK{tag()}", f"{tag()}@peer"))
            inv = await device.request("INVITE")
            public, internal = node.transport.local_via("udp"), node.via_address
            assert inv.header_values("record-route") == [
                f"<sip:{token}@{public[0]}:{public[1]};lr>",
                f"<sip:{token}@{internal[0]}:{internal[1]};transport=udp;lr>",
            ] == [f"<{node.public_uri(token, 'udp')}>", f"<{node.uri(token)}>"], n
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_our_two_record_route_entries_cost_one_token_check_per_dialog():
    """The peer's ACK carries both of B's entries (RFC 5658: internal, then public, each with the
    device's token); the second has the first one's user part, so its token is not read again."""
    pair = Pair()
    pair.start()
    try:
        device, peer, route = await _device_on_b(pair)
        branch, call_id = f"z9hG4bK{tag()}", f"{tag()}@peer"
        peer.send(_peer_invite(peer, device, route, branch, call_id))
        inv = await device.request("INVITE")
        device.send(response_to(inv, 200, "OK", "dev1"))
        ok = await peer.response(200, "INVITE")
        rr = ok.header_values("record-route")
        assert len(rr) == 2 and rr[0] != rr[1]
        tokens = pair.b.parts.extra["cluster_node"].tokens
        reads: list[str | None] = []
        real_read = tokens.read
        tokens.read = lambda token: reads.append(token) or real_read(token)
        peer.send(f"ACK sip:bob@127.0.0.1:{device.port} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK{tag()};rport\r\nMax-Forwards: 70\r\n"
                  f"Route: {', '.join(reversed(rr))}\r\nFrom: <sip:carol@127.0.0.1>;tag=p1\r\n"
                  f"To: {ok.header('to')}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")
        ack = await device.request("ACK")
        assert not ack.has_header("route")  # both entries were B's, both popped
        assert reads == []
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_the_entries_b_wrote_itself_are_never_read_back_through_the_hmac():
    """B wrote the Path entry (at the REGISTER) and the two Record-Route entries (on the INVITE): the
    INVITE's Route, the ACK's and the device's BYE's name them, and B knows them without reading
    their token back (an HMAC each, the costliest step of a relayed request)."""
    pair = Pair()
    pair.start()
    try:
        tokens = pair.b.parts.extra["cluster_node"].tokens
        reads: list[str | None] = []
        real_read = tokens.read
        tokens.read = lambda token: reads.append(token) or real_read(token)
        caller, device, inv, answer, device_tag = await _answered_call(pair, "udp")
        rr = inv.header_values("record-route")
        device.send(in_dialog(device, "BYE", str(inv.contacts[0].uri), rr,
                              f"{inv.header('to')};tag={device_tag}", inv.header("from") or "", inv.call_id, 1))
        bye = await caller.request("BYE")
        caller.send(response_to(bye, 200, "OK"))
        await device.response(200, "BYE")
        assert pair.b.parts.extra["cluster_relay"].counters["to_peer"] == 1
        assert reads == []
    finally:
        await pair.stop()


def _peer_bye(peer: UA, device: UA, routes: list[str], to: str, call_id: str, branch: str, via: str = "") -> str:
    return (
        f"BYE sip:bob@127.0.0.1:{device.port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch}{via}\r\nMax-Forwards: 70\r\n"
        f"Route: {', '.join(routes)}\r\nFrom: <sip:carol@127.0.0.1>;tag=p1\r\nTo: {to}\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )


@pytest_twisted.ensureDeferred
async def test_a_peers_in_dialog_request_is_relayed_as_bytes_exactly_as_the_parsed_path_would():
    """The peer's BYE (and ACK) go on without a parse (sip/wire_edit.py ``read_request_head``): the
    device gets byte for byte what the parsed stateless path sends (B's Via on top, the peer's Via
    with received/rport, B's Route entries off, Max-Forwards less one), retransmissions included;
    the device's 200 comes back to the peer."""
    pair = Pair()
    pair.start()
    try:
        relay = pair.b.parts.extra["cluster_relay"]
        device, peer, call_id, ok, routes = await _answered_through_b(pair)
        for via in (";rport", "", ";received=192.0.2.66"):  # the transport's received/rport rules, each
            device.received.clear()
            bye = _peer_bye(peer, device, routes, ok.header("to") or "", call_id, f"z9hG4bK{tag()}", via)
            peer.send(bye)  # as bytes
            await device.request("BYE")
            relay.internal_exempt = False  # the same request again, on the parsed path
            peer.send(bye)
            await wait_for(lambda: len([m for m in device.received if isinstance(m, Request)]) == 2, "the copy")
            relay.internal_exempt = True
            as_bytes, as_parsed = [m.to_bytes() for m in device.received]
            assert as_bytes == as_parsed, via
        assert relay.counters["stateless_bytes"] == 3
        assert relay.counters["stateless"] == 1 + 3 + 3  # the INVITE, then each BYE both ways
        got = device.received[0]
        assert not got.has_header("route") and got.header("max-forwards") == "69"
        assert got.branch.startswith("z9hG4bKsl")
        device.send(response_to(got, 200, "OK"))
        await peer.response(200, "BYE")
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_peers_request_that_cannot_be_sent_on_gets_a_503_as_bytes_as_when_parsed():
    """RFC 3261 §16.9: a transport error on a forwarded request counts as a 503 to it. The device's
    flow refuses the send (sendto's EPERM, as a firewall's reject gives): the peer's BYE relayed as
    bytes gets B's 503, as the parsed path's does, not silence; its ACK gets nothing."""
    pair = Pair()
    pair.start()
    try:
        relay = pair.b.parts.extra["cluster_relay"]
        device, peer, call_id, ok, routes = await _answered_through_b(pair)
        flow = next(f for f in pair.b.parts.transport.flows if f.key.remote == ("127.0.0.1", device.port))

        def refused(data: bytes) -> None:
            raise TransportError(f"UDP send to 127.0.0.1:{device.port} failed: [Errno 1] Operation not permitted")

        flow._sender = refused

        async def bye_answered(as_bytes: bool) -> Response:
            relay.internal_exempt = as_bytes  # False: the parsed path takes it
            branch = f"z9hG4bK{tag()}"
            peer.send(_peer_bye(peer, device, routes, ok.header("to") or "", call_id, branch, ";rport"))
            return await wait_for(lambda: next(
                (m for m in peer.received if isinstance(m, Response) and m.branch == branch), None), "the answer")

        as_bytes = relay.counters["stateless_bytes"]
        answers = [await bye_answered(True)]
        assert relay.counters["stateless_bytes"] == as_bytes + 1
        answers.append(await bye_answered(False))
        assert relay.counters["stateless_bytes"] == as_bytes + 1
        for answer in answers:
            assert answer.status == 503 and answer.call_id == call_id and answer.cseq.method == "BYE"
            assert answer.top_via.rport == peer.port and len(answer.vias) == 1  # the peer's Via only
        relay.internal_exempt = True
        peer.send(f"ACK sip:bob@127.0.0.1:{device.port} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK{tag()};rport\r\nMax-Forwards: 70\r\n"
                  f"Route: {', '.join(routes)}\r\nFrom: <sip:carol@127.0.0.1>;tag=p1\r\n"
                  f"To: {ok.header('to')}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")
        await bye_answered(True)  # after the ACK, over the same sockets: what the ACK got came first
        assert relay.counters["stateless_bytes"] == as_bytes + 3  # the ACK went the bytes path too
        # the INVITE's 200 and the three BYEs' 503s: nothing for the ACK
        assert len([m for m in peer.received if isinstance(m, Response)]) == 1 + 3
    finally:
        await pair.stop()
