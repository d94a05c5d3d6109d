"""SIP requests and responses: lazy parsing and byte-faithful serialization (RFC 3261 §7, §20).

Only the start line and the header split happen when a message is parsed. A header value is parsed
the first time something reads it, and the result is cached. A header nobody changed is written back
from its original text, and a message nobody changed is written back as its original bytes.
"""

from __future__ import annotations

import os
from typing import Any, Final

from libon_tsilo.sip.branch import new_branch
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.framing import StreamFramer
from libon_tsilo.sip.headers import (
    COMPACT,
    LIST_HEADERS,
    CSeq,
    NameAddr,
    Via,
    canonical_key,
    check_date,
    is_token,
    parse_uint,
    pretty_name,
    split_commas,
)
from libon_tsilo.sip.uri import URI, known_scheme, known_uri

__all__ = [
    "CSeq", "Message", "NameAddr", "ParseError", "Request", "Response", "StreamFramer", "URI", "Via",
    "log_call_id", "extract_for_error_response", "make_response", "new_branch", "new_call_id", "new_tag",
    "parse_message",
]

SIP_VERSION = "SIP/2.0"
MAGIC_COOKIE = "z9hG4bK"

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued", 183: "Session Progress",
    200: "OK", 202: "Accepted", 300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 415: "Unsupported Media Type", 416: "Unsupported URI Scheme",
    420: "Bad Extension", 421: "Extension Required", 423: "Interval Too Brief",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist", 482: "Loop Detected",
    483: "Too Many Hops", 484: "Address Incomplete", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Server Time-out",
    505: "Version Not Supported", 513: "Message Too Large",
    555: "Push Notification Service Not Supported", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}

# Headers that may appear once only (RFC 3261 §7.3.1, §20): a second copy is a 400
# (RFC 4475 multi01, mcl01).
_SINGLE_VALUED = frozenset({
    "from", "to", "call-id", "cseq", "max-forwards", "content-length", "content-type", "expires",
})

# validate() names the first duplicate it finds in this order (a frozenset's order varies by process)
_SINGLE_VALUED_ORDER: Final = tuple(sorted(_SINGLE_VALUED))

# Header name as our code passes it -> (lookup key, name to write). add_header sees the
# same few dozen literals all day: one dict lookup instead of canonical_key + islower + pretty_name.
_ADDED: Final[dict[str, tuple[str, str]]] = {}


def _added_name(name: str) -> tuple[str, str]:
    known = _ADDED.get(name)
    if known is None:
        key = canonical_key(name)
        known = (key, pretty_name(key) if name.islower() else name)
        if len(_ADDED) < 1024:  # bound the memo, as canonical_key does
            _ADDED[name] = known
    return known


# what compact() leaves in a packed message's parsed slots (never written to: see compact)
_PACKED_HEADERS: Final[list[list[Any]]] = []
_PACKED_CACHE: Final[dict[str, Any]] = {}

# the headers make_response copies from the request (To apart: only its first line)
_RESPONSE_COPIED: Final = frozenset({"via", "from", "call-id", "cseq"})

def _chain(head: list[Any], entry: list[Any]) -> None:
    """Link ``entry`` after the last entry with ``head``'s key."""
    while head[4] is not None:
        head = head[4]
    head[4] = entry


# Tags and Call-IDs were one os.urandom each, i.e. one getrandom syscall (four per late-fork call,
# ~4,000 per 1,000 calls in strace): the same kernel bytes are now read 4 KiB at a time and handed
# out in order, each byte once. A child made by fork starts with an empty pool, so no two processes
# hand out the same bytes.
_POOL_SIZE = 4096
_pool = b""
_pool_at = 0


def _random_hex(nbytes: int) -> str:
    global _pool, _pool_at
    start = _pool_at
    end = start + nbytes
    if end > len(_pool):
        _pool = os.urandom(max(_POOL_SIZE, nbytes))
        start, end = 0, nbytes
    _pool_at = end
    return _pool[start:end].hex()


def _empty_pool() -> None:
    global _pool, _pool_at
    _pool, _pool_at = b"", 0


os.register_at_fork(after_in_child=_empty_pool)


def new_tag() -> str:
    return _random_hex(6)


def log_call_id(msg: Any) -> str | None:
    """The Call-ID to put in a log event about `msg`, or None when it has no usable one (a log line
    about a malformed message must not raise in its turn)."""
    try:
        return str(msg.call_id)
    except (ParseError, AttributeError):
        return None


def new_call_id(host: str = "") -> str:
    return f"{_random_hex(12)}@{host}" if host else _random_hex(12)


class Message:
    """Common header handling for requests and responses."""

    __slots__ = ("_headers", "_index", "_body", "_cache", "_raw", "_raw_body", "contact_star", "validated",
                 "_packed")

    def __init__(self) -> None:
        # One entry per header line, in order: [key, name as written, value (text or a header
        # object), the line as received (None once the value changed), the next entry with the same
        # key (None: the last)]. Lists, not a slotted class: making an instance of one costs ~620
        # more instructions than a list literal, ~1,600 with an __init__ (+3 to +8 % per parse).
        self._headers: list[list[Any]] = []
        # The one index: key -> first entry with that key, the others chained from it. None after a
        # mutation, until the next lookup rebuilds it (a message being built is never indexed).
        self._index: dict[str, list[Any]] | None = None
        # set by validate(): later layers may skip the checks it already made
        self.validated = False
        self._body = b""
        self._cache: dict[str, Any] = {}
        self._raw: bytes | None = None
        self._raw_body: bytes | None = None
        self.contact_star = False
        # True after compact(), until the next read: every method that reads the parsed state checks
        # it first and parses the bytes again (_unpack). No __getattr__ does it: compiled by mypyc
        # (setup.py), a read of an emptied slot would not reach it, and a __getattr__ there would
        # turn a ParseError raised by a property into an AttributeError.
        self._packed = False

    @property
    def body(self) -> bytes:
        if self._packed:
            self._unpack()
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        if self._packed:
            self._unpack()
        self._body = value

    # -- raw header access ------------------------------------------------------------------------

    # Every header read looks its key up as `(self._reindex() if index is None else index).get(key)`,
    # written out at each site: a helper method for it cost a Python call per read, ~100 per call.
    def _reindex(self) -> dict[str, list[Any]]:
        if self._packed:
            self._unpack()
        index: dict[str, list[Any]] = {}
        for entry in self._headers:
            entry[4] = None  # a copied entry may still point into the message it came from
            # one dict operation where `in` and a store were two (as the parser's header loop)
            first = index.setdefault(entry[0], entry)
            if first is not entry:
                _chain(first, entry)
        self._index = index
        return index

    def _dirty(self, key: str) -> None:
        self._raw = None
        self._index = None
        cache = self._cache
        if cache:  # a message we are building has parsed nothing yet: no pops
            cache.pop(key, None)
            if key == "via":
                cache.pop("top_via", None)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` as text (a list header's line is not split)."""
        if self._packed:
            self._unpack()
        index = self._index
        entry = (self._reindex() if index is None else index).get(canonical_key(name))
        if entry is None:
            return None
        value = entry[2]
        return value if type(value) is str else str(value)

    def _text(self, key: str) -> str | None:
        """header() for a key that is canonical already (the accessors' literals)."""
        if self._packed:
            self._unpack()
        index = self._index
        entry = (self._reindex() if index is None else index).get(key)
        if entry is None:
            return None
        value = entry[2]
        return value if type(value) is str else str(value)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``; list headers are split on their commas."""
        return self.values(canonical_key(name))

    def values(self, key: str) -> list[str]:
        """header_values() for a key that is canonical already (``headers.canonical_key``: lower
        case, long form), as callers that resolve their names once pass it; [] when absent."""
        if self._packed:
            self._unpack()
        index = self._index
        entry = (self._reindex() if index is None else index).get(key)
        values: list[str] = []
        split = key in LIST_HEADERS
        while entry is not None:
            value = entry[2] if type(entry[2]) is str else str(entry[2])
            if split and "," in value:
                # a loop, not extend() of a generator expression: compiled, that builds a generator
                # object per line
                for v in split_commas(value):
                    if v:
                        values.append(v)
            elif split:
                value = value.strip()  # what split_commas gives for a line without a comma
                if value:
                    values.append(value)
            else:
                values.append(value)
            entry = entry[4]
        return values

    def has_header(self, name: str) -> bool:
        if self._packed:
            self._unpack()
        index = self._index
        return (self._reindex() if index is None else index).get(canonical_key(name)) is not None

    def header_names(self) -> list[str]:
        if self._packed:
            self._unpack()
        return [entry[1] for entry in self._headers]

    def headers(self) -> list[tuple[str, str, Any]]:
        """(canonical key, name as written, value) of every header line, in order; a value is text
        or the header object it was set to, and a list header's line is not split."""
        if self._packed:
            self._unpack()
        return [(entry[0], entry[1], entry[2]) for entry in self._headers]

    def set_header(self, name: str, value: Any) -> None:
        """Replace every value of ``name`` with one, in the position of the first old one."""
        if self._packed:
            self._unpack()
        key = canonical_key(name)
        self._dirty(key)
        new = [key, pretty_name(key) if key != name.lower() or name.islower() else name, value, None, None]
        for i, entry in enumerate(self._headers):
            if entry[0] == key:
                self._headers[i] = new
                self._headers[i + 1:] = [e for e in self._headers[i + 1:] if e[0] != key]
                return
        self._headers.append(new)

    def add_header(self, name: str, value: Any, first: bool = False) -> None:
        if self._packed:
            self._unpack()
        # the memo hit and _dirty() written out: ~30 calls per late-fork call, two frames each spared
        known = _ADDED.get(name)
        key, written = known if known is not None else _added_name(name)
        self._raw = None
        self._index = None
        cache = self._cache
        if cache:
            cache.pop(key, None)
            if key == "via":
                cache.pop("top_via", None)
        new = [key, written, value, None, None]
        if first:
            for i, entry in enumerate(self._headers):
                if entry[0] == key:
                    self._headers.insert(i, new)
                    return
            self._headers.insert(0, new)
        else:
            self._headers.append(new)

    def remove_header(self, name: str) -> None:
        if self._packed:
            self._unpack()
        key = canonical_key(name)
        self._dirty(key)
        self._headers = [e for e in self._headers if e[0] != key]

    def copy_headers_from(self, other: Message, name: str) -> None:
        """Append ``other``'s ``name`` lines verbatim (used for Via, Record-Route, ...)."""
        if self._packed:
            self._unpack()
        key = canonical_key(name)
        self._dirty(key)
        if other._packed:
            other._unpack()
        for entry in other._headers:
            if entry[0] == key:
                self._headers.append(list(entry))

    def _copy_into(self, new: Message) -> None:
        # Entry lists are copied (each message edits its own lines); values are shared, as
        # make_response shares them: a header object is replaced on change, never edited in place.
        # _raw stays valid until the copy's first edit, so an unchanged copy is never serialized again.
        if self._packed:
            self._unpack()
        new._headers = [entry.copy() for entry in self._headers]
        new.body = self.body
        new._raw = self._raw
        new._raw_body = self._raw_body
        new.contact_star = self.contact_star
        new.validated = self.validated

    def _required(self, name: str) -> str:
        value = self.header(name)
        if value is None:
            raise ParseError(f"missing {pretty_name(canonical_key(name))} header")
        return value

    # -- parsed accessors (cached) ----------------------------------------------------------------

    @property
    def vias(self) -> list[Via]:
        if self._packed:
            self._unpack()
        cached = self._cache.get("via")
        if cached is None:
            top = self._cache.get("top_via")
            index = self._index
            entry = (self._reindex() if index is None else index).get("via")
            first = entry[2] if entry is not None else None
            if entry is not None and entry[4] is None and type(first) is str and first and "," not in first:
                # one Via line with one value, as most messages carry: what values() would return,
                # without building the list through the comma split
                cached = [top if top is not None else Via.parse(first)]
            else:
                values = self.values("via")
                if not values:
                    raise ParseError("missing Via header")
                cached = [top if i == 0 and top is not None else Via.parse(v) for i, v in enumerate(values)]
            self._cache["via"] = cached
            self._cache["top_via"] = cached[0]
        return cached

    @property
    def top_via(self) -> Via:
        if self._packed:
            self._unpack()
        cached = self._cache.get("top_via")
        if cached is None:
            index = self._index
            entry = (self._reindex() if index is None else index).get("via")
            if entry is None:
                raise ParseError("missing Via header")
            first = entry[2] if type(entry[2]) is str else str(entry[2])
            if "," in first:
                first = split_commas(first)[0]
            cached = Via.parse(first)
            self._cache["top_via"] = cached
        return cached

    def set_top_via(self, via: Via) -> None:
        """Write back a modified top Via (e.g. received/rport set by the transport)."""
        if self._packed:
            self._unpack()
        for entry in self._headers:
            if entry[0] == "via":
                value = entry[2] if type(entry[2]) is str else str(entry[2])
                if "," in value:
                    parts = split_commas(value)
                    parts[0] = str(via)
                    entry[2] = ", ".join(parts)
                else:
                    entry[2] = str(via)
                entry[3] = None
                # The line changed in place: the index (key -> first entry) still holds, where
                # _dirty's reset made the next read of any header (the UAS core's Max-Forwards, on
                # every request the transport fixed) index the whole message again
                self._raw = None
                cache = self._cache
                vias = cache.get("via")
                if vias is not None and vias[0] is not via:
                    del cache["via"]
                cache["top_via"] = via
                return
        self.add_header("Via", via, first=True)
        self._cache["top_via"] = via

    def remove_top_via(self) -> None:
        if self._packed:
            self._unpack()
        for i, entry in enumerate(self._headers):
            if entry[0] == "via":
                value = entry[2] if type(entry[2]) is str else str(entry[2])
                parts = split_commas(value) if "," in value else [value]
                if len(parts) == 1:
                    del self._headers[i]
                else:
                    entry[2] = ", ".join(parts[1:])
                    entry[3] = None
                parsed = self._cache.get("via")
                self._dirty("via")
                if parsed is not None and len(parsed) > 1:
                    # the others are unchanged: a proxy that sends the response on reads the next one
                    self._cache["via"] = parsed[1:]
                    self._cache["top_via"] = parsed[1]
                return

    @property
    def branch(self) -> str | None:
        return self.top_via.branch

    def _name_addr(self, key: str) -> NameAddr:
        if self._packed:
            self._unpack()
        cached = self._cache.get(key)
        if cached is None:
            index = self._index
            entry = (self._reindex() if index is None else index).get(key)
            if entry is None:
                raise ParseError(f"missing {pretty_name(key)} header")
            value = entry[2]
            cached = value if isinstance(value, NameAddr) else NameAddr.parse(value)
            self._cache[key] = cached
        return cached

    @property
    def from_(self) -> NameAddr:
        return self._name_addr("from")

    @property
    def to(self) -> NameAddr:
        return self._name_addr("to")

    @property
    def call_id(self) -> str:
        if self._packed:
            self._unpack()
        cached = self._cache.get("call-id")
        if cached is None:
            index = self._index
            entry = (self._reindex() if index is None else index).get("call-id")
            if entry is None:
                raise ParseError("missing Call-ID header")
            cached = str(entry[2]).strip()
            if not cached or " " in cached:
                raise ParseError("bad Call-ID")
            self._cache["call-id"] = cached
        return cached

    @property
    def cseq(self) -> CSeq:
        if self._packed:
            self._unpack()
        cached = self._cache.get("cseq")
        if cached is None:
            index = self._index
            entry = (self._reindex() if index is None else index).get("cseq")
            if entry is None:
                raise ParseError("missing CSeq header")
            cached = CSeq.parse(str(entry[2]))
            self._cache["cseq"] = cached
        return cached

    @property
    def max_forwards(self) -> int | None:
        value = self._text("max-forwards")
        return None if value is None else parse_uint(value, "Max-Forwards", 255)

    @property
    def contacts(self) -> list[NameAddr]:
        if self._packed:
            self._unpack()
        cached = self._cache.get("contact")
        if cached is None:
            values = self.values("contact")
            if len(values) == 1 and values[0] == "*":
                self.contact_star = True
                cached = []
            else:
                if "*" in values:
                    raise ParseError("Contact * mixed with other contacts")
                cached = [NameAddr.parse(v) for v in values]
            self._cache["contact"] = cached
        return cached

    @property
    def content_length(self) -> int | None:
        value = self._text("content-length")
        return None if value is None else parse_uint(value, "Content-Length")

    @property
    def content_type(self) -> str | None:
        """The media type, lower case, without parameters."""
        value = self._text("content-type")
        if value is None:
            return None
        media = value.split(";", 1)[0].strip().lower()
        if "/" not in media:
            raise ParseError("bad Content-Type")
        return media

    @property
    def expires(self) -> int | None:
        value = self._text("expires")
        return None if value is None else parse_uint(value, "Expires")

    def validate(self) -> None:
        """Parse every header a server relies on; raises ParseError on the first malformed one.

        This is what the transport runs on every inbound message, so it reads the hot headers (which the
        transaction layer reads anyway, and then finds cached) and checks the rest only when present.
        """
        if self._packed:
            self._unpack()
        index = self._index
        if index is None:
            index = self._reindex()
        # The index has one entry per distinct key: as many as there are header lines means no key
        # repeats, and most messages then skip the search for a duplicate.
        if len(index) != len(self._headers):
            for key in _SINGLE_VALUED_ORDER:
                entry = index.get(key)
                if entry is not None and entry[4] is not None:
                    raise ParseError(f"more than one {pretty_name(key)} header")
        self.vias
        # check_uri, not .uri: a URI text seen before is known good, and most messages' From and To
        # URIs are read by nobody after this check (~2,800 instructions each to build)
        self.from_.check_uri()
        self.to.check_uri()
        self.call_id
        self.cseq
        # Nothing above changes a header, so the index is still current, and the keys are canonical
        # already: straight to the dict (no header() / property per check), with index.get each time
        # (compiled, a direct dict lookup; a bound `get` was a generic call)
        entry = index.get("max-forwards")
        if entry is not None:
            parse_uint(entry[2] if type(entry[2]) is str else str(entry[2]), "Max-Forwards", 255)
        entry = index.get("content-length")
        if entry is not None:
            parse_uint(entry[2] if type(entry[2]) is str else str(entry[2]), "Content-Length")
        if "contact" in index:
            for contact in self.contacts:
                contact.check_uri()
        entry = index.get("date")
        if entry is not None:
            check_date(entry[2] if type(entry[2]) is str else str(entry[2]))
        if "content-type" in index:
            self.content_type
        self.validated = True

    # -- serialization ----------------------------------------------------------------------------

    # -- compaction (long-lived messages) ---------------------------------------------------------

    def compact(self) -> None:
        """Keep only the serialized bytes of a message that will wait long (a parked call's INVITE,
        its 100 Trying): the header entries, the index and the parsed Via/From/To/URI objects take
        five to ten times the size of the bytes. Behaviour does not change: the first read of any of
        the dropped state re-parses the bytes (``_unpack``), and ``to_bytes()`` gives the same bytes
        as before."""
        if self._packed:
            return  # already compact
        data = self.to_bytes()
        # The parsed state is replaced by shared empty values, not deleted: compiled, a del goes
        # through PyObject_SetAttr (~1,000 instructions per slot, five per message, seven messages
        # per late-fork call), an assignment is a store. Nothing writes to these values: every
        # reader checks _packed first, and _unpack puts fresh ones back.
        self._headers = _PACKED_HEADERS
        self._index = None
        self._cache = _PACKED_CACHE
        self._body = b""
        self._raw_body = None
        self._raw = data
        self._packed = True

    @property
    def compacted(self) -> bool:
        """True while the message is held as bytes only (after compact(), until its next read)."""
        return self._packed

    def _unpack(self) -> None:
        """Parse the bytes compact() kept back into the emptied slots."""
        fresh = parse_message(self._raw)  # type: ignore[arg-type]
        self._headers = fresh._headers
        self._index = fresh._index
        self._cache = {}
        self._body = fresh._body
        self._raw_body = fresh._raw_body
        self._raw = fresh._raw
        self._packed = False

    def _start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        if self._packed:
            self._unpack()
        if self._raw is not None and self._body is self._raw_body:
            return self._raw
        body = self._body
        length = str(len(body))
        # lines.append each time, not a bound `append`: compiled, the method is a direct list append,
        # the bound one a generic call
        lines = [self._start_line()]
        length_written = False
        # key, name and line typed as the str (or None) they are: compiled, comparing them is a string
        # compare, where the untyped fields of an entry went through the generic rich compare; an
        # f-string formats a header object with str(), so a str value and an object share a branch
        for entry in self._headers:
            key: str = entry[0]
            raw: str | None = entry[3]
            if key == "content-length":
                if length_written:
                    continue
                length_written = True
                if raw is not None and str(entry[2]).strip() == length:
                    lines.append(raw)
                else:
                    lines.append(f"{entry[1]}: {length}")
            elif raw is not None:
                lines.append(raw)
            else:
                lines.append(f"{entry[1]}: {entry[2]}")
        if not length_written:
            lines.append(f"Content-Length: {length}")
        lines.append("")
        lines.append("")
        data = "\r\n".join(lines).encode("utf-8", "surrogateescape") + body
        # Kept until the next mutation (_dirty): retransmissions, the 2xx resends and compact() of a
        # message we built then reuse these bytes instead of serializing it again.
        self._raw = data
        self._raw_body = body
        return data

    def __bytes__(self) -> bytes:
        return self.to_bytes()


class Request(Message):
    __slots__ = ("method", "raw_uri", "version", "_uri")

    def __init__(self, method: str, uri: URI | str, version: str = SIP_VERSION) -> None:
        super().__init__()
        self.method = method
        if isinstance(uri, URI):
            self._uri: URI | None = uri
            self.raw_uri = str(uri)
        else:
            self._uri = None
            self.raw_uri = uri
        self.version = version

    @property
    def uri(self) -> URI:
        if self._uri is None:
            uri = URI.parse(self.raw_uri)
            if uri.headers and uri.scheme in ("sip", "sips"):
                raise ParseError("Request-URI must not carry headers")
            self._uri = uri
        return self._uri

    @uri.setter
    def uri(self, value: URI) -> None:
        if self._packed:
            self._unpack()  # before the bytes it would come back from go stale
        self._uri = value
        self.raw_uri = str(value)
        self._raw = None

    def copy(self) -> Request:
        """An independent copy to forward (a proxy's, RFC 3261 §16.6 step 1), made from the parsed
        header lines: about a tenth of what re-parsing ``to_bytes()`` costs."""
        new = Request(self.method, self.raw_uri if self._uri is None else str(self._uri), self.version)
        self._copy_into(new)
        return new

    def compact(self) -> None:
        super().compact()
        # the Request-URI text is in sync (to_bytes wrote the start line): the parsed URI can go
        self._uri = None

    def _start_line(self) -> str:
        if self._uri is not None:
            self.raw_uri = str(self._uri)
        return f"{self.method} {self.raw_uri} {self.version}"

    @property
    def uri_scheme(self) -> str:
        """The Request-URI's scheme, lower case, without building the URI when its text parsed
        before (the UAS core's check: most requests' URIs are read by nobody else)."""
        if self._uri is None:
            scheme = known_scheme(self.raw_uri)
            if scheme is not None:
                return scheme
        return self.uri.scheme

    def validate(self) -> None:
        # a text that parsed before on the URI fast path parses again (no headers either: that path
        # takes none), so nothing is built: only an INVITE's URI is read later, by the call layer
        if self._uri is None and not known_uri(self.raw_uri):
            self.uri
        super().validate()

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_uri}>"


class Response(Message):
    __slots__ = ("status", "reason", "version")

    def __init__(self, status: int, reason: str | None = None, version: str = SIP_VERSION) -> None:
        super().__init__()
        self.status = status
        self.reason = REASONS.get(status, "Unknown") if reason is None else reason
        self.version = version

    def _start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# -- parsing ----------------------------------------------------------------------------------------


# _split_head decodes a datagram-sized message whole (its body too: cheap for these sizes); a larger
# one has only its head decoded
_DECODE_WHOLE: Final = 4096


def _split_head(data: bytes) -> tuple[list[str], int, int]:
    """The head's lines, where the message starts and where its body starts."""
    # RFC 3261 §7.5: empty lines before the start line are ignored (keep-alives on streams).
    # (a slice compared, not startswith(b"\r\n", start): compiled, that is a generic method call)
    start = 0
    while data[start:start + 2] == b"\r\n":
        start += 2
    text = data.decode("utf-8", "surrogateescape") if len(data) <= _DECODE_WHOLE else ""
    if len(text) == len(data):
        # every character one byte (ASCII, or bytes kept as surrogates), so a character's index is
        # its byte offset: the end of the head is found by str.find, which compiled is a direct
        # call, where bytes.find with a start is a generic method call
        end = text.find("\r\n\r\n", start)
        if end < 0:
            raise ParseError("no empty line after the headers")
        head = text[start:end]
    else:
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            raise ParseError("no empty line after the headers")
        head = data[start:end].decode("utf-8", "surrogateescape")
    lines = head.split("\r\n")
    # RFC 3261 §7.3.1/§25.1: a CR or LF is only ever part of a CRLF (a line end, or a fold before SP/HT).
    # A bare one inside a value would reach the B-leg as a header of its own. Once split on CRLF, no
    # line may hold one: the lines joined are scanned with memchr (`in`), far cheaper than counting
    # CRs and LFs in the head, and no regex. A NUL is legal only escaped in a quoted-string
    # (quoted-pair, RFC 4475 intmeth); a raw one truncates C strings.
    joined = "".join(lines)
    if "\r" in joined or "\n" in joined:
        raise ParseError("bare CR or LF in the header section")
    if "\0" in joined and joined.count("\0") != joined.count("\\\0"):
        raise ParseError("NUL in the header section")
    return lines, start, end + 4


# the methods we see all day are tokens: a set lookup spares the token regex
_METHODS: Final = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE",
                             "INFO", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH"})


# status code text -> its number: one lookup checks three ASCII digits in 100-699 and converts them
_STATUS_CODES: Final = {str(code): code for code in range(100, 700)}


def _parse_start_line(line: str) -> Message:
    # the exact spellings first: upper() makes a string per message, and is needed only for the
    # case-insensitive rest (RFC 3261 §7.1)
    if line.startswith("SIP/") or line[:4].upper() == "SIP/":
        parts = line.split(" ", 2)
        if len(parts) < 2:
            raise ParseError("bad status line")
        if parts[0] != SIP_VERSION and parts[0].upper() != SIP_VERSION:
            raise ParseError("unsupported SIP version", 505)
        status = _STATUS_CODES.get(parts[1])
        if status is None:
            raise ParseError("bad status code")
        return Response(status, parts[2] if len(parts) == 3 else "")
    parts = line.split(" ")
    if len(parts) != 3:
        raise ParseError("bad request line")
    method, uri, version = parts
    if not method or not uri or not version:
        raise ParseError("bad request line")
    if method not in _METHODS and not is_token(method):
        raise ParseError("bad method")
    if version != SIP_VERSION and version.upper() != SIP_VERSION:
        if version.upper().startswith("SIP/"):
            raise ParseError("unsupported SIP version", 505)
        raise ParseError("bad request line")
    if uri.startswith("<"):
        raise ParseError("Request-URI in angle brackets")
    return Request(method, uri)


# Header name as written -> lookup key. Names repeat endlessly on the wire, so validating and
# folding each one once saves most of the per-header cost.
_KEYS: Final[dict[str, tuple[str, str]]] = {}


def _header_key(written: str) -> tuple[str, str]:
    """(lookup key, name) for a header name as written; validated once per distinct spelling."""
    known = _KEYS.get(written)
    if known is None:
        name = written.rstrip(" \t")
        if not written or not is_token(name):
            raise ParseError("bad header name")
        key = name.lower()
        known = (COMPACT.get(key, key), name)
        if len(_KEYS) < 1024:
            _KEYS[written] = known
    return known


def _parse_headers(msg: Message, lines: list[str], folded: bool = False) -> None:
    headers = msg._headers
    index: dict[str, list[Any]] = {}
    keys = _KEYS
    if not folded:
        # No continuation lines, as far as we know: the common case, kept to the bare minimum of work
        # per line. A continuation line starts with SP or HT, which no header name in _KEYS does, so
        # it always lands in the branch below: only then is the head parsed again, unfolding. (A regex
        # scan for folds up front cost every message about as much as this whole check for CR/LF.)
        for line in lines:
            # partition: one call for the name and the value (a find and two slices cost more)
            name, colon, value = line.partition(":")
            known = keys.get(name)
            if known is None or not colon:
                if line[:1] in (" ", "\t"):
                    headers.clear()
                    _parse_headers(msg, lines, folded=True)
                    return
                if not colon or not name:
                    raise ParseError("header line without a colon")
                known = _header_key(name)
            entry = [known[0], known[1], value.strip(), line, None]
            headers.append(entry)
            # one lookup where `in` and a store were two
            first = index.setdefault(known[0], entry)
            if first is not entry:
                _chain(first, entry)
        msg._index = index
        return
    last: list[Any] | None = None
    for line in lines:
        if not line:
            continue
        if line[0] in " \t":
            if last is None:
                raise ParseError("folded line before the first header")
            last[2] = f"{last[2]} {line.strip()}".strip()
            last[3] = f"{last[3]}\r\n{line}"
            continue
        at = line.find(":")
        if at <= 0:
            raise ParseError("header line without a colon")
        known = _header_key(line[:at])
        last = [known[0], known[1], line[at + 1:].strip(), line, None]
        headers.append(last)
        if known[0] not in index:
            index[known[0]] = last
        else:
            _chain(index[known[0]], last)
    msg._index = index


def parse_message(data: bytes, stream: bool = False) -> Request | Response:
    """Parse one complete message.

    For a datagram (``stream`` False) a Content-Length larger than the bytes present is an error, and
    octets after the body are ignored (RFC 3261 §18.3). The framer has already cut stream messages.
    """
    lines, start, body_start = _split_head(data)
    msg = _parse_start_line(lines[0])
    _parse_headers(msg, lines[1:])
    length_entry = msg._index.get("content-length")  # type: ignore[union-attr]
    length_text = length_entry[2] if length_entry is not None else None
    available = len(data) - body_start
    if length_text is not None:
        length = parse_uint(length_text, "Content-Length")
        if length > available:
            raise ParseError("Content-Length larger than the message")
    elif stream:
        raise ParseError("missing Content-Length on a stream")
    else:
        length = available
    end = body_start + length
    body = data[body_start:end]
    msg._body = body
    msg._raw_body = body
    msg._raw = data if start == 0 and end == len(data) else data[start:end]
    return msg  # type: ignore[return-value]


def extract_for_error_response(data: bytes) -> Request | None:
    """Tolerantly read a request that failed to parse, keeping what a 400 needs.

    Returns a Request carrying only Via, From, To, Call-ID and CSeq (as raw text), or None when the
    data is a response or has no Via or no CSeq: a client matches a response by those two (RFC 3261
    §17.1.3), so a request missing From, To or Call-ID still gets its 400 (RFC 4475 insuf). A header
    with a bare CR, LF or NUL is left out, so that the 400 never carries it back. The Via lines may
    themselves be unparseable: the caller then answers to the packet's source address.
    """
    try:
        end = data.find(b"\r\n\r\n")
        head = data[: end if end >= 0 else len(data)].decode("utf-8", "surrogateescape")
        lines = head.split("\r\n")
        while lines and not lines[0]:
            lines.pop(0)
        if not lines or lines[0].startswith("SIP/"):
            return None
        method = lines[0].split(" ", 1)[0] or "UNKNOWN"
        req = Request(method, "sip:invalid")
        wanted = {"via", "from", "to", "call-id", "cseq"}
        last: list[Any] | None = None
        for line in lines[1:]:
            continued = line[:1] in (" ", "\t")
            if "\r" in line or "\n" in line or "\0" in line:
                if continued and last is not None:
                    req._headers.remove(last)
                last = None
                continue
            if continued:
                if last is not None:
                    last[2] = f"{last[2]} {line.strip()}"
                    last[3] = f"{last[3]}\r\n{line}"
                continue
            last = None
            name, colon, value = line.partition(":")
            name = name.rstrip(" \t")
            if not colon or not is_token(name):  # copied as is, the line would spoil our 400
                continue
            key = canonical_key(name)
            if key in wanted:
                last = [key, name, value.strip(), line, None]
                req._headers.append(last)
        present = {entry[0] for entry in req._headers}
        if "via" not in present or "cseq" not in present:
            return None
        return req
    except Exception:  # noqa: BLE001 - a tolerant reader must never raise
        return None


def make_response(
    req: Request, status: int, reason: str | None = None, to_tag: str | None = None
) -> Response:
    """Build a response per RFC 3261 §8.2.6: Via, From, To, Call-ID and CSeq copied from the request.

    A To tag is added when ``to_tag`` is given and the request's To has none (never on 100).
    """
    resp = Response(status, reason)
    headers = resp._headers
    if req._packed:
        req._unpack()
    to_entry = None
    for entry in req._headers:
        key = entry[0]
        if key in _RESPONSE_COPIED:
            headers.append(entry.copy())
        elif key == "to" and to_entry is None:
            to_entry = entry.copy()
            headers.append(to_entry)
    cache = req._cache
    top_via = cache.get("top_via")
    if top_via is not None:
        resp._cache["top_via"] = top_via  # the same text: spare the transport a second parse
    cseq = cache.get("cseq")
    if cseq is not None:
        # the same text too (nothing changes a CSeq in place): the message counters read it
        resp._cache["cseq"] = cseq
    if to_tag and status != 100 and to_entry is not None:
        try:
            to = req.to
        except ParseError:
            to = None
        if to is not None and to.tag is None:
            # appending to the text keeps the caller's spelling and spares a rebuild of the address
            value = to_entry[2] if type(to_entry[2]) is str else str(to_entry[2])
            to_entry[2] = f"{value};tag={to_tag}"
            to_entry[3] = None
    return resp
