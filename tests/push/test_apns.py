"""APNsSender against the in-process fake APNs: real loopback TLS + HTTP/2 through our APNsClient.

Uses tests/fakes/apns_fake.py (FakeAPNs) with keys from tests/fakes/keys.py.
"""

from __future__ import annotations

import random
import time

import jwt
import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from libon_tsilo.ops.config import ApnsConfig
from libon_tsilo.push.apns import APNsSender
from libon_tsilo.push.base import PushRequest, PushResult, RetryPolicy
from tests.fakes.apns_fake import FakeEnv

BUNDLE = "com.example.app"
TOKEN = "a1b2c3" * 10 + "d4e5"


def _sender(env: FakeEnv, senders: list, *, cert: bool = False, timeout: float = 1.0, **kw) -> APNsSender:
    from twisted.internet import reactor

    p = env.paths
    cfg = ApnsConfig(
        bundle_id=BUNDLE,
        team_id=env.team_key.team_id,
        key_id=env.team_key.key_id,
        key_file="" if cert else str(p["p8"]),
        cert_file=str(p["client"]) if cert else "",
        server=env.url,
        ca_file=str(p["ca"]),
        timeout=timeout,
    )
    kw.setdefault("policy", RetryPolicy(initial=0.05, max_delay=0.2, rng=random.Random(3)))
    s = APNsSender(cfg, reactor, **kw)
    senders.append(s)
    return s


def _req(kind: str = "call", token: str = TOKEN, ttl: float = 3.0, **kw) -> PushRequest:
    return PushRequest(
        provider="apns",
        prid=token,
        param=kw.pop("param", f"TEAM123456.{BUNDLE}.voip"),
        kind=kind,  # type: ignore[arg-type]
        call_id=kw.pop("call_id", "call-1@10.0.0.1"),
        caller_uri="sip:alice@example.com",
        caller_name=kw.pop("caller_name", "Alice"),
        aor="sip:bob@example.com",
        ttl=ttl,
        **kw,
    )


async def _send(sender: APNsSender, req: PushRequest) -> PushResult:
    return await sender.send(req)


@pytest_twisted.ensureDeferred
async def test_a_token_cannot_leave_the_device_path(env, senders) -> None:
    # pn-prid comes unescaped from a REGISTER: "/", "?" or "#" in it must not reshape the :path
    await _send(_sender(env, senders), _req(token="ab/../../x?y#z"))
    [rec] = env.fake.requests
    assert rec.path == "/3/device/ab%2F..%2F..%2Fx%3Fy%23z"


@pytest_twisted.ensureDeferred
async def test_call_push_is_delivered_with_voip_headers(env, senders) -> None:
    sender = _sender(env, senders)
    req = _req(ttl=20.0)
    before = time.time()
    res = await _send(sender, req)
    assert (res.outcome, res.status, res.provider_id, res.attempts) == ("delivered", 200, req.push_id, 1)
    [rec] = env.fake.requests
    h = rec.headers
    assert rec.token == TOKEN and rec.method == "POST"
    assert h["apns-push-type"] == "voip" and h["apns-topic"] == BUNDLE + ".voip"
    assert h["apns-priority"] == "10" and h["apns-id"] == req.push_id
    assert before + 19 <= int(h["apns-expiration"]) <= time.time() + 21
    assert rec.jwt_header["kid"] == env.team_key.key_id and rec.jwt_header["alg"] == "ES256"
    assert rec.jwt_claims["iss"] == env.team_key.team_id
    assert rec.json["call_id"] == "call-1@10.0.0.1" and rec.json["caller_name"] == "Alice"
    assert rec.json["push_id"] == req.push_id


@pytest_twisted.ensureDeferred
async def test_unregistered_is_a_dead_token(env, senders) -> None:
    env.fake.script(TOKEN, "410")
    res = await _send(_sender(env, senders), _req())
    assert (res.outcome, res.status, res.reason) == ("dead_token", 410, "Unregistered")


@pytest_twisted.ensureDeferred
async def test_bad_device_token_is_a_dead_token(env, senders) -> None:
    env.fake.script(TOKEN, "400:BadDeviceToken")
    res = await _send(_sender(env, senders), _req())
    assert (res.outcome, res.status, res.reason, res.attempts) == ("dead_token", 400, "BadDeviceToken", 1)
    assert len(env.fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_429_then_200_is_delivered_inside_the_ttl(env, senders) -> None:
    env.fake.script(TOKEN, "429", "200")
    t0 = time.monotonic()
    res = await _send(_sender(env, senders), _req(ttl=3.0))
    assert res.outcome == "delivered" and res.attempts == 2
    assert time.monotonic() - t0 < 3.0
    assert [r.status for r in env.fake.requests] == [429, 200]


@pytest_twisted.ensureDeferred
async def test_retry_after_beyond_ttl_gives_up_without_waiting(env, senders) -> None:
    env.fake.script(TOKEN, "503 retry-after=60")
    t0 = time.monotonic()
    res = await _send(_sender(env, senders), _req(ttl=2.0))
    assert (res.outcome, res.status, res.retry_after, res.attempts) == ("retryable", 503, 60.0, 1)
    assert time.monotonic() - t0 < 1.0


@pytest_twisted.ensureDeferred
async def test_short_retry_after_is_honoured(env, senders) -> None:
    env.fake.script(TOKEN, "503 retry-after=1", "200")
    t0 = time.monotonic()
    res = await _send(_sender(env, senders), _req(ttl=3.0))
    assert res.outcome == "delivered" and res.attempts == 2
    assert time.monotonic() - t0 >= 1.0
    assert env.fake.requests[1].time - env.fake.requests[0].time >= 1.0


@pytest_twisted.ensureDeferred
async def test_server_errors_until_the_deadline_end_retryable(env, senders) -> None:
    env.fake.script(TOKEN, "500")
    res = await _send(_sender(env, senders), _req(ttl=0.6))
    assert res.outcome == "retryable" and res.status == 500
    assert res.attempts >= 2 and len(env.fake.requests) == res.attempts


@pytest_twisted.ensureDeferred
async def test_hanging_server_times_out_retryable(env, senders) -> None:
    env.fake.script(TOKEN, "hang")
    t0 = time.monotonic()
    res = await _send(_sender(env, senders, timeout=0.2), _req(ttl=0.5))
    took = time.monotonic() - t0
    assert res.outcome == "retryable" and res.reason == "timeout"
    assert 0.2 <= took < 1.0


@pytest_twisted.ensureDeferred
async def test_hang_then_delivery_on_the_same_pool(env, senders) -> None:
    # the timed-out stream is reset and its slot freed: the retry is not blocked behind it
    env.fake.script(TOKEN, "hang", "200")
    res = await _send(_sender(env, senders, timeout=0.2), _req(ttl=2.0))
    assert res.outcome == "delivered" and res.attempts == 2
    # one connection: its only stream slot (the fake allows 1 before a valid push) came back
    assert env.fake.connections_made == 1


@pytest_twisted.ensureDeferred
async def test_expired_provider_token_mints_a_new_jwt_and_retries_once(env, senders) -> None:
    env.fake.script(TOKEN, "403:ExpiredProviderToken", "200")
    sender = _sender(env, senders)
    res = await _send(sender, _req())
    assert res.outcome == "delivered" and res.attempts == 1
    first, second = env.fake.requests
    assert first.reason == "ExpiredProviderToken" and second.status == 200
    assert first.headers["authorization"] != second.headers["authorization"]
    assert second.jwt_claims["iat"] > first.jwt_claims["iat"]


@pytest_twisted.ensureDeferred
async def test_expired_provider_token_twice_is_a_config_error(env, senders) -> None:
    env.fake.script(TOKEN, "403:ExpiredProviderToken")
    res = await _send(_sender(env, senders), _req())
    assert (res.outcome, res.reason) == ("config_error", "ExpiredProviderToken")
    assert len(env.fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_config_error_is_logged_loudly_once_per_app(env, senders) -> None:
    env.fake.bundles = {"com.other.app"}
    critical: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "critical":
            critical.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        sender = _sender(env, senders)
        r1 = await _send(sender, _req())
        r2 = await _send(sender, _req())
    finally:
        globalLogPublisher.removeObserver(observer)
    assert (r1.outcome, r1.status, r1.reason) == ("config_error", 400, "TopicDisallowed")
    assert r2.outcome == "config_error" and r2.attempts == 1
    assert len(critical) == 1 and critical[0]["bundle"] == BUNDLE


@pytest_twisted.ensureDeferred
async def test_wrong_team_key_is_invalid_provider_token(env, senders) -> None:
    sender = _sender(env, senders)
    sender.token.team_id = "OTHERTEAM1"
    res = await _send(sender, _req())
    assert (res.outcome, res.status, res.reason) == ("config_error", 403, "InvalidProviderToken")


@pytest_twisted.ensureDeferred
async def test_a_caller_in_bytes_that_are_not_utf8_still_wakes_the_device(env, senders) -> None:
    # the parser keeps a peer's non-UTF-8 bytes as surrogates: they cannot be encoded as UTF-8 as is
    sender = _sender(env, senders)
    res = await _send(sender, _req(caller_name="Ren\udce9", call_id="c\udcff1@10.0.0.1"))
    assert res.outcome == "delivered"
    res = await _send(sender, _req(kind="cancel", caller_name="Ren\udce9", call_id="c\udcff1@10.0.0.1"))
    assert res.outcome == "delivered"
    call, cancel = env.fake.requests
    assert call.json["caller_name"] == "Ren\ufffd" and call.json["call_id"] == "c\ufffd1@10.0.0.1"
    assert cancel.headers["apns-collapse-id"].isascii()


@pytest_twisted.ensureDeferred
async def test_cancel_is_an_alert_push_not_voip(env, senders) -> None:
    res = await _send(_sender(env, senders), _req(kind="cancel"))
    assert res.outcome == "delivered"
    [rec] = env.fake.requests
    assert rec.headers["apns-push-type"] == "alert" and rec.headers["apns-topic"] == BUNDLE
    assert rec.headers["apns-collapse-id"] == "call-1@10.0.0.1"
    assert rec.json["aps"]["alert"]["body"] == "Missed call from Alice"


@pytest_twisted.ensureDeferred
async def test_cancel_refused_as_not_for_topic_keeps_the_token(env, senders) -> None:
    env.fake.script(TOKEN, "400:DeviceTokenNotForTopic")
    res = await _send(_sender(env, senders), _req(kind="cancel"))
    assert res.outcome == "config_error"
    call = await _send(_sender(env, senders), _req(kind="call"))
    assert call.outcome == "dead_token"


@pytest_twisted.ensureDeferred
async def test_refresh_is_a_background_push_at_priority_5(env, senders) -> None:
    res = await _send(_sender(env, senders), _req(kind="refresh"))
    assert res.outcome == "delivered"
    h = env.fake.requests[0].headers
    assert (h["apns-push-type"], h["apns-topic"], h["apns-priority"]) == ("background", BUNDLE, "5")


@pytest_twisted.ensureDeferred
async def test_huge_display_name_is_cut_to_the_voip_limit(env, senders) -> None:
    res = await _send(_sender(env, senders), _req(caller_name="☎" * 4000))
    assert res.outcome == "delivered"
    rec = env.fake.requests[0]
    assert 5000 < len(rec.body.encode()) <= 5120 and rec.json["caller_name"].endswith("…")


@pytest_twisted.ensureDeferred
async def test_goaway_then_delivery_on_a_new_connection(env, senders) -> None:
    env.fake.script(TOKEN, "goaway", "200")
    res = await _send(_sender(env, senders), _req())
    assert res.outcome == "delivered" and res.attempts == 2
    assert env.fake.connections_made == 2


@pytest_twisted.ensureDeferred
async def test_certificate_auth_sends_no_jwt(env, senders) -> None:
    res = await _send(_sender(env, senders, cert=True), _req())
    assert res.outcome == "delivered"
    rec = env.fake.requests[0]
    assert "authorization" not in rec.headers and rec.client_cert_uid == BUNDLE


@pytest_twisted.ensureDeferred
async def test_pn_param_for_another_app_is_refused_locally(env, senders) -> None:
    res = await _send(_sender(env, senders), _req(param="TEAM123456.com.other.voip"))
    assert res.outcome == "config_error" and env.fake.requests == []


@pytest_twisted.ensureDeferred
async def test_unreachable_server_is_retryable(env, senders) -> None:
    sender = _sender(env, senders, timeout=0.3)
    await env.fake.stop()
    res = await _send(sender, _req(ttl=0.5))
    assert res.outcome == "retryable"
    env.fake._port.startListening()  # so the fixture's stop() has something to stop


@pytest_twisted.ensureDeferred
async def test_concurrent_pushes_share_one_jwt(env, senders) -> None:
    from twisted.internet.defer import gatherResults

    sender = _sender(env, senders)
    results = await gatherResults([sender.send(_req(token=f"{i:064x}")) for i in range(5)])
    assert [r.outcome for r in results] == ["delivered"] * 5
    assert len({r.headers["authorization"] for r in env.fake.requests}) == 1
    token = env.fake.requests[0].headers["authorization"].split()[1]
    assert jwt.decode(token, env.team_key.public_pem, algorithms=["ES256"])["iss"] == env.team_key.team_id


@pytest_twisted.ensureDeferred
async def test_sender_takes_the_ops_config_entry_as_is(env, senders) -> None:
    # ops/config.py's [[push.apns]] dataclass is what the service will hand us
    from twisted.internet import reactor

    from libon_tsilo.ops.config import ApnsConfig

    cfg = ApnsConfig(
        bundle_id=BUNDLE,
        team_id=env.team_key.team_id,
        key_id=env.team_key.key_id,
        key_file=str(env.paths["p8"]),
        server=env.url,
        ca_file=str(env.paths["ca"]),
        timeout=1.0,
    )
    sender = APNsSender(cfg, reactor)
    senders.append(sender)
    res = await _send(sender, _req())
    assert res.outcome == "delivered"


@pytest_twisted.ensureDeferred
async def test_non_uuid_push_id_gets_a_generated_apns_id(env, senders) -> None:
    res = await _send(_sender(env, senders), _req(push_id="not-a-uuid"))
    assert res.outcome == "delivered"
    apns_id = env.fake.requests[0].headers["apns-id"]
    assert apns_id != "not-a-uuid" and len(apns_id) == 36 and res.provider_id == apns_id


@pytest_twisted.ensureDeferred
async def test_cancelling_a_send_abandons_the_stream(env, senders) -> None:
    # the waker cancels pushes for a call that ended; nothing may keep waiting on APNs after that
    from twisted.internet import defer, reactor, task

    env.fake.script(TOKEN, "hang", "200")
    sender = _sender(env, senders, timeout=5.0)
    d = sender.send(_req(ttl=10.0))
    for _ in range(500):  # until the fake holds the request (it hangs it), at most 5 s
        if env.fake.requests:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert len(env.fake.requests) == 1
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    res = await _send(sender, _req())  # the stream slot came back: same connection, no wait
    assert res.outcome == "delivered" and env.fake.connections_made == 1
