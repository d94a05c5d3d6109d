"""Cut a TCP/TLS byte stream into SIP messages by Content-Length (RFC 3261 §18.3, RFC 5626 §3.5.1)."""

from __future__ import annotations

import re
from typing import NoReturn

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

    Memory: nothing is held between messages (a chunk that ends on a message boundary is framed in
    place and no buffer is kept), and what is held for an incomplete message never exceeds
    ``max_message_size`` plus the last chunk read: beyond that the message is refused (513).
    """

    def __init__(self, max_message_size: int = 65535) -> None:
        self.max_message_size = max_message_size
        self._buffer: bytes | bytearray = b""

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def incomplete(self) -> bool:
        """Part of a message is held (a lone CRLF, the half of a keep-alive, does not count)."""
        buf = self._buffer
        # only CR, CRLF or CRLFCR may still become a keep-alive: any other CR/LF mix (bare LFs) is
        # held as the start of a message, and must run the message clock
        return bool(buf) and not (len(buf) < 4 and PING.startswith(buf))

    def clear(self) -> None:
        """Drop what is held (the connection is gone: its buffer must not wait for the garbage collector)."""
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        buf: bytes | bytearray
        if self._buffer:
            buf = self._buffer
            buf += data  # a bytearray since the previous feed kept it
        else:
            buf = data  # the usual case: the chunk starts a message; framed in place, no copy
        out: list[tuple[str, bytes]] = []
        pos, size = 0, len(buf)
        while pos < size:
            if buf[pos] == 0x0D:
                if buf.startswith(PING, pos):
                    out.append(("ping", b""))
                    pos += 4
                    continue
                if size - pos < 4:
                    break  # maybe the first half of a ping
                if buf.startswith(PONG, pos):
                    out.append(("pong", b""))
                    pos += 2
                    continue
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if size - pos > self.max_message_size:
                    self._fail("header section too long", bytes(buf[pos:pos + 4096]), out, 513)
                break
            match = _CONTENT_LENGTH.search(buf, pos, end + 2)
            if match is None:
                self._fail("missing Content-Length on a stream", bytes(buf[pos:end + 4]), out)
            text = match.group(1)
            if not text.isdigit():
                self._fail("bad Content-Length", bytes(buf[pos:end + 4]), out)
            if len(text) > 10:  # int() refuses more than 4,300 digits: bound them first
                text = text.lstrip(b"0") or b"0"
                if len(text) > 10:
                    self._fail("message too large", bytes(buf[pos:end + 4]), out, 513)
            total = end + 4 - pos + int(text)
            if total > self.max_message_size:
                self._fail("message too large", bytes(buf[pos:end + 4]), out, 513)
            if size - pos < total:
                break
            out.append(("msg", bytes(buf[pos:pos + total])))
            pos += total
        # keep only the incomplete tail, in a buffer of its own size (the chunk it came in is freed)
        self._buffer = bytearray(memoryview(buf)[pos:]) if pos < size else b""
        return out

    def _fail(self, reason: str, data: bytes, framed: list[tuple[str, bytes]], status: int = 400) -> NoReturn:
        self._buffer = b""
        err = ParseError(reason, status)
        err.data = data  # type: ignore[attr-defined]
        # what was framed before the bad message is still good: the caller delivers it first
        err.framed = framed  # type: ignore[attr-defined]
        raise err
