"""Webhook sender: hands each push to an HTTP endpoint of the operator's own (JSON POST).

For deployments whose push relay is not APNs/FCM (a company gateway, a test harness), the
provider name is the webhook's configured name and pn-provider values equal to it land here.

Body (UTF-8 JSON object; absent values are null)::

    {"type": "call"|"cancel"|"refresh"|"message", "aor": ..., "call_id": ...,
     "caller": {"name": ..., "uri": ...},
     "pn_provider": ..., "pn_prid": ..., "pn_param": ..., "push_id": ..., "send_time": <unix s>,
     "ttl": <seconds left>}

``call_id`` is the Call-ID of the INVITE (and of the CANCEL) the device will receive, and ``caller``
names the caller as that INVITE's From does. A "message" push (a waiting SIP MESSAGE) names its
sender in ``caller`` and adds ``message_id`` and, unless ``[messages] push_preview = false``,
``preview`` (the start of a text body).

Replies: any 2xx -> delivered; 404/410 -> dead_token (the endpoint says the device is gone);
429/5xx -> retryable (Retry-After honoured, within the push's ttl); anything else -> config_error.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeoutError, succeed
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet.protocol import Protocol, connectionDone
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from libon_tsilo.push.base import (
    CONFIG_ERROR,
    DEAD_TOKEN,
    DELIVERED,
    RETRYABLE,
    IPushSender,
    PushRequest,
    PushResult,
    RetryPolicy,
    parse_retry_after,
    send_with_retries,
)
from libon_tsilo.push.payload import message_fields
from libon_tsilo.util import redact

__all__ = ["WebhookSender", "webhook_body", "classify_status"]

log = Logger()

_USER_AGENT = b"libon-tsilo webhook"


def webhook_body(req: PushRequest, now: float, ttl_left: float) -> dict[str, Any]:
    """The JSON object POSTed for ``req`` (see the module docstring)."""
    body = {
        "type": req.kind,
        "aor": req.aor,
        "call_id": req.device_call_id or req.call_id,
        "caller": {"name": req.caller_name, "uri": req.caller_uri},
        "pn_provider": req.provider,
        "pn_prid": req.prid,
        "pn_param": req.param,
        "push_id": req.push_id,
        "send_time": round(now, 3),
        "ttl": round(max(0.0, ttl_left), 3),
    }
    if req.kind == "message":
        body.update(message_fields(req))
    return body


def classify_status(status: int, phrase: str, retry_after: str | None, now: float) -> PushResult:
    reason = f"HTTP {status} {phrase}".strip()
    if 200 <= status < 300:
        return PushResult(DELIVERED, "ok", status)
    if status in (404, 410):
        return PushResult(DEAD_TOKEN, reason, status)
    if status == 429 or status >= 500:
        return PushResult(RETRYABLE, reason, status, retry_after=parse_retry_after(retry_after, now))
    return PushResult(CONFIG_ERROR, reason, status)


class _DiscardBody(Protocol):
    """Consumes a response body we have no use for; ``done`` fires at its end."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._abort)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _abort(self, _: Deferred[None]) -> None:
        if self.transport is not None:
            # the body's transport is its producer too; stopping it closes the connection, as a
            # half-read body can't be reused
            cast(IPushProducer, self.transport).stopProducing()


def _loggable(url: str) -> str:
    # webhook URLs often carry a secret (user:pass@ or ?key=); logs get scheme, host and path only
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _classify_failure(failure: Failure) -> PushResult:
    e = failure.value
    if isinstance(e, (DeferredTimeoutError, CancelledError)):
        return PushResult(RETRYABLE, "timeout")
    if isinstance(e, DNSLookupError):
        return PushResult(RETRYABLE, f"DNS lookup failed: {e}")
    if isinstance(e, (ConnectError, ResponseFailed)):
        return PushResult(RETRYABLE, f"connection error: {type(e).__name__}")
    return PushResult(RETRYABLE, f"internal error: {type(e).__name__}: {e}")


@implementer(IPushSender)
class WebhookSender:
    """IPushSender that POSTs JSON to ``url``; provider = ``name``. Never errbacks."""

    def __init__(
        self,
        name: str,
        url: str,
        timeout: float,
        clock: IReactorTime,
        *,
        reactor: Any = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.provider = name
        self.url = url
        self.timeout = float(timeout)
        self.clock = clock
        self.policy = policy or RetryPolicy()
        self._config_errors_logged: set[str] = set()
        # keep-alive: a call's push and its cancel go to the same host seconds apart
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._agent = Agent(reactor, connectTimeout=self.timeout, pool=self._pool)

    def send(self, req: PushRequest) -> Deferred[PushResult]:
        start = self.clock.seconds()
        deadline = start + req.ttl
        d = send_with_retries(self.clock, self.policy, deadline, lambda n: self._attempt(req, n, deadline))
        d.addCallback(self._finish, req, start)
        return d

    def close(self) -> Deferred[None]:
        """Drop kept-alive connections (service shutdown, test teardown)."""
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    def _attempt(self, req: PushRequest, n: int, deadline: float) -> Deferred[PushResult]:
        now = self.clock.seconds()
        remaining = deadline - now
        if remaining <= 0:
            return succeed(PushResult(RETRYABLE, "ttl expired before sending"))
        body = json.dumps(webhook_body(req, now, remaining)).encode("utf-8")
        headers = Headers({
            b"content-type": [b"application/json"],
            b"user-agent": [_USER_AGENT],
        })
        producer = FileBodyProducer(BytesIO(body))
        sent = self._agent.request(b"POST", self.url.encode("ascii"), headers, producer)
        d = sent.addCallback(self._read)
        # one bound for connect + request + body, and never past the ring timeout; cancelling the
        # request surfaces as ResponseNeverReceived/ResponseFailed, so name the cause here
        d.addTimeout(min(self.timeout, remaining), self.clock,
                     onTimeoutCancel=lambda _result, _t: PushResult(RETRYABLE, "timeout"))
        d.addErrback(_classify_failure)
        return d

    def _read(self, response: IResponse) -> Deferred[PushResult]:
        raw = response.headers.getRawHeaders(b"retry-after")
        retry_after = raw[-1].decode("latin-1") if raw else None
        phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""

        def classify(_: None) -> PushResult:
            return classify_status(response.code, phrase, retry_after, self.clock.seconds())

        # read (and discard) the body so the connection can go back to the pool
        protocol = _DiscardBody()
        response.deliverBody(protocol)
        return protocol.done.addCallback(classify)

    def _finish(self, result: PushResult, req: PushRequest, start: float) -> PushResult:
        latency = self.clock.seconds() - start
        if result.outcome == CONFIG_ERROR and result.reason not in self._config_errors_logged:
            self._config_errors_logged.add(result.reason)
            log.critical(
                "webhook {name} ({url}) refuses pushes: {reason}; check the URL and the endpoint;"
                " further pushes failing this way are not logged again",
                name=self.provider, url=_loggable(self.url), reason=result.reason, call_id=req.call_id,
            )
        log.info("{name} push {push_id} ({kind}) to {token} for {aor}: {outcome} {status} {reason}"
                 " after {attempts} attempt(s), {latency:.3f}s",
                 name=self.provider, push_id=req.push_id, kind=req.kind, token=redact(req.prid), aor=req.aor,
                 outcome=result.outcome, status=result.status, reason=result.reason,
                 attempts=result.attempts, latency=latency, call_id=req.call_id)
        return result
