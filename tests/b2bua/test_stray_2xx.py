"""Issue 11 item 8 through the whole stack below the transport (transaction layer, TransactionPort,
CallManager): an unsolicited 200 OK gets no ACK and no BYE; a late 2xx to our own forked INVITE
still gets both (RFC 6026: the dialog it creates must be ACKed, and we end it)."""

from __future__ import annotations

from libon_tsilo.sip.message import Request, make_response, parse_message
from tests.b2bua.helpers import SDP_B, caller_invite
from tests.b2bua.test_integration_txn import assert_idle, device_reply, setup


def _unsolicited_200() -> bytes:
    # what the reproducer sent: a 233-byte 200 OK naming a victim in its Contact
    return (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKdeadbeef\r\n"
            b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\nCall-ID: stray-1\r\n"
            b"CSeq: 1 INVITE\r\nContact: <sip:victim@198.51.100.66:5060>\r\nContent-Length: 0\r\n\r\n")


def test_unsolicited_200_ok_is_not_acked_nor_byed() -> None:
    clock, transport, layer, mgr, caller, device = setup()
    layer.inbound(parse_message(_unsolicited_200()), device)
    assert transport.out == []
    assert layer.strays_dropped == 1
    assert_idle(clock, layer, mgr)


def test_late_2xx_from_another_fork_of_our_invite_is_acked_and_byed() -> None:
    clock, transport, layer, mgr, caller, device = setup()
    layer.inbound(caller_invite(), caller)
    (invite,) = transport.requests("INVITE")
    layer.inbound(device_reply(invite, 200, SDP_B), device)
    clock.advance(64 * 0.5)  # timer M: the INVITE client transaction is gone
    # a second fork behind the device answers late, with its own To tag
    late = make_response(invite, 200, None, to_tag="fork-2")
    late.add_header("Contact", "<sip:bob@10.0.0.3:5090;transport=tcp>")
    layer.inbound(parse_message(late.to_bytes()), device)
    acks = [r for r in transport.requests("ACK") if r.to.tag == "fork-2"]
    byes = [r for r in transport.requests("BYE") if r.to.tag == "fork-2"]
    assert len(acks) == 1 and len(byes) == 1
    assert isinstance(byes[0], Request) and byes[0].cseq.seq == acks[0].cseq.seq + 1
    assert layer.strays_dropped == 0
