"""What every push sender shares: the request/result records, the sender interface and the retry loop.

A push for a ringing call is only useful for a few seconds, so the retry policy is bounded by the
request's ``ttl`` (a deadline), not by an attempt count alone: a back-off that would land past the
deadline, or a ``Retry-After`` that asks us to wait beyond it, ends the loop at once.
"""

from __future__ import annotations

import email.utils
import random
import uuid
from dataclasses import dataclass, field
from typing import Callable, Final, Literal

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import Attribute, Interface

__all__ = [
    "DELIVERED",
    "DEAD_TOKEN",
    "RETRYABLE",
    "CONFIG_ERROR",
    "OUTCOMES",
    "PushKind",
    "Outcome",
    "PushRequest",
    "PushResult",
    "IPushSender",
    "RetryPolicy",
    "parse_retry_after",
    "send_with_retries",
]

log = Logger()

DELIVERED: Final = "delivered"
DEAD_TOKEN: Final = "dead_token"
RETRYABLE: Final = "retryable"
CONFIG_ERROR: Final = "config_error"
OUTCOMES = (DELIVERED, DEAD_TOKEN, RETRYABLE, CONFIG_ERROR)

PushKind = Literal["call", "cancel", "refresh", "message"]
Outcome = Literal["delivered", "dead_token", "retryable", "config_error"]

def _new_push_id() -> str:
    return str(uuid.uuid4())


@dataclass
class PushRequest:
    """One push to one device token (RFC 8599 pn-provider / pn-prid / pn-param)."""

    provider: str
    prid: str
    param: str | None
    kind: PushKind
    call_id: str | None = None  # the caller's Call-ID: our logs name the call by it
    caller_uri: str | None = None
    caller_name: str | None = None
    aor: str = ""
    ttl: float = 30.0  # seconds; also the deadline for every retry of this push
    push_id: str = field(default_factory=_new_push_id)
    # the Call-ID of the INVITE (or CANCEL) the device will get, decided before the push: the payload
    # carries this one, so the app can match the push to the SIP call (None: same as call_id)
    device_call_id: str | None = None
    # kind "message" (messaging/): the stored message's id, and the start of its text (None when
    # [messages] push_preview is off or the body is not text)
    message_id: str | None = None
    preview: str | None = None

    @property
    def payload_call_id(self) -> str:
        return self.device_call_id or self.call_id or ""


@dataclass
class PushResult:
    outcome: Outcome
    reason: str
    status: int | None = None
    provider_id: str | None = None  # apns-id / FCM message name
    # seconds the provider asked us to wait (Retry-After); only meaningful for "retryable"
    retry_after: float | None = None
    attempts: int = 1


class IPushSender(Interface):
    provider = Attribute("provider name as in pn-provider: 'apns', 'fcm', 'webhook'")

    def send(req: PushRequest) -> Deferred[PushResult]:
        """Send one push; never errbacks: failures are PushResult outcomes."""


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/garbled."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


@dataclass
class RetryPolicy:
    """Exponential back-off with jitter, capped, bounded by a deadline and an attempt count.

    ``jitter`` is the fraction of each delay that is randomised (0.5: delay in [d/2, d]) so that
    many calls failing together do not retry in lock-step.
    """

    initial: float = 0.25
    factor: float = 2.0
    max_delay: float = 4.0
    jitter: float = 0.5
    max_attempts: int = 5
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt: int) -> float:
        """Delay after the ``attempt``-th failed attempt (1-based), jitter applied."""
        base = min(self.max_delay, self.initial * self.factor ** max(0, attempt - 1))
        return base * (1.0 - self.jitter * self.rng.random())

    def next_delay(
        self, attempt: int, now: float, deadline: float, retry_after: float | None = None
    ) -> float | None:
        """Delay before attempt ``attempt + 1``, or None to give up.

        A Retry-After is honoured as a floor; if it (or the back-off) reaches past the deadline
        there is no point waiting: the push would arrive after the call stopped ringing.
        """
        if attempt >= self.max_attempts:
            return None
        delay = self.backoff(attempt)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if now + delay >= deadline:
            return None
        return delay


def send_with_retries(
    clock: IReactorTime,
    policy: RetryPolicy,
    deadline: float,
    attempt: Callable[[int], Deferred[PushResult]],
) -> Deferred[PushResult]:
    """Run ``attempt(n)`` (n = 1, 2, ...) until it is not "retryable" or the policy gives up.

    ``attempt`` must not errback (map failures to PushResult); if it does, the failure is
    turned into a retryable result so the caller's Deferred still fires with a PushResult.
    The returned result's ``attempts`` says how many were made. Cancelling the returned
    Deferred cancels the attempt or back-off in progress and fails with CancelledError.
    """

    @inlineCallbacks
    def loop():  # type: ignore[no-untyped-def]
        n = 0
        while True:
            n += 1
            try:
                result = yield attempt(n)
            except CancelledError:
                raise  # the caller gave up on this push (call ended): stop, don't retry
            except Exception as e:  # a bug in a sender must not leave a call waiting forever
                log.failure("push attempt {n} raised", n=n)
                result = PushResult(RETRYABLE, f"internal error: {e!r}")
            result.attempts = n
            if result.outcome != RETRYABLE:
                return result
            delay = policy.next_delay(n, clock.seconds(), deadline, result.retry_after)
            if delay is None:
                return result
            yield deferLater(clock, delay, lambda: None)

    return loop()
