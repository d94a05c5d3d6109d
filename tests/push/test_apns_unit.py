"""APNs pieces that need no network: pn-param parsing, outcome mapping, the shared provider JWT."""

from __future__ import annotations

from dataclasses import replace

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.task import Clock

from libon_tsilo.ops.config import ApnsConfig
from libon_tsilo.push.apns import (
    PRODUCTION_HOST,
    SANDBOX_HOST,
    APNsSender,
    ProviderToken,
    classify,
    parse_pn_param,
    select_app,
)
from tests.fakes.keys import make_team_key


def test_pn_param_selects_the_bundle() -> None:
    assert select_app("ABCDE12345.com.example.app.voip") == "com.example.app"
    assert parse_pn_param("ABCDE12345.com.example.app.voip") == ("ABCDE12345", "com.example.app", True)
    assert parse_pn_param("ABCDE12345.com.example.app") == ("ABCDE12345", "com.example.app", False)


@pytest.mark.parametrize("bad", ["", "nodot", ".com.example", "TEAM.", "TEAM..x", "TE-AM.com.x", "TEAM..voip"])
def test_malformed_pn_param_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_pn_param(bad)


@pytest.mark.parametrize(
    "status,reason,push_type,outcome",
    [
        (200, "", "voip", "delivered"),
        (410, "Unregistered", "voip", "dead_token"),
        (410, "ExpiredToken", "alert", "dead_token"),
        (400, "BadDeviceToken", "voip", "dead_token"),
        (400, "DeviceTokenNotForTopic", "voip", "dead_token"),
        (400, "DeviceTokenNotForTopic", "alert", "config_error"),
        (400, "BadTopic", "voip", "config_error"),
        (400, "MissingTopic", "voip", "config_error"),
        (400, "TopicDisallowed", "voip", "config_error"),
        (403, "InvalidProviderToken", "voip", "config_error"),
        (403, "BadCertificate", "voip", "config_error"),
        (413, "PayloadTooLarge", "voip", "config_error"),
        (429, "TooManyRequests", "voip", "retryable"),
        (429, "TooManyProviderTokenUpdates", "voip", "retryable"),
        (500, "InternalServerError", "voip", "retryable"),
        (503, "ServiceUnavailable", "voip", "retryable"),
    ],
)
def test_classify(status: int, reason: str, push_type: str, outcome: str) -> None:
    assert classify(status, reason, push_type) == outcome


def _token(clock: Clock) -> tuple[ProviderToken, bytes]:
    k = make_team_key()
    return ProviderToken(k.p8_pem.decode(), k.key_id, k.team_id, clock), k.public_pem


def test_provider_token_is_reused_then_rotated_after_its_lifetime() -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    tok, pub = _token(clock)
    h1 = tok.get_header()
    assert h1.startswith("bearer ")
    claims = jwt.decode(h1[7:], pub, algorithms=["ES256"], options={"verify_iat": False})
    assert claims == {"iss": "TEAM123456", "iat": 1_700_000_000}
    assert jwt.get_unverified_header(h1[7:])["kid"] == "KEY1234567"
    clock.advance(30 * 60)
    assert tok.get_header() == h1  # Apple: no more than one new token per 20 minutes
    clock.advance(10 * 60)
    assert tok.get_header() != h1 and tok.iat == 1_700_000_000 + 40 * 60


def test_refresh_only_replaces_the_rejected_jwt_and_moves_iat_forward() -> None:
    clock = Clock()
    clock.advance(1000)
    tok, _ = _token(clock)
    h1 = tok.get_header()
    tok.refresh(tok.iat)
    h2 = tok.get_header()
    assert h2 != h1 and tok.iat == 1001  # same second, still a newer token
    tok.refresh(1000)  # a late report about the old token: keep the new one
    assert tok.get_header() == h2


def test_sender_needs_key_or_certificate(tmp_path) -> None:
    with pytest.raises(ValueError, match="key_file"):
        APNsSender(ApnsConfig(bundle_id="com.x"), Clock())
    p8 = tmp_path / "k.p8"
    p8.write_bytes(make_team_key().p8_pem)
    with pytest.raises(ValueError, match="team_id"):
        APNsSender(ApnsConfig(bundle_id="com.x", key_file=str(p8)), Clock())
    bad = tmp_path / "bad.p8"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="PKCS#8"):
        APNsSender(ApnsConfig(bundle_id="com.x", team_id="T", key_id="K", key_file=str(bad)), Clock())
    rsa_key = tmp_path / "rsa.p8"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError, match="P-256"):
        APNsSender(ApnsConfig(bundle_id="com.x", team_id="T", key_id="K", key_file=str(rsa_key)), Clock())


def test_sender_dials_apple_or_the_override(tmp_path) -> None:
    p8 = tmp_path / "k.p8"
    p8.write_bytes(make_team_key().p8_pem)
    cfg = ApnsConfig(bundle_id="com.x", team_id="T", key_id="K", key_file=str(p8))
    assert (APNsSender(cfg, Clock()).host, APNsSender(cfg, Clock()).port) == (PRODUCTION_HOST, 443)
    cfg = replace(cfg, sandbox=True)
    assert APNsSender(cfg, Clock()).host == SANDBOX_HOST
    cfg = replace(cfg, server="127.0.0.1:2197")
    s = APNsSender(cfg, Clock())
    assert (s.host, s.port) == ("127.0.0.1", 2197)
    cfg = replace(cfg, server="https://localhost:8443")
    s = APNsSender(cfg, Clock())
    assert (s.host, s.port) == ("localhost", 8443)
    cfg = replace(cfg, server="https://[::1]")
    s = APNsSender(cfg, Clock())
    assert (s.host, s.port) == ("::1", 443)
    for bad in ("nonsense", "http://127.0.0.1:80", "https://h:99999"):
        cfg = replace(cfg, server=bad)
        with pytest.raises(ValueError, match="host"):
            APNsSender(cfg, Clock())
