"""Session timers on the real transaction layer (TransactionPort over a recording transport): our
refresh carries our Via, its 2xx gets an ACK through the port, and a device that no longer answers
shows as a transaction timeout (a local 408) that ends the call both ways."""

from __future__ import annotations

from libon_tsilo.b2bua.session_timer import REASON_REFRESH_FAILED
from libon_tsilo.sip.message import Request, Response
from tests.b2bua.helpers import SDP_B, caller_invite, parse
from tests.b2bua.test_integration_txn import assert_idle, device_reply
from tests.b2bua.test_integration_txn import setup as txn_setup


def answered() -> tuple:
    clock, transport, layer, mgr, caller, device = txn_setup()
    layer.inbound(caller_invite(), caller)
    (invite,) = transport.requests("INVITE")
    layer.inbound(device_reply(invite, 200, SDP_B), device)  # no Session-Expires: we refresh it
    ok = [m for m, _, _ in transport.out if isinstance(m, Response) and m.status == 200][0]
    assert ok.header("Session-Expires") == "1800;refresher=uac"  # the caller refreshes its leg
    layer.inbound(parse(f"""ACK sip:b2bua@192.0.2.10:5060 SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKack1;rport
Max-Forwards: 70
From: <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>;tag={ok.to.tag}
Call-ID: call-1@10.0.0.1
CSeq: 10 ACK"""), caller)
    return clock, transport, layer, mgr, caller, device, invite


def test_refresh_reinvite_over_the_real_layer_is_acked() -> None:
    clock, transport, layer, mgr, caller, device, invite = answered()
    clock.advance(900)
    refresh = transport.requests("INVITE")[-1]
    assert refresh.call_id == invite.call_id and refresh.cseq.seq == 2
    assert refresh.top_via.host == "192.0.2.10" and refresh.branch != invite.branch
    layer.inbound(device_reply(refresh, 200, SDP_B), device)
    ack = transport.requests("ACK")[-1]
    assert ack.cseq.seq == 2 and ack.cseq.method == "ACK" and ack.top_via.host == "192.0.2.10"
    assert mgr.calls  # refreshed: the call goes on
    clock.advance(1768 - 900)  # the caller never refreshed its own leg
    byes: list[Request] = transport.requests("BYE")
    assert {b.call_id for b in byes} == {"call-1@10.0.0.1", invite.call_id}
    for bye in byes:
        layer.inbound(device_reply(bye, 200), caller if bye.call_id == "call-1@10.0.0.1" else device)
    assert_idle(clock, layer, mgr)


def test_silent_device_refresh_times_out_and_ends_the_call() -> None:
    clock, transport, layer, mgr, caller, device, invite = answered()
    clock.advance(900)
    assert transport.requests("INVITE")[-1].cseq.seq == 2  # our refresh; the device says nothing
    clock.advance(64 * 0.5 - 0.001)
    assert transport.requests("BYE") == []
    clock.advance(0.001)  # Timer B: the transaction layer answers our refresh with a local 408
    byes = transport.requests("BYE")
    assert {b.call_id for b in byes} == {"call-1@10.0.0.1", invite.call_id}
    assert all(b.header("Reason") == REASON_REFRESH_FAILED for b in byes)
    assert mgr.calls == {} and mgr.counters["session_expired"] == 1
    assert_idle(clock, layer, mgr)  # the BYEs time out too: nothing is left
