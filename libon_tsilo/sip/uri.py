"""SIP, SIPS and TEL URIs (RFC 3261 §19.1, RFC 3966), with RFC 3261 §19.1.4 comparison.

The parsed URI keeps the text it came from: ``str(uri)`` returns the original text until a field is
changed, so forwarding a URI never rewrites it.
"""

from __future__ import annotations

import re
import sys
from typing import Final, TypeVar
from urllib.parse import unquote_to_bytes

from libon_tsilo.sip.errors import ParseError

T = TypeVar("T")
_HEX = "0123456789abcdefABCDEF"
# Characters that may never appear raw in a URI we accept: whitespace, angle brackets, quotes.
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9])?\.?$|^[A-Za-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")
_IPV6_CHARS = re.compile(r"^[0-9A-Fa-f:.]+$")
# Parameters that, when present in only one of two URIs, make them differ (§19.1.4).
_SIGNIFICANT = ("user", "ttl", "method", "maddr", "transport")


def _check_escapes(text: str, what: str) -> None:
    i = text.find("%")
    while i >= 0:
        if len(text) < i + 3 or text[i + 1] not in _HEX or text[i + 2] not in _HEX:
            raise ParseError(f"bad escape in {what}")
        i = text.find("%", i + 3)


def unescape(text: str) -> str:
    """Decode %-escapes; bytes that are not UTF-8 are kept as surrogates so comparisons stay exact."""
    if "%" not in text:
        return text
    return unquote_to_bytes(text).decode("utf-8", "surrogateescape")


def _parse_params(text: str, what: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if not text:
        return params
    for part in text.split(";"):
        if not part:
            raise ParseError(f"empty parameter in {what}")
        name, eq, value = part.partition("=")
        if not name:
            raise ParseError(f"empty parameter name in {what}")
        params[name.lower()] = value if eq else None
    return params


def _format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


# The hot module-level tables are Final: compiled (setup.py), a Final name is a C static, where any
# other global is a dict lookup in the module's namespace at every use
_HOSTPORT_CACHE: Final[dict[str, tuple[str, int | None]]] = {}

# Every character str.isspace() is true for, i.e. what `\s` matches in a str pattern (a test checks).
UNICODE_SPACES = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b)))
                  + "\u2028\u2029\u202f\u205f\u3000")


def _class_char(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def char_class_without(excluded: str) -> str:
    """The body of a regex class matching every character but ``excluded`` and whitespace: the same
    set as ``[^<excluded>\\s]``, spelled as ranges. SRE tests such a class with a bitmap lookup for
    the first 256 code points; the negated class with `\\s` costs a Unicode category test per
    character, about half as much again on the long URIs of Contact headers."""
    cuts = sorted({ord(c) for c in excluded + UNICODE_SPACES})
    parts: list[str] = []
    start = 0
    for cut in cuts + [sys.maxunicode + 1]:
        if cut > start:
            first, last = _class_char(start), _class_char(cut - 1)
            parts.append(first if cut - 1 == start else f"{first}-{last}")
        start = cut + 1
    return "".join(parts)



# A call carries the same From, To, Contact and URIs in most of its messages, and each message is
# parsed on its own: the fast-path regexes (~6,000 instructions a match, 61 matches per late-fork
# call) were 14 % of a call's CPU in process. What a regex found in a text is kept by that text:
# the regex is not run again, and the objects are still built anew from the groups (they are
# mutable; a CSeq, a value with Final fields, is the one kept whole). Bounded: texts up to
# SHAPE_MAX_TEXT characters, and a full cache is emptied, not frozen, so it keeps serving the calls
# of the moment whatever came before.
SHAPE_CACHE_SIZE: Final = 4096
SHAPE_MAX_TEXT: Final = 256


def remember_shape(cache: dict[str, T], text: str, shape: T) -> None:
    """Keep ``shape``, what the fast-path regex found in ``text``, in ``cache``."""
    if len(text) <= SHAPE_MAX_TEXT:
        if len(cache) >= SHAPE_CACHE_SIZE:
            cache.clear()
        cache[text] = shape


def split_hostport(text: str, what: str = "host") -> tuple[str, int | None]:
    """Split ``host[:port]`` (IPv6 references in brackets). Validates the host and the port."""
    cached = _HOSTPORT_CACHE.get(text)
    if cached is not None:
        return cached
    result = _split_hostport(text, what)
    if len(_HOSTPORT_CACHE) < 4096:
        _HOSTPORT_CACHE[text] = result
    return result


def _split_hostport(text: str, what: str) -> tuple[str, int | None]:
    if not text:
        raise ParseError(f"missing {what}")
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            raise ParseError(f"unterminated IPv6 reference in {what}")
        host = text[: end + 1]
        if not _IPV6_CHARS.match(host[1:-1]):
            raise ParseError(f"bad IPv6 reference in {what}")
        rest = text[end + 1:]
        if rest and rest[0] != ":":
            raise ParseError(f"junk after IPv6 reference in {what}")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
        if not _HOSTNAME.match(host):
            raise ParseError(f"bad {what} {host!r}")
        if _IPV4.match(host) and any(int(o) > 255 for o in host.split(".")):
            raise ParseError(f"bad IPv4 address in {what}")
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5 or int(port_text) > 65535:
            raise ParseError(f"bad port in {what}")
        port = int(port_text)
    return host, port


_URI_PARAM_CHARS = char_class_without('?%<>"')

# sip[s]:[user@]host[:port][;params], lower-case scheme, no password, no %-escapes, no ?headers, no
# blanks or delimiters: such a URI parses with one regex; anything else takes URI._parse_general.
# Possessive repeats (`++`): no class here holds the character that ends its run, so giving characters
# back could never make a match; told so, SRE keeps no state to backtrack into (~25 % of a match).
_SIMPLE_SIP_URI = re.compile(
    r"(sips?):(?:([A-Za-z0-9\-_.!~*'()&=+$,]++)@)?"
    r"([A-Za-z0-9.\-]++(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]++\](?::[0-9]{1,5})?)"
    rf"(?:;([{_URI_PARAM_CHARS}]++))?")
# text -> (scheme, user, host, port, params text) of a URI that took the fast path (remember_shape).
# A text is kept once it parsed whole, so it is also the set of texts known to parse (known_uri).
_URI_SHAPES: Final[dict[str, tuple[str, str | None, str, int | None, str | None]]] = {}


def known_uri(text: str) -> bool:
    """True when ``text`` parsed before as a URI of the fast path, so parses again without an error:
    a check that builds nothing (Message.validate)."""
    return text in _URI_SHAPES


def known_scheme(text: str) -> str | None:
    """The scheme (lower case) of a ``known_uri`` text, None for any other text."""
    shape = _URI_SHAPES.get(text)
    return shape[0] if shape is not None else None


class URI:
    """A sip: or sips: URI. ``params`` keys are lower case; values keep their text (escaped).

    ``str()`` returns the text the URI was parsed from. After changing a field in place, call
    ``touch()`` (or use ``replace()``) so that the text is rebuilt from the fields.
    """

    __slots__ = ("scheme", "user", "password", "host", "port", "params", "headers", "_text")

    def __init__(
        self,
        scheme: str = "sip",
        user: str | None = None,
        host: str = "",
        port: int | None = None,
        params: dict[str, str | None] | None = None,
        headers: dict[str, str] | None = None,
        password: str | None = None,
    ) -> None:
        self.scheme = scheme.lower()
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = params if params is not None else {}
        self.headers = headers if headers is not None else {}
        self._text: str | None = None

    @classmethod
    def parse(cls, text: str) -> URI:
        """Parse a sip/sips/tel URI (tel gives a TelURI); other schemes give an AbsoluteURI."""
        shape = _URI_SHAPES.get(text)
        if shape is None:
            match = _SIMPLE_SIP_URI.fullmatch(text)
            if match is None:
                return cls._parse_general(text)
            # Fast path: the common shape, with nothing the general parser would have to check or decode
            scheme, user, hostport, params_text = match.groups()  # the scheme: "sip" or "sips", lower case
            host, port = split_hostport(hostport, "URI host")
            params = _parse_params(params_text, "URI") if params_text is not None else None
            # only now, after the parameters' checks: what is kept is known to parse (known_uri)
            remember_shape(_URI_SHAPES, text, (scheme, user, host, port, params_text))
        else:
            scheme, user, host, port, params_text = shape
            params = _parse_params(params_text, "URI") if params_text is not None else None
        # URI, not cls: compiled (setup.py), a call of the class itself is native, where cls(...) goes
        # through the type's generic call and the interpreted __init__ wrapper (~1,300 instructions)
        uri = URI(scheme, user, host, port, params)
        uri._text = text
        return uri

    @classmethod
    def _parse_general(cls, text: str) -> URI:
        # a handful of C-level scans beats one regex search over the whole URI
        if " " in text or "<" in text or ">" in text or '"' in text or "\t" in text or "\r" in text \
                or "\n" in text:
            raise ParseError("whitespace or delimiter inside a URI")
        scheme, colon, rest = text.partition(":")
        if not colon or not scheme:
            raise ParseError(f"URI without a scheme: {text[:40]!r}")
        lscheme = scheme.lower()
        if lscheme == "tel":
            return TelURI.parse(text)
        if lscheme not in ("sip", "sips"):
            if not re.match(r"^[A-Za-z][A-Za-z0-9+\-.]*$", scheme):
                raise ParseError("bad URI scheme")
            absolute = AbsoluteURI(lscheme, rest)
            absolute._text = text
            return absolute
        uri = cls()  # every field is set below
        uri.scheme = lscheme
        uri._text = text
        headers_text = ""
        at = rest.find("@")
        if at >= 0:
            userinfo, hostpart = rest[:at], rest[at + 1:]
            user, pcolon, password = userinfo.partition(":")
            if not user:
                raise ParseError("empty user part in URI")
            _check_escapes(userinfo, "URI user")
            uri.user = user
            uri.password = password if pcolon else None
        else:
            hostpart = rest
            uri.user = None
            uri.password = None
        q = hostpart.find("?")
        if q >= 0:
            hostpart, headers_text = hostpart[:q], hostpart[q + 1:]
        semi = hostpart.find(";")
        if semi >= 0:
            hostport, params_text = hostpart[:semi], hostpart[semi + 1:]
            if not params_text:
                raise ParseError("empty parameter in URI")
        else:
            hostport, params_text = hostpart, ""
        uri.host, uri.port = split_hostport(hostport, "URI host")
        _check_escapes(params_text, "URI parameters")
        uri.params = _parse_params(params_text, "URI")
        uri.headers = {}
        if headers_text:
            _check_escapes(headers_text, "URI headers")
            for part in headers_text.split("&"):
                name, _, value = part.partition("=")
                if not name:
                    raise ParseError("empty URI header name")
                uri.headers[name] = value
        return uri

    def touch(self) -> None:
        """Forget the original text. Call it after changing a field in place; ``replace`` does it."""
        self._text = None

    def replace(self, **fields: object) -> URI:
        """A copy with some fields changed (URIs are best treated as values)."""
        new = self.copy()
        for name, value in fields.items():
            setattr(new, name, value)
        new._text = None
        return new

    @property
    def transport(self) -> str | None:
        value = self.params.get("transport")
        return value.lower() if value else None

    @property
    def host_bare(self) -> str:
        """The host without IPv6 brackets, ready for a socket call."""
        return self.host[1:-1] if self.host.startswith("[") else self.host

    def copy(self) -> URI:
        new = URI(self.scheme, self.user, self.host, self.port, dict(self.params), dict(self.headers),
                  self.password)
        new._text = self._text
        return new

    def __str__(self) -> str:
        if self._text is not None:
            return self._text
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":" + self.password)
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out.append(f":{self.port}")
        if self.params:
            out.append(_format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(f"{k}={v}" for k, v in self.headers.items()))
        text = "".join(out)
        self._text = text
        return text

    def __repr__(self) -> str:
        return f"URI({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        """RFC 3261 §19.1.4 comparison."""
        if not isinstance(other, URI):
            return NotImplemented
        if self.scheme != other.scheme:
            return False
        if _unesc(self.user) != _unesc(other.user) or _unesc(self.password) != _unesc(other.password):
            return False
        if self.host.lower() != other.host.lower() or self.port != other.port:
            return False
        for name in _SIGNIFICANT:
            if name in self.params and name in other.params:
                if _folded(self.params[name]) != _folded(other.params[name]):  # a flag equals only a flag
                    return False
            elif name in self.params or name in other.params:
                return False
        for name in self.params.keys() & other.params.keys():
            if name in _SIGNIFICANT:
                continue
            if _folded(self.params[name]) != _folded(other.params[name]):
                return False
        mine = {k.lower(): _unesc(v) for k, v in self.headers.items()}
        theirs = {k.lower(): _unesc(v) for k, v in other.headers.items()}
        return mine == theirs

    def __hash__(self) -> int:
        return hash((self.scheme, _unesc(self.user), self.host.lower(), self.port))



def _unesc(value: str | None) -> str | None:
    return unescape(value) if value is not None else None


def _folded(value: str | None) -> str | None:
    return unescape(value).lower() if value is not None else None


# RFC 3966 §5.1.1 visual separators do not count when comparing numbers.
_VISUAL = str.maketrans("", "", "-.()")


# RFC 3966 §3: a global number is "+" and digits; a local number is hex digits, "*" and "#"; both
# may carry visual separators anywhere but must hold at least one digit
_TEL_GLOBAL = re.compile(r"^\+[0-9\-.()]*[0-9][0-9\-.()]*$")
_TEL_LOCAL = re.compile(r"^[0-9A-Fa-f*#\-.()]*[0-9A-Fa-f*#][0-9A-Fa-f*#\-.()]*$")


class TelURI(URI):
    """tel: URI (RFC 3966): ``number`` is the subscriber number as written; ``params`` as for SIP.

    A local number (no leading "+") must name its ``phone-context`` (§5.1.5): without it nobody
    can tell which network the digits belong to.
    """

    __slots__ = ("number",)
    number: str

    @classmethod
    def parse(cls, text: str) -> TelURI:
        scheme, _, rest = text.partition(":")
        number, _, params_text = rest.partition(";")
        if not number or "%" in number:
            raise ParseError("bad tel URI number")
        params = _parse_params(params_text, "tel URI")
        if number[0] == "+":
            if not _TEL_GLOBAL.match(number):
                raise ParseError("bad tel URI global number")
        elif not _TEL_LOCAL.match(number):
            raise ParseError("bad tel URI number")
        elif not params.get("phone-context"):
            raise ParseError("tel URI local number without phone-context")
        uri = cls()  # every field is set below
        uri.scheme = "tel"
        uri.number = number
        uri.user = number
        uri.password = None
        uri.host = ""
        uri.port = None
        uri.params = params
        uri.headers = {}
        uri._text = text
        return uri

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    @property
    def digits(self) -> str:
        """The number without visual separators ("+33123456789" for "+33-1-23-45-67-89")."""
        return self.number.translate(_VISUAL)

    @property
    def phone_context(self) -> str | None:
        return self.params.get("phone-context")

    def __str__(self) -> str:
        if self._text is not None:
            return self._text
        return f"tel:{self.number}{_format_params(self.params)}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TelURI):
            return NotImplemented
        return (self.number.translate(_VISUAL).lower() == other.number.translate(_VISUAL).lower()
                and {k: (v or "").lower() for k, v in self.params.items()}
                == {k: (v or "").lower() for k, v in other.params.items()})

    def __hash__(self) -> int:
        return hash(("tel", self.number.translate(_VISUAL).lower()))


class AbsoluteURI(URI):
    """A URI of a scheme we do not interpret (e.g. mailto:, http:). The UAS core answers 416."""

    __slots__ = ("opaque",)

    def __init__(self, scheme: str, opaque: str) -> None:
        self.scheme = scheme
        self.opaque = opaque
        self.user = None
        self.password = None
        self.host = ""
        self.port = None
        self.params = {}
        self.headers = {}
        self._text = f"{scheme}:{opaque}"

    def __str__(self) -> str:
        return self._text if self._text is not None else f"{self.scheme}:{self.opaque}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AbsoluteURI):
            return NotImplemented
        return self.scheme == other.scheme and self.opaque == other.opaque

    def __hash__(self) -> int:
        return hash((self.scheme, self.opaque))
