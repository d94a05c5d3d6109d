"""Fakes for the call-layer tests: a SipPort that records everything, a scripted waker, builders.

Messages are built as text and read with the real parser, so the call logic sees exactly what it
will see in production.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from libon_tsilo.b2bua.manager import CallManager, CallSettings
from libon_tsilo.b2bua.ports import Hop
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.silo.silo import Silo
from libon_tsilo.sip.message import Request, Response, make_response, parse_message
from tests.fakes.calls import FakeLocation
from tests.fakes.sip import FakeFlow, FakeStx

SDP_A = b"v=0\r\no=alice 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
SDP_B = b"v=0\r\no=bob 2 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n"
SDP_C = b"v=0\r\no=bob 3 3 IN IP4 10.0.0.3\r\ns=-\r\nc=IN IP4 10.0.0.3\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"
AOR = "sip:bob@example.com"


def parse(text: str, body: bytes = b"") -> Any:
    head = text.strip("\n").replace("\n", "\r\n")
    return parse_message(head.encode() + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)


def caller_invite(call_id: str = "call-1@10.0.0.1", body: bytes = SDP_A, extra: str = "",
                  ruri: str = "sip:bob@example.com", max_forwards: int = 70,
                  supported: str = "100rel, timer") -> Request:
    ctype = "Content-Type: application/sdp\n" if body else ""
    return parse(
        f"""INVITE {ruri} SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKcaller{call_id[:6]};rport
Max-Forwards: {max_forwards}
From: "Alice Liddell" <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>
Call-ID: {call_id}
CSeq: 10 INVITE
Contact: <sip:alice@10.0.0.1:5070;transport=tcp>
Subject: lunch?
X-Private: must-not-leak
Supported: {supported}
{extra}{ctype}""".rstrip("\n"),
        body,
    )


def in_dialog(method: str, call_id: str, from_: str, to: str, seq: int, body: bytes = b"",
              ruri: str = "sip:b2bua@192.0.2.10:5060", extra: str = "") -> Request:
    ctype = "Content-Type: application/sdp\n" if body else ""
    return parse(
        f"""{method} {ruri} SIP/2.0
Via: SIP/2.0/TCP 10.9.9.9:5070;branch=z9hG4bK{method.lower()}{seq};rport
Max-Forwards: 70
From: {from_}
To: {to}
Call-ID: {call_id}
CSeq: {seq} {method}
{extra}{ctype}""".rstrip("\n"),
        body,
    )


def reply(req: Request, status: int, to_tag: str | None = "dev-tag", body: bytes = b"",
          contact: str | None = "<sip:bob@10.0.0.2:5080;transport=tcp>") -> Response:
    resp = make_response(req, status, None, to_tag=to_tag if status > 100 else None)
    if contact and 100 < status < 300:
        resp.add_header("Contact", contact)
    if body:
        resp.add_header("Content-Type", "application/sdp")
        resp.body = body
    # through the wire format, as a device's response would come
    return parse_message(resp.to_bytes())


def flow(fid: str = "tcp:caller#1", transport: str = "tcp", remote: tuple[str, int] = ("10.0.0.1", 5070)) -> Any:
    return FakeFlow(transport, remote, id=fid)


def binding(n: int = 1, aor: str = AOR, live: bool = True, push: str | None = None, flow_id: str | None = None,
            contact: str | None = None) -> Binding:
    return Binding(
        aor=aor,
        contact_uri=contact or f"sip:bob@10.0.0.{n + 1}:5080;transport=tcp",
        contact=f"<sip:bob@10.0.0.{n + 1}:5080;transport=tcp>",
        expires_at=10_000.0,
        registered_at=0.0,
        call_id=f"reg-{n}",
        cseq=1,
        instance=f"<urn:uuid:dev-{n}>",
        flow_id=flow_id if flow_id is not None else f"tcp:dev{n}#1",
        flow_live=live,
        received=("tcp", f"10.0.0.{n + 1}", 5080),
        pn_provider=push,
        pn_prid=f"token-{n}" if push else None,
        pn_param="TEAM.com.example.voip" if push else None,
    )


@dataclass
class FakeCtx:
    request: Request
    hop: Hop
    on_response: Callable[[Response], Any]
    cancelled: bool = False
    cancel_headers: list[tuple[str, str]] = field(default_factory=list)
    detached: bool = False
    failed_locally: bool = False

    def cancel(self, extra_headers: Any = (), on_response: Any = None) -> None:
        self.cancelled = True
        self.cancel_headers = list(extra_headers)

    def detach(self) -> None:
        self.detached = True

    def respond(self, status: int, **kw: Any) -> Response:
        resp = reply(self.request, status, **kw)
        self.on_response(resp)
        return resp

    def fail_locally(self, status: int = 503) -> None:
        """What the client transaction does on a transport error (503) or timeout (408)."""
        self.failed_locally = True
        self.on_response(make_response(self.request, status, None))

    @property
    def reason(self) -> str | None:
        return dict(self.cancel_headers).get("Reason")


@dataclass
class FakeRetransmit:
    resp: Response
    give_up: Callable[[], Any]
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True


class FakePort:
    def __init__(self) -> None:
        self.sent: list[FakeCtx] = []
        self.acks: list[tuple[Request, Hop]] = []
        self.retransmits: list[FakeRetransmit] = []
        self.dead_flows: set[str] = set()

    def send_request(self, req: Request, hop: Hop, on_response: Callable[[Response], Any]) -> FakeCtx:
        # round-trip through bytes: what we send must be a well-formed message
        parsed = parse_message(req.to_bytes())
        ctx = FakeCtx(parsed, hop, on_response)
        self.sent.append(ctx)
        return ctx

    def send_ack(self, ack: Request, hop: Hop) -> None:
        self.acks.append((parse_message(ack.to_bytes()), hop))

    def respond(self, stx: FakeStx, resp: Response) -> None:
        stx.respond(parse_message(resp.to_bytes()))  # as TransactionPort does

    def respond_2xx(self, stx: FakeStx, resp: Response, on_give_up: Callable[[], Any]) -> FakeRetransmit:
        self.respond(stx, resp)
        handle = FakeRetransmit(resp, on_give_up)
        self.retransmits.append(handle)
        return handle

    def contact(self, transport: str, local: tuple[str, int] | None = None) -> str:
        host, port = local or ("192.0.2.10", 5060)
        return f"<sip:b2bua@{host}:{port};transport={transport}>"

    def flow_live(self, flow_id: str | None) -> bool:
        return flow_id is not None and flow_id not in self.dead_flows

    def sent_methods(self) -> list[str]:
        return [c.request.method for c in self.sent]

    def invites(self) -> list[FakeCtx]:
        return [c for c in self.sent if c.request.method == "INVITE"]

    def last(self, method: str) -> FakeCtx:
        return [c for c in self.sent if c.request.method == method][-1]


class ScriptedWaker:
    """Hands out Deferreds the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[Binding], Deferred[Any]]] = []
        self.ended: list[tuple[str, bool]] = []

    def wake(self, call: Any, bindings: list[Binding]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((call, bindings, d))
        return d

    def call_ended(self, call: Any, answered_elsewhere: bool) -> None:
        self.ended.append((call.call_id, answered_elsewhere))


class Env:
    def __init__(self, waker: Any = None, max_pending: int = 8, **settings: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.port = FakePort()
        self.location = FakeLocation()
        self.silo = Silo(self.clock, self.location, max_pending_per_aor=max_pending)
        self.waker = waker if waker is not None else ScriptedWaker()
        self.mgr = CallManager(self.clock, self.port, self.silo, self.location, self.waker,
                               CallSettings(**settings))
        self.caller_flow = flow()

    def invite(self, **kw: Any) -> tuple[Request, FakeStx]:
        req = caller_invite(**kw)
        stx = FakeStx(req)
        self.mgr.handle_invite(req, stx, self.caller_flow)
        return req, stx

    def register(self, b: Binding, refreshed: bool = False) -> None:
        """What the registrar does: store, then tell the silo."""
        self.location.bindings[b.aor] = [x for x in self.location.bindings.get(b.aor, []) if x.key != b.key] + [b]
        if refreshed:
            self.silo.binding_refreshed(b, None)
        else:
            self.silo.binding_added(b, None)

    def call(self, call_id: str = "call-1@10.0.0.1") -> Any:
        return self.mgr.calls[call_id]

    def assert_clean(self) -> None:
        assert self.mgr.calls == {}
        assert self.mgr.dialogs == {}
        assert self.mgr.flows == {}
        assert len(self.silo) == 0
        assert self.silo.stats()["stored_transactions"] == 0
        assert self.clock.getDelayedCalls() == []
        assert all(r.stopped for r in self.port.retransmits)
