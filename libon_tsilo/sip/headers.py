"""Header names and the parsers for the structured header values we read (RFC 3261 §20, §25).

Every parser takes the header value as text with line folding already replaced by a space, and raises
ParseError with a short reason when the value is malformed.
"""

from __future__ import annotations

import re
from typing import Final

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.uri import URI, char_class_without, known_uri, remember_shape, split_hostport

# RFC 3261 §7.3.3 and the IANA compact forms. (The hot tables are Final, as in uri.py: C statics
# when compiled.)
COMPACT: Final = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via",
    "o": "event", "u": "allow-events", "r": "refer-to", "b": "referred-by", "x": "session-expires",
    "y": "identity", "a": "accept-contact", "j": "reject-contact", "d": "request-disposition",
}

_PRETTY = {
    "call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
    "rack": "RAck", "rseq": "RSeq", "sip-etag": "SIP-ETag", "sip-if-match": "SIP-If-Match",
}

# Headers whose value is a comma-separated list (RFC 3261 §7.3.1). Authorization-like headers are
# not lists even though their values contain commas.
LIST_HEADERS: Final = frozenset({
    "via", "contact", "route", "record-route", "path", "service-route", "allow", "supported", "require",
    "proxy-require", "unsupported", "accept", "accept-encoding", "accept-language", "content-encoding",
    "allow-events", "in-reply-to", "warning", "alert-info", "call-info", "error-info", "reason",
    "security-client", "security-server", "security-verify", "feature-caps", "p-asserted-identity",
})

TOKEN_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
_WS: Final = " \t"
# Every number we read fits in 32 bits: ten digits. int() of more than 4,300 digits raises ValueError
# (not ParseError), and a long one costs quadratic time before that, so the length is checked first.
_MAX_DIGITS: Final = 10
# Possessive repeats (`++`, `*+`, `?+`): a token ends at "=", ";" or the end, a value at ";" or the
# end, and none of them is in the class that ran: giving back characters can never make a match, so
# SRE need keep no state to backtrack into (a quarter of the regex's cost on a Via's parameters).
_PTOKEN = r"[A-Za-z0-9\-.!%*_+`'~]++"
_PVALUE = r"(?:=(?:[A-Za-z0-9\-.!%*_+`'~:\[\]]++|\"[^\"\\\r\n;]*+\"))?+"
# ;-separated parameters without whitespace, and quoted values without ';' or escapes: a plain split
# is exact. The Via and name-addr fast paths embed it, so they split without a second regex scan.
_PARAMS = rf"{_PTOKEN}{_PVALUE}(?:;{_PTOKEN}{_PVALUE})*+"
_SIMPLE_PARAMS = re.compile(rf"^{_PARAMS}$")


_CANONICAL: Final[dict[str, str]] = {}


def canonical_key(name: str) -> str:
    """The lookup key for a header name: lower case, compact forms expanded."""
    key = _CANONICAL.get(name)
    if key is None:
        key = name.lower()
        key = COMPACT.get(key, key)
        if len(_CANONICAL) < 1024:  # names come from our code and the wire: bound the memo
            _CANONICAL[name] = key
    return key


def pretty_name(key: str) -> str:
    """The conventional spelling of a header name we generate."""
    pretty = _PRETTY.get(key)
    if pretty is None:
        pretty = "-".join(part.capitalize() for part in key.split("-"))
        _PRETTY[key] = pretty
    return pretty


def is_token(text: str) -> bool:
    return bool(_TOKEN_RE.match(text))


def split_commas(value: str) -> list[str]:
    """Split a list header value on commas outside quoted strings and angle brackets."""
    if "," not in value:
        return [value.strip()]
    if '"' not in value:
        # The common case (Via, Route, Record-Route lines): with no quoted string, a comma splits
        # exactly when every piece before it has as many '<' as '>' (depth 0), which str methods
        # check in C; the scan below runs only when some '<...>' holds a comma.
        pieces = value.split(",")
        if ("<" not in value and ">" not in value) or all(p.count("<") == p.count(">") for p in pieces):
            return [p.strip() for p in pieces]
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    if quoted:
        raise ParseError("unbalanced quotes in header")
    parts.append(value[start:].strip())
    return parts


def _scan_quoted(text: str, i: int) -> int:
    """Given text[i] == '"', return the index just past the closing quote."""
    n = len(text)
    i += 1
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        i += 1
    raise ParseError("unbalanced quotes in header")


def unquote(text: str) -> str:
    """Strip the quotes of a quoted-string and resolve its quoted-pairs."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        body = text[1:-1]
        if "\\" in body:
            body = re.sub(r"\\(.)", r"\1", body, flags=re.S)
        return body
    return text


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_params(text: str, what: str) -> dict[str, str | None]:
    """Parse ``;name[=value]`` header parameters (text starts after the first ';' or is empty).

    Values may be tokens, host names or quoted strings; quoted values keep their quotes so that the
    original text can be reproduced. Whitespace around ';' and '=' is allowed (RFC 3261 §25.1 SEMI/EQUAL).
    """
    if _SIMPLE_PARAMS.match(text):
        return _split_params(text)
    params: dict[str, str | None] = {}
    if not text.strip():
        raise ParseError(f"empty parameter in {what}")
    i = 0
    n = len(text)
    while True:
        while i < n and text[i] in _WS:
            i += 1
        start = i
        while i < n and text[i] in TOKEN_CHARS:
            i += 1
        name = text[start:i]
        if not name:
            raise ParseError(f"empty parameter in {what}")
        while i < n and text[i] in _WS:
            i += 1
        value: str | None = None
        if i < n and text[i] == "=":
            i += 1
            while i < n and text[i] in _WS:
                i += 1
            if i < n and text[i] == '"':
                end = _scan_quoted(text, i)
                value = text[i:end]
                i = end
            else:
                start = i
                while i < n and text[i] not in "; \t":
                    i += 1
                value = text[start:i]
                if not value:
                    raise ParseError(f"empty parameter value in {what}")
                if "[" not in value and not all(c in TOKEN_CHARS or c == ":" for c in value):
                    raise ParseError(f"bad parameter value in {what}")
            while i < n and text[i] in _WS:
                i += 1
        params[name.lower()] = value
        if i >= n:
            return params
        if text[i] != ";":
            raise ParseError(f"junk in {what} parameters")
        i += 1


def _split_params(text: str) -> dict[str, str | None]:
    """parse_params for a text that matched _PARAMS."""
    params: dict[str, str | None] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        params[name.lower()] = value if eq else None
    return params


def _plain_params(text: str) -> dict[str, str | None] | None:
    """_split_params for parameters whose names are letters and digits and whose values are too,
    with "-" and "." (a branch, a tag, rport, received=<IPv4>): such a text is _PARAMS's, found
    by str methods (direct calls when compiled) where the regex costs as much as the split. None
    when some part is not that plain: the regex decides then."""
    if not text.isascii():
        return None
    params: dict[str, str | None] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        # most values (our branches, tags, rport) are letters and digits: the replaces, a new string
        # each, only for the rest
        if not name.isalnum() or (eq and not value.isalnum()
                                  and not value.replace("-", "").replace(".", "").isalnum()):
            return None
        params[name.lower()] = value if eq else None
    return params


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


_URI_CHARS = char_class_without('<>"')
# The common spelling of a name-addr; everything else takes NameAddr._parse_general.
_SIMPLE_NAME_ADDR = re.compile(rf'(?:"([^"\\\r\n]*+)"[ \t]*+)?<([{_URI_CHARS}]++)>(?:;({_PARAMS}))?')
# text -> (display, URI text, params text, params) of a name-addr that took the fast path
# (uri.remember_shape); the params dict is never handed out, each NameAddr gets a copy (a dict copy
# costs a tenth of splitting the text again)
_NAME_ADDR_SHAPES: Final[dict[str, tuple[str | None, str, str | None, dict[str, str | None] | None]]] = {}


_PARAMS_ONLY = re.compile(_PARAMS)


def _known_head(text: str) -> tuple[str | None, str, str | None, dict[str, str | None] | None] | None:
    """What _SIMPLE_NAME_ADDR would find in ``text`` when the part before its parameters was itself
    a name-addr seen before without any: the To of a dialog's first request and then the same To
    with the new tag, a From whose tag is new. None when that part is unknown or the parameters are
    not _PARAMS's: the regex decides then. The first ">;" ends the <URI> (no URI character is ">"; a
    quoted display holding one leaves a head that is no known name-addr)."""
    gt = text.find(">;")
    if gt < 0:
        return None
    head = _NAME_ADDR_SHAPES.get(text[:gt + 1])
    if head is None or head[2] is not None:
        return None
    params_text = text[gt + 2:]
    params = _plain_params(params_text)
    if params is None:
        if _PARAMS_ONLY.fullmatch(params_text) is None:
            return None
        params = _split_params(params_text)
    shape = (head[0], head[1], params_text, params)
    remember_shape(_NAME_ADDR_SHAPES, text, shape)
    return shape


class NameAddr:
    """name-addr or addr-spec with header parameters (From, To, Contact, Route, ...)."""

    __slots__ = ("display", "_uri", "_uri_text", "params", "_text")

    def __init__(self, uri: URI | str, display: str | None = None,
                 params: dict[str, str | None] | None = None):
        # The URI is parsed when first read: most messages only need the tag of From and To.
        if isinstance(uri, URI):
            self._uri: URI | None = uri
            self._uri_text = ""
        else:
            self._uri = None
            self._uri_text = uri
        self.display = display
        self.params = params if params is not None else {}
        self._text: str | None = None

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        text = text.strip()
        shape = _NAME_ADDR_SHAPES.get(text)
        if shape is None:
            shape = _known_head(text)
        if shape is None:
            match = _SIMPLE_NAME_ADDR.fullmatch(text)
            if match is None:
                return cls._parse_general(text)
            # Fast path: [quoted display without escapes] <URI without blanks or quotes>[;params]
            display, uri_text, params_text = match.groups()
            params = _split_params(params_text) if params_text is not None else None
            remember_shape(_NAME_ADDR_SHAPES, text, (display, uri_text, params_text, params))
        else:
            display, uri_text, _, params = shape
        # NameAddr, not cls (as URI.parse): a native call when compiled
        obj = NameAddr(uri_text, display, params.copy() if params is not None else None)
        obj._text = text
        return obj

    @classmethod
    def _parse_general(cls, text: str) -> NameAddr:
        text = text.strip()
        if not text:
            raise ParseError("empty address")
        display = None
        lt = -1
        if text[0] == '"':
            end = _scan_quoted(text, 0)
            display = unquote(text[:end])
            rest = text[end:].lstrip(_WS)
            if not rest.startswith("<"):
                raise ParseError("quoted display name without <URI>")
            lt = end + (len(text[end:]) - len(rest))
        else:
            lt = text.find("<")
            if lt > 0:
                words = text[:lt].split()
                for word in words:
                    if not is_token(word):
                        raise ParseError("bad display name")
                display = " ".join(words)
            elif lt < 0:
                # addr-spec: parameters after the URI belong to the header, not to the URI.
                if any(c in text for c in "<>\""):
                    raise ParseError("bad address")
                semi = text.find(";")
                uri_text = text if semi < 0 else text[:semi]
                if "?" in uri_text or "," in uri_text:
                    raise ParseError("addr-spec with '?' or ',' must be in <>")
                params = parse_params(text[semi + 1:], "address") if semi >= 0 else {}
                obj = NameAddr(uri_text.rstrip(_WS), None, params)
                obj._text = text
                return obj
        gt = text.find(">", lt)
        if gt < 0:
            raise ParseError("unterminated <URI>")
        uri_text = text[lt + 1:gt]
        if uri_text != uri_text.strip():
            raise ParseError("whitespace inside <URI>")
        rest = text[gt + 1:].strip()
        if rest:
            if rest[0] != ";":
                raise ParseError("junk after <URI>")
            params = parse_params(rest[1:], "address")
        else:
            params = {}
        obj = NameAddr(uri_text, display, params)
        obj._text = text
        return obj

    @property
    def uri(self) -> URI:
        if self._uri is None:
            self._uri = URI.parse(self._uri_text)
        return self._uri

    @uri.setter
    def uri(self, value: URI) -> None:
        self._uri = value
        self._text = None

    def check_uri(self) -> None:
        """Raise the ParseError that reading ``uri`` would raise, if any. A URI text that parsed before
        is known good and nothing is built: validation then costs a set lookup, and the URI object
        is made only if something reads it."""
        if self._uri is None and not known_uri(self._uri_text):
            self._uri = URI.parse(self._uri_text)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @tag.setter
    def tag(self, value: str | None) -> None:
        if value is None:
            self.params.pop("tag", None)
        else:
            self.params["tag"] = value
        self._text = None

    def touch(self) -> None:
        self._text = None

    def copy(self) -> NameAddr:
        return NameAddr(self.uri.copy(), self.display, dict(self.params))

    def __str__(self) -> str:
        if self._text is not None and (self._uri is None or str(self._uri) == self._uri_text):
            return self._text
        out = f"<{self.uri}>"
        if self.display:
            out = f"{quote(self.display)} {out}"
        text = out + format_params(self.params)
        self._text = text
        return text

    def __repr__(self) -> str:
        return f"NameAddr({str(self)!r})"


_SIMPLE_VIA = re.compile(
    r"^SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9.\-]+(?::\d+)?|\[[0-9A-Fa-f:.]+\](?::\d+)?)"
    rf"(?:;({_PARAMS}))?$")
# A Via differs from message to message by its branch, but not before its first ";": the part of
# _SIMPLE_VIA before the parameters (no ";" can be in it) -> (transport, host, port) it gave, so a
# Via whose head was seen runs only the parameters' regex (uri.remember_shape)
_VIA_HEADS: Final[dict[str, tuple[str, str, int | None]]] = {}
# _SIMPLE_VIA's parameters, matched from a position (match(text, pos): "^" would not match there)
_VIA_PARAMS = re.compile(rf"{_PARAMS}$")


class Via:
    """One Via value: ``SIP/2.0/<transport> host[:port];params``."""

    __slots__ = ("transport", "host", "port", "params", "_text")

    def __init__(self, transport: str, host: str, port: int | None = None,
                 params: dict[str, str | None] | None = None):
        self.transport = transport.upper()
        self.host = host
        self.port = port
        self.params = params if params is not None else {}
        self._text: str | None = None

    @classmethod
    def parse(cls, text: str) -> Via:
        semi = text.find(";")
        head = _VIA_HEADS.get(text[:semi] if semi >= 0 else text)
        params: dict[str, str | None] | None = {}
        if head is not None and semi >= 0:
            params = _plain_params(text[semi + 1:])
            if params is None and _VIA_PARAMS.match(text, semi + 1) is not None:
                params = _split_params(text[semi + 1:])
        if head is not None and params is not None:
            # what _SIMPLE_VIA would have matched: the same head, then ";" and the parameters to the end
            transport, host, port = head
            via = Via(transport, host, port, params)
            via._text = text
            if "rport" in params or "ttl" in params:
                via._check_numbers()
            return via
        match = _SIMPLE_VIA.match(text)
        if match is not None:
            # Fast path for the canonical spelling; anything unusual takes the general parser below.
            transport, hostport, params_text = match.groups()
            host, port = split_hostport(hostport, "Via sent-by")
            remember_shape(_VIA_HEADS, text[:match.end(2)], (transport, host, port))
            params = _split_params(params_text) if params_text is not None else {}
            # through __init__, which compiled (setup.py) costs little; a bare cls.__new__ instance
            # was cheaper in pure Python, but mypyc cannot build one
            via = Via(transport, host, port, params)
            via._text = text
            if "rport" in params or "ttl" in params:
                via._check_numbers()
            return via
        return cls._parse_general(text)

    @classmethod
    def _parse_general(cls, text: str) -> Via:
        parts = text.split("/", 2)
        if len(parts) != 3:
            raise ParseError("bad Via protocol")
        proto, version, rest = parts[0].strip(), parts[1].strip(), parts[2].lstrip(_WS)
        if proto.upper() != "SIP":
            raise ParseError("bad Via protocol")
        if version != "2.0":
            raise ParseError("unsupported SIP version in Via", 505)
        i = 0
        n = len(rest)
        while i < n and rest[i] not in _WS:
            i += 1
        transport = rest[:i]
        if not is_token(transport):
            raise ParseError("bad Via transport")
        rest = rest[i:].strip()
        semi = rest.find(";")
        sent_by = (rest if semi < 0 else rest[:semi]).strip()
        if not sent_by:
            raise ParseError("Via without sent-by")
        host, port = split_hostport(sent_by.replace(" ", "").replace("\t", ""), "Via sent-by")
        params = parse_params(rest[semi + 1:], "Via") if semi >= 0 else {}
        via = Via(transport, host, port, params)
        via._check_numbers()
        via._text = text.strip()
        return via

    def _check_numbers(self) -> None:
        ttl = self.params.get("ttl")
        if ttl is not None:
            parse_uint(ttl, "Via ttl", 255)
        rport = self.params.get("rport")
        if rport is not None:
            parse_uint(rport, "Via rport", 65535)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        value = self.params.get("rport")
        if not value:
            return None
        # checked when parsed (or set by us): only leading zeros can make it longer than 5 digits,
        # and int() of those may be too long; the short common case skips the full check (hot path)
        return int(value) if len(value) <= 5 else parse_uint(value, "Via rport", 65535)

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def ttl(self) -> int | None:
        value = self.params.get("ttl")
        return parse_uint(value, "Via ttl", 255) if value else None

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self.host, self.port

    def set_param(self, name: str, value: str | None) -> None:
        """Set parameter ``name`` (lower case). What the transport sets on every request it receives
        (RFC 3581: ``rport`` filled in, ``received`` added) edits the text it was parsed from, where
        rebuilding it from the fields cost ~5,000 instructions a request; any other change, or a text
        with quotes, is rebuilt from the fields when next written."""
        params = self.params
        text = self._text
        if text is not None and '"' not in text:
            if name not in params:
                # a new parameter goes last, where the dict puts it too
                text = f"{text};{name}" if value is None else f"{text};{name}={value}"
            elif params[name] is None and value is not None and text.endswith(f";{name}"):
                text = f"{text}={value}"  # a flag, written last as we name it (";rport"), gets its value
            else:
                text = None
        else:
            text = None
        params[name] = value
        self._text = text

    def copy(self) -> Via:
        return Via(self.transport, self.host, self.port, dict(self.params))

    def __str__(self) -> str:
        if self._text is not None:
            return self._text
        hostport = self.host if self.port is None else f"{self.host}:{self.port}"
        text = f"SIP/2.0/{self.transport} {hostport}{format_params(self.params)}"
        self._text = text
        return text

    def __repr__(self) -> str:
        return f"Via({str(self)!r})"


# the common spelling of a CSeq value (already stripped by the message parser)
_SIMPLE_CSEQ = re.compile(r"([0-9]+) ([A-Za-z0-9\-.!%*_+`'~]+)")
# text -> the CSeq it parsed to on the fast path (uri.remember_shape). Unlike the other shape caches
# this one keeps the object itself: a CSeq is a value (Final fields, checked by mypy), so every
# message with the same text may share one, as make_response already shares its request's
_CSEQ_SHAPES: Final[dict[str, CSeq]] = {}


class CSeq:
    __slots__ = ("seq", "method")

    def __init__(self, seq: int, method: str):
        self.seq: Final = seq
        self.method: Final = method

    @classmethod
    def parse(cls, text: str) -> CSeq:
        known = _CSEQ_SHAPES.get(text)
        if known is not None:
            return known
        match = _SIMPLE_CSEQ.fullmatch(text)
        if match is not None:
            # Fast path: "<digits> <method>" checked in one regex (no split, isdigit and token regex)
            seq_text, method = match.groups()
        else:
            parts = text.split()
            # ASCII digits only: str.isdigit() alone takes other scripts' digits, which int() reads
            if (len(parts) != 2 or not parts[0].isascii() or not parts[0].isdigit()
                    or not is_token(parts[1])):
                raise ParseError("bad CSeq")
            seq_text, method = parts
        if len(seq_text) > _MAX_DIGITS:
            seq_text = seq_text.lstrip("0") or "0"  # leading zeros are still a small number
            if len(seq_text) > _MAX_DIGITS:
                raise ParseError("CSeq number too large")
        seq = int(seq_text)
        if seq >= 2**31:
            raise ParseError("CSeq number too large")
        cseq = CSeq(seq, method)
        if match is not None:
            remember_shape(_CSEQ_SHAPES, text, cseq)
        return cseq

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"

    def __repr__(self) -> str:
        return f"CSeq({self.seq}, {self.method!r})"


# number text -> its value, for texts that passed parse_uint's digit checks (uri.remember_shape): the
# same few Max-Forwards, Content-Length and Expires values come in all day, and the checks with
# int() cost ~1,000 instructions; the limit, which differs per header, is checked each time
_UINTS: Final[dict[str, int]] = {}


def parse_uint(text: str, what: str, limit: int = 2**32 - 1) -> int:
    """A decimal number of at most ``limit`` (< 10**10) as RFC 3261 writes it (1*DIGIT, ASCII only)."""
    value = _UINTS.get(text)
    if value is None:
        digits = text.strip()
        # ASCII too: str.isdigit() takes digits like "²" that int() refuses with a ValueError
        if not digits.isdigit() or not digits.isascii():
            raise ParseError(f"bad {what}")
        if len(digits) > _MAX_DIGITS:
            digits = digits.lstrip("0") or "0"
            if len(digits) > _MAX_DIGITS:
                raise ParseError(f"{what} too large")
        value = int(digits)
        remember_shape(_UINTS, text, value)
    if value > limit:
        raise ParseError(f"{what} too large")
    return value


_DATE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                   r"\d{4} \d{2}:\d{2}:\d{2} GMT$")


def check_date(text: str) -> None:
    """RFC 3261 §20.17: SIP-date is RFC 1123 and always in GMT."""
    if not _DATE.match(text.strip()):
        raise ParseError("bad Date (must be RFC 1123 in GMT)")
