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

__all__ = ["PoppedVia", "RequestHead", "TopVia", "pop_top_via", "read_request_head", "read_top_via"]

# The head is searched as Latin-1 text (one character per byte, so offsets are the bytes'): under
# mypyc str methods run natively and bytes methods as generic calls, several times slower.
# a Via header line of the head (each line ends with CRLF: the head is searched with its last one)
# (spelled without re.I: a pattern that starts with a literal "\r\n" is only tried at line starts)
_VIA_LINE = re.compile(r"\r\n(?:[Vv][Ii][Aa]|[Vv])[ \t]*:[ \t]*([^\r\n]*)")
_BRANCH = re.compile(r";[ \t]*[Bb][Rr][Aa][Nn][Cc][Hh][ \t]*=[ \t]*([^;, \t]+)")
_PARAM_VALUE = re.compile(r"[A-Za-z0-9_.!~*'%+`-]*")


class PoppedVia:
    """A response without its top Via: ``data`` to send, ``branch`` the removed Via's branch,
    ``next_via`` the value that is on top now (text, as the parser decodes it)."""

    __slots__ = ("data", "branch", "next_via")

    def __init__(self, data: bytes, branch: str, next_via: str) -> None:
        self.data = data
        self.branch = branch
        self.next_via = next_via


def _response_head(data: bytes) -> str | None:
    """The head of a response (status line and header lines, each with its CRLF) as Latin-1 text;
    None for anything else."""
    if not data.startswith(b"SIP/2.0 ") or not data[8:11].isdigit() or data[11:12] != b" ":
        return None
    end = data.find(b"\r\n\r\n")
    return data[:end + 2].decode("latin-1") if end >= 0 else None


def _via_line(head: str, at: int) -> tuple[int, int, int] | None:
    """The first Via header line after ``at`` (the CRLF that ends a line of the head): where it
    starts (its CRLF), where its value starts and ends; None when the head has none after ``at``,
    or when that line is folded onto the next or holds a bare CR or LF (the parser's path judges
    those)."""
    if head[at:at + 7] == "\r\nVia: ":  # the spelling nearly everyone writes, on the next line
        line, start = at, at + 7
        stop = head.find("\r\n", start)
    else:
        found = _VIA_LINE.search(head, at)
        if found is None:
            return None
        line = found.start()
        start, stop = found.span(1)
    if stop < 0 or head.find("\n", start, stop) >= 0 or head.find("\r", start, stop) >= 0 \
            or head[stop + 2:stop + 3] in (" ", "\t"):
        return None
    if head.find('"', start, stop) >= 0:  # a quoted comma would not separate values
        return None
    return line, start, stop


def _text(data: bytes, head: str, start: int, stop: int) -> str:
    """``head[start:stop]`` as the parser decodes it (UTF-8, undecodable bytes kept as escapes)."""
    text = head[start:stop]
    return text if text.isascii() else data[start:stop].decode("utf-8", "surrogateescape")


class TopVia:
    """A response's head (Latin-1 text) and where its top Via line is, read once (``read_top_via``)
    for each question a forwarder asks of it: ``pop`` and ``param``."""

    __slots__ = ("data", "head", "line", "start", "stop", "comma")

    def __init__(self, data: bytes, head: str, line: int, start: int, stop: int, comma: int) -> None:
        self.data = data
        self.head = head
        self.line = line  # where the line starts (its CRLF)
        self.start = start  # where its value starts and stops
        self.stop = stop
        self.comma = comma  # the first comma in the value, or -1

    def pop(self, branch_prefix: str) -> PoppedVia | None:
        """The response without this Via, when its branch starts with ``branch_prefix`` and a
        second Via follows; None otherwise (see the module doc)."""
        data, head, start, stop, comma = self.data, self.head, self.start, self.stop, self.comma
        end = stop if comma < 0 else comma
        if head.find(branch_prefix, start, end) < 0:
            return None  # no branch in it can start with the prefix: not ours, and no pattern run
        found = _BRANCH.search(head, start, end)
        if found is None:
            return None
        branch = found.group(1)
        if not branch.startswith(branch_prefix):
            return None
        if comma >= 0:  # "Via: ours, next[, ...]": the line keeps the values after ours
            rest = comma + 1
            while head[rest:rest + 1] in (" ", "\t"):
                rest += 1
            following = head.find(",", rest, stop)
            n_start, n_stop = rest, stop if following < 0 else following
            out = data[:start] + data[rest:]
        else:  # ours is the whole line: the next value is the first of the next Via line
            second = _via_line(head, stop)
            if second is None:
                return None
            _, n_start, s_stop = second
            following = head.find(",", n_start, s_stop)
            n_stop = s_stop if following < 0 else following
            out = data[:self.line] + data[stop:]
        next_via = _text(data, head, n_start, n_stop).rstrip(" \t")
        if not next_via:
            return None
        return PoppedVia(out, branch, next_via)

    def param(self, name: str) -> str | None:
        """The value of the parameter ``;name=`` (spelled as given) in this Via; None when it has
        none."""
        head, comma = self.head, self.comma
        start, end = self.start, self.stop if comma < 0 else comma
        at = head.find(";" + name + "=", start, end)
        if at < 0:
            return None
        at += len(name) + 2
        value = _PARAM_VALUE.match(head, at, end)
        return value.group() if value is not None and value.end() > at else None


def read_top_via(data: bytes) -> TopVia | None:
    """The top Via line of ``data`` (one complete response, as received); None for a request, or
    when the head or that line is not one read for sure."""
    head = _response_head(data)
    if head is None:
        return None
    top = _via_line(head, head.find("\r\n"))
    if top is None:
        return None
    line, start, stop = top
    return TopVia(data, head, line, start, stop, head.find(",", start, stop))


def pop_top_via(data: bytes, branch_prefix: bytes) -> PoppedVia | None:
    """``data`` (one complete response, as received) without its top Via, when that Via's branch
    starts with ``branch_prefix`` and a second Via follows; None otherwise (see the module doc)."""
    top = read_top_via(data)
    return top.pop(branch_prefix.decode("latin-1")) if top is not None else None


_METHOD = re.compile(r"[A-Z]{2,16} ")


class RequestHead:
    """What a stateless forwarder routes a request by, read from its bytes (``read_request_head``):
    its method, its top Via value (text, and where it is), its Route values (in order) and lines,
    its Max-Forwards (and where its digits are). Offsets are into ``head``: the head decoded as
    Latin-1, one character per byte (mypyc runs str methods natively, bytes methods as calls)."""

    __slots__ = ("head", "end", "method", "via_start", "via_stop", "via", "routes", "route_lines",
                 "max_forwards", "mf_start", "mf_stop")

    def __init__(self, head: str, end: int, method: str, via_start: int, via_stop: int,
                 routes: list[str], route_lines: list[tuple[int, int]], max_forwards: int,
                 mf_start: int, mf_stop: int) -> None:
        self.head = head
        self.end = end
        self.method = method
        self.via_start = via_start
        self.via_stop = via_stop
        self.via = head[via_start:via_stop]
        self.routes = routes
        self.route_lines = route_lines
        self.max_forwards = max_forwards
        self.mf_start = mf_start
        self.mf_stop = mf_stop

    def edited(self, data: bytes, new_via: str, top_via: str, max_forwards: int) -> bytes:
        """``data`` with ``new_via`` as a new top Via line, ``top_via`` as the old top Via's value,
        every Route line gone and Max-Forwards set (the edits of RFC 3261 §16.6, on the wire)."""
        head = self.head
        edits = [(self.via_start - 7, self.via_start - 7, "\r\nVia: " + new_via),
                 (self.via_start, self.via_stop, top_via),
                 (self.mf_start, self.mf_stop, str(max_forwards))]
        edits += [(start, stop, "") for start, stop in self.route_lines]
        edits.sort()
        pieces = []
        at = 0
        for start, stop, text in edits:
            pieces.append(head[at:start])
            pieces.append(text)
            at = stop
        pieces.append(head[at:])
        return "".join(pieces).encode("latin-1") + data[self.end:]


def read_request_head(data: bytes) -> RequestHead | None:
    """The head of ``data`` (one complete request, as received) as a stateless forwarder edits it;
    None when it is not one it reads for sure: a response, a first header line that is not a plain
    ``Via: `` line with one value, a Route or Max-Forwards line spelled otherwise than ``Route: ``
    and ``Max-Forwards: ``, folded or with a quote or a bare CR/LF, no Max-Forwards or two."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    end += 2  # the head keeps the CRLF of its last line
    head = data[:end].decode("latin-1")
    if _METHOD.match(head) is None:
        return None
    first = head.find("\r\n")
    if head[first:first + 7] != "\r\nVia: ":
        return None
    via = _plain(head, first, 7)
    if via is None or head.find(",", via[0], via[1]) >= 0:
        return None
    lower = head.lower()
    routes: list[str] = []
    route_lines: list[tuple[int, int]] = []
    at = lower.find("\r\nroute", first)
    while at >= 0:
        after = lower[at + 7:at + 8]
        if after in (":", " ", "\t"):
            if head[at:at + 9] != "\r\nRoute: ":
                return None
            line = _plain(head, at, 9)
            if line is None:
                return None
            route_lines.append((at, line[1]))
            routes += [v.strip() for v in head[line[0]:line[1]].split(",")]
        at = lower.find("\r\nroute", at + 7)
    mf_at = lower.find("\r\nmax-forwards", first)
    if mf_at < 0 or head[mf_at:mf_at + 16] != "\r\nMax-Forwards: " \
            or lower.find("\r\nmax-forwards", mf_at + 2) >= 0:
        return None
    mf = _plain(head, mf_at, 16)
    if mf is None:
        return None
    digits = head[mf[0]:mf[1]].rstrip()
    if not digits.isdigit() or len(digits) > 3 or not digits.isascii():
        return None
    method = head[:head.find(" ")]
    return RequestHead(head, end, method, via[0], via[1], routes, route_lines, int(digits),
                       mf[0], mf[0] + len(digits))


def _plain(head: str, at: int, name: int) -> tuple[int, int] | None:
    """Where the value of the header line at ``at`` (its CRLF; ``name`` characters of name, colon
    and space) starts and ends, when the line is plain: not folded, no quote, no bare CR or LF."""
    start = at + name
    stop = head.find("\r\n", start)
    if stop < 0 or head[stop + 2:stop + 3] in (" ", "\t"):
        return None
    if head.find("\n", start, stop) >= 0 or head.find("\r", start, stop) >= 0 \
            or head.find('"', start, stop) >= 0:
        return None
    return start, stop
