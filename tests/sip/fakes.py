"""Fakes for the sip/ tests: a transport that records what it is asked to send, flows, a recording TU,
and builders for the request text the tests feed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import Clock

from libon_tsilo.sip.message import Request, Response, make_response, new_tag, parse_message
from libon_tsilo.sip.transaction import TransactionLayer
from tests.fakes.sip import FakeFlow


@dataclass
class FakeTarget:
    transport: str = "udp"
    host: str = "192.0.2.9"
    port: int = 5060


class FakeTransport:
    """Records every send; ``fail`` makes the next sends raise like a dead socket would."""

    def __init__(self) -> None:
        self.sink: Any = None
        self.responses: list[tuple[Response, Any]] = []
        self.requests: list[tuple[Request, Any, Any]] = []
        self.fail = False

    def send_response(self, resp: Response, flow: Any) -> None:
        if self.fail:
            raise OSError("fake transport: send failed")
        # Round-trip through bytes so a response the real transport could not serialize fails here.
        self.responses.append((parse_message(resp.to_bytes()), flow))

    def send_request(self, req: Request, target: Any, flow: Any = None) -> Any:
        if self.fail:
            raise OSError("fake transport: connection refused")
        self.requests.append((parse_message(req.to_bytes()), target, flow))
        return flow if flow is not None else FakeFlow(target.transport, (target.host, target.port))

    def statuses(self) -> list[int]:
        return [resp.status for resp, _ in self.responses]

    def methods(self) -> list[str]:
        return [req.method for req, _, _ in self.requests]


@dataclass
class RecordingTU:
    """Remembers every upcall; optionally answers requests at once with ``auto_status``."""

    requests: list[tuple[Request, Any, Any]] = field(default_factory=list)
    cancels: list[tuple[Request, Any, Any, Any]] = field(default_factory=list)
    strays: list[tuple[Response, Any]] = field(default_factory=list)
    timeouts: list[Any] = field(default_factory=list)
    transport_errors: list[Any] = field(default_factory=list)
    auto_status: int | None = None
    explode: bool = False

    def request_received(self, request: Request, stx: Any, flow: Any) -> None:
        self.requests.append((request, stx, flow))
        if self.explode:
            raise RuntimeError("TU bug")
        if self.auto_status is not None and stx is not None:
            stx.respond(make_response(request, self.auto_status, to_tag=new_tag()))

    def cancel_received(self, cancel: Request, invite_stx: Any, flow: Any, stx: Any) -> None:
        self.cancels.append((cancel, invite_stx, flow, stx))

    def stray_response(self, response: Response, flow: Any) -> None:
        self.strays.append((response, flow))

    def transaction_timeout(self, stx: Any) -> None:
        self.timeouts.append(stx)

    def transport_error(self, stx: Any) -> None:
        self.transport_errors.append(stx)


class Env:
    """A layer wired to a fake transport, a recording TU and a Clock."""

    def __init__(self, t1: float = 0.5, t2: float = 4.0, t4: float = 5.0, slack_share: float = 0.0) -> None:
        self.clock = Clock()
        self.transport = FakeTransport()
        self.layer = TransactionLayer(self.transport, self.clock, t1=t1, t2=t2, t4=t4, slack_share=slack_share)
        self.tu = RecordingTU()
        self.layer.tu = self.tu

    def feed(self, data: bytes | str, flow: Any) -> None:
        """Hand a message to the layer the way the transport's sink is called."""
        raw = data.encode() if isinstance(data, str) else data
        self.transport.sink(parse_message(raw), flow)

    def assert_clean(self) -> None:
        assert len(self.layer) == 0
        assert self.clock.getDelayedCalls() == []


def request_text(
    method: str = "INVITE",
    *,
    branch: str | None = "z9hG4bKtest1",
    via_host: str = "192.0.2.1:5060",
    transport: str = "UDP",
    ruri: str = "sip:bob@example.com",
    call_id: str = "call-1@example.net",
    from_tag: str = "ftag1",
    to_tag: str | None = None,
    cseq: int = 1,
    cseq_method: str | None = None,
    routes: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    body: str = "",
) -> str:
    via = f"SIP/2.0/{transport} {via_host}" + (f";branch={branch}" if branch is not None else "")
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: {via}",
        *(f"Route: {route}" for route in routes),
        "Max-Forwards: 70",
        f"From: Alice <sip:alice@example.net>;tag={from_tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
        "Contact: <sip:alice@192.0.2.1:5060>",
        *extra,
        f"Content-Length: {len(body.encode())}",
    ]
    return "\r\n".join(lines) + "\r\n\r\n" + body


def response_text(req: Request, status: int, reason: str = "Whatever", to_tag: str | None = "rtag1") -> str:
    """A response as the peer would send it to a request we sent (its Via, From, To, Call-ID, CSeq)."""
    resp = make_response(req, status, reason, to_tag=to_tag)
    return resp.to_bytes().decode()


def run_until(clock: Clock, until: float, count: Any) -> list[float]:
    """Step the clock from timer to timer up to ``until`` seconds; return the times ``count()`` grew.

    Jumping exactly to each scheduled call avoids float drift from fixed-size steps.
    """
    times: list[float] = []
    while True:
        pending = [c.getTime() for c in clock.getDelayedCalls()]
        if not pending or min(pending) > until:
            break
        before = count()
        clock.advance(max(0.0, min(pending) - clock.seconds()))
        if count() > before:
            times.append(round(clock.seconds(), 3))
    clock.advance(max(0.0, until - clock.seconds()))
    return times
