"""Cut a TCP/TLS byte stream into SIP messages by Content-Length (RFC 3261 §18.3, RFC 5626 §3.5.1)."""

from __future__ import annotations

import re

from libon_tsilo.sip.errors import ParseError

_CONTENT_LENGTH = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\S*)", re.IGNORECASE)
PING = b"\r\n\r\n"
PONG = b"\r\n"


class StreamFramer:
    """Accumulates stream bytes and yields complete messages and keep-alives.

    ``feed`` returns a list of ``("msg", bytes)``, ``("ping", b"")`` (a CRLFCRLF keep-alive, to be
    answered with CRLF) and ``("pong", b"")``. A message that cannot be framed raises ParseError: after
    that the stream cannot be resynchronised, so the caller closes the connection. The error's
    ``data`` attribute holds the header bytes read so far, for a best-effort 400, and its ``framed``
    attribute the good messages framed from the same chunk before the bad one.
    """

    def __init__(self, max_message_size: int = 65535) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        buf = self._buffer
        buf += data
        out: list[tuple[str, bytes]] = []
        while buf:
            if buf[0] == 0x0D:
                if buf.startswith(PING):
                    out.append(("ping", b""))
                    del buf[:4]
                    continue
                if len(buf) < 4:
                    break  # maybe the first half of a ping
                if buf.startswith(PONG):
                    out.append(("pong", b""))
                    del buf[:2]
                    continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_message_size:
                    self._fail("header section too long", bytes(buf[:4096]), out, 513)
                break
            match = _CONTENT_LENGTH.search(buf, 0, end + 2)
            if match is None:
                self._fail("missing Content-Length on a stream", bytes(buf[: end + 4]), out)
            text = match.group(1)
            if not text.isdigit():
                self._fail("bad Content-Length", bytes(buf[: end + 4]), out)
            if len(text) > 10:  # int() refuses more than 4,300 digits: bound them first
                text = text.lstrip(b"0") or b"0"
                if len(text) > 10:
                    self._fail("message too large", bytes(buf[: end + 4]), out, 513)
            total = end + 4 + int(text)
            if total > self.max_message_size:
                self._fail("message too large", bytes(buf[: end + 4]), out, 513)
            if len(buf) < total:
                break
            out.append(("msg", bytes(buf[:total])))
            del buf[:total]
        return out

    def _fail(self, reason: str, data: bytes, framed: list[tuple[str, bytes]], status: int = 400) -> None:
        self._buffer.clear()
        err = ParseError(reason, status)
        err.data = data  # type: ignore[attr-defined]
        # what was framed before the bad message is still good: the caller delivers it first
        err.framed = framed  # type: ignore[attr-defined]
        raise err
