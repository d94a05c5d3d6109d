"""The fake FCM server checks what Google checks and answers in Google's shapes.

Driven with plain ``requests`` (in the reactor's thread pool) so the fake is tested independently
of our sender; one test runs it as a separate process, the way end-to-end tests use it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import requests
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.fakes.fcm_fake import FCM_SCOPE, GOOGLE_TOKEN_AUD, JWT_GRANT, FakeFCM, Reply, spawn
from tests.fakes.sa_keys import TestServiceAccount, make_service_account

PROJECT = "tsilo-test"


@pytest.fixture
def sa() -> TestServiceAccount:
    return make_service_account(PROJECT)


@pytest_twisted.async_yield_fixture
async def fake(sa: TestServiceAccount, tmp_path: Path):
    f = FakeFCM(sa.public_key_pem, reactor=reactor, project_id=PROJECT, client_email=sa.client_email,
                record_path=str(tmp_path / "record.jsonl"))
    f.listen(0)
    try:
        yield f
    finally:
        await f.stop()


def assertion(sa: TestServiceAccount, key: bytes | None = None, **override: Any) -> str:
    now = int(time.time())
    claims = {"iss": sa.client_email, "scope": FCM_SCOPE, "aud": GOOGLE_TOKEN_AUD, "iat": now, "exp": now + 3600}
    claims.update(override)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key or sa.private_key_pem, algorithm="RS256", headers={"kid": sa.private_key_id})


def http(method: str, url: str, **kw: Any) -> Any:
    kw.setdefault("timeout", 5)
    return deferToThread(requests.request, method, url, **kw)


async def token_reply(fake: FakeFCM, jwt_text: str, grant: str = JWT_GRANT) -> requests.Response:
    return await http("POST", fake.token_uri, data={"grant_type": grant, "assertion": jwt_text})


async def access_token(fake: FakeFCM, sa: TestServiceAccount) -> str:
    r = await token_reply(fake, assertion(sa))
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


async def send(fake: FakeFCM, token: str | None, message: dict[str, Any], project: str = PROJECT,
               **kw: Any) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{fake.base_url}/v1/projects/{project}/messages:send"
    return await http("POST", url, data=json.dumps({"message": message}), headers=headers, **kw)


def msg(token: str = "tok-1", **extra: Any) -> dict[str, Any]:
    return {"token": token, "data": {"type": "call", "call_id": "c1"},
            "android": {"priority": "high", "ttl": "30s"}, **extra}


# -- OAuth2 token endpoint -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_token_endpoint_accepts_a_valid_rs256_assertion(fake: FakeFCM, sa: TestServiceAccount) -> None:
    r = await token_reply(fake, assertion(sa))
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3599
    assert body["access_token"].startswith("ya29.")


@pytest.mark.parametrize(
    "override, error",
    [
        ({"aud": "https://example.com/token"}, "invalid_grant"),
        ({"iss": "someone@else.iam.gserviceaccount.com"}, "invalid_grant"),
        ({"scope": "https://www.googleapis.com/auth/cloud-platform.read-only"}, "invalid_scope"),
        ({"exp": int(time.time()) + 7200}, "invalid_grant"),  # longer than one hour
        ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, "invalid_grant"),  # expired
        ({"exp": None}, "invalid_grant"),  # required claim missing
    ],
)
@pytest_twisted.ensureDeferred
async def test_token_endpoint_rejects_bad_claims(fake: FakeFCM, sa: TestServiceAccount,
                                                 override: dict[str, Any], error: str) -> None:
    r = await token_reply(fake, assertion(sa, **override))
    assert (r.status_code, r.json()["error"]) == (400, error)


@pytest_twisted.ensureDeferred
async def test_token_endpoint_rejects_a_foreign_signature_and_grant_type(fake: FakeFCM,
                                                                         sa: TestServiceAccount) -> None:
    other = make_service_account(PROJECT, slot=1)
    r = await token_reply(fake, assertion(sa, key=other.private_key_pem))
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert "Signature" in r.json()["error_description"]
    r = await token_reply(fake, assertion(sa), grant="client_credentials")
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_grant_type")
    assert [t.status for t in fake.token_requests] == [400, 400]


# -- messages:send ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_send_ok_returns_a_message_name(fake: FakeFCM, sa: TestServiceAccount) -> None:
    r = await send(fake, await access_token(fake, sa), msg())
    assert r.status_code == 200
    assert r.json()["name"].startswith(f"projects/{PROJECT}/messages/")
    [rec] = fake.sends
    assert (rec.status, rec.target, rec.error) == (200, "tok-1", None)


@pytest_twisted.ensureDeferred
async def test_send_needs_a_valid_bearer_token(fake: FakeFCM, sa: TestServiceAccount) -> None:
    for token in (None, "ya29.made-up"):
        r = await send(fake, token, msg())
        assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    good = await access_token(fake, sa)
    fake.expire_access_tokens()
    r = await send(fake, good, msg())
    assert r.status_code == 401
    assert r.json()["error"]["details"][0]["reason"] == "ACCESS_TOKEN_EXPIRED"


@pytest.mark.parametrize(
    "message, field",
    [
        ({"data": {"a": "b"}}, "message"),  # no target
        ({"token": "t", "topic": "news"}, "message"),  # two targets
        (msg(data={"n": 42}), "message.data[0].value"),
        (msg(data={"from": "x"}), "message.data"),
        (msg(data={"google.x": "y"}), "message.data"),
        (msg(android={"ttl": "30"}), "message.android.ttl"),
        (msg(android={"ttl": 30}), "message.android.ttl"),
        (msg(android={"ttl": "3000000s"}), "message.android.ttl"),
        (msg(android={"priority": "urgent"}), "message.android.priority"),
        (msg(data={"big": "x" * 5000}), "message"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_send_rejects_what_fcm_rejects(fake: FakeFCM, sa: TestServiceAccount,
                                             message: dict[str, Any], field: str) -> None:
    r = await send(fake, await access_token(fake, sa), message)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    violations = [v["field"] for d in error["details"] for v in d.get("fieldViolations", [])]
    assert violations == [field]
    assert fake.sends[-1].error == error["message"]


@pytest_twisted.ensureDeferred
async def test_send_accepts_fractional_ttl_and_normal_priority(fake: FakeFCM, sa: TestServiceAccount) -> None:
    r = await send(fake, await access_token(fake, sa), msg(android={"ttl": "2.5s", "priority": "normal"}))
    assert r.status_code == 200


@pytest_twisted.ensureDeferred
async def test_send_to_another_project_is_denied(fake: FakeFCM, sa: TestServiceAccount) -> None:
    r = await send(fake, await access_token(fake, sa), msg(), project="someone-else")
    assert (r.status_code, r.json()["error"]["status"]) == (403, "PERMISSION_DENIED")


@pytest_twisted.ensureDeferred
async def test_scripted_replies_run_in_order_and_the_last_repeats(fake: FakeFCM, sa: TestServiceAccount) -> None:
    fake.script("tok-s", Reply("quota", retry_after=3), "unavailable", "unregistered")
    token = await access_token(fake, sa)
    replies = [await send(fake, token, msg("tok-s")) for _ in range(4)]
    assert [r.status_code for r in replies] == [429, 503, 404, 404]
    assert replies[0].headers["Retry-After"] == "3"
    assert "Retry-After" not in replies[1].headers
    codes = [r.json()["error"]["details"][0]["errorCode"] for r in replies]
    assert codes == ["QUOTA_EXCEEDED", "UNAVAILABLE", "UNREGISTERED", "UNREGISTERED"]
    # other tokens are unaffected
    assert (await send(fake, token, msg("tok-other"))).status_code == 200


@pytest_twisted.ensureDeferred
async def test_delay_and_hang(fake: FakeFCM, sa: TestServiceAccount) -> None:
    fake.script("tok-slow", Reply("ok", delay=0.2))
    fake.script("tok-hang", "hang")
    token = await access_token(fake, sa)
    started = time.monotonic()
    assert (await send(fake, token, msg("tok-slow"))).status_code == 200
    assert time.monotonic() - started >= 0.2
    with pytest.raises(requests.ReadTimeout):
        await send(fake, token, msg("tok-hang"), timeout=0.2)
    assert [s.status for s in fake.sends] == [200, None]


@pytest_twisted.ensureDeferred
async def test_every_request_is_recorded_to_the_file(fake: FakeFCM, sa: TestServiceAccount,
                                                     tmp_path: Path) -> None:
    await send(fake, await access_token(fake, sa), msg())
    lines = [json.loads(x) for x in (tmp_path / "record.jsonl").read_text().splitlines()]
    assert [(x["kind"], x["status"]) for x in lines] == [("token", 200), ("send", 200)]
    assert lines[1]["json"]["message"]["token"] == "tok-1"


def test_unknown_reply_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        Reply("explode")


# -- as a separate process -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_runs_as_a_separate_process(sa: TestServiceAccount, tmp_path: Path) -> None:
    pub = sa.write_public_key(tmp_path)
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"tok-gone": ["unregistered"], "tok-busy": [{"kind": "quota", "retry_after": 2}]}))
    record = tmp_path / "rec.jsonl"
    proc, port = await deferToThread(spawn, [
        "--port", "0", "--sa-pub", str(pub), "--script", str(script), "--record", str(record),
        "--project", PROJECT, "--client-email", sa.client_email])
    try:
        base = f"http://127.0.0.1:{port}"
        r = await http("POST", f"{base}/token", data={"grant_type": JWT_GRANT, "assertion": assertion(sa)})
        token = r.json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        statuses = []
        for t in ("tok-ok", "tok-gone", "tok-busy"):
            body = json.dumps({"message": msg(t)})
            reply = await http("POST", f"{base}/v1/projects/{PROJECT}/messages:send", data=body, headers=headers)
            statuses.append(reply.status_code)
        assert statuses == [200, 404, 429]
    finally:
        proc.terminate()
        await deferToThread(proc.wait, 10)
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert [(x["kind"], x["target"], x["status"]) for x in lines] == [
        ("token", None, 200), ("send", "tok-ok", 200), ("send", "tok-gone", 404), ("send", "tok-busy", 429)]
