"""WebhookSender against a loopback fake endpoint (tests/fakes/webhook_fake.py)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from libon_tsilo.push.base import CONFIG_ERROR, DEAD_TOKEN, DELIVERED, RETRYABLE, PushRequest, RetryPolicy
from libon_tsilo.push.webhook import WebhookSender, _loggable, classify_status, webhook_body
from tests.fakes.step_clock import StepClock
from tests.fakes.webhook_fake import FakeWebhook, HookReply


@pytest_twisted.async_yield_fixture
async def hook():
    fake = FakeWebhook(reactor)
    fake.listen()
    senders: list[WebhookSender] = []
    clock = StepClock()

    def make(timeout: float = 2.0, policy: RetryPolicy | None = None, url: str | None = None) -> WebhookSender:
        s = WebhookSender("relay", url or fake.url, timeout, clock, reactor=reactor, policy=policy)
        senders.append(s)
        return s

    try:
        yield fake, make, clock
    finally:
        for s in senders:
            await s.close()
        await fake.stop()


def req(prid: str = "dev-1", kind: str = "call", ttl: float = 30.0) -> PushRequest:
    return PushRequest("relay", prid, "app.example", kind, call_id="c1@host", caller_uri="sip:bob@example.com",
                       caller_name="Bob", aor="sip:alice@example.com", ttl=ttl)


@pytest_twisted.ensureDeferred
async def test_2xx_is_delivered_with_the_documented_body(hook: Any) -> None:
    fake, make, clock = hook
    fake.script("dev-1", 202)
    sender = make()
    result = await sender.send(req())
    assert (result.outcome, result.status, result.attempts) == (DELIVERED, 202, 1)
    [got] = fake.requests
    assert got.method == "POST" and got.path == "/push"
    assert got.headers["content-type"] == "application/json"
    assert got.body == {
        "type": "call", "aor": "sip:alice@example.com", "call_id": "c1@host",
        "caller": {"name": "Bob", "uri": "sip:bob@example.com"},
        "pn_provider": "relay", "pn_prid": "dev-1", "pn_param": "app.example",
        "push_id": got.body["push_id"], "send_time": 0.0, "ttl": 30.0,
    }
    assert len(got.body["push_id"]) == 36
    assert sender.provider == "relay"


def test_body_names_the_call_id_the_device_will_see() -> None:
    request = req()
    request.device_call_id = "b-leg-1@tsilo"
    body = webhook_body(request, now=0.0, ttl_left=30.0)
    assert body["call_id"] == "b-leg-1@tsilo"


@pytest.mark.parametrize("status", [404, 410])
@pytest_twisted.ensureDeferred
async def test_404_and_410_are_dead_tokens(hook: Any, status: int) -> None:
    fake, make, _ = hook
    fake.script("gone", status)
    result = await make().send(req("gone"))
    assert (result.outcome, result.status, result.attempts) == (DEAD_TOKEN, status, 1)


@pytest_twisted.ensureDeferred
async def test_500_is_retried_then_delivered(hook: Any) -> None:
    fake, make, clock = hook
    fake.script("flaky", HookReply(500), HookReply(200))
    d = make(policy=RetryPolicy(initial=0.5, jitter=0.0)).send(req("flaky"))
    delay = await clock.wait_for_call(lambda s: s < 1)  # the retry timer, not the 2 s request timeout
    assert delay == 0.5 and len(fake.requests) == 1
    clock.advance(delay)
    result = await d
    assert (result.outcome, result.attempts) == (DELIVERED, 2)
    assert [r.status for r in fake.requests] == [500, 200]


@pytest_twisted.ensureDeferred
async def test_503_with_retry_after_beyond_ttl_gives_up(hook: Any) -> None:
    fake, make, clock = hook
    fake.script("down", HookReply(503, retry_after=120))
    result = await make().send(req("down", ttl=10))
    assert (result.outcome, result.status, result.retry_after, result.attempts) == (RETRYABLE, 503, 120.0, 1)
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_other_4xx_is_a_config_error(hook: Any) -> None:
    fake, make, _ = hook
    fake.script("dev-1", 401)
    result = await make().send(req())
    assert (result.outcome, result.status) == (CONFIG_ERROR, 401)


@pytest_twisted.ensureDeferred
async def test_hang_is_cut_by_the_timeout(hook: Any) -> None:
    fake, make, clock = hook
    fake.script("slow", None)
    d = make(timeout=3.0, policy=RetryPolicy(max_attempts=1)).send(req("slow"))
    await fake.wait_for_requests(1)
    assert not d.called
    clock.advance(3.0)
    result = await d
    assert (result.outcome, result.reason) == (RETRYABLE, "timeout")


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_retryable(hook: Any) -> None:
    _, make, _ = hook
    from twisted.internet.protocol import Factory

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/push"
    await port.stopListening()
    result = await make(url=url, policy=RetryPolicy(max_attempts=1)).send(req())
    assert result.outcome == RETRYABLE and result.reason.startswith("connection error")


@pytest.mark.parametrize(
    "status, outcome",
    [(200, DELIVERED), (204, DELIVERED), (299, DELIVERED), (404, DEAD_TOKEN), (410, DEAD_TOKEN),
     (429, RETRYABLE), (500, RETRYABLE), (503, RETRYABLE), (400, CONFIG_ERROR), (403, CONFIG_ERROR),
     (301, CONFIG_ERROR)],
)
def test_classify_status(status: int, outcome: str) -> None:
    assert classify_status(status, "x", None, 0.0).outcome == outcome


def test_logged_url_drops_credentials_and_query() -> None:
    assert _loggable("https://u:secret@hooks.example.com:8443/push?key=abc") == "https://hooks.example.com:8443/push"
