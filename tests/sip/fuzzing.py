"""A seeded mutation fuzzer for the message layer and for the whole server below its sockets.

Used by tests/sip/test_fuzz.py (a fixed budget) and bench/fuzz.py (the long run). Nothing here is
random unless seeded: the same seed and count give the same inputs.

- ``Mutator(seed).mutate(data)`` applies one to four edits to a message: flipped and inserted bytes,
  the separators a SIP parser trips on (CR, LF, NUL, quotes, brackets, folds), numbers made huge,
  negative or Unicode, lines dropped, duplicated or swapped, header names changed, truncation, and
  splices of two messages.
- ``check_parser(data)`` runs what the server runs on a message (parse, validate, every accessor, a
  400 built from it and its serialization) and raises whatever is not a ParseError.
- ``Stack`` is the real service tree (``make_service``: transport, transaction layer, router, UAS
  core, registrar, calls, silo) on a Clock, whose transport listens on a fake reactor: datagrams
  and TCP bytes go in through the real protocols, what the server sends is recorded, and every
  ``log.failure`` (a traceback: the server caught a programming error) is kept in ``failures``.
"""

from __future__ import annotations

import random
import re
import tempfile
import traceback
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from libon_tsilo.sip.digest import make_nonce
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.framing import StreamFramer
from libon_tsilo.sip.message import Request, Response, extract_for_error_response, make_response, parse_message

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "rfc4475"

_SDP = ("v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def _message(start: str, *headers: str, body: str = "") -> bytes:
    lines = [start, *headers, f"Content-Length: {len(body.encode())}"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def _common(method: str, n: int, to: str = "<sip:bob@127.0.0.1>", cseq: int = 1) -> tuple[str, ...]:
    return (
        f"Via: SIP/2.0/UDP 127.0.0.1:16000;branch=z9hG4bK-f{method}{n};rport",
        "Max-Forwards: 70",
        f'From: "Alice" <sip:alice@example.org>;tag=a{n}',
        f"To: {to}",
        f"Call-ID: fuzz-{n}@127.0.0.1",
        f"CSeq: {cseq} {method}",
    )


# our own messages: what phones and the SIPp scenarios send
OWN = (
    _message("REGISTER sip:127.0.0.1 SIP/2.0", *_common("REGISTER", 1, "<sip:bob@127.0.0.1>"),
             'Contact: <sip:bob@127.0.0.1:17000>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-0001>";reg-id=1',
             "Expires: 3600", "Supported: outbound, path", "User-Agent: fuzz/1"),
    _message("REGISTER sip:127.0.0.1 SIP/2.0", *_common("REGISTER", 2, "<sip:carol@127.0.0.1>"),
             "Contact: <sip:carol@127.0.0.1:17001;pn-provider=apns;pn-prid=00ff;pn-param=ABCD.com.x.voip>"
             ";expires=600;q=0.5"),
    _message("INVITE sip:bob@127.0.0.1 SIP/2.0", *_common("INVITE", 3),
             "Contact: <sip:alice@127.0.0.1:16000>", "Content-Type: application/sdp", "Subject: hello",
             "Supported: timer, replaces", "Session-Expires: 1800;refresher=uac", "Allow: INVITE, ACK, BYE",
             body=_SDP),
    _message("INVITE sip:carol@127.0.0.1 SIP/2.0", *_common("INVITE", 4, "<sip:carol@127.0.0.1>"),
             "Contact: <sip:alice@127.0.0.1:16000>", "Content-Type: application/sdp", body=_SDP),
    _message("CANCEL sip:bob@127.0.0.1 SIP/2.0", *_common("CANCEL", 3)),
    _message("ACK sip:bob@127.0.0.1 SIP/2.0", *_common("ACK", 3, "<sip:bob@127.0.0.1>;tag=x1")),
    _message("BYE sip:bob@127.0.0.1 SIP/2.0", *_common("BYE", 3, "<sip:bob@127.0.0.1>;tag=x1", 2)),
    _message("OPTIONS sip:127.0.0.1 SIP/2.0", *_common("OPTIONS", 5), "Accept: application/sdp"),
    _message("MESSAGE sip:bob@127.0.0.1 SIP/2.0", *_common("MESSAGE", 6), "Content-Type: text/plain",
             body="hi"),
    _message("SIP/2.0 200 OK", *_common("INVITE", 7, "<sip:bob@127.0.0.1>;tag=r7"),
             "Contact: <sip:bob@127.0.0.1:17000>", "Content-Type: application/sdp", body=_SDP),
    _message("SIP/2.0 180 Ringing", *_common("INVITE", 8, "<sip:bob@127.0.0.1>;tag=r8")),
)
# with [auth] on (Stack(auth=True), secret FUZZ_SECRET, clock at FUZZ_NOW): credentials carrying a
# nonce the server did issue, so mutations reach the nonce and digest checks, not just the parser
FUZZ_SECRET = "fuzz-secret"
FUZZ_NOW = 1_000_000.0
_NONCE = make_nonce(FUZZ_SECRET, FUZZ_NOW, salt="00ff00ff00ff")
AUTHORIZED = (
    _message("REGISTER sip:127.0.0.1 SIP/2.0", *_common("REGISTER", 9, "<sip:bob@127.0.0.1>"),
             "Contact: <sip:bob@127.0.0.1:17000>",
             f'Authorization: Digest username="bob", realm="libon-tsilo", nonce="{_NONCE}", '
             'uri="sip:127.0.0.1", response="0123456789abcdef0123456789abcdef", algorithm=MD5, '
             'qop=auth, nc=00000001, cnonce="c0ffee"'),
    _message("INVITE sip:carol@127.0.0.1 SIP/2.0", *_common("INVITE", 10, "<sip:carol@127.0.0.1>"),
             "Contact: <sip:alice@127.0.0.1:16000>",
             f'Proxy-Authorization: Digest username="alice", realm="libon-tsilo", nonce="{_NONCE}", '
             'uri="sip:carol@127.0.0.1", response="0123456789abcdef0123456789abcdef", algorithm=MD5, '
             'qop=auth, nc=00000002, cnonce="c0ffee"'),
)

# what parsers trip on
_TOKENS = (
    b"\r", b"\n", b"\r\n", b"\r\n ", b"\r\n\r\n", b"\x00", b"\\\x00", b" ", b"\t", b'"', b"\\", b"<", b">",
    b";", b",", b":", b"=", b"%", b"%00", b"%zz", b"[", b"]", b"@", b"?", b"&", b"/", b"\xff", b"\xc3\xa9",
    "\u00b2".encode(), "\u0663".encode(), b"9" * 4400, b"0" * 4400, b"-1", b"4294967296", b"2147483648",
    b"65536", b"256", b"z9hG4bK", b";tag=", b";branch=", b";rport", b";received=", b";maddr=255.255.255.255",
    b";expires=", b";reg-id=", b";q=", b";lr", b";transport=tcp", b"sip:", b"sips:", b"tel:", b"*",
    b"SIP/2.0", b"SIP/3.0", b"[::1]", b"[", b"1.2.3.4.5", b"a" * 300,
)
_HEADER_NAMES = (
    b"Via", b"v", b"From", b"f", b"To", b"t", b"Call-ID", b"i", b"CSeq", b"Contact", b"m",
    b"Content-Length", b"l", b"Content-Type", b"c", b"Max-Forwards", b"Expires", b"Route", b"Record-Route",
    b"Require", b"Proxy-Require", b"Supported", b"Authorization", b"Proxy-Authorization", b"Path",
    b"Date", b"Accept", b"Allow", b"Min-Expires", b"Retry-After", b"RSeq", b"RAck", b"Session-Expires",
    b"P-Asserted-Identity", b"Subject", b"User-Agent", b"Event", b"X-Whatever",
)
_NUMBER = re.compile(rb"\d+")
_NUMBERS = (b"0", b"1", b"-1", b"9" * 11, b"9" * 4400, b"0" * 4400 + b"5", "\u00b2".encode(),
            "\uff15".encode(), b"4294967295", b"4294967296", b"2147483648", b"65535", b"65536", b"255", b"")


class Mutator:
    """Seeded edits on SIP messages (bytes in, bytes out)."""

    def __init__(self, seed: int, corpus: tuple[bytes, ...] | None = None) -> None:
        self.rng = random.Random(seed)
        self.corpus = corpus if corpus is not None else load_corpus()
        self._edits = (
            self._flip, self._insert, self._insert, self._delete, self._number, self._number,
            self._line_dup, self._line_drop, self._line_swap, self._header_name, self._truncate,
            self._splice, self._header_add,
        )

    def pick(self) -> bytes:
        return self.rng.choice(self.corpus)

    def mutate(self, data: bytes) -> bytes:
        for _ in range(self.rng.randint(1, 4)):
            data = self.rng.choice(self._edits)(data)
        return data

    def _pos(self, data: bytes) -> int:
        # edits land in the header section most of the time: that is where the parser works
        end = data.find(b"\r\n\r\n")
        limit = end if end > 0 and self.rng.random() < 0.9 else len(data)
        return self.rng.randint(0, max(0, limit))

    def _flip(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self._pos(data) % len(data)
        return data[:i] + bytes([self.rng.randrange(256)]) + data[i + 1:]

    def _insert(self, data: bytes) -> bytes:
        i = self._pos(data)
        return data[:i] + self.rng.choice(_TOKENS) + data[i:]

    def _delete(self, data: bytes) -> bytes:
        i = self._pos(data)
        return data[:i] + data[i + self.rng.randint(1, 8):]

    def _number(self, data: bytes) -> bytes:
        spans = [m.span() for m in _NUMBER.finditer(data)]
        if not spans:
            return data
        a, b = self.rng.choice(spans)
        return data[:a] + self.rng.choice(_NUMBERS) + data[b:]

    def _lines(self, data: bytes) -> tuple[list[bytes], bytes]:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return data.split(b"\r\n"), b""
        return data[:end].split(b"\r\n"), data[end:]

    def _line_dup(self, data: bytes) -> bytes:
        lines, rest = self._lines(data)
        i = self.rng.randrange(len(lines))
        lines.insert(self.rng.randrange(len(lines) + 1), lines[i])
        return b"\r\n".join(lines) + rest

    def _line_drop(self, data: bytes) -> bytes:
        lines, rest = self._lines(data)
        if len(lines) > 1:
            del lines[self.rng.randrange(1, len(lines))]
        return b"\r\n".join(lines) + rest

    def _line_swap(self, data: bytes) -> bytes:
        lines, rest = self._lines(data)
        i, j = self.rng.randrange(len(lines)), self.rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return b"\r\n".join(lines) + rest

    def _header_name(self, data: bytes) -> bytes:
        lines, rest = self._lines(data)
        if len(lines) > 1:
            i = self.rng.randrange(1, len(lines))
            _, colon, value = lines[i].partition(b":")
            if colon:
                lines[i] = self.rng.choice(_HEADER_NAMES) + b":" + value
        return b"\r\n".join(lines) + rest

    def _header_add(self, data: bytes) -> bytes:
        lines, rest = self._lines(data)
        source = self._lines(self.pick())[0]
        value = source[self.rng.randrange(len(source))].partition(b":")[2] or b" x"
        lines.insert(self.rng.randint(1, len(lines)), self.rng.choice(_HEADER_NAMES) + b":" + value)
        return b"\r\n".join(lines) + rest

    def _truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randint(0, len(data))]

    def _splice(self, data: bytes) -> bytes:
        other = self.pick()
        return data[: self.rng.randint(0, len(data))] + other[self.rng.randint(0, len(other)):]


def load_corpus() -> tuple[bytes, ...]:
    found = tuple(p.read_bytes() for p in sorted(CORPUS_DIR.glob("*.dat"))) if CORPUS_DIR.is_dir() else ()
    return found + OWN + AUTHORIZED


# -- the parser, as the server uses it -------------------------------------------------------------


def check_parser(data: bytes, stream: bool = False) -> None:
    """Everything the server does with a message's text; raises anything but a ParseError."""
    try:
        msg = parse_message(data, stream=stream)
        msg.validate()
    except ParseError:
        bare = extract_for_error_response(data)
        if bare is not None:
            parse_message(make_response(bare, 400, "Bad Request").to_bytes())
        return
    try:
        _read_everything(msg)
    except ParseError:
        pass
    # a message we accepted must survive our own serialization
    again = parse_message(msg.to_bytes(), stream=stream)
    again.validate()
    if isinstance(msg, Request):
        parse_message(make_response(msg, 400, "Bad Request", to_tag="t1").to_bytes()).validate()


def fuzz_parser(n: int, seed: int) -> list[str]:
    """``n`` mutated messages through the parser (and every 4th through the framer): a traceback per
    input that raised anything but ParseError."""
    mutator = Mutator(seed)
    chunks = random.Random(seed)
    found: list[str] = []
    for i in range(n):
        data = mutator.mutate(mutator.pick())
        try:
            check_parser(data)
            if i % 4 == 0:
                check_framer(data, chunks)
        except Exception:
            found.append(f"seed {seed} #{i}: {data[:300]!r}\n{traceback.format_exc()}")
    return found


def _read_everything(msg: Request | Response) -> None:
    if isinstance(msg, Request):
        msg.uri
    for via in msg.vias:
        str(via), via.rport, via.ttl, via.branch, via.received
    msg.from_.uri, msg.to.uri, msg.from_.tag, msg.to.tag
    msg.call_id, msg.cseq, msg.max_forwards, msg.content_length, msg.content_type
    for contact in msg.contacts:
        contact.uri, str(contact), contact.params
    msg.expires
    for name in ("Route", "Record-Route", "Path", "Supported", "Require", "Allow"):
        msg.header_values(name)


def check_framer(data: bytes, rng: random.Random) -> None:
    """The stream framer fed ``data`` in random chunks: only ParseError may come out."""
    framer = StreamFramer(65535)
    i = 0
    try:
        while i < len(data):
            step = rng.randint(1, max(1, len(data) // 2))
            for kind, payload in framer.feed(data[i:i + step]):
                if kind == "msg":
                    check_parser(payload, stream=True)
            i += step
    except ParseError:
        return


# -- the whole server, below its sockets -----------------------------------------------------------


class FuzzReactor(MemoryReactorClock):
    """A Clock and a memory reactor, plus listenUDP: what the transport needs to listen and send."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[Any] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        writer = _DatagramWriter(IPv4Address("UDP", interface or "127.0.0.1", port or 5060))
        protocol.makeConnection(writer)
        self.udp.append(protocol)
        return writer


class _DatagramWriter:
    """The UDP port and transport of one listener: records every datagram sent."""

    def __init__(self, host: IPv4Address) -> None:
        self.host = host
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any = None) -> None:
        self.sent.append((data, addr))

    def getHost(self) -> IPv4Address:
        return self.host

    def stopListening(self) -> None:
        return None

    def connect(self, host: str, port: int) -> None:
        raise NotImplementedError


class Stack:
    """The real service tree on a FuzzReactor; feed it datagrams and TCP bytes."""

    def __init__(self, auth: bool = False) -> None:
        from libon_tsilo.ops.config import config_from_dict
        from libon_tsilo.ops.service import make_service

        self.reactor = FuzzReactor()
        self.reactor.advance(FUZZ_NOW)
        self._state = tempfile.TemporaryDirectory(prefix="libon-tsilo-fuzz-")  # the users db, if any
        cfg = config_from_dict({
            "sip": {"listen": ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"], "domains": ["127.0.0.1", "localhost"]},
            "auth": {"enabled": auth, "secret": FUZZ_SECRET},
            "location": {"backend": "memory"},
            "calls": {"ring_timeout": 30},
        }, base_dir=self._state.name)
        self.root = make_service(cfg, clock=self.reactor)
        self.parts = self.root.parts
        self.transport = self.parts.transport
        self.transport.reactor = self.reactor
        self.transport.startService()
        self.udp = self.reactor.udp[0]
        self.tcp_factory = self.reactor.tcpServers[0][1]
        self.failures: list[str] = []
        self._peer = 0

    def __enter__(self) -> Stack:
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self._observe)
        self.parts.transactions.stop()
        self._state.cleanup()

    def _observe(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            self.failures.append(f"{event.get('log_format')}: {failure.getTraceback()}")

    def datagram(self, data: bytes) -> None:
        self._peer = (self._peer + 1) % 50
        self.udp.datagramReceived(data, ("127.0.0.1", 16000 + self._peer))

    def stream(self, chunks: list[bytes]) -> None:
        self._peer = (self._peer + 1) % 50
        proto = self.tcp_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000 + self._peer))
        proto.makeConnection(StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 5060),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + self._peer),
        ))
        for chunk in chunks:
            proto.dataReceived(chunk)
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        proto.connectionLost(Failure(ConnectionDone()))

    def sent(self) -> list[bytes]:
        """Datagrams sent since the last call (and forgotten)."""
        writer = self.udp.transport
        out = [data for data, _ in writer.sent]
        writer.sent.clear()
        return out

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)


_LINE = {name: re.compile(rb"^(" + name + rb":[^\r]*)\r\n", re.M | re.I)
         for name in (rb"Via", rb"From", rb"To", rb"Call-ID", rb"CSeq")}


def answer(request: bytes, status: bytes, to_tag: bytes) -> bytes | None:
    """A device's response to a request the server sent (Via/From/To/Call-ID/CSeq copied), or None."""
    if request.startswith(b"SIP/"):
        return None
    lines = [b"SIP/2.0 " + status]
    for name, pattern in _LINE.items():
        found = pattern.findall(request)
        if not found:
            return None
        if name == b"To" and b"tag=" not in found[0]:
            found = [found[0] + b";tag=" + to_tag]
        lines.extend(found)
    lines.append(b"Contact: <sip:device@127.0.0.1:17000>")
    lines.append(b"Content-Length: 0\r\n\r\n")
    return b"\r\n".join(lines)


_CALL_ID = re.compile(rb"^(Call-ID|i)([ \t]*:[ \t]*)", re.M | re.I)


def fresh(data: bytes, i: int, rng: random.Random) -> bytes:
    """A corpus message made new: a branch of its own (else the server takes it for a retransmission
    of the last one and absorbs it), and mostly a Call-ID of its own too."""
    data = data.replace(b"branch=z9hG4bK", b"branch=z9hG4bK%d." % i, 1)
    if rng.random() < 0.7:
        data = _CALL_ID.sub(lambda m: m.group(1) + m.group(2) + b"%d." % i, data, count=1)
    return data


def run_stack(stack: Stack, mutator: Mutator, n: int) -> int:
    """Feed ``n`` mutated messages (datagrams, and every tenth over TCP in chunks); the server's own
    requests are answered now and then (mutated too), so the client side gets fuzzed as well.
    Returns the number of messages fed."""
    rng = mutator.rng
    # one clean registration, so that INVITEs to bob fork and the server sends requests we can answer
    stack.datagram(OWN[0])
    pending: list[bytes] = []
    for i in range(n):
        if pending and rng.random() < 0.3:
            reply = answer(pending.pop(rng.randrange(len(pending))), rng.choice(
                (b"100 Trying", b"180 Ringing", b"200 OK", b"486 Busy Here", b"603 Decline")), b"d%d" % i)
            data = reply if reply is not None else mutator.pick()
        else:
            data = fresh(mutator.pick(), i, rng)
        if rng.random() < 0.9:
            data = mutator.mutate(data)
        if i % 10 == 9:
            cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 3)))
            stack.stream([data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])])
        else:
            stack.datagram(data)
        pending.extend(d for d in stack.sent() if not d.startswith(b"SIP/"))
        del pending[:-20]
        if i % 50 == 49:
            stack.advance(rng.choice((0.5, 4.0, 32.0)))
    stack.advance(3600)
    return n
