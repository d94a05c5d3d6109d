"""FCM HTTP v1 sender: pyfcm (blocking, requests + google-auth) run in a bounded thread pool.

pyfcm is used for what it does well (message body, OAuth2 credentials from the service-account
file, per-thread requests sessions) and tamed where it would hurt a ringing call:

- ``notify()`` sleeps ``Retry-After`` seconds and recurses, and urllib3 retries 502/503 up to ten
  times; a push for a call is worthless after the ring timeout. We build the body with pyfcm's
  ``parse_payload`` and POST once per attempt through a session with retries disabled, then retry
  ourselves with the deadline-bounded :class:`RetryPolicy`.
- ``parse_response`` throws away the status and Google's error JSON (errorCode, message); we
  classify the raw response so dead tokens and configuration errors are told apart.
- The endpoint is taken from the app config (tests point it at a loopback fake), the project is
  the configured one (not the service account's), and one access token is shared by all threads.

The service account's ``token_uri`` is honoured by google-auth for the JWT-bearer grant.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import google.auth.exceptions
import google.auth.transport.requests
import requests
from pyfcm import FCMNotification
from pyfcm import errors as pyfcm_errors
from requests.adapters import HTTPAdapter
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

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
from libon_tsilo.push.payload import PayloadTooLarge, call_data
from libon_tsilo.util import redact

__all__ = ["FCMAppConfig", "FCMSender", "WireReply", "classify_reply", "classify_failure"]

log = Logger()

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


class FCMAppConfig(Protocol):
    """What the sender reads from one ``[[push.fcm]]`` table (ops.config.FcmConfig fits)."""

    project_id: str
    service_account_file: str
    endpoint: str
    timeout: float


@dataclass(frozen=True)
class WireReply:
    """The parts of an HTTP reply the classifier needs (built in the worker thread)."""

    status: int
    text: str
    retry_after: str | None = None


class _TimeoutRequest(google.auth.transport.requests.Request):
    """google-auth's transport with a bounded timeout: its default is 120 s per token request."""

    def __init__(self, session: requests.Session, timeout: float) -> None:
        super().__init__(session)
        self._timeout = timeout

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: Any = None, **kwargs: Any) -> Any:
        return super().__call__(url, method=method, body=body, headers=headers,  # type: ignore[no-untyped-call]
                                timeout=self._timeout, **kwargs)


class _BoundedFCM(FCMNotification):  # type: ignore[misc]  # pyfcm ships no type information
    """pyfcm pointed at ``endpoint`` for ``project_id``; one POST per call, no sleeping.

    Runs only in pool threads. The credentials object is shared, so token refresh is serialised
    by a lock and happens once for all threads instead of once per thread.
    """

    def __init__(self, service_account_file: str, project_id: str, endpoint: str, pool_size: int) -> None:
        # max_retries=0: urllib3 would otherwise retry 502/503 with back-off on its own clock
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, pool_size), max_retries=0)
        super().__init__(service_account_file=service_account_file, project_id=project_id, adapter=adapter)
        self.FCM_END_POINT_BASE = endpoint.rstrip("/") + "/v1/projects"
        self._token_lock = threading.Lock()
        self._token_session = requests.Session()
        self._token_session.mount("http://", HTTPAdapter(max_retries=0))
        self._token_session.mount("https://", HTTPAdapter(max_retries=0))

    @property
    def fcm_end_point(self) -> str:
        # pyfcm prefers the service account's project; the configured project (pn-param) must win
        return f"{self.FCM_END_POINT_BASE}/{self._project_id}/messages:send"

    def _get_access_token(self) -> str:
        with self._token_lock:
            if self.credentials is None:
                self._initialize_credentials()
            if not self.credentials.valid:
                timeout = getattr(self.thread_local, "token_timeout", 5.0)
                self.credentials.refresh(_TimeoutRequest(self._token_session, timeout))
            return str(self.credentials.token)

    def _invalidate_token(self) -> None:
        with self._token_lock:
            if self.credentials is not None:
                self.credentials.token = None

    def send_request(self, payload: Any = None, timeout: Any = None) -> requests.Response:
        # pyfcm's own version sleeps on Retry-After and recurses; keep notify() (unused by the
        # sender, but reachable) to a single bounded POST as well
        response: requests.Response = self.requests_session.post(
            self.fcm_end_point, data=payload, timeout=timeout or 5.0, headers=self.request_headers()
        )
        return response

    def post(self, body: bytes, deadline: float, abandoned: threading.Event) -> WireReply:
        """One send that ends by ``deadline`` (time.monotonic(); token fetch included).

        Retried once on an expired access token. Skipped when the reactor side already gave up
        (``abandoned``) or the deadline passed while the job waited for a free pool thread: a
        push sent after the call stopped ringing would wake a phone for nothing.
        """
        if abandoned.is_set() or deadline <= time.monotonic():
            raise _Abandoned()

        def left() -> float:
            return max(0.05, deadline - time.monotonic())

        self.thread_local.token_timeout = left()
        session = self.requests_session
        response = session.post(self.fcm_end_point, data=body, timeout=left(), headers=self.request_headers())
        if self._is_access_token_expired(response) and deadline > time.monotonic():
            self._invalidate_token()
            self.thread_local.token_timeout = left()
            response = session.post(self.fcm_end_point, data=body, timeout=left(),
                                    headers=self.request_headers())
        return WireReply(response.status_code, response.text, response.headers.get("Retry-After"))


class _Abandoned(Exception):
    """The attempt's time ran out before its thread could start sending."""


def _google_error(text: str) -> tuple[str, str, str, list[str]]:
    """(canonical status, FCM errorCode, message, fieldViolation fields) from Google's error JSON."""
    try:
        error = json.loads(text).get("error", {})
    except (ValueError, AttributeError):
        return "", "", text.strip()[:200], []
    if not isinstance(error, dict):
        return "", "", str(error)[:200], []
    code, fields = "", []
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == _FCM_ERROR_TYPE:
            code = str(detail.get("errorCode", ""))
        elif detail.get("@type") == _BAD_REQUEST_TYPE:
            violations = detail.get("fieldViolations") or []
            fields += [str(v.get("field", "")) for v in violations if isinstance(v, dict)]
    return str(error.get("status", "")), code, str(error.get("message", "")), fields


def _is_token_problem(message: str, fields: list[str]) -> bool:
    return "message.token" in fields or "registration token" in message.lower()


def classify_reply(reply: WireReply, now: float) -> PushResult:
    """Map one FCM HTTP v1 reply to a PushResult, keeping Google's reason text."""
    status = reply.status
    if status == 200:
        try:
            name = json.loads(reply.text).get("name")
        except (ValueError, AttributeError):
            name = None
        if not name:
            return PushResult(RETRYABLE, "200 without a message name", status)
        return PushResult(DELIVERED, "ok", status, provider_id=str(name))
    canonical, code, message, fields = _google_error(reply.text)
    reason = " ".join(p for p in (code or canonical, message) if p) or f"HTTP {status}"
    if status == 404 or code == "UNREGISTERED":
        return PushResult(DEAD_TOKEN, reason, status)
    if status == 400:
        outcome: Outcome = DEAD_TOKEN if _is_token_problem(message, fields) else CONFIG_ERROR
        return PushResult(outcome, reason, status)
    if status == 429 or status >= 500:
        return PushResult(RETRYABLE, reason, status, retry_after=parse_retry_after(reply.retry_after, now))
    # 401/403 (auth, SENDER_ID_MISMATCH, THIRD_PARTY_AUTH_ERROR) and anything else we can't fix by retrying
    return PushResult(CONFIG_ERROR, reason, status)


def classify_failure(failure: Failure) -> PushResult:
    """Map an exception from the worker thread (or our deadline guard) to a PushResult."""
    e = failure.value
    if isinstance(e, (DeferredTimeoutError, CancelledError, requests.Timeout, _Abandoned)):
        return PushResult(RETRYABLE, "timeout")
    if isinstance(e, requests.ConnectionError):
        return PushResult(RETRYABLE, f"connection error: {type(e).__name__}")
    if isinstance(e, google.auth.exceptions.RefreshError):
        # invalid_grant (bad key, unknown account, clock skew) won't heal by retrying
        return PushResult(RETRYABLE if e.retryable else CONFIG_ERROR, f"OAuth token: {e}")
    if isinstance(e, google.auth.exceptions.TransportError):
        return PushResult(RETRYABLE, f"OAuth token endpoint: {e}")
    if isinstance(e, pyfcm_errors.FCMNotRegisteredError):
        return PushResult(DEAD_TOKEN, str(e))
    if isinstance(e, pyfcm_errors.FCMServerError):
        return PushResult(RETRYABLE, str(e))
    if isinstance(e, (pyfcm_errors.FCMError, PayloadTooLarge, OSError, ValueError, KeyError)):
        # missing/unreadable/malformed service account file, impossible payload, pyfcm auth errors
        return PushResult(CONFIG_ERROR, f"{type(e).__name__}: {e}")
    return PushResult(RETRYABLE, f"internal error: {type(e).__name__}: {e}")


def _ttl_duration(seconds: float) -> str:
    # FCM wants a protobuf Duration string; whole seconds, rounded up so a live call keeps its push
    return f"{max(0, math.ceil(seconds))}s"


@implementer(IPushSender)
class FCMSender:
    """IPushSender for one FCM project (pn-provider "fcm", pn-param = project id)."""

    provider = "fcm"

    def __init__(
        self,
        app_config: FCMAppConfig,
        clock: IReactorTime,
        threadpool: ThreadPool,
        *,
        reactor: Any = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.project_id = app_config.project_id
        self.timeout = float(app_config.timeout)
        self._clock = clock
        self._reactor = reactor
        self._pool = threadpool
        self._policy = policy or RetryPolicy()
        self._config_errors_logged: set[str] = set()
        self._fcm = _BoundedFCM(app_config.service_account_file, app_config.project_id,
                                app_config.endpoint, threadpool.max)

    def send(self, req: PushRequest) -> Deferred[PushResult]:
        start = self._clock.seconds()
        deadline = start + req.ttl
        d = send_with_retries(self._clock, self._policy, deadline, lambda n: self._attempt(req, n, deadline))
        d.addCallback(self._finish, req, start)
        return d

    def _attempt(self, req: PushRequest, n: int, deadline: float) -> Deferred[PushResult]:
        now = self._clock.seconds()
        remaining = deadline - now
        if remaining <= 0:
            return succeed(PushResult(RETRYABLE, "ttl expired before sending"))
        try:
            body = self._fcm.parse_payload(
                fcm_token=req.prid,
                data_payload=call_data(req, now),
                android_config={"priority": "high", "ttl": _ttl_duration(remaining)},
            )
        except Exception:
            return succeed(classify_failure(Failure()))
        budget = min(self.timeout, remaining)
        log.debug("fcm push {push_id} attempt {n} to {token}", push_id=req.push_id, n=n,
                  token=redact(req.prid), call_id=req.call_id)
        # the socket budget is wall time in the worker; the reactor clock can't be read from there
        wall_deadline = time.monotonic() + budget
        abandoned = threading.Event()
        replies: Deferred[WireReply] = deferToThreadPool(self._reactor, self._pool, self._fcm.post, body,
                                                         wall_deadline, abandoned)

        def gave_up(_result: object, _timeout: float) -> PushResult:
            abandoned.set()
            return PushResult(RETRYABLE, "timeout")

        d = replies.addCallback(lambda reply: classify_reply(reply, self._clock.seconds()))
        d.addErrback(classify_failure)
        # a thread can't be interrupted; this guard makes sure our answer never waits past the
        # ttl (the thread's own socket timeouts free the pool slot soon after)
        d.addTimeout(remaining, self._clock, onTimeoutCancel=gave_up)
        return d

    def _finish(self, result: PushResult, req: PushRequest, start: float) -> PushResult:
        latency = self._clock.seconds() - start
        if result.outcome == CONFIG_ERROR:
            self._report_config_error(result, req)
        log.info("fcm push {push_id} ({kind}) to {token} for {aor}: {outcome} {status} {reason}"
                 " after {attempts} attempt(s), {latency:.3f}s",
                 push_id=req.push_id, kind=req.kind, token=redact(req.prid), aor=req.aor,
                 outcome=result.outcome, status=result.status, reason=result.reason,
                 attempts=result.attempts, latency=latency, call_id=req.call_id)
        return result

    def _report_config_error(self, result: PushResult, req: PushRequest) -> None:
        # once per distinct reason: a broken service account would otherwise log on every call
        if result.reason in self._config_errors_logged:
            return
        self._config_errors_logged.add(result.reason)
        log.critical(
            "FCM project {project}: configuration error, pushes will fail until fixed: {reason} "
            "(status {status}); further errors are not logged at this level",
            project=self.project_id, reason=result.reason, status=result.status, call_id=req.call_id,
        )
