"""A fake FCM HTTP v1 server (plain HTTP/1.1 on loopback) with the Google OAuth2 token endpoint.

It is strict where the real service is strict, so a sender that passes here sends what Google
accepts: the token endpoint verifies the RS256 JWT-bearer assertion against the test service
account's public key (iss, aud, scope, iat/exp), and ``messages:send`` checks the bearer token,
exactly one target, string-only data, reserved keys, ``android.ttl`` and ``android.priority``.
Replies use Google's JSON error shapes (``error.details[].errorCode``) and ``Retry-After``.

Behaviour per registration token is scriptable (see :class:`Reply`); every request is recorded
in memory and, optionally, as JSON lines in a file for end-to-end tests that run the fake as a
separate process::

    python -m tests.fakes.fcm_fake --port 0 --sa-pub pub.pem [--script s.json] --record rec.jsonl

prints ``PORT <n>`` once listening. The script file maps a token to a list of replies, each a
kind name or an object: ``{"tok1": [{"kind": "quota", "retry_after": 1}, "ok"]}``.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs

import jwt
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP
from twisted.web import resource, server
from twisted.web.http import HTTPChannel
from tests.fakes.spawn import spawn_fake

__all__ = ["FakeFCM", "Reply", "RecordedRequest", "GOOGLE_TOKEN_AUD", "FCM_SCOPE", "spawn", "main"]

GOOGLE_TOKEN_AUD = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_TTL_RE = re.compile(r"^\d+(\.\d{1,9})?s$")
_MAX_TTL = 2_419_200
_MAX_MESSAGE = 4096
_SEND_RE = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"

# kind -> (HTTP status, canonical status, FCM errorCode, message) as FCM documents them
_KINDS: dict[str, tuple[int, str, str | None, str]] = {
    "invalid_token": (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                      "The registration token is not a valid FCM registration token"),
    "bad_request": (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                    "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration)"),
    "unregistered": (404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    "sender_mismatch": (403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    "third_party_auth": (401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR",
                         "Auth error from APNS or Web Push Service"),
    "quota": (429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED",
              "Quota exceeded for quota metric 'Send requests' of service 'fcm.googleapis.com'"),
    "internal": (500, "INTERNAL", "INTERNAL", "Internal error encountered."),
    "unavailable": (503, "UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}
KINDS = ("ok", "hang", *_KINDS)


@dataclass(frozen=True)
class Reply:
    """What the fake does for one send to a token.

    kind: "ok", "hang" (never answers) or an error kind: invalid_token, bad_request,
    unregistered, sender_mismatch, third_party_auth, quota, internal, unavailable.
    retry_after: seconds for a ``Retry-After`` header (any kind). delay: seconds before answering.
    """

    kind: str = "ok"
    retry_after: int | None = None
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown reply kind {self.kind!r}; expected one of {KINDS}")

    @classmethod
    def parse(cls, spec: str | dict[str, Any]) -> Reply:
        return cls(spec) if isinstance(spec, str) else cls(**spec)


@dataclass
class RecordedRequest:
    kind: str  # "token" | "send" | "other"
    method: str
    path: str
    headers: dict[str, str]
    body: str
    at: float
    status: int | None = None  # None while pending or for a hang
    target: str | None = None  # the registration token for sends
    error: str | None = None  # the reason the fake rejected it, if it did
    json: Any = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Problem(Exception):
    """A request the real service would reject: (HTTP status, canonical status, message, field)."""

    def __init__(self, code: int, status: str, message: str, field_path: str | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.message, self.field_path = code, status, message, field_path


class FakeFCM:
    """The fake server's state and behaviour; :meth:`listen` puts it on 127.0.0.1."""

    def __init__(
        self,
        public_key_pem: bytes,
        reactor: Any = None,
        project_id: str | None = None,
        client_email: str | None = None,
        record_path: str | None = None,
        access_token_lifetime: int = 3599,
        now: Callable[[], float] = time.time,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.public_key_pem = public_key_pem
        self.project_id = project_id
        self.client_email = client_email
        self.access_token_lifetime = access_token_lifetime
        self._now = now
        self._record_file = open(record_path, "a", encoding="utf-8") if record_path else None
        self._scripts: dict[str, deque[Reply]] = {}
        self.default_reply = Reply("ok")
        self._access_tokens: dict[str, float] = {}
        self.requests: list[RecordedRequest] = []
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []
        self._pending: dict[Any, IDelayedCall | None] = {}
        self._channels: dict[HTTPChannel, defer.Deferred[None]] = {}
        self._port: IListeningPort | None = None
        self.message_counter = 0

    # -- scripting -----------------------------------------------------------------------------

    def script(self, token: str, *replies: Reply | str) -> None:
        """Queue replies for ``token``; each send consumes one, and the last one repeats."""
        if not replies:
            raise ValueError("script() needs at least one reply")
        self._scripts[token] = deque(r if isinstance(r, Reply) else Reply(r) for r in replies)

    def load_script(self, data: dict[str, list[str | dict[str, Any]]]) -> None:
        for token, specs in data.items():
            self.script(token, *(Reply.parse(s) for s in specs))

    def expire_access_tokens(self) -> None:
        """Make every issued access token expired (the next send gets 401 ACCESS_TOKEN_EXPIRED)."""
        for token in self._access_tokens:
            self._access_tokens[token] = 0.0

    def _next_reply(self, token: str) -> Reply:
        queue = self._scripts.get(token)
        if not queue:
            return self.default_reply
        return queue.popleft() if len(queue) > 1 else queue[0]

    # -- observation ---------------------------------------------------------------------------

    @property
    def sends(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == "send"]

    @property
    def token_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == "token"]

    def wait_for_sends(self, n: int) -> defer.Deferred[None]:
        """A Deferred that fires once ``n`` sends have arrived (answered or not)."""
        return self._wait(lambda: len(self.sends) >= n)

    def _wait(self, predicate: Callable[[], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if predicate():
            d.callback(None)
        else:
            self._waiters.append((predicate, d))
        return d

    def _record(self, rec: RecordedRequest) -> None:
        self.requests.append(rec)
        if self._record_file is not None:
            self._record_file.write(json.dumps(rec.to_json()) + "\n")
            self._record_file.flush()
        ready = [(p, d) for p, d in self._waiters if p()]
        for item in ready:
            self._waiters.remove(item)
            item[1].callback(None)

    # -- network -------------------------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        tcp: IReactorTCP = self.reactor
        site = _TrackingSite(_Root(self), self._channels)
        self._port = tcp.listenTCP(port, site, interface=interface)
        return self._port.getHost().port

    @property
    def base_url(self) -> str:
        assert self._port is not None, "listen() first"
        return f"http://127.0.0.1:{self._port.getHost().port}"

    @property
    def token_uri(self) -> str:
        return self.base_url + "/token"

    def abort_hanging(self) -> None:
        """Drop the connections of requests scripted to hang (their clients see a reset)."""
        for request, call in list(self._pending.items()):
            transport = _transport_of(request.channel) if call is None else None
            if transport is not None:
                transport.abortConnection()

    def stop(self) -> defer.Deferred[None]:
        """Stop listening, drop open connections (hanging requests too) and cancel timers."""
        for call in self._pending.values():
            if call is not None and call.active():
                call.cancel()
        self._pending.clear()
        # wait for every dropped connection to be really closed, so a client thread blocked on one
        # sees EOF now (tests join their thread pools right after)
        live = [(_transport_of(channel), lost) for channel, lost in self._channels.items()]
        closing = [lost for transport, lost in live if transport is not None]
        for transport, _ in live:
            if transport is not None:
                transport.abortConnection()
        if self._record_file is not None:
            self._record_file.close()
            self._record_file = None
        port, self._port = self._port, None
        if port is not None:
            closing.append(defer.maybeDeferred(port.stopListening))
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    # -- request handling (called by _Root) ----------------------------------------------------

    def handle(self, request: server.Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = request.method.decode("ascii")
        body = request.content.read() if request.content is not None else b""
        headers = {k.decode("latin-1").lower(): v[-1].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        rec = RecordedRequest("other", method, path, headers, body.decode("utf-8", "replace"), self._now())
        if path == "/token":
            rec.kind = "token"
            return self._finish_now(request, rec, *self._token(method, body))
        match = _SEND_RE.match(path)
        if match is None:
            return self._finish_now(request, rec, *_google_error(404, "NOT_FOUND", "Not Found"))
        rec.kind = "send"
        try:
            message = self._check_send(method, match.group(1), headers, body, rec)
        except _Problem as p:
            rec.error = p.message
            return self._finish_now(request, rec, *_google_error(p.code, p.status, p.message, p.field_path))
        reply = self._next_reply(rec.target or "")
        return self._scripted(request, rec, reply, message)

    def _finish_now(self, request: server.Request, rec: RecordedRequest, status: int,
                    payload: dict[str, Any], extra: dict[str, str] | None = None) -> bytes:
        rec.status = status
        self._record(rec)
        return _write_json(request, status, payload, extra)

    def _scripted(self, request: server.Request, rec: RecordedRequest, reply: Reply,
                  message: dict[str, Any]) -> bytes | int:
        extra = {"Retry-After": str(reply.retry_after)} if reply.retry_after is not None else {}
        # state is complete before _record(): waiters run synchronously and may call stop()
        if reply.kind == "hang":
            self._pending[request] = None
            request.notifyFinish().addBoth(lambda _: self._pending.pop(request, None))
            self._record(rec)
            return server.NOT_DONE_YET
        if reply.kind == "ok":
            self.message_counter += 1
            name = f"projects/{self._project(rec)}/messages/0:{self.message_counter}"
            status, payload = 200, {"name": name}
        else:
            code, canonical, error_code, text = _KINDS[reply.kind]
            field_path = "message.token" if reply.kind == "invalid_token" else None
            status, payload = _google_error(code, canonical, text, field_path, error_code)
        if reply.delay <= 0:
            return self._finish_now(request, rec, status, payload, extra)
        rec.status = status

        def answer() -> None:
            self._pending.pop(request, None)
            request.write(_write_json(request, status, payload, extra))
            request.finish()

        self._pending[request] = self.reactor.callLater(reply.delay, answer)
        request.notifyFinish().addErrback(lambda _: self._cancel_pending(request))
        self._record(rec)
        return server.NOT_DONE_YET

    def _cancel_pending(self, request: server.Request) -> None:
        call = self._pending.pop(request, None)
        if call is not None and call.active():
            call.cancel()

    def _project(self, rec: RecordedRequest) -> str:
        match = _SEND_RE.match(rec.path)
        return match.group(1) if match else "?"

    # -- OAuth2 token endpoint -----------------------------------------------------------------

    def _token(self, method: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method != "POST":
            return 405, {"error": "invalid_request", "error_description": "POST required"}
        form = {k: v[0] for k, v in parse_qs(body.decode("ascii", "replace")).items()}
        if form.get("grant_type") != JWT_GRANT:
            return 400, {"error": "unsupported_grant_type",
                         "error_description": f"Invalid grant_type: {form.get('grant_type', '')}"}
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                self.public_key_pem,
                algorithms=["RS256"],
                audience=GOOGLE_TOKEN_AUD,
                options={"require": ["iss", "aud", "iat", "exp"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: aud"}
        except jwt.InvalidTokenError as e:
            return 400, {"error": "invalid_grant", "error_description": f"Invalid JWT Signature. ({e})"}
        if self.client_email is not None and claims["iss"] != self.client_email:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: unknown iss"}
        now = self._now()
        iat, exp = float(claims["iat"]), float(claims["exp"])
        if exp - iat > 3600 or exp <= now or iat > now + 300:
            return 400, {"error": "invalid_grant", "error_description":
                         "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                         "timeframe. Check your iat and exp values in the JWT claim."}
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return 400, {"error": "invalid_scope",
                         "error_description": "Invalid OAuth scope or ID token audience"}
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self._access_tokens[token] = now + self.access_token_lifetime
        return 200, {"access_token": token, "expires_in": self.access_token_lifetime, "token_type": "Bearer"}

    # -- messages:send checks ------------------------------------------------------------------

    def _check_send(self, method: str, project: str, headers: dict[str, str], body: bytes,
                    rec: RecordedRequest) -> dict[str, Any]:
        if method != "POST":
            raise _Problem(405, "METHOD_NOT_ALLOWED", "POST required")
        self._check_bearer(headers.get("authorization", ""))
        if self.project_id is not None and project != self.project_id:
            raise _Problem(403, "PERMISSION_DENIED",
                           f"Permission 'cloudmessaging.messages.create' denied on resource "
                           f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                           "(or it may not exist).")
        if not headers.get("content-type", "").startswith("application/json"):
            raise _Problem(400, "INVALID_ARGUMENT", "Content-Type must be application/json")
        try:
            doc = json.loads(body)
        except ValueError:
            raise _Problem(400, "INVALID_ARGUMENT", "Invalid JSON payload received.") from None
        rec.json = doc
        message = doc.get("message") if isinstance(doc, dict) else None
        if not isinstance(message, dict):
            raise _Problem(400, "INVALID_ARGUMENT", "Invalid JSON payload: message is required", "message")
        unknown = set(doc) - {"message", "validate_only"}
        if unknown:
            raise _Problem(400, "INVALID_ARGUMENT",
                           f"Invalid JSON payload received. Unknown name {sorted(unknown)}")
        targets = [k for k in ("token", "topic", "condition") if message.get(k)]
        if len(targets) != 1:
            raise _Problem(400, "INVALID_ARGUMENT", "Exactly one of token, topic or condition must be set",
                           "message")
        rec.target = message.get("token")
        _check_data(message.get("data"))
        _check_android(message.get("android"))
        if len(json.dumps(message, separators=(",", ":")).encode()) > _MAX_MESSAGE:
            raise _Problem(400, "INVALID_ARGUMENT", "Message is too big", "message")
        return message

    def _check_bearer(self, value: str) -> None:
        scheme, _, token = value.partition(" ")
        expiry = self._access_tokens.get(token) if scheme.lower() == "bearer" else None
        if expiry is None:
            raise _Problem(401, "UNAUTHENTICATED",
                           "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                           "login cookie or other valid authentication credential.")
        if expiry <= self._now():
            raise _Problem(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.",
                           "ACCESS_TOKEN_EXPIRED")


def _check_data(data: Any) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise _Problem(400, "INVALID_ARGUMENT", "Invalid value at 'message.data'", "message.data")
    for i, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            raise _Problem(400, "INVALID_ARGUMENT",
                           f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {json.dumps(value)}",
                           f"message.data[{i}].value")
        if key in ("from", "gcm", "message_type") or key.startswith("google"):
            raise _Problem(400, "INVALID_ARGUMENT", f"Invalid data payload key: {key}", "message.data")


def _check_android(android: Any) -> None:
    if android is None:
        return
    if not isinstance(android, dict):
        raise _Problem(400, "INVALID_ARGUMENT", "Invalid value at 'message.android'", "message.android")
    priority = android.get("priority")
    if priority is not None and str(priority).lower() not in ("normal", "high"):
        raise _Problem(400, "INVALID_ARGUMENT",
                       f"Invalid value at 'message.android.priority' "
                       f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {priority!r}",
                       "message.android.priority")
    ttl = android.get("ttl")
    if ttl is not None:
        if not isinstance(ttl, str) or not _TTL_RE.match(ttl) or float(ttl[:-1]) > _MAX_TTL:
            raise _Problem(400, "INVALID_ARGUMENT",
                           f"Invalid value at 'message.android.ttl' "
                           f"(type.googleapis.com/google.protobuf.Duration), {ttl!r}", "message.android.ttl")


def _google_error(code: int, status: str, message: str, field_path: str | None = None,
                  error_code: str | None = None) -> tuple[int, dict[str, Any]]:
    details: list[dict[str, Any]] = []
    if error_code is not None:
        details.append({"@type": _FCM_ERROR, "errorCode": error_code})
    if field_path == "ACCESS_TOKEN_EXPIRED":
        details.append({"@type": _ERROR_INFO, "reason": "ACCESS_TOKEN_EXPIRED", "domain": "googleapis.com"})
    elif field_path is not None:
        if error_code is None and code == 400:
            details.append({"@type": _FCM_ERROR, "errorCode": "INVALID_ARGUMENT"})
        violation = {"field": field_path, "description": message}
        details.append({"@type": _BAD_REQUEST, "fieldViolations": [violation]})
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return code, {"error": error}


def _write_json(request: server.Request, status: int, payload: dict[str, Any],
                extra: dict[str, str] | None = None) -> bytes:
    body = json.dumps(payload).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=UTF-8")
    for name, value in (extra or {}).items():
        request.setHeader(name.encode(), value.encode())
    return body


def _transport_of(channel: Any) -> Any:
    # Site builds a protocol-negotiating wrapper (HTTP/1.1 or h2) around the real HTTPChannel
    inner = getattr(channel, "_channel", channel)
    return getattr(inner, "transport", None)


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, fake: FakeFCM) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: server.Request) -> bytes | int:
        return self.fake.handle(request)


class _TrackingSite(server.Site):
    """A Site that remembers its live connections so stop() can drop keep-alive and hung ones."""

    def __init__(self, root: resource.Resource, channels: dict[HTTPChannel, defer.Deferred[None]]) -> None:
        super().__init__(root)
        self._live = channels
        self.displayTracebacks = False

    def buildProtocol(self, addr: Any) -> HTTPChannel:
        channel = super().buildProtocol(addr)
        live = self._live
        gone: defer.Deferred[None] = defer.Deferred()
        live[channel] = gone
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            live.pop(channel, None)
            try:
                lost(reason)
            finally:
                gone.callback(None)

        channel.connectionLost = connection_lost  # type: ignore[method-assign]
        return channel

    def log(self, request: server.Request) -> None:
        pass  # the fake records requests itself; access logs would only add noise to test output


def spawn(args: list[str], cwd: str | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -m tests.fakes.fcm_fake *args`` and wait (blocking) for its ``PORT`` line.

    Returns the process and its port; the caller terminates it. ``cwd`` defaults to the repo root.
    """
    return spawn_fake("tests.fakes.fcm_fake", args, "fake FCM", cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.fcm_fake",
                                     description="Fake FCM HTTP v1 server with an OAuth2 token endpoint")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sa-pub", required=True, help="PEM public key of the test service account")
    parser.add_argument("--project", default=None, help="accept sends for this project only")
    parser.add_argument("--client-email", default=None, help="required iss of the JWT assertion")
    parser.add_argument("--script", default=None, help="JSON file: token -> list of replies")
    parser.add_argument("--record", default=None, help="append every request here as JSON lines")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    with open(args.sa_pub, "rb") as f:
        pub = f.read()
    fake = FakeFCM(pub, reactor=reactor, project_id=args.project, client_email=args.client_email,
                   record_path=args.record)
    if args.script:
        with open(args.script, encoding="utf-8") as f:
            fake.load_script(json.load(f))
    port = fake.listen(args.port)
    print(f"PORT {port}", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", fake.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
