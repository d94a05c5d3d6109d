"""APNs sender: one app's pushes over our HTTP/2 client (push/apns_http2.py), on Twisted TLS.

The sender builds the request (headers, payload, the shared provider JWT), bounds each exchange
by a timeout, maps Apple's answer to a PushResult, and retries through RetryPolicy within the
push's ttl. Why the HTTP/2 client is ours and not aioapns': docs/ARCHITECTURE.md (push/).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Generator
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from libon_tsilo.push.apns_http2 import APNsClient, APNsConnectionError, APNsResponse
from libon_tsilo.push.base import (
    CONFIG_ERROR,
    DEAD_TOKEN,
    DELIVERED,
    RETRYABLE,
    IPushSender,
    Outcome,
    PushRequest,
    PushResult,
    RetryPolicy,
    parse_retry_after,
    send_with_retries,
)
from libon_tsilo.push.payload import (
    PayloadTooLarge,
    cancel_alert_payload,
    message_alert_payload,
    encode,
    refresh_payload,
    voip_payload,
)
from libon_tsilo.util import redact

__all__ = [
    "PRODUCTION_HOST",
    "SANDBOX_HOST",
    "APNsAppSettings",
    "ApnsAppRef",
    "ProviderToken",
    "APNsSender",
    "classify",
    "parse_pn_param",
    "select_app",
]

log = Logger()

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
APNS_PORT = 443

# Apple: statuses/reasons that say "this token will never work again" (Sygnal agrees)
_DEAD_REASONS = {"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered", "ExpiredToken"}


class APNsAppSettings(Protocol):
    """What the sender reads from one [[push.apns]] entry (ops/config.py's ApnsConfig owns the schema)."""

    @property
    def bundle_id(self) -> str: ...
    @property
    def team_id(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def key_file(self) -> str: ...  # .p8 (token auth) ...
    @property
    def cert_file(self) -> str: ...  # ... or a PEM with certificate + key (certificate auth)
    @property
    def sandbox(self) -> bool: ...
    @property
    def server(self) -> str: ...  # "https://host:port" (or "host:port") override; "" = Apple's
    @property
    def ca_file(self) -> str: ...  # trust only this CA (the fake's, a relay's); "" = system trust
    @property
    def timeout(self) -> float: ...  # per HTTP/2 request, connect included


class ApnsAppRef(NamedTuple):
    team_id: str
    bundle_id: str
    voip: bool


def parse_pn_param(pn_param: str) -> ApnsAppRef:
    """RFC 8599 §9.1: pn-param for apns is "<Team ID>.<topic>", topic = bundle id [+ ".voip"]."""
    team, dot, topic = pn_param.strip().partition(".")
    if not dot or not team.isalnum() or not topic or topic.startswith(".") or topic.endswith("."):
        raise ValueError(f"pn-param {pn_param!r} is not <TeamID>.<bundle id>[.voip]")
    voip = topic.endswith(".voip")
    bundle = topic.removesuffix(".voip")
    if not bundle:
        raise ValueError(f"pn-param {pn_param!r} has no bundle id")
    return ApnsAppRef(team, bundle, voip)


def select_app(pn_param: str) -> str:
    """The bundle id a push for this pn-param goes to (the key a PushRouter picks a sender by)."""
    return parse_pn_param(pn_param).bundle_id


def classify(status: int, reason: str, push_type: str = "voip") -> Outcome:
    """Map an APNs answer to a PushResult outcome (ExpiredProviderToken is handled before this)."""
    if status == 200:
        return DELIVERED
    if status == 429 or status >= 500:
        return RETRYABLE
    if status == 410 or (status == 400 and reason in _DEAD_REASONS):
        # an alert/background push to a PushKit token is refused as "not for topic": the token is
        # fine for calls, so don't let a cancel notification get it deleted
        if reason == "DeviceTokenNotForTopic" and push_type != "voip":
            return CONFIG_ERROR
        return DEAD_TOKEN
    return CONFIG_ERROR


class ProviderToken:
    """One ES256 provider JWT per (team, key), shared by every connection of a sender.

    Apple wants it rebuilt every 20-60 minutes and not more often: ``lifetime`` is 40 minutes,
    and ``refresh`` only replaces the JWT that was actually rejected, so a burst of concurrent
    ExpiredProviderToken answers mints one new token, not one each.
    """

    def __init__(
        self, key_pem: str, key_id: str, team_id: str, clock: IReactorTime, lifetime: float = 40 * 60
    ) -> None:
        self.key_pem = key_pem
        self.key_id = key_id
        self.team_id = team_id
        self.clock = clock
        self.lifetime = lifetime
        self.iat: int | None = None
        self._header: str | None = None

    def get_header(self) -> str:
        now = self.clock.seconds()
        if self._header is None or self.iat is None or now - self.iat >= self.lifetime:
            self._mint(int(now))
        assert self._header is not None
        return self._header

    def refresh(self, rejected_iat: int | None) -> None:
        """Forget the JWT issued at ``rejected_iat`` (if it is still the current one)."""
        if rejected_iat is not None and rejected_iat == self.iat:
            # iat has 1 s resolution; a refresh must still yield a different token
            self._mint(max(int(self.clock.seconds()), rejected_iat + 1))

    def _mint(self, iat: int) -> None:
        self.iat = iat
        token = jwt.encode(
            {"iss": self.team_id, "iat": iat},
            self.key_pem,
            algorithm="ES256",
            headers={"kid": self.key_id},
        )
        self._header = f"bearer {token}"


def _split_server(server: str, sandbox: bool) -> tuple[str, int]:
    """Dial target: Apple's host, or the override as "https://host[:port]" (the config's form)
    or a bare "host:port"."""
    if not server:
        return (SANDBOX_HOST if sandbox else PRODUCTION_HOST), APNS_PORT
    if "://" in server:
        url = urlsplit(server)
        try:
            port = url.port or APNS_PORT
        except ValueError:
            port = None
        if url.scheme != "https" or not url.hostname or port is None:
            raise ValueError(f"apns server {server!r} is not https://host[:port]")
        return url.hostname, port
    host, _, port_text = server.rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(f"apns server {server!r} is not host:port")
    return host.strip("[]"), int(port_text)


class _Kind(NamedTuple):
    push_type: str  # apns-push-type
    topic: str
    priority: int


_VOIP, _ALERT, _BACKGROUND = "voip", "alert", "background"


@implementer(IPushSender)
class APNsSender:
    """Sends PushRequests for ONE app (bundle id) to APNs.

    ``send`` never errbacks with a push failure (those are PushResult outcomes); it fails only
    with CancelledError when the caller cancels it, which also abandons the HTTP/2 stream.
    Outcomes are counted by the PushWaker (push/stats.py), not here.
    """

    provider = "apns"

    def __init__(
        self,
        app_config: APNsAppSettings,
        clock: IReactorTime,
        *,
        policy: RetryPolicy | None = None,
        max_connections: int = 2,
        reactor: Any = None,
    ) -> None:
        self.bundle_id: str = app_config.bundle_id
        self.clock = clock
        self.policy = policy or RetryPolicy()
        self.timeout = float(app_config.timeout or 5.0)
        self.host, self.port = _split_server(app_config.server, bool(app_config.sandbox))
        self._max_connections = max_connections
        self._tls = self._tls_options(app_config, self.host)
        self.token = self._provider_token(app_config, clock)
        self._reactor = reactor
        self._client: APNsClient | None = None
        self._config_errors_logged: set[str] = set()

    @staticmethod
    def _tls_options(cfg: APNsAppSettings, host: str) -> Any:
        """TLS towards APNs: ALPN h2, the configured CA or the system roots, and the client
        certificate when certificate auth is used."""
        trust: Any = None  # None: the platform's trust store
        if cfg.ca_file:
            with open(cfg.ca_file, "rb") as f:
                trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
        client_cert = None
        if cfg.cert_file and not cfg.key_file:
            with open(cfg.cert_file, "rb") as f:
                client_cert = ssl.PrivateCertificate.loadPEM(f.read())
        return ssl.optionsForClientTLS(
            host, trustRoot=trust, clientCertificate=client_cert, acceptableProtocols=[b"h2"]
        )

    @staticmethod
    def _provider_token(cfg: APNsAppSettings, clock: IReactorTime) -> ProviderToken | None:
        if not cfg.key_file:
            if not cfg.cert_file:
                raise ValueError(f"apns app {cfg.bundle_id}: set key_file (.p8) or cert_file")
            return None
        if not (cfg.team_id and cfg.key_id):
            raise ValueError(f"apns app {cfg.bundle_id}: token auth needs team_id and key_id")
        with open(cfg.key_file, encoding="ascii") as f:
            pem = f.read()
        # fail at start-up, not on the first call: a bad key would otherwise surface mid-ring
        try:
            key = serialization.load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"apns app {cfg.bundle_id}: key_file is not a PKCS#8 PEM key: {e}") from None
        if not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"):
            raise ValueError(f"apns app {cfg.bundle_id}: key_file must hold a P-256 (ES256) key")
        return ProviderToken(pem, cfg.key_id, cfg.team_id, clock)

    # -- public API ----------------------------------------------------------------------

    def send(self, req: PushRequest) -> Deferred[PushResult]:
        start = self.clock.seconds()
        deadline = start + req.ttl
        try:
            kind, payload = self._build(req, start)
        except (ValueError, PayloadTooLarge) as e:
            d: Deferred[PushResult] = Deferred()
            d.callback(PushResult(CONFIG_ERROR, str(e)))
        else:
            body = encode(payload)  # the bytes payload.py measured against the limit
            d = send_with_retries(
                self.clock, self.policy, deadline, lambda n: self._attempt(req, kind, body, deadline)
            )
        d.addCallback(self._finish, req, start)
        return d

    def close(self) -> None:
        """Close pooled connections (service stop)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- internals -----------------------------------------------------------------------

    def _build(self, req: PushRequest, now: float) -> tuple[_Kind, dict[str, Any]]:
        if req.param:
            ref = parse_pn_param(req.param)
            if ref.bundle_id != self.bundle_id:
                raise ValueError(f"pn-param is for {ref.bundle_id}, this sender is {self.bundle_id}")
        if req.kind == "call":
            return _Kind(_VOIP, self.bundle_id + ".voip", 10), voip_payload(req, now)
        if req.kind == "cancel":
            # PushKit: every VoIP push must report a call, so the end of one is a plain alert
            return _Kind(_ALERT, self.bundle_id, 10), cancel_alert_payload(req, now)
        if req.kind == "refresh":
            return _Kind(_BACKGROUND, self.bundle_id, 5), refresh_payload(req, now)
        if req.kind == "message":
            return _Kind(_ALERT, self.bundle_id, 10), message_alert_payload(req, now)
        raise ValueError(f"unknown push kind {req.kind!r}")

    def _get_client(self) -> APNsClient:
        if self._client is None:
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = default_reactor
            self._client = APNsClient(
                reactor, self.clock, self.host, self.port, self._tls,
                max_connections=self._max_connections, connect_timeout=self.timeout,
            )
        return self._client

    @inlineCallbacks
    def _attempt(
        self, req: PushRequest, kind: _Kind, body: bytes, deadline: float
    ) -> Generator[Deferred[Any], Any, PushResult]:
        result: PushResult
        result, iat = yield self._post(req, kind, body, deadline)
        if result.reason == "ExpiredProviderToken" and self.token is not None:
            # one retry with a fresh JWT; a second refusal is a real clock/key problem
            self.token.refresh(iat)
            result, _ = yield self._post(req, kind, body, deadline)
        return result

    def _post(
        self, req: PushRequest, kind: _Kind, body: bytes, deadline: float
    ) -> Deferred[tuple[PushResult, int | None]]:
        """One HTTP/2 exchange; fires with the result and the JWT iat it was sent with."""
        now = self.clock.seconds()
        remaining = deadline - now
        if remaining <= 0:
            return defer.succeed((PushResult(RETRYABLE, "deadline passed"), None))
        apns_id = req.push_id if _is_uuid(req.push_id) else str(uuid.uuid4())
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", self.host),
            # the token comes unescaped from a REGISTER: quoted, it names a device and nothing else
            (":path", f"/3/device/{quote(req.prid, safe='')}"),
            ("apns-id", apns_id),
            ("apns-topic", kind.topic),
            ("apns-push-type", kind.push_type),
            ("apns-priority", str(kind.priority)),
            ("apns-expiration", str(int(now) + max(1, math.ceil(remaining)))),
        ]
        collapse_id = _collapse_id(req.call_id) if req.kind == "cancel" else None
        if collapse_id is not None:
            headers.append(("apns-collapse-id", collapse_id))
        iat = None
        if self.token is not None:
            headers.append(("authorization", self.token.get_header()))
            iat = self.token.iat
        d = self._get_client().post(headers, body)
        d.addTimeout(min(self.timeout, remaining), self.clock)
        answered = d.addCallbacks(self._result, self._no_answer, callbackArgs=(apns_id, kind))
        return answered.addCallback(lambda result: (result, iat))

    def _result(self, res: APNsResponse, apns_id: str, kind: _Kind) -> PushResult:
        reason = res.reason or ("Success" if res.status == 200 else "")
        return PushResult(
            classify(res.status, reason, kind.push_type),
            reason,
            status=res.status,
            provider_id=res.apns_id or apns_id,
            retry_after=parse_retry_after(res.retry_after, self.clock.seconds()),
        )

    def _no_answer(self, failure: Failure) -> PushResult | Failure:
        if failure.check(defer.TimeoutError):
            return PushResult(RETRYABLE, "timeout")
        if failure.check(APNsConnectionError):
            return PushResult(RETRYABLE, f"connection error: {failure.getErrorMessage()}")
        return failure

    def _finish(self, result: PushResult, req: PushRequest, start: float) -> PushResult:
        latency = self.clock.seconds() - start
        if result.outcome == CONFIG_ERROR and result.reason not in self._config_errors_logged:
            self._config_errors_logged.add(result.reason)
            log.critical(
                "APNs refuses pushes for app {bundle}: {status} {reason}. Check bundle id, team/key id,"
                " .p8 key or certificate and sandbox setting; further pushes failing this way are not"
                " logged again",
                bundle=self.bundle_id,
                status=result.status,
                reason=result.reason,
            )
        log.info(
            "apns push {push_id} ({kind}) to {token} for {aor}: {outcome} {status} {reason}"
            " after {attempts} attempt(s), {latency:.3f}s",
            push_id=req.push_id,
            kind=req.kind,
            token=redact(req.prid),
            aor=req.aor,
            outcome=result.outcome,
            status=result.status,
            reason=result.reason,
            attempts=result.attempts,
            latency=latency,
            call_id=req.call_id,
        )
        return result


def _is_uuid(value: str) -> bool:
    """apns-id must be a canonical 8-4-4-4-12 UUID or APNs answers 400 BadMessageId."""
    try:
        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except (ValueError, AttributeError, TypeError):
        return False


def _collapse_id(call_id: str | None) -> str | None:
    """apns-collapse-id is limited to 64 bytes; long Call-IDs are hashed to stay unique."""
    if not call_id:
        return None
    if call_id.isascii() and len(call_id) <= 64:
        return call_id
    # hashed too when not ASCII: a peer's non-UTF-8 bytes (surrogates) cannot go in a header as is
    return hashlib.sha256(call_id.encode("utf-8", "surrogateescape")).hexdigest()
