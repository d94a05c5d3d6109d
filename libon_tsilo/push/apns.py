"""APNs sender: aioapns' HTTP/2 connections, driven from Twisted on the asyncio reactor.

We use aioapns' protocol and pool classes, not its ``APNs`` facade, because the facade can't:
- dial another host/port or trust another CA (the fake, or a relay): the pool dials
  ``protocol_class.APNS_SERVER/APNS_PORT``, so we give it a per-sender protocol subclass;
- share one JWT across connections and refresh it on demand: aioapns mints one per connection
  and keeps it 30 minutes, so an ``ExpiredProviderToken`` could not be fixed by retrying;
- time out: nothing in aioapns does; every await here sits under ``asyncio.wait_for``;
- report ``Retry-After``: the protocol drops response headers other than status/apns-id.
Retries are ours (RetryPolicy, bounded by the push's ttl), so the pool makes one attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import ssl
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import jwt
from aioapns.common import NotificationRequest, NotificationResult, PushType
from aioapns.connection import (
    APNsBaseClientProtocol,
    APNsBaseConnectionPool,
    APNsTLSClientProtocol,
    AuthorizationHeaderProvider,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.errors import ErrorCodes
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from libon_tsilo.push.base import (
    CONFIG_ERROR,
    DEAD_TOKEN,
    DELIVERED,
    RETRYABLE,
    IPushSender,
    PushRequest,
    PushResult,
    ResultHook,
    RetryPolicy,
    SenderStats,
    parse_retry_after,
    send_with_retries,
)
from libon_tsilo.push.payload import (
    PayloadTooLarge,
    cancel_alert_payload,
    refresh_payload,
    voip_payload,
)
from libon_tsilo.push.reactor import deferred_from_coro

try:
    from libon_tsilo.util import redact
except ImportError:  # util is owned by ops; keep the sender usable without it

    def redact(secret: str | None) -> str:
        return f"{secret[:6]}…" if secret else "(empty)"


__all__ = [
    "PRODUCTION_HOST",
    "SANDBOX_HOST",
    "APNsAppConfig",
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


@dataclass
class APNsAppConfig:
    """What the sender reads from one [[push.apns]] app entry (ops/config.py owns the schema)."""

    bundle_id: str
    team_id: str = ""
    key_id: str = ""
    key_file: str = ""  # .p8 (token auth) ...
    cert_file: str = ""  # ... or a PEM with certificate + key (certificate auth)
    sandbox: bool = False
    server: str = ""  # "https://host:port" (or "host:port") override; "" = Apple's
    ca_file: str = ""  # trust only this CA (the fake's, a relay's); "" = system trust
    timeout: float = 5.0  # per HTTP/2 request, connect included


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


def classify(status: int, reason: str, push_type: str = "voip") -> str:
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


class ProviderToken(AuthorizationHeaderProvider):
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


class _SenderProtocol(APNsTLSClientProtocol):
    """aioapns' client protocol, plus Retry-After capture and clean abandonment on timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after: dict[str, bytes] = {}

    def on_response_received(self, headers: dict[bytes, bytes]) -> None:
        value = headers.get(b"retry-after")
        if value is not None:
            self.retry_after[headers.get(b"apns-id", b"").decode()] = value
        super().on_response_received(headers)

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        try:
            return await super().send_notification(request)
        except asyncio.CancelledError:
            self._abandon(request.notification_id)
            raise

    def _abandon(self, notification_id: str) -> None:
        """Our timeout fired: reset the stream and free its slot, or a late answer would hit a
        cancelled future (aioapns would raise inside data_received) and the slot would leak."""
        self.requests.pop(notification_id, None)
        self.request_statuses.pop(notification_id, None)
        self.retry_after.pop(notification_id, None)
        for stream_id, nid in list(self.request_streams.items()):
            if nid == notification_id:
                del self.request_streams[stream_id]
                try:
                    self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                    self.flush()
                except Exception:  # stream already closed by the peer: nothing to reset
                    pass
                self.free_channels.release()


class _SenderPool(APNsBaseConnectionPool):
    """aioapns' pool with our dial target, TLS context and shared auth provider."""

    def __init__(
        self,
        protocol_class: type[APNsTLSClientProtocol],
        ssl_context: ssl.SSLContext,
        auth: AuthorizationHeaderProvider | None,
        topic: str,
        max_connections: int,
    ) -> None:
        super().__init__(topic=topic, max_connections=max_connections, max_connection_attempts=1)
        self.protocol_class = protocol_class
        self.ssl_context = ssl_context
        self.auth = auth

    async def create_connection(self) -> APNsBaseClientProtocol:
        factory = partial(self.protocol_class, self.apns_topic, self.loop, self.discard_connection, self.auth)
        _, protocol = await self.loop.create_connection(
            factory,
            host=self.protocol_class.APNS_SERVER,
            port=self.protocol_class.APNS_PORT,
            ssl=self.ssl_context,
        )
        return protocol

    def discard_connection(self, connection: APNsBaseClientProtocol) -> None:
        if connection in self.connections:  # a connection that failed early was never added
            super().discard_connection(connection)


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
    push_type: PushType
    topic: str
    priority: int


@implementer(IPushSender)
class APNsSender:
    """Sends PushRequests for ONE app (bundle id) to APNs.

    ``send`` never errbacks with a push failure (those are PushResult outcomes); it fails only
    with CancelledError when the caller cancels it, which also abandons the HTTP/2 stream.

    ``on_result(provider, outcome, latency_s)`` is called once per push (after retries), for
    metrics. ``stats`` counts outcomes.
    """

    provider = "apns"

    def __init__(
        self,
        app_config: Any,
        clock: IReactorTime,
        *,
        policy: RetryPolicy | None = None,
        on_result: ResultHook | None = None,
        max_connections: int = 2,
    ) -> None:
        self.bundle_id: str = app_config.bundle_id
        self.clock = clock
        self.policy = policy or RetryPolicy()
        self.on_result = on_result
        self.timeout = float(getattr(app_config, "timeout", 5.0) or 5.0)
        self.stats = SenderStats()
        self.host, self.port = _split_server(getattr(app_config, "server", ""), bool(app_config.sandbox))
        self._max_connections = max_connections
        self._ssl = self._ssl_context(app_config)
        self.token = self._provider_token(app_config, clock)
        self._pool: _SenderPool | None = None
        self._config_errors_logged: set[str] = set()
        self._protocol_class = type(
            "APNsProtocol", (_SenderProtocol,), {"APNS_SERVER": self.host, "APNS_PORT": self.port}
        )

    @staticmethod
    def _ssl_context(cfg: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=getattr(cfg, "ca_file", "") or None)
        ctx.set_alpn_protocols(["h2"])
        cert_file = getattr(cfg, "cert_file", "")
        if cert_file and not getattr(cfg, "key_file", ""):
            ctx.load_cert_chain(cert_file)
        return ctx

    @staticmethod
    def _provider_token(cfg: Any, clock: IReactorTime) -> ProviderToken | None:
        key_file = getattr(cfg, "key_file", "")
        if not key_file:
            if not getattr(cfg, "cert_file", ""):
                raise ValueError(f"apns app {cfg.bundle_id}: set key_file (.p8) or cert_file")
            return None
        if not (cfg.team_id and cfg.key_id):
            raise ValueError(f"apns app {cfg.bundle_id}: token auth needs team_id and key_id")
        with open(key_file, encoding="ascii") as f:
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
            d = send_with_retries(
                self.clock,
                self.policy,
                deadline,
                lambda n: deferred_from_coro(self._attempt(req, kind, payload, deadline)),
            )
        d.addCallback(self._finish, req, start)
        return d

    def close(self) -> None:
        """Close pooled connections (service stop)."""
        if self._pool is not None:
            self._pool.close()

    # -- internals -----------------------------------------------------------------------

    def _build(self, req: PushRequest, now: float) -> tuple[_Kind, dict[str, Any]]:
        if req.param:
            ref = parse_pn_param(req.param)
            if ref.bundle_id != self.bundle_id:
                raise ValueError(f"pn-param is for {ref.bundle_id}, this sender is {self.bundle_id}")
        if req.kind == "call":
            return _Kind(PushType.VOIP, self.bundle_id + ".voip", 10), voip_payload(req, now)
        if req.kind == "cancel":
            # PushKit: every VoIP push must report a call, so the end of one is a plain alert
            return _Kind(PushType.ALERT, self.bundle_id, 10), cancel_alert_payload(req, now)
        if req.kind == "refresh":
            return _Kind(PushType.BACKGROUND, self.bundle_id, 5), refresh_payload(req, now)
        raise ValueError(f"unknown push kind {req.kind!r}")

    def _get_pool(self) -> _SenderPool:
        # built on first use, from inside the running loop (aioapns binds the loop at construction)
        if self._pool is None:
            self._pool = _SenderPool(
                self._protocol_class, self._ssl, self.token, self.bundle_id + ".voip", self._max_connections
            )
        return self._pool

    async def _attempt(
        self, req: PushRequest, kind: _Kind, payload: dict[str, Any], deadline: float
    ) -> PushResult:
        result, iat = await self._post(req, kind, payload, deadline)
        if result.reason == "ExpiredProviderToken" and self.token is not None:
            # one retry with a fresh JWT; a second refusal is a real clock/key problem
            self.token.refresh(iat)
            result, _ = await self._post(req, kind, payload, deadline)
        return result

    async def _post(
        self, req: PushRequest, kind: _Kind, payload: dict[str, Any], deadline: float
    ) -> tuple[PushResult, int | None]:
        """One HTTP/2 exchange; returns the result and the JWT iat it was sent with."""
        remaining = deadline - self.clock.seconds()
        if remaining <= 0:
            return PushResult(RETRYABLE, "deadline passed"), None
        nreq = NotificationRequest(
            device_token=req.prid,
            message=payload,
            notification_id=req.push_id if _is_uuid(req.push_id) else None,  # None: aioapns makes one
            time_to_live=max(1, math.ceil(remaining)),
            priority=kind.priority,
            collapse_key=_collapse_id(req.call_id) if req.kind == "cancel" else None,
            push_type=kind.push_type,
            apns_topic=kind.topic,
        )
        iat = None
        if self.token is not None:
            self.token.get_header()  # mint/rotate now, so we know which iat this request carries
            iat = self.token.iat
        try:
            res, retry_raw = await asyncio.wait_for(self._exchange(nreq), min(self.timeout, remaining))
        except asyncio.TimeoutError:
            return PushResult(RETRYABLE, "timeout"), iat
        except Exception as e:  # aioapns ConnectionError/ConnectionClosed, h2 errors, OSError, ssl
            return PushResult(RETRYABLE, f"connection error: {type(e).__name__} {e}".strip()), iat
        status = int(res.status) if str(res.status).isdigit() else 0
        reason = res.description or ("Success" if status == 200 else "")
        outcome = classify(status, reason, kind.push_type.value)
        return (
            PushResult(
                outcome,
                reason,
                status=status,
                provider_id=res.notification_id,
                retry_after=parse_retry_after(retry_raw, self.clock.seconds()),
            ),
            iat,
        )

    async def _exchange(self, nreq: NotificationRequest) -> tuple[NotificationResult, bytes | None]:
        pool = self._get_pool()
        connection = await pool.acquire()
        res = await connection.send_notification(nreq)
        retry_raw = getattr(connection, "retry_after", {}).pop(nreq.notification_id, None)
        return res, retry_raw

    def _finish(self, result: PushResult, req: PushRequest, start: float) -> PushResult:
        latency = self.clock.seconds() - start
        self.stats.record(result.outcome)
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
        if self.on_result is not None:
            try:
                self.on_result(self.provider, result.outcome, latency)
            except Exception:  # metrics must never break call handling
                log.failure("on_result hook failed")
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
    if len(call_id.encode()) <= 64:
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()
