"""A tiny SIP user agent on the real reactor, for the in-process cluster tests (UDP or TCP).

It keeps every message it receives in ``received``; a test builds what to send from text and waits
for what it expects with ``await ua.expect(...)`` (polling, with a generous timeout that only guards
against a hang). It parses with the server's own parser: these tests are about routing between two
nodes, not about parsing (the e2e tests use independent UAs).
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.task import deferLater

from libon_tsilo.sip.message import Message, Request, Response, parse_message

_CLEN = re.compile(rb"^(?:content-length|l)\s*:\s*(\d+)", re.IGNORECASE | re.MULTILINE)


def branch() -> str:
    return "z9hG4bK" + uuid.uuid4().hex[:16]


def tag() -> str:
    return uuid.uuid4().hex[:10]


async def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll ``predicate`` on the reactor until it is truthy; AssertionError after ``timeout``."""
    waited = 0.0
    while True:
        value = predicate()
        if value:
            return value
        if waited > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


class UA:
    """One SIP endpoint on 127.0.0.1: UDP (its own socket) or TCP (one connection to ``server``)."""

    def __init__(self, transport: str = "udp") -> None:
        self.transport = transport
        self.received: list[Message] = []
        self.port = 0
        self._udp: Any = None
        self._tcp: _Stream | None = None
        self._server: tuple[str, int] | None = None

    async def start(self, server: tuple[str, int]) -> UA:
        self._server = server
        if self.transport == "udp":
            proto = _Datagram(self)
            self._udp = reactor.listenUDP(0, proto, interface="127.0.0.1")
            self.port = self._udp.getHost().port
        else:
            from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

            stream = _Stream(self)
            await connectProtocol(TCP4ClientEndpoint(reactor, *server), stream)
            self._tcp = stream
            self.port = stream.transport.getHost().port
        return self

    def stop(self) -> None:
        if self._udp is not None:
            self._udp.stopListening()
        if self._tcp is not None and self._tcp.transport is not None:
            self._tcp.transport.loseConnection()

    @property
    def via(self) -> str:
        return f"SIP/2.0/{self.transport.upper()} 127.0.0.1:{self.port};branch={branch()};rport"

    @property
    def contact(self) -> str:
        suffix = "" if self.transport == "udp" else ";transport=tcp"
        return f"<sip:bob@127.0.0.1:{self.port}{suffix}>"

    def send(self, text: str, to: tuple[str, int] | None = None) -> None:
        data = text.encode()
        if self._tcp is not None:
            self._tcp.transport.write(data)
        else:
            self._udp.write(data, to or self._server)

    def _got(self, data: bytes) -> None:
        self.received.append(parse_message(data))

    async def expect(self, match: Callable[[Message], bool], what: str, timeout: float = 5.0) -> Message:
        return await wait_for(lambda: next((m for m in self.received if match(m)), None), what, timeout)

    async def request(self, method: str) -> Request:
        msg = await self.expect(lambda m: isinstance(m, Request) and m.method == method, f"a {method}")
        assert isinstance(msg, Request)
        return msg

    async def response(self, status: int, cseq_method: str) -> Response:
        msg = await self.expect(
            lambda m: isinstance(m, Response) and m.status == status and m.cseq.method == cseq_method,
            f"{status} to {cseq_method}",
        )
        assert isinstance(msg, Response)
        return msg


class _Datagram(DatagramProtocol):
    def __init__(self, ua: UA) -> None:
        self.ua = ua

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if data.strip():
            self.ua._got(data)


class _Stream(Protocol):
    def __init__(self, ua: UA) -> None:
        self.ua = ua
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            self.buf = self.buf.lstrip(b"\r\n")
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = _CLEN.search(self.buf[:end])
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < total:
                return
            self.ua._got(self.buf[:total])
            self.buf = self.buf[total:]


def response_to(req: Request, status: int, reason: str, to_tag: str | None = None,
                extra: tuple[str, ...] = (), body: str = "") -> str:
    """A response to ``req``: its Via, From, To (with ``to_tag``), Call-ID, CSeq and Record-Route."""
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in req.header_values("via")]
    lines.append(f"From: {req.header('from')}")
    to = req.header("to") or ""
    lines.append(f"To: {to};tag={to_tag}" if to_tag and ";tag=" not in to else f"To: {to}")
    lines.append(f"Call-ID: {req.call_id}")
    lines.append(f"CSeq: {req.header('cseq')}")
    lines += [f"Record-Route: {r}" for r in req.header_values("record-route")]
    lines += list(extra)
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return "\r\n".join(lines) + "\r\n\r\n" + body
