"""Byte-level edits of a received SIP message, for a stateless forwarder that routes by a few bytes.

A stateless proxy passes a response on after taking its own Via off (RFC 3261 §16.11); it reads
nothing else (§16.7: the other header fields are not its business). Parsing the whole head into a
message model and writing it out again, as the transaction layer's path does, costs a relayed
response more than everything else the proxy does with it. ``pop_top_via`` finds the first Via
value in the bytes, cuts it out and hands back the next one as text for the caller to check.

It takes only what it can read for sure: a response whose Via lines are not folded, hold no bare
CR or LF and no quoted string. Anything else is None: the caller then takes the parser's path,
which answers or drops a malformed message as it always did. The rest of the message is passed on
as it came, unread: its next hop parses it and judges it as it would have. Octets after the body
stay too (a stream's framer cut the message at its Content-Length already; a datagram's receiver
ignores them, RFC 3261 §18.3), so a datagram's bytes must not go on over a stream: the caller
keeps those on the parser's path.
"""

from __future__ import annotations

import re

__all__ = ["PoppedVia", "pop_top_via", "top_via_param"]

_STATUS_LINE = b"SIP/2.0 "
# a Via header line of the head (each line ends with CRLF: the head is searched with its last one)
# (spelled without re.I: a pattern that starts with a literal "\r\n" is only tried at line starts)
_VIA_LINE = re.compile(rb"\r\n(?:[Vv][Ii][Aa]|[Vv])[ \t]*:[ \t]*([^\r\n]*)")
_BRANCH = re.compile(rb";[ \t]*[Bb][Rr][Aa][Nn][Cc][Hh][ \t]*=[ \t]*([^;, \t]+)")


class PoppedVia:
    """A response without its top Via: ``data`` to send, ``branch`` the removed Via's branch,
    ``next_via`` the value that is on top now (text, as the parser decodes it)."""

    __slots__ = ("data", "branch", "next_via")

    def __init__(self, data: bytes, branch: str, next_via: str) -> None:
        self.data = data
        self.branch = branch
        self.next_via = next_via


def _via_line(data: bytes, at: int) -> tuple[int, int, int] | None:
    """The first Via header line after ``at`` (the CRLF that ends a line of the head): where it
    starts (its CRLF), where its value starts and ends; None when the head has none after ``at``,
    or when that line is folded onto the next or holds a bare CR or LF (the parser's path judges
    those)."""
    if data.startswith(b"\r\nVia: ", at):  # the spelling nearly everyone writes, on the next line
        line, start = at, at + 7
        stop = data.find(b"\r\n", start)
    else:
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            return None
        found = _VIA_LINE.search(data, at, end + 2)
        if found is None:
            return None
        line = found.start()
        start, stop = found.span(1)
    if stop < 0 or data.find(b"\n", start, stop) >= 0 or data.find(b"\r", start, stop) >= 0 \
            or data[stop + 2:stop + 3] in (b" ", b"\t"):
        return None
    if data.find(b'"', start, stop) >= 0:  # a quoted comma would not separate values
        return None
    return line, start, stop


def pop_top_via(data: bytes, branch_prefix: bytes) -> PoppedVia | None:
    """``data`` (one complete response, as received) without its top Via, when that Via's branch
    starts with ``branch_prefix`` and a second Via follows; None otherwise (see the module doc)."""
    if not data.startswith(_STATUS_LINE) or not data[8:11].isdigit() or data[11:12] != b" ":
        return None
    top = _via_line(data, data.find(b"\r\n"))
    if top is None:
        return None
    line, start, stop = top
    comma = data.find(b",", start, stop)
    branch = _BRANCH.search(data, start, stop if comma < 0 else comma)
    if branch is None or not branch.group(1).startswith(branch_prefix):
        return None
    if comma >= 0:  # "Via: ours, next[, ...]": the line keeps the values after ours
        rest = comma + 1
        while data[rest:rest + 1] in (b" ", b"\t"):
            rest += 1
        following = data.find(b",", rest, stop)
        next_via = data[rest:stop if following < 0 else following].rstrip(b" \t")
        out = data[:start] + data[rest:]
    else:  # ours is the whole line: the next value is the first of the next Via line
        second = _via_line(data, stop)
        if second is None:
            return None
        _, s_start, s_stop = second
        following = data.find(b",", s_start, s_stop)
        next_via = data[s_start:s_stop if following < 0 else following].rstrip(b" \t")
        out = data[:line] + data[stop:]
    if not next_via:
        return None
    return PoppedVia(out, branch.group(1).decode("ascii", "replace"),
                     next_via.decode("utf-8", "surrogateescape"))


def top_via_param(data: bytes, name: bytes) -> str | None:
    """The value of the parameter ``;name=`` (spelled as given) in the top Via of ``data`` (one
    complete response, as received); None when it has none, or when its Via lines are not ones
    ``pop_top_via`` reads for sure."""
    if not data.startswith(_STATUS_LINE):
        return None
    top = _via_line(data, data.find(b"\r\n"))
    if top is None:
        return None
    _, start, stop = top
    comma = data.find(b",", start, stop)
    end = stop if comma < 0 else comma
    at = data.find(b";" + name + b"=", start, end)
    if at < 0:
        return None
    at += len(name) + 2
    value = _PARAM_VALUE.match(data, at, end)
    return value.group().decode("ascii") if value is not None and value.end() > at else None


_PARAM_VALUE = re.compile(rb"[A-Za-z0-9_.!~*'%+`-]*")
