"""The fake APNs' own checks, driven by a bare h2 client so requests can be malformed on purpose.

Also runs the fake as a separate process (as e2e tests do) and checks its PORT line and record file.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from pathlib import Path

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RemoteSettingsChanged, ResponseReceived, StreamEnded
from h2.settings import SettingCodes

from twisted.internet.defer import Deferred

from tests.fakes.apns_fake import FakeEnv, parse_step, spawn, spawn_with_keys, start_fake

BUNDLE = "com.example.app"
TOKEN = "ab" * 32
REPO = Path(__file__).resolve().parents[2]


def deferred_from_coro(coro):  # the bare client below runs on asyncio streams
    return Deferred.fromFuture(asyncio.ensure_future(coro))


class H2Client:
    """Minimal HTTP/2 client on asyncio streams: one connection, sequential requests."""

    def __init__(self, env: FakeEnv) -> None:
        self.env = env
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.max_streams: int | None = None

    async def connect(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.env.paths["ca"]))
        ctx.set_alpn_protocols(["h2"])
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.env.port, ssl=ctx)
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())

    async def post(
        self, headers: dict[str, str], body: bytes, token: str = TOKEN
    ) -> tuple[int, dict[str, str], dict | None]:
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", "POST"), (":scheme", "https"), (":path", f"/3/device/{token}"),
                (":authority", "localhost"), *headers.items()]
        self.conn.send_headers(sid, hdrs)
        self.conn.send_data(sid, body, end_stream=True)
        self.writer.write(self.conn.data_to_send())
        resp: dict[str, str] = {}
        data = b""
        ended = False
        while not ended:
            chunk = await asyncio.wait_for(self.reader.read(65536), 2.0)
            assert chunk, "connection closed"
            for ev in self.conn.receive_data(chunk):
                if isinstance(ev, ResponseReceived) and ev.stream_id == sid:
                    resp = dict(ev.headers)
                elif isinstance(ev, DataReceived) and ev.stream_id == sid:
                    data += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, RemoteSettingsChanged):
                    if SettingCodes.MAX_CONCURRENT_STREAMS in ev.changed_settings:
                        self.max_streams = ev.changed_settings[SettingCodes.MAX_CONCURRENT_STREAMS].new_value
                elif isinstance(ev, StreamEnded) and ev.stream_id == sid:
                    ended = True
            self.writer.write(self.conn.data_to_send())
        return int(resp[":status"]), resp, (json.loads(data) if data else None)

    def close(self) -> None:
        self.writer.close()


def _jwt(env: FakeEnv, *, iat: int | None = None, key: bytes | None = None, kid: str | None = None,
         iss: str | None = None) -> str:
    return jwt.encode(
        {"iss": iss or env.team_key.team_id, "iat": int(time.time()) if iat is None else iat},
        key or env.team_key.p8_pem,
        algorithm="ES256",
        headers={"kid": kid or env.team_key.key_id},
    )


def _headers(env: FakeEnv, push_type: str = "voip", topic: str = BUNDLE + ".voip", **extra: str) -> dict:
    h = {
        "authorization": f"bearer {_jwt(env)}",
        "apns-push-type": push_type,
        "apns-topic": topic,
        "apns-priority": "10",
        "apns-expiration": str(int(time.time()) + 30),
        "apns-id": str(uuid.uuid4()),
    }
    h.update(extra)
    return {k: v for k, v in h.items() if v != ""}


BODY = json.dumps({"aps": {}, "call_id": "x"}).encode()


@pytest_twisted.async_yield_fixture
async def env(tmp_path):
    from twisted.internet import reactor

    e = start_fake(tmp_path, reactor)
    yield e
    await e.fake.stop()


async def _one(env: FakeEnv, headers: dict, body: bytes = BODY, token: str = TOKEN):
    client = H2Client(env)
    await client.connect()
    try:
        return await client.post(headers, body, token)
    finally:
        client.close()


def _post(env, headers, body=BODY, token=TOKEN):
    return deferred_from_coro(_one(env, headers, body, token))


@pytest_twisted.ensureDeferred
async def test_valid_push_is_accepted_and_recorded_with_echoed_id(env) -> None:
    h = _headers(env)
    status, resp, body = await _post(env, h)
    assert status == 200 and body is None and resp["apns-id"] == h["apns-id"]
    [rec] = env.fake.requests
    assert rec.token == TOKEN and rec.json == {"aps": {}, "call_id": "x"} and rec.status == 200
    assert rec.jwt_claims["iss"] == env.team_key.team_id


@pytest.mark.parametrize(
    "change,status,reason",
    [
        ({"authorization": ""}, 403, "MissingProviderToken"),
        ({"authorization": "bearer not.a.jwt"}, 403, "InvalidProviderToken"),
        ({"apns-push-type": "voip", "apns-topic": BUNDLE}, 400, "BadTopic"),
        ({"apns-push-type": "alert", "apns-topic": BUNDLE + ".voip"}, 400, "BadTopic"),
        ({"apns-push-type": ""}, 400, "InvalidPushType"),
        ({"apns-push-type": "bogus"}, 400, "InvalidPushType"),
        ({"apns-topic": ""}, 400, "MissingTopic"),
        ({"apns-priority": "7"}, 400, "BadPriority"),
        ({"apns-expiration": "soon"}, 400, "BadExpirationDate"),
        ({"apns-id": "not-a-uuid"}, 400, "BadMessageId"),
        ({"apns-collapse-id": "c" * 65}, 400, "BadCollapseId"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_header_checks(env, change, status, reason) -> None:
    h = _headers(env, **{k: v for k, v in change.items() if k in ("push_type", "topic")})
    for k, v in change.items():
        if v == "":
            h.pop(k, None)
        else:
            h[k] = v
    got, resp, body = await _post(env, h)
    assert (got, body["reason"]) == (status, reason)
    if "apns-id" in h:
        assert resp["apns-id"] == h["apns-id"]


@pytest_twisted.ensureDeferred
async def test_jwt_signed_by_another_key_is_invalid(env) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for token in (_jwt(env, key=other), _jwt(env, kid="UNKNOWNKID"), _jwt(env, iss="OTHERTEAM1")):
        status, _, body = await _post(env, _headers(env, authorization=f"bearer {token}"))
        assert (status, body["reason"]) == (403, "InvalidProviderToken")


@pytest_twisted.ensureDeferred
async def test_jwt_older_than_an_hour_is_expired(env) -> None:
    old = _jwt(env, iat=int(time.time()) - 3700)
    status, _, body = await _post(env, _headers(env, authorization=f"bearer {old}"))
    assert (status, body["reason"]) == (403, "ExpiredProviderToken")


@pytest_twisted.ensureDeferred
async def test_payload_limits_4k_normal_5k_voip(env) -> None:
    def body_of(size: int) -> bytes:
        b = json.dumps({"aps": {}, "pad": ""}).encode()
        return json.dumps({"aps": {}, "pad": "p" * (size - len(b))}).encode()

    assert len(body_of(5120)) == 5120
    assert (await _post(env, _headers(env), body_of(5120)))[0] == 200
    status, _, body = await _post(env, _headers(env), body_of(5121))
    assert (status, body["reason"]) == (413, "PayloadTooLarge")
    alert = _headers(env, push_type="alert", topic=BUNDLE)
    assert (await _post(env, alert, body_of(4096)))[0] == 200
    assert (await _post(env, _headers(env, push_type="alert", topic=BUNDLE), body_of(4097)))[0] == 413
    status, _, body = await _post(env, _headers(env), b"")
    assert (status, body["reason"]) == (400, "PayloadEmpty")


@pytest_twisted.ensureDeferred
async def test_scripted_answers_in_order_then_last_repeats(env) -> None:
    env.fake.script(TOKEN, "429", "410", "503 retry-after=7")
    s1, _, b1 = await _post(env, _headers(env))
    s2, _, b2 = await _post(env, _headers(env))
    s3, r3, b3 = await _post(env, _headers(env))
    s4, _, _ = await _post(env, _headers(env))
    assert (s1, b1["reason"]) == (429, "TooManyRequests")
    assert (s2, b2["reason"]) == (410, "Unregistered")
    assert abs(b2["timestamp"] - time.time() * 1000) < 5000  # milliseconds, as Apple sends it
    assert (s3, b3["reason"], r3["retry-after"]) == (503, "ServiceUnavailable", "7")
    assert s4 == 503


@pytest_twisted.ensureDeferred
async def test_delay_step_answers_late(env) -> None:
    env.fake.script(TOKEN, "delay=0.3 200")
    t0 = time.monotonic()
    status, _, _ = await _post(env, _headers(env))
    assert status == 200 and time.monotonic() - t0 >= 0.3


async def _same_connection(env: FakeEnv) -> tuple[list[int], int | None, int | None]:
    client = H2Client(env)
    await client.connect()
    try:
        s1, _, _ = await client.post(_headers(env), BODY)
        before = client.max_streams
        h = _headers(env, authorization=f"bearer {_jwt(env, iat=int(time.time()) - 5)}")
        s2, _, b2 = await client.post(h, BODY)
        return [s1, s2, b2["reason"]], before, client.max_streams
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_streams_raised_after_first_valid_jwt_and_token_churn_refused(env) -> None:
    (s1, s2, reason), after_first, _ = await deferred_from_coro(_same_connection(env))
    assert s1 == 200 and after_first == 1000
    assert (s2, reason) == (429, "TooManyProviderTokenUpdates")


def test_parse_step_words() -> None:
    s = parse_step("delay=0.5 400:DeviceTokenNotForTopic retry-after=3")
    assert (s.status, s.reason, s.delay, s.retry_after, s.action) == (400, "DeviceTokenNotForTopic", 0.5, "3", None)
    assert parse_step("hang").action == "hang" and parse_step("500").reason == "InternalServerError"


@pytest_twisted.ensureDeferred
async def test_standalone_process_prints_port_and_records(tmp_path) -> None:
    from twisted.internet import reactor

    from libon_tsilo.ops.config import ApnsConfig
    from libon_tsilo.push.apns import APNsSender
    from libon_tsilo.push.base import PushRequest

    record = tmp_path / "requests.jsonl"
    proc, port, paths, key = spawn_with_keys(tmp_path, script={"tokens": {TOKEN: ["410"]}}, record=record)
    try:
        cfg = ApnsConfig(bundle_id=BUNDLE, team_id=key.team_id, key_id=key.key_id, key_file=str(paths["p8"]),
                         server=f"127.0.0.1:{port}", ca_file=str(paths["ca"]), timeout=2.0)
        sender = APNsSender(cfg, reactor)
        try:
            ok = await sender.send(PushRequest("apns", "cd" * 32, None, "call", call_id="e2e", ttl=3.0))
            dead = await sender.send(PushRequest("apns", TOKEN, None, "call", call_id="e2e", ttl=3.0))
        finally:
            sender.close()
        assert (ok.outcome, dead.outcome) == ("delivered", "dead_token")
        lines = [json.loads(x) for x in record.read_text().splitlines()]
        assert [(r["token"], r["status"]) for r in lines] == [("cd" * 32, 200), (TOKEN, 410)]
        assert lines[0]["json"]["call_id"] == "e2e" and lines[0]["headers"]["apns-push-type"] == "voip"
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0  # SIGTERM is a clean reactor shutdown
        proc.stdout.close()
        proc.stderr.close()


def test_spawn_reports_a_fake_that_cannot_start(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        spawn(["--port", "0", "--cert", str(tmp_path / "missing.pem"), "--key", "x", "--ca", "x",
               "--team-key-pub", "x"])
