"""FCMSender against the fake FCM server (tests/fakes/fcm_fake.py) over loopback HTTP.

Real pyfcm + google-auth run in a real thread pool; retry timing and ttl deadlines run on a
StepClock (a task.Clock that reports what gets scheduled), so no test sleeps for back-off.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from libon_tsilo.push.base import (
    CONFIG_ERROR,
    DEAD_TOKEN,
    DELIVERED,
    RETRYABLE,
    PushRequest,
    RetryPolicy,
)
from libon_tsilo.ops.config import FcmConfig
from libon_tsilo.push.fcm import FCMSender, WireReply, classify_reply
from tests.fakes.step_clock import StepClock
from tests.fakes.fcm_fake import FakeFCM, Reply, spawn
from tests.fakes.sa_keys import make_service_account

PROJECT = "tsilo-test"


@dataclass
class AppConfig:
    project_id: str
    service_account_file: str
    endpoint: str
    timeout: float = 2.0


@dataclass
class Env:
    fake: FakeFCM
    clock: StepClock
    pool: ThreadPool
    tmp: Path
    sa_file: str

    def sender(self, timeout: float = 2.0, sa_file: str | None = None, policy: RetryPolicy | None = None,
               endpoint: str | None = None) -> FCMSender:
        cfg = AppConfig(PROJECT, sa_file or self.sa_file, endpoint or self.fake.base_url, timeout)
        return FCMSender(cfg, self.clock, self.pool, reactor=reactor, policy=policy)


@pytest_twisted.async_yield_fixture
async def env(tmp_path: Path):
    sa = make_service_account(PROJECT)
    pool = ThreadPool(minthreads=0, maxthreads=2, name="fcm-test")
    pool.start()
    fake = FakeFCM(sa.public_key_pem, reactor=reactor, project_id=PROJECT, client_email=sa.client_email)
    fake.listen(0)
    sa_file = str(sa.write(tmp_path, fake.token_uri))
    try:
        yield Env(fake, StepClock(), pool, tmp_path, sa_file)
    finally:
        try:
            await fake.stop()
        finally:
            pool.stop()  # a pool thread left running would keep the test process alive


def call(prid: str = "tok-alice", ttl: float = 30.0, **kw: Any) -> PushRequest:
    return PushRequest("fcm", prid, PROJECT, "call", call_id="c1@host", caller_uri="sip:bob@example.com",
                       caller_name="Bob", aor="sip:alice@example.com", ttl=ttl, **kw)


@pytest_twisted.ensureDeferred
async def test_delivered_sends_a_data_only_high_priority_message(env: Env) -> None:
    sender = env.sender()
    result = await sender.send(call())
    assert result.outcome == DELIVERED, result
    assert result.status == 200
    assert result.provider_id is not None and result.provider_id.startswith(f"projects/{PROJECT}/messages/")

    [send] = env.fake.sends
    assert send.status == 200 and send.error is None
    message = send.json["message"]
    assert message["token"] == "tok-alice"
    assert "notification" not in message
    assert message["android"] == {"priority": "high", "ttl": "30s"}
    data = message["data"]
    assert all(isinstance(v, str) for v in data.values())
    assert data["type"] == "call" and data["call_id"] == "c1@host"
    assert data["caller_name"] == "Bob" and data["caller_uri"] == "sip:bob@example.com"
    assert data["push_id"] and float(data["send_time"]) == env.clock.seconds()
    assert send.headers["authorization"].startswith("Bearer ya29.fake-")

    assert env.clock.getDelayedCalls() == []  # the ttl guard was cancelled


@pytest_twisted.ensureDeferred
async def test_a_caller_in_bytes_that_are_not_utf8_still_wakes_the_device(env: Env) -> None:
    # the SIP parser keeps a peer's non-UTF-8 bytes as surrogates: pyfcm's UTF-8 encoding refused them
    req = PushRequest("fcm", "tok-alice", PROJECT, "call", call_id="c\udcff1@host",
                      caller_uri="sip:bob@example.com", caller_name="Ren\udce9", aor="sip:alice@example.com")
    result = await env.sender().send(req)
    assert result.outcome == DELIVERED, result
    [send] = env.fake.sends
    data = send.json["message"]["data"]
    assert data["caller_name"] == "Ren\ufffd" and data["call_id"] == "c\ufffd1@host"


@pytest_twisted.ensureDeferred
async def test_access_token_is_fetched_once_and_shared(env: Env) -> None:
    sender = env.sender()
    results = [await sender.send(call(f"tok-{i}")) for i in range(3)]
    assert [r.outcome for r in results] == [DELIVERED] * 3
    assert len(env.fake.token_requests) == 1
    assert env.fake.token_requests[0].status == 200


@pytest_twisted.ensureDeferred
async def test_expired_access_token_is_refreshed_and_the_send_repeated(env: Env) -> None:
    sender = env.sender()
    assert (await sender.send(call())).outcome == DELIVERED
    env.fake.expire_access_tokens()
    result = await sender.send(call())
    assert result.outcome == DELIVERED, result
    assert [s.status for s in env.fake.sends] == [200, 401, 200]
    assert len(env.fake.token_requests) == 2


@pytest_twisted.ensureDeferred
async def test_unregistered_is_a_dead_token(env: Env) -> None:
    env.fake.script("tok-gone", "unregistered")
    result = await env.sender().send(call("tok-gone"))
    assert (result.outcome, result.status, result.attempts) == (DEAD_TOKEN, 404, 1)
    assert "UNREGISTERED" in result.reason and "not found" in result.reason


@pytest_twisted.ensureDeferred
async def test_invalid_argument_about_the_token_is_a_dead_token(env: Env) -> None:
    env.fake.script("tok-bad", "invalid_token")
    result = await env.sender().send(call("tok-bad"))
    assert (result.outcome, result.status) == (DEAD_TOKEN, 400)
    assert "not a valid FCM registration token" in result.reason


@pytest_twisted.ensureDeferred
async def test_invalid_argument_about_the_message_is_a_config_error(env: Env) -> None:
    env.fake.script("tok-x", "bad_request")
    result = await env.sender().send(call("tok-x"))
    assert (result.outcome, result.status) == (CONFIG_ERROR, 400)
    assert "android.ttl" in result.reason


@pytest_twisted.ensureDeferred
async def test_sender_id_mismatch_is_a_config_error(env: Env) -> None:
    env.fake.script("tok-other", "sender_mismatch")
    result = await env.sender().send(call("tok-other"))
    assert (result.outcome, result.status) == (CONFIG_ERROR, 403)
    assert "SENDER_ID_MISMATCH" in result.reason


@pytest_twisted.ensureDeferred
async def test_429_then_200_waits_retry_after_and_delivers(env: Env) -> None:
    env.fake.script("tok-busy", Reply("quota", retry_after=2), "ok")
    sender = env.sender(policy=RetryPolicy(initial=0.1, jitter=0.0))
    d = sender.send(call("tok-busy"))
    delay = await env.clock.wait_for_call(lambda s: s < 10)  # the retry, not the 30 s ttl guard
    assert delay == 2.0  # Retry-After wins over the 0.1 s back-off
    assert len(env.fake.sends) == 1
    env.clock.advance(delay)
    result = await d
    assert (result.outcome, result.attempts) == (DELIVERED, 2)
    assert [s.status for s in env.fake.sends] == [429, 200]
    # the second attempt tells FCM how much ring time is left
    assert env.fake.sends[1].json["message"]["android"]["ttl"] == "28s"


@pytest_twisted.ensureDeferred
async def test_500_is_retried_with_backoff(env: Env) -> None:
    env.fake.script("tok-flaky", "internal", "internal", "ok")
    sender = env.sender(policy=RetryPolicy(initial=0.5, factor=2.0, jitter=0.0))
    d = sender.send(call("tok-flaky"))
    for expected in (0.5, 1.0):
        delay = await env.clock.wait_for_call(lambda s: s < 10)
        assert delay == expected
        env.clock.advance(delay)
    result = await d
    assert (result.outcome, result.attempts) == (DELIVERED, 3)


@pytest_twisted.ensureDeferred
async def test_503_with_retry_after_beyond_ttl_gives_up_at_once(env: Env) -> None:
    env.fake.script("tok-down", Reply("unavailable", retry_after=60))
    started = time.monotonic()
    result = await env.sender().send(call("tok-down", ttl=5.0))
    assert (result.outcome, result.status, result.retry_after, result.attempts) == (RETRYABLE, 503, 60.0, 1)
    assert "UNAVAILABLE" in result.reason
    assert len(env.fake.sends) == 1
    assert env.clock.getDelayedCalls() == []  # nothing left waiting past the ttl
    assert time.monotonic() - started < 3  # neither pyfcm nor urllib3 slept on Retry-After


@pytest_twisted.ensureDeferred
async def test_pyfcm_notify_does_not_sleep_on_retry_after_either(env: Env) -> None:
    from pyfcm.errors import FCMServerError

    env.fake.script("tok-q", Reply("quota", retry_after=60))
    fcm = env.sender()._fcm
    started = time.monotonic()
    with pytest.raises(FCMServerError):
        await deferToThreadPool(reactor, env.pool, fcm.notify, fcm_token="tok-q", data_payload={"a": "b"},
                                timeout=2)
    assert time.monotonic() - started < 3
    assert len(env.fake.sends) == 1


@pytest_twisted.ensureDeferred
async def test_hang_times_out_on_the_http_timeout(env: Env) -> None:
    env.fake.script("tok-hang", "hang")
    started = time.monotonic()
    result = await env.sender(timeout=0.3, policy=RetryPolicy(max_attempts=1)).send(call("tok-hang"))
    assert (result.outcome, result.reason, result.status) == (RETRYABLE, "timeout", None)
    assert 0.25 < time.monotonic() - started < 3
    assert len(env.fake.sends) == 1 and env.fake.sends[0].status is None


@pytest_twisted.ensureDeferred
async def test_hang_never_outlives_the_ttl(env: Env) -> None:
    env.fake.script("tok-hang", "hang")
    d = env.sender(timeout=30).send(call("tok-hang", ttl=2.0))
    await env.fake.wait_for_sends(1)
    assert not d.called
    env.clock.advance(2.0)  # ring timeout reached while the HTTP request still hangs
    assert d.called
    result = await d
    assert (result.outcome, result.reason, result.attempts) == (RETRYABLE, "timeout", 1)
    assert env.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_push_queued_past_its_ttl_is_never_sent(env: Env) -> None:
    # one thread, stuck on a hanging request: the next push waits in the pool's queue
    pool = ThreadPool(minthreads=0, maxthreads=1, name="fcm-test-1")
    pool.start()
    try:
        env.fake.script("tok-hang", "hang")
        sender = FCMSender(AppConfig(PROJECT, env.sa_file, env.fake.base_url, 30.0), env.clock, pool,
                           reactor=reactor)
        first = sender.send(call("tok-hang", ttl=2.0))
        await env.fake.wait_for_sends(1)
        late = sender.send(call("tok-late", ttl=2.0))
        env.clock.advance(2.0)  # both calls stop ringing
        assert [(await d).reason for d in (first, late)] == ["timeout", "timeout"]
        env.fake.abort_hanging()  # frees the thread; the queued job runs now
        await deferToThreadPool(reactor, pool, lambda: None)  # FIFO: after the queued job
        assert [s.target for s in env.fake.sends] == ["tok-hang"]
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_bad_service_account_is_a_config_error_logged_once(env: Env) -> None:
    wrong = make_service_account(PROJECT, client_email=None, slot=1)  # key the fake does not know
    sa_file = str(wrong.write(env.tmp, env.fake.token_uri, name="wrong.json"))
    loud: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "libon_tsilo.push.fcm" and event["log_level"] >= LogLevel.error:
            loud.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        sender = env.sender(sa_file=sa_file)
        first = await sender.send(call())
        second = await sender.send(call())
    finally:
        globalLogPublisher.removeObserver(observer)
    assert first.outcome == second.outcome == CONFIG_ERROR
    assert "invalid_grant" in first.reason and first.attempts == 1
    assert env.fake.sends == []
    assert [r.status for r in env.fake.token_requests] == [400, 400]
    assert len(loud) == 1 and loud[0]["log_level"] == LogLevel.critical


@pytest_twisted.ensureDeferred
async def test_missing_service_account_file_is_a_config_error(env: Env) -> None:
    result = await env.sender(sa_file=str(env.tmp / "nope.json")).send(call())
    assert result.outcome == CONFIG_ERROR
    assert "service account file" in result.reason


@pytest_twisted.ensureDeferred
async def test_unreachable_endpoint_is_retryable(env: Env) -> None:
    # a port that was just free: connection refused, quickly
    from twisted.internet.protocol import Factory

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    sender = env.sender(endpoint=f"http://127.0.0.1:{number}", policy=RetryPolicy(max_attempts=1))
    result = await sender.send(call())
    assert result.outcome == RETRYABLE and result.reason.startswith("connection error")


@pytest_twisted.ensureDeferred
async def test_against_the_fake_in_its_own_process_with_the_ops_config(env: Env) -> None:
    """The set-up end-to-end tests use: fake as a process, FcmConfig from ops, the real reactor clock."""
    sa = make_service_account(PROJECT)
    pub = sa.write_public_key(env.tmp)
    script = env.tmp / "script.json"
    script.write_text(json.dumps({"tok-gone": ["unregistered"]}))
    proc, port = await deferToThread(spawn, ["--port", "0", "--sa-pub", str(pub), "--script", str(script),
                                             "--project", PROJECT, "--client-email", sa.client_email])
    try:
        base = f"http://127.0.0.1:{port}"
        sa_file = sa.write(env.tmp, f"{base}/token", name="proc-sa.json")
        cfg = FcmConfig(project_id=PROJECT, service_account_file=str(sa_file), endpoint=base, timeout=2.0)
        sender = FCMSender(cfg, reactor, env.pool, reactor=reactor)
        ok = await sender.send(call("tok-ok"))
        gone = await sender.send(call("tok-gone"))
        assert (ok.outcome, gone.outcome) == (DELIVERED, DEAD_TOKEN)
    finally:
        proc.terminate()
        await deferToThread(proc.wait, 10)


# -- the classifier on its own: cases the fake has no script for ------------------------------------


def _err(code: int, status: str, message: str, error_code: str | None = None, **extra: Any) -> str:
    details: list[dict[str, Any]] = []
    if error_code:
        details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code})
    details += extra.get("details", [])
    return json.dumps({"error": {"code": code, "status": status, "message": message, "details": details}})


@pytest.mark.parametrize(
    "reply, outcome",
    [
        (WireReply(400, _err(400, "INVALID_ARGUMENT", "Invalid value", "INVALID_ARGUMENT", details=[
            {"@type": "type.googleapis.com/google.rpc.BadRequest",
             "fieldViolations": [{"field": "message.token", "description": "bad"}]}])), DEAD_TOKEN),
        (WireReply(400, _err(400, "INVALID_ARGUMENT", "Invalid value at 'message.data[0].value' (TYPE_STRING)",
                             "INVALID_ARGUMENT")), CONFIG_ERROR),
        (WireReply(401, _err(401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service",
                             "THIRD_PARTY_AUTH_ERROR")), CONFIG_ERROR),
        (WireReply(401, _err(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")),
         CONFIG_ERROR),
        (WireReply(404, "<html>not found</html>"), DEAD_TOKEN),
        (WireReply(502, "bad gateway"), RETRYABLE),
        (WireReply(429, _err(429, "RESOURCE_EXHAUSTED", "Quota", "QUOTA_EXCEEDED"), "7"), RETRYABLE),
        (WireReply(200, "{}"), RETRYABLE),
        (WireReply(413, "too big"), CONFIG_ERROR),
    ],
)
def test_classify_reply(reply: WireReply, outcome: str) -> None:
    result = classify_reply(reply, now=1000.0)
    assert result.outcome == outcome
    assert result.status == reply.status
    assert result.reason
    if reply.retry_after:
        assert result.retry_after == float(reply.retry_after)
