"""Generic UAS behaviour (RFC 3261 §8.2, §11): request checks and the answers no router needs to own.

The app router runs :meth:`UASCore.check_request` on every request before routing it, and asks
:meth:`UASCore.method_response` for OPTIONS and for methods nobody routes.
"""

from __future__ import annotations

from typing import Iterable

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.message import Request, Response, make_response, new_tag

__all__ = [
    "UASCore",
    "ALLOWED_METHODS",
    "KNOWN_UNSUPPORTED_METHODS",
    "SUPPORTED_OPTION_TAGS",
    "ACCEPTED_BODY_TYPES",
    "URI_SCHEMES",
    "sdp_in_multipart",
]

ALLOWED_METHODS = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "INFO", "UPDATE", "PRACK",
                   "REFER")
# Methods we know of but do not implement: 405 with Allow, rather than 501 (RFC 3261 §21.4.6).
# MESSAGE is added to Allow when routed (ops wires messaging/ when [messages] enabled); without it,
# MESSAGE outside a dialog gets 405 (inside a call it is relayed).
KNOWN_UNSUPPORTED_METHODS = ("SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE")
# Served inside a dialog only (the router hands those to its in_dialog handler). Outside one: a
# PRACK matches nothing (RFC 3262 §3); a REFER would ask us to call anyone for anyone.
DIALOG_ONLY_METHODS = {"PRACK": (481, None), "REFER": (403, "REFER Only Within A Call")}
SUPPORTED_OPTION_TAGS = ("path", "100rel", "norefersub")  # RFC 3262; RFC 4488 (Refer-Sub: false)
ACCEPTED_BODY_TYPES = ("application/sdp",)
URI_SCHEMES = ("sip", "sips", "tel")

# Headers that must appear exactly once in a request (RFC 3261 §8.1.1, §20); Max-Forwards is not
# required, for RFC 2543 peers (RFC 4475 inv2543), but may not repeat.
_REQUIRED_ONCE = ("From", "To", "Call-ID", "CSeq")
_AT_MOST_ONCE = ("Max-Forwards", "Content-Length", "Content-Type")


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and its parameters (names lower case, quotes removed)."""
    media, *raw_params = value.split(";")
    params: dict[str, str] = {}
    for item in raw_params:
        name, _, val = item.partition("=")
        params[name.strip().lower()] = val.strip().strip('"')
    return media.strip().lower(), params


def sdp_in_multipart(content_type: str, body: bytes) -> bool:
    """True when a multipart/mixed body holds at least one application/sdp part (RFC 5621)."""
    _, params = _media_type(content_type)
    boundary = params.get("boundary")
    if not boundary:
        return False
    for part in body.split(b"--" + boundary.encode("utf-8", "replace"))[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head = part.split(b"\r\n\r\n", 1)[0]
        for line in head.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() in (b"content-type", b"c"):
                if _media_type(value.decode("utf-8", "replace"))[0] == "application/sdp":
                    return True
    return False


class UASCore:
    """Answers built per RFC 3261 §8.2 with the right headers (Allow, Accept, Unsupported, ...)."""

    def __init__(
        self,
        allow: Iterable[str] = ALLOWED_METHODS,
        supported: Iterable[str] = SUPPORTED_OPTION_TAGS,
        server: str | None = None,
    ) -> None:
        self.allow = tuple(allow)
        self.supported = tuple(tag.lower() for tag in supported)
        self.server = server
        # option tags only one method's handler implements (the registrar's "outbound"): a
        # Require of them is fine for that method and still a 420 for the others
        self.method_extensions: dict[str, frozenset[str]] = {}

    def add_extensions(self, method: str, tags: Iterable[str]) -> None:
        """Accept ``Require: <tag>`` on ``method`` requests (its handler implements the extension)."""
        self.method_extensions[method] = self.method_extensions.get(method, frozenset()) | {
            t.lower() for t in tags
        }

    # -- responses --------------------------------------------------------------------------------

    def response(self, req: Request, status: int, reason: str | None = None) -> Response:
        """A response with a fresh To tag (RFC 3261 §8.2.6.2) and our Server header."""
        resp = make_response(req, status, reason, to_tag=new_tag())
        if self.server:
            resp.set_header("Server", self.server)
        return resp

    def options_response(self, req: Request) -> Response:
        resp = self.response(req, 200)
        resp.set_header("Allow", ", ".join(self.allow))
        resp.set_header("Accept", ", ".join(ACCEPTED_BODY_TYPES))
        resp.set_header("Accept-Encoding", "identity")
        resp.set_header("Supported", ", ".join(self.supported))
        return resp

    def method_response(self, req: Request) -> Response | None:
        """200 for OPTIONS, 405 (known method we do not do) or 501; None: route the request."""
        method = req.method
        if method == "OPTIONS":
            return self.options_response(req)
        if method in DIALOG_ONLY_METHODS:
            return self.response(req, *DIALOG_ONLY_METHODS[method])
        if method in self.allow:
            return None
        resp = self.response(req, 405 if method in KNOWN_UNSUPPORTED_METHODS else 501)
        resp.set_header("Allow", ", ".join(self.allow))
        return resp

    def answer(self, req: Request) -> Response | None:
        """``check_request`` then ``method_response``: the whole generic UAS part in one call."""
        return self.check_request(req) or self.method_response(req)

    # -- §8.2 checks ------------------------------------------------------------------------------

    def check_request(self, req: Request) -> Response | None:
        """The generic checks of RFC 3261 §8.2, in order; a Response to send, or None to go on.

        Never raises: a header that cannot be parsed becomes a 400 naming it. ACKs are never
        answered, so they always get None.
        """
        if req.method == "ACK":
            return None
        try:
            return self._check(req)
        except ParseError as exc:
            return self._bad_request(req, exc.reason, exc.status)

    def _check(self, req: Request) -> Response | None:
        malformed = self._malformed(req)
        if malformed is not None:
            return self._bad_request(req, malformed)
        if req.cseq.method != req.method:
            return self._bad_request(req, "CSeq method does not match the request method")
        if req.uri_scheme not in URI_SCHEMES:
            return self.response(req, 416)
        if req.max_forwards == 0:
            return self.response(req, 483)
        unknown = self._unsupported_requirements(req)
        if unknown:
            resp = self.response(req, 420)
            resp.set_header("Unsupported", ", ".join(unknown))
            return resp
        if req.method == "INVITE":
            return self._check_invite_body(req)
        return None

    def _malformed(self, req: Request) -> str | None:
        if req.validated:
            return None  # Message.validate() made these checks and more when the message came in
        for name in _REQUIRED_ONCE:
            count = len(req.header_values(name))
            if count != 1:
                return f"{'missing' if count == 0 else 'duplicate'} {name} header"
        for name in _AT_MOST_ONCE:
            if len(req.header_values(name)) > 1:
                return f"duplicate {name} header"
        # Parse what every later layer relies on, so a bad one is a 400 here and not a crash there.
        req.vias
        req.from_
        req.to
        req.call_id
        req.uri
        req.content_length
        return None

    def _unsupported_requirements(self, req: Request) -> list[str]:
        if req.method == "CANCEL":
            return []  # RFC 3261 §8.2.2.3: Require is ignored on ACK and CANCEL
        required = req.header_values("Require")
        if not required:
            return required
        extra = self.method_extensions.get(req.method, ())
        return [tag for tag in required if tag.lower() not in self.supported and tag.lower() not in extra]

    def _check_invite_body(self, req: Request) -> Response | None:
        encodings = [e.lower() for e in req.header_values("Content-Encoding")]
        if any(e != "identity" for e in encodings):
            resp = self.response(req, 415)
            resp.set_header("Accept-Encoding", "identity")
            resp.set_header("Accept", ", ".join(ACCEPTED_BODY_TYPES))
            return resp
        if req.body:
            content_type = req.header("Content-Type")
            if content_type is None:
                return self._bad_request(req, "body without Content-Type")
            if not self._body_acceptable(content_type, req.body):
                resp = self.response(req, 415)
                resp.set_header("Accept", ", ".join(ACCEPTED_BODY_TYPES))
                return resp
        if not self._can_answer_in_kind(req):
            resp = self.response(req, 406)
            resp.set_header("Accept", ", ".join(ACCEPTED_BODY_TYPES))
            return resp
        return None

    @staticmethod
    def _body_acceptable(content_type: str, body: bytes) -> bool:
        media = _media_type(content_type)[0]
        if media in ACCEPTED_BODY_TYPES:
            return True
        return media == "multipart/mixed" and sdp_in_multipart(content_type, body)

    @staticmethod
    def _can_answer_in_kind(req: Request) -> bool:
        """Our answers carry SDP: a caller whose Accept excludes it cannot take them (RFC 4475 sdp01)."""
        accepted = [_media_type(v)[0] for v in req.header_values("Accept")]
        if not accepted:
            return True  # no Accept header means application/sdp (RFC 3261 §20.1)
        return any(m in ("application/sdp", "application/*", "*/*") for m in accepted)

    def _bad_request(self, req: Request, reason: str, status: int = 400) -> Response:
        # The reason goes on the status line: keep it one short line.
        text = reason.replace("\r", " ").replace("\n", " ")[:100]
        try:
            return self.response(req, status, text)
        except ParseError:
            return make_response(req, status, text)
