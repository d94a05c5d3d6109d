"""The call layer on the real transaction layer (through TransactionPort), over a recording transport.

Checks what the unit tests' fake port cannot: our Via on every request, the 100 Trying, the
CANCEL built by the client transaction, and that no transaction or timer outlives a call.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from libon_tsilo.b2bua.manager import CallManager, CallSettings
from libon_tsilo.b2bua.ports import TransactionPort
from libon_tsilo.silo.silo import Silo
from libon_tsilo.sip.flow import Flow, FlowKey
from libon_tsilo.sip.message import Request, Response, make_response, parse_message
from libon_tsilo.sip.transaction import TransactionLayer
from tests.fakes.calls import FakeLocation
from tests.b2bua.helpers import SDP_A, SDP_B, binding, caller_invite, parse


class Flows:
    def __init__(self) -> None:
        self.table: dict[str, Flow] = {}

    def get(self, flow_id: str) -> Flow | None:
        return self.table.get(flow_id)


class RecordingTransport:
    def __init__(self) -> None:
        self.sink: Any = None
        self.flows = Flows()
        self.out: list[tuple[Any, Any, Any]] = []  # (message, target, flow)

    def local_via(self, transport: str, remote_host: str | None = None) -> tuple[str, int]:
        return ("192.0.2.10", 5060)

    def send_request(self, req: Request, target: Any, flow: Any = None) -> Any:
        self.out.append((parse_message(req.to_bytes()), target, flow))
        return flow

    def send_response(self, resp: Response, flow: Any) -> None:
        self.out.append((parse_message(resp.to_bytes()), None, flow))

    def flow(self, fid: str, remote: tuple[str, int]) -> Flow:
        f = Flow(FlowKey("tcp", ("192.0.2.10", 5060), remote), fid, lambda data: None)
        self.flows.table[fid] = f
        return f

    def requests(self, method: str) -> list[Request]:
        return [m for m, _, _ in self.out if isinstance(m, Request) and m.method == method]

    def statuses(self) -> list[int]:
        return [m.status for m, _, _ in self.out if isinstance(m, Response)]


class TU:
    def __init__(self, mgr: CallManager) -> None:
        self.mgr = mgr

    def request_received(self, request: Request, stx: Any, flow: Any) -> None:
        self.mgr.request_received(request, stx, flow)

    def cancel_received(self, cancel: Request, invite_stx: Any, flow: Any, stx: Any) -> None:
        self.mgr.handle_cancel(cancel, invite_stx, flow, stx)

    def stray_response(self, response: Response, flow: Any) -> None:
        self.mgr.stray_response(response, flow)


def setup() -> tuple[Clock, RecordingTransport, TransactionLayer, CallManager, Flow, Flow]:
    clock = Clock()
    transport = RecordingTransport()
    layer = TransactionLayer(transport, clock)
    location = FakeLocation()
    location.add(binding(1))
    silo = Silo(clock, location)
    mgr = CallManager(clock, TransactionPort(layer, clock), silo, location, settings=CallSettings())
    layer.tu = TU(mgr)
    caller = transport.flow("tcp:caller#1", ("10.0.0.1", 5070))
    device = transport.flow("tcp:dev1#1", ("10.0.0.2", 5080))
    return clock, transport, layer, mgr, caller, device


def device_reply(req: Request, status: int, body: bytes = b"") -> Response:
    resp = make_response(req, status, None, to_tag="dev-tag" if status > 100 else None)
    if 100 < status < 300:
        resp.add_header("Contact", "<sip:bob@10.0.0.2:5080;transport=tcp>")
    if body:
        resp.add_header("Content-Type", "application/sdp")
        resp.body = body
    return parse_message(resp.to_bytes())


def assert_idle(clock: Clock, layer: TransactionLayer, mgr: CallManager) -> None:
    clock.advance(64 * 0.5 + 33)  # every transaction timer (B, D, H, J, L, M) has run out
    assert len(layer) == 0
    assert mgr.calls == {} and mgr.dialogs == {} and mgr.flows == {} and len(mgr.silo) == 0
    assert clock.getDelayedCalls() == []


def test_answered_call_over_the_real_transaction_layer() -> None:
    clock, transport, layer, mgr, caller, device = setup()
    layer.inbound(caller_invite(), caller)
    assert transport.statuses() == [100]
    (invite,) = transport.requests("INVITE")
    assert invite.top_via.host == "192.0.2.10" and invite.branch.startswith("z9hG4bK")
    assert len(invite.vias) == 1  # the caller's Via never leaks to the device
    layer.inbound(device_reply(invite, 180), device)
    layer.inbound(device_reply(invite, 200, SDP_B), device)
    assert transport.statuses() == [100, 180, 200]
    (ack,) = transport.requests("ACK")
    assert ack.branch != invite.branch and ack.to.tag == "dev-tag"
    ok = [m for m, _, _ in transport.out if isinstance(m, Response) and m.status == 200][0]
    tag = ok.to.tag
    # the caller's ACK, then its BYE
    layer.inbound(parse(f"""ACK sip:b2bua@192.0.2.10:5060 SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKack1;rport
Max-Forwards: 70
From: <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>;tag={tag}
Call-ID: call-1@10.0.0.1
CSeq: 10 ACK"""), caller)
    layer.inbound(parse(f"""BYE sip:b2bua@192.0.2.10:5060 SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKbye1;rport
Max-Forwards: 70
From: <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>;tag={tag}
Call-ID: call-1@10.0.0.1
CSeq: 11 BYE"""), caller)
    assert transport.statuses()[-1] == 200
    (bye,) = transport.requests("BYE")
    assert bye.call_id == invite.call_id
    layer.inbound(device_reply(bye, 200), device)
    assert_idle(clock, layer, mgr)


def test_caller_cancel_over_the_real_transaction_layer() -> None:
    clock, transport, layer, mgr, caller, device = setup()
    layer.inbound(caller_invite(body=SDP_A), caller)
    (invite,) = transport.requests("INVITE")
    layer.inbound(device_reply(invite, 180), device)
    layer.inbound(parse("""CANCEL sip:bob@example.com SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKcallercall-1;rport
Max-Forwards: 70
From: "Alice Liddell" <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>
Call-ID: call-1@10.0.0.1
CSeq: 10 CANCEL"""), caller)
    assert transport.statuses() == [100, 180, 200, 487]
    (cancel,) = transport.requests("CANCEL")
    assert cancel.branch == invite.branch
    layer.inbound(device_reply(cancel, 200), device)
    layer.inbound(device_reply(invite, 487), device)
    assert transport.requests("ACK")  # the client transaction ACKs the 487 itself
    assert_idle(clock, layer, mgr)


def test_ring_timeout_over_the_real_transaction_layer() -> None:
    clock, transport, layer, mgr, caller, device = setup()
    layer.inbound(caller_invite(), caller)
    (invite,) = transport.requests("INVITE")
    layer.inbound(device_reply(invite, 180), device)
    clock.advance(30)
    assert transport.statuses()[-1] == 480
    (cancel,) = transport.requests("CANCEL")
    # RFC 3326: the device can tell a call nobody answered from one answered elsewhere (issue 12 item 14)
    assert cancel.header("Reason") == 'SIP;cause=480;text="Ring timeout"'
    # the device never answers the CANCEL: the client transaction gives up by itself
    assert_idle(clock, layer, mgr)


def test_device_unreachable_gives_the_caller_480_over_the_real_transaction_layer() -> None:
    # the device's connection is gone and a new one cannot be opened: the client transaction makes
    # a local 503 (RFC 3261 §8.1.3.1), which the caller must not see as a 500 "server crashed"
    from libon_tsilo.sip.transport import TransportError

    clock, transport, layer, mgr, caller, device = setup()

    def refuse(req: Request, target: Any, flow: Any = None) -> Any:
        if req.method == "INVITE" and target.host == "10.0.0.2":
            raise TransportError("connection refused")
        return RecordingTransport.send_request(transport, req, target, flow)

    transport.send_request = refuse  # type: ignore[method-assign]
    layer.inbound(caller_invite(), caller)
    clock.advance(0)
    assert transport.statuses() == [100, 480]
    assert_idle(clock, layer, mgr)


def test_a_bug_in_the_call_layer_gets_one_500_and_one_traceback(monkeypatch: Any) -> None:
    """One guard on the request path (the transaction layer, where a request enters the
    application): one traceback with the Call-ID, one 500, nothing stacked above it."""
    from twisted.logger import globalLogPublisher

    clock, transport, layer, mgr, caller, device = setup()

    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    # raised from the digest check the manager calls for a new INVITE (an attribute it calls): the
    # manager is compiled (mypyc), its own methods cannot be replaced on the instance
    monkeypatch.setattr(mgr, "authorize", broken)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        layer.inbound(parse_message(caller_invite(call_id="bug-1").to_bytes()), caller)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    (final,) = [m for m, _, _ in transport.out if isinstance(m, Response) and m.status >= 200]
    assert final.status == 500 and final.to.tag  # RFC 3261 §8.2.6.2: a final response has a To tag
    tracebacks = [e for e in logged if e.get("log_failure") is not None]
    assert len(tracebacks) == 1 and tracebacks[0]["call_id"] == "bug-1"
    assert_idle(clock, layer, mgr)


def test_a_malformed_header_found_by_the_call_layer_gets_400_without_a_traceback() -> None:
    from twisted.logger import globalLogPublisher

    clock, transport, layer, mgr, caller, device = setup()
    invite = caller_invite(call_id="bad-se", extra="Session-Expires: soon\n")
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        layer.inbound(parse_message(invite.to_bytes()), caller)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    (final,) = [m for m, _, _ in transport.out if isinstance(m, Response) and m.status >= 200]
    assert final.status == 400 and final.to.tag
    assert [e for e in logged if e.get("log_failure") is not None] == []
    assert transport.requests("INVITE") == []
    assert_idle(clock, layer, mgr)


def _timer_functions(clock: Clock) -> list[str]:
    return [c.func.__name__ for c in clock.getDelayedCalls()]  # type: ignore[attr-defined]


def test_ring_and_session_timers_wait_in_the_layers_queues_and_fire_on_time() -> None:
    """Issue 15: a call's ring timer and its session timer's first wait (delays the config fixes)
    take a place in the transaction layer's expiry queues, which share one DelayedCall: a call arms
    no DelayedCall of its own, and both timers still fire at their RFC/config times."""
    clock, transport, layer, mgr, caller, device = setup()
    layer.inbound(caller_invite(), caller)
    (invite,) = transport.requests("INVITE")
    layer.inbound(device_reply(invite, 180), device)
    # ringing: the one DelayedCall is the layer's shared timer (sip/timers.ExpiryTimer), armed for
    # the ring queue
    assert _timer_functions(clock) == ["_expire"]
    layer.inbound(device_reply(invite, 200, SDP_B), device)
    ok = [m for m, _, _ in transport.out if isinstance(m, Response) and m.status == 200][0]
    layer.inbound(parse(f"""ACK sip:b2bua@192.0.2.10:5060 SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKack1;rport
Max-Forwards: 70
From: <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>;tag={ok.to.tag}
Call-ID: call-1@10.0.0.1
CSeq: 10 ACK"""), caller)
    call = mgr.calls["call-1@10.0.0.1"]
    assert call.timers is not None
    # connected: the session timer waits in the layer's queue too (the ring entry left it)
    assert _timer_functions(clock) == ["_expire"]
    half = CallSettings().session_expires / 2
    clock.advance(half - 0.01)
    assert len(transport.requests("INVITE")) == 1  # no refresh before half the interval
    clock.advance(0.01)
    # the device's 200 had no Session-Expires: we refresh it, with a re-INVITE (no UPDATE in its Allow)
    assert len(transport.requests("INVITE")) == 2


def test_ring_timer_fires_at_the_ring_timeout_from_the_layers_queue() -> None:
    clock, transport, layer, mgr, caller, device = setup()
    layer.inbound(caller_invite(), caller)
    (invite,) = transport.requests("INVITE")
    layer.inbound(device_reply(invite, 180), device)
    clock.advance(CallSettings().ring_timeout - 0.01)
    assert 480 not in transport.statuses()
    clock.advance(0.01)
    assert transport.statuses()[-1] == 480
    assert_idle(clock, layer, mgr)
