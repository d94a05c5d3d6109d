"""Payload builders: contents and the VoIP/alert size limits measured as aioapns encodes them."""

from __future__ import annotations

import json

import pytest

from libon_tsilo.push.base import PushRequest
from libon_tsilo.push.payload import (
    ALERT_LIMIT,
    VOIP_LIMIT,
    PayloadTooLarge,
    call_data,
    cancel_alert_payload,
    encoded_size,
    refresh_payload,
    voip_payload,
)


def _req(**kw) -> PushRequest:
    base = dict(
        provider="apns",
        prid="ab" * 32,
        param="ABCDE12345.com.example.app.voip",
        kind="call",
        call_id="c1@host",
        caller_uri="sip:alice@example.com",
        caller_name="Alice",
        aor="sip:bob@example.com",
        ttl=20.0,
    )
    base.update(kw)
    return PushRequest(**base)


def test_voip_payload_carries_call_details() -> None:
    req = _req()
    p = voip_payload(req, now=1700000000.1234)
    assert p["aps"] == {}
    assert p["call_id"] == "c1@host"
    assert p["caller_name"] == "Alice" and p["caller_uri"] == "sip:alice@example.com"
    assert p["push_id"] == req.push_id
    assert p["send_time"] == 1700000000.123 and p["ttl"] == 20.0
    assert p["type"] == "call"


def test_payloads_carry_the_device_call_id_when_there_is_one() -> None:
    req = _req(device_call_id="b-leg-7@tsilo")
    assert voip_payload(req, now=0)["call_id"] == "b-leg-7@tsilo"
    assert call_data(req, now=0)["call_id"] == "b-leg-7@tsilo"
    assert cancel_alert_payload(req, now=0)["call_id"] == "b-leg-7@tsilo"


def test_encoded_size_matches_aioapns_encoding() -> None:
    p = voip_payload(_req(caller_name="Zoë ☎"), now=0)
    assert encoded_size(p) == len(json.dumps(p, ensure_ascii=False).encode())


@pytest.mark.parametrize("char", ["a", "é", "☎", "😀"])
def test_long_display_name_is_truncated_to_fit_exactly(char: str) -> None:
    req = _req(caller_name=char * 6000)
    p = voip_payload(req, now=0)
    size = encoded_size(p)
    assert size <= VOIP_LIMIT
    assert p["caller_name"].endswith("…")
    # longest prefix: one more character would not fit
    n = len(p["caller_name"]) - 1
    bigger = dict(p, caller_name=char * (n + 1) + "…")
    assert encoded_size(bigger) > VOIP_LIMIT
    assert p["call_id"] == "c1@host" and p["caller_uri"] == "sip:alice@example.com"


def test_short_payload_is_untouched() -> None:
    p = voip_payload(_req(caller_name="x" * 100), now=0)
    assert p["caller_name"] == "x" * 100


def test_huge_uri_is_cut_after_the_name() -> None:
    p = voip_payload(_req(caller_name="Bob", caller_uri="sip:" + "u" * 9000 + "@h"), now=0)
    assert encoded_size(p) <= VOIP_LIMIT
    assert p["caller_name"] == "…" and p["caller_uri"].endswith("…")


def test_call_id_is_never_cut() -> None:
    with pytest.raises(PayloadTooLarge):
        voip_payload(_req(call_id="c" * 6000), now=0)


def test_cancel_alert_is_a_visible_missed_call() -> None:
    p = cancel_alert_payload(_req(kind="cancel"), now=5)
    assert p["aps"]["alert"]["body"] == "Missed call from Alice"
    assert p["type"] == "cancel" and p["call_id"] == "c1@host"
    p2 = cancel_alert_payload(_req(kind="cancel", caller_name=None), now=5)
    assert p2["aps"]["alert"]["body"] == "Missed call from sip:alice@example.com"


def test_cancel_alert_respects_the_4k_limit() -> None:
    p = cancel_alert_payload(_req(kind="cancel", caller_name="n" * 5000), now=5)
    assert encoded_size(p) <= ALERT_LIMIT


def test_call_data_is_strings_only() -> None:
    d = call_data(_req(), now=12.5)
    assert all(isinstance(v, str) for v in d.values())
    assert d["send_time"] == "12.5" and d["call_id"] == "c1@host"


def test_refresh_payload_is_content_available() -> None:
    p = refresh_payload(_req(kind="refresh"), now=1)
    assert p["aps"] == {"content-available": 1} and p["type"] == "refresh"
