"""RetryPolicy, Retry-After parsing and the deadline-bounded retry loop, on a fake Clock."""

from __future__ import annotations

import random

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from libon_tsilo.push.base import (
    CONFIG_ERROR,
    DELIVERED,
    RETRYABLE,
    PushRequest,
    PushResult,
    RetryPolicy,
    parse_retry_after,
    send_with_retries,
)


def test_push_request_defaults_give_unique_uuid_push_ids() -> None:
    a = PushRequest("apns", "tok", None, "call")
    b = PushRequest("apns", "tok", None, "call")
    assert a.push_id != b.push_id
    assert len(a.push_id) == 36 and a.push_id.count("-") == 4


def test_backoff_grows_caps_and_jitters_within_bounds() -> None:
    p = RetryPolicy(initial=1.0, factor=2.0, max_delay=5.0, jitter=0.5, rng=random.Random(7))
    for attempt, full in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        for _ in range(50):
            d = p.backoff(attempt)
            assert full / 2 <= d <= full


def test_no_jitter_is_exact() -> None:
    p = RetryPolicy(initial=0.5, factor=3.0, max_delay=100.0, jitter=0.0)
    assert [p.backoff(n) for n in (1, 2, 3)] == [0.5, 1.5, 4.5]


def test_next_delay_honours_retry_after_as_floor() -> None:
    p = RetryPolicy(initial=0.1, jitter=0.0)
    assert p.next_delay(1, now=0.0, deadline=10.0, retry_after=3.0) == 3.0
    assert p.next_delay(1, now=0.0, deadline=10.0, retry_after=None) == 0.1


def test_next_delay_gives_up_past_deadline_or_attempts() -> None:
    p = RetryPolicy(initial=0.1, jitter=0.0, max_attempts=3)
    assert p.next_delay(1, now=0.0, deadline=5.0, retry_after=5.0) is None
    assert p.next_delay(1, now=4.95, deadline=5.0) is None
    assert p.next_delay(3, now=0.0, deadline=5.0) is None


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (b"7", 7.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("soon", None),
    ],
)
def test_parse_retry_after(value, expected) -> None:
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert parse_retry_after(value, now) == expected


def test_parse_retry_after_date_in_past_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480.0 + 60) == 0.0


def _scripted(results: list[PushResult], calls: list[float], clock: Clock):
    def attempt(n: int) -> Deferred[PushResult]:
        calls.append(clock.seconds())
        return succeed(results[min(n, len(results)) - 1])

    return attempt


def test_retry_loop_retries_then_delivers_on_the_clock() -> None:
    clock = Clock()
    calls: list[float] = []
    policy = RetryPolicy(initial=1.0, jitter=0.0)
    results = [PushResult(RETRYABLE, "500"), PushResult(RETRYABLE, "503"), PushResult(DELIVERED, "ok")]
    d = send_with_retries(clock, policy, 30.0, _scripted(results, calls, clock))
    out: list[PushResult] = []
    d.addCallback(out.append)
    assert calls == [0.0] and not out
    clock.advance(1.0)
    assert calls == [0.0, 1.0] and not out
    clock.advance(2.0)
    assert calls == [0.0, 1.0, 3.0]
    assert out[0].outcome == DELIVERED and out[0].attempts == 3


def test_retry_loop_stops_on_non_retryable() -> None:
    clock = Clock()
    calls: list[float] = []
    attempt = _scripted([PushResult(CONFIG_ERROR, "x")], calls, clock)
    d = send_with_retries(clock, RetryPolicy(), 30.0, attempt)
    out: list[PushResult] = []
    d.addCallback(out.append)
    assert out[0].outcome == CONFIG_ERROR and out[0].attempts == 1 and calls == [0.0]


def test_retry_loop_gives_up_when_retry_after_exceeds_deadline() -> None:
    clock = Clock()
    calls: list[float] = []
    res = PushResult(RETRYABLE, "503", status=503, retry_after=60.0)
    d = send_with_retries(clock, RetryPolicy(), 10.0, _scripted([res], calls, clock))
    out: list[PushResult] = []
    d.addCallback(out.append)
    # gave up at once: no timer left waiting out the Retry-After
    assert out and out[0].outcome == RETRYABLE and clock.getDelayedCalls() == []


def test_retry_loop_turns_a_raising_attempt_into_retryable() -> None:
    clock = Clock()

    def attempt(n: int) -> Deferred[PushResult]:
        raise RuntimeError("boom")

    d = send_with_retries(clock, RetryPolicy(max_attempts=1), 10.0, attempt)
    out: list[PushResult] = []
    d.addCallback(out.append)
    assert out[0].outcome == RETRYABLE and "boom" in out[0].reason


def test_cancelling_the_loop_stops_retries() -> None:
    from twisted.internet.defer import CancelledError

    clock = Clock()
    calls: list[float] = []
    d = send_with_retries(clock, RetryPolicy(initial=1.0, jitter=0.0), 30.0,
                          _scripted([PushResult(RETRYABLE, "503")], calls, clock))
    failures: list = []
    d.addErrback(failures.append)
    d.cancel()  # during the back-off
    assert failures and failures[0].check(CancelledError)
    clock.advance(100)
    assert calls == [0.0] and clock.getDelayedCalls() == []


def test_cancelling_a_pending_attempt_does_not_retry() -> None:
    from twisted.internet.defer import CancelledError

    clock = Clock()
    pending: list[Deferred] = []

    def attempt(n: int) -> Deferred[PushResult]:
        pending.append(Deferred())
        return pending[-1]

    d = send_with_retries(clock, RetryPolicy(), 30.0, attempt)
    failures: list = []
    d.addErrback(failures.append)
    d.cancel()
    assert failures and failures[0].check(CancelledError) and len(pending) == 1
