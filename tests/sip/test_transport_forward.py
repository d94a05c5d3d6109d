"""The transport's stateless forwarder hook (RFC 3261 §16.11: a stateless proxy takes messages from
the transport layer) on real loopback sockets, and TransactionLayer.holds, which tells it what a
transaction of ours must take instead (on a Clock with a fake transport)."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from libon_tsilo.sip.headers import Via
from libon_tsilo.sip.message import Request, make_response, parse_message
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, request_text
from tests.sip.test_transport_udp import harness, peer  # noqa: F401 (fixtures)
from tests.sip.tlsutil import sip_request

UDP = FakeFlow("udp")


@pytest_twisted.ensureDeferred
async def test_the_forwarder_sees_a_request_with_its_via_fixed_before_any_validation(harness, peer):  # noqa: F811
    h = harness()
    client, cport = peer()
    offered: list[Any] = []

    def forward(msg: Any, flow: Any) -> bool:
        offered.append(msg)
        return msg.method == "BYE"

    h.layer.forward = forward
    # a From no validation would let through: a proxy passes on what it does not route by (§16.3)
    bad_from = sip_request("BYE", via="SIP/2.0/UDP phone.invalid:5999;rport;branch=z9hG4bK-f1")
    bad_from = bad_from.replace(b"From: <sip:alice@example.com>", b"From: <sip:alice@exa mple.com>")
    client.send(bad_from, h.addr())
    client.send(sip_request("OPTIONS", via=f"SIP/2.0/UDP 127.0.0.1:{cport};rport;branch=z9hG4bK-f2"), h.addr())
    msg, flow = await h.next()  # the OPTIONS, declined: validated and handed to the sink
    assert msg.method == "OPTIONS" and msg.validated and msg.top_via.rport == cport
    bye = offered[0]
    assert [m.method for m in offered] == ["BYE", "OPTIONS"] and not bye.validated
    assert bye.top_via.received == "127.0.0.1" and bye.top_via.rport == cport
    assert h.inbox.pending == []  # the BYE never reached the sink


@pytest_twisted.ensureDeferred
async def test_a_header_the_forwarder_cannot_read_gets_the_400_of_unparseable_input(harness, peer):  # noqa: F811
    h = harness()
    client, cport = peer()

    def forward(msg: Any, flow: Any) -> bool:
        return msg.max_forwards is None  # raises ParseError on a bad Max-Forwards

    h.layer.forward = forward
    client.send(sip_request(via=f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bK-m1").replace(
        b"Max-Forwards: 70", b"Max-Forwards: lots"), h.addr())
    data, _ = await client.next()
    assert parse_message(data).status == 400


def test_holds_names_what_a_transaction_of_ours_takes():
    env = Env()
    invite = parse_message(request_text("INVITE").encode())
    assert isinstance(invite, Request) and not env.layer.holds(invite)
    env.feed(request_text("INVITE"), UDP)
    stx = env.tu.requests[-1][1]
    assert env.layer.holds(invite)  # its retransmission
    for text in (request_text("CANCEL"), request_text("ACK", to_tag="t1")):  # the INVITE's branch
        assert env.layer.holds(parse_message(text.encode()))
    for text in (request_text("CANCEL", branch="z9hG4bKother"), request_text("ACK", branch="z9hG4bKa2", to_tag="t1"),
                 request_text("BYE", branch="z9hG4bKbye", to_tag="t1")):
        assert not env.layer.holds(parse_message(text.encode()))
    stx.respond(make_response(stx.request, 486, to_tag="t1"))
    env.layer.stop()


@pytest_twisted.ensureDeferred
async def test_the_bytes_forwarder_sees_each_message_before_the_parse_and_sends_a_response_by_its_via(
        harness, peer):  # noqa: F811
    h = harness()
    client, cport = peer()
    target, tport = peer()
    offered: list[bytes] = []

    def forward_bytes(data: bytes, flow: Any) -> bool:
        offered.append(data)
        if not data.startswith(b"SIP/2.0 "):
            return False  # declined: parsed and handed on as ever
        via = Via.parse(f"SIP/2.0/UDP 127.0.0.1:{tport};branch=z9hG4bK-t1")
        h.layer.forward_response_data(data.replace(b"Unparseable", b"Passed on"), via)
        return True

    h.layer.forward_bytes = forward_bytes
    # a response no parser would take (no Via at all): the bytes forwarder reads what it needs only
    client.send(b"SIP/2.0 180 Unparseable\r\nCSeq: nonsense\r\n\r\n", h.addr())
    data, _ = await target.next()
    assert data == b"SIP/2.0 180 Passed on\r\nCSeq: nonsense\r\n\r\n"
    client.send(sip_request("OPTIONS", via=f"SIP/2.0/UDP 127.0.0.1:{cport};rport;branch=z9hG4bK-f3"), h.addr())
    msg, _ = await h.next()
    assert msg.method == "OPTIONS" and len(offered) == 2 and offered[1].startswith(b"OPTIONS ")


def test_a_response_that_cannot_be_forwarded_is_logged_with_its_call_id(harness):  # noqa: F811
    from twisted.logger import globalLogPublisher

    h = harness()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:  # never raises: the sender's retransmission is the retry
        h.layer.forward_response_data(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/SCTP 127.0.0.1:9;branch=z9hG4bK-s\r\n"
                                      b"Call-ID: c-sctp\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
                                      Via.parse("SIP/2.0/SCTP 127.0.0.1:9;branch=z9hG4bK-s"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if "cannot forward a response" in e.get("log_format", "")]
    assert event["call_id"] == "c-sctp" and "SCTP" in str(event["err"])
