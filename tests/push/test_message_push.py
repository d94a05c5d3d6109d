"""Pushes of kind "message" (a SIP MESSAGE waiting for a sleeping device): payloads and the waker."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.task import Clock

from libon_tsilo.push.base import CONFIG_ERROR, DELIVERED, PushRequest
from libon_tsilo.push.payload import ALERT_LIMIT, call_data, encoded_size, message_alert_payload
from libon_tsilo.push.router import PushRouter
from libon_tsilo.push.waker import MESSAGE_PUSH_TTL, PushWaker
from libon_tsilo.push.webhook import webhook_body
from tests.push.test_waker import FakeSender, dev, fired


def _req(preview: str | None = "see you at 8?", **kw) -> PushRequest:
    base = dict(provider="apns", prid="ab" * 32, param="ABCDE12345.com.example.app", kind="message",
                call_id="im-1@host", caller_uri="sip:alice@example.com", caller_name="Alice",
                aor="sip:bob@example.com", ttl=300.0, message_id="m-42", preview=preview)
    base.update(kw)
    return PushRequest(**base)


def test_the_apns_message_push_is_a_visible_alert_with_sender_and_preview() -> None:
    p = message_alert_payload(_req(), now=5)
    assert p["aps"]["alert"] == {"title": "Alice", "body": "see you at 8?"}
    assert p["type"] == "message" and p["message_id"] == "m-42" and p["preview"] == "see you at 8?"
    assert p["caller_uri"] == "sip:alice@example.com"


def test_without_preview_the_alert_says_only_who_wrote() -> None:
    p = message_alert_payload(_req(preview=None, caller_name=None), now=5)
    assert p["aps"]["alert"] == {"title": "sip:alice@example.com", "body": "New message"}
    assert "preview" not in p


def test_the_message_alert_fits_the_limit() -> None:
    p = message_alert_payload(_req(caller_name="n" * 5000, preview="x" * 200), now=5)
    assert encoded_size(p) <= ALERT_LIMIT


def test_fcm_and_webhook_bodies_carry_the_message_fields() -> None:
    d = call_data(_req(), now=1.0)
    assert d["type"] == "message" and d["message_id"] == "m-42" and d["preview"] == "see you at 8?"
    body = webhook_body(_req(provider="relay"), now=0.0, ttl_left=300.0)
    assert body["type"] == "message" and body["caller"] == {"name": "Alice", "uri": "sip:alice@example.com"}
    assert body["message_id"] == "m-42" and body["preview"] == "see you at 8?"
    call = webhook_body(_req(kind="call"), now=0.0, ttl_left=30.0)
    assert "preview" not in call and "message_id" not in call


def _msg(clock: Clock) -> SimpleNamespace:
    return SimpleNamespace(id="m-1", aor="sip:bob@example.com", sender="sip:alice@example.com",
                           sender_name="Alice", call_id="im-1", expires_at=clock.seconds() + 7 * 86400)


def test_the_waker_sends_a_message_push_and_counts_it_by_kind() -> None:
    clock = Clock()
    sender = FakeSender("fcm")
    waker = PushWaker(clock, PushRouter([sender]))
    result = fired(waker.notify_message(dev(1, provider="fcm"), _msg(clock), "hello"))
    assert result.outcome == DELIVERED
    [req] = sender.sent
    assert (req.kind, req.message_id, req.preview, req.caller_uri) == ("message", "m-1", "hello",
                                                                        "sip:alice@example.com")
    assert req.prid == dev(1, provider="fcm").pn_prid
    assert req.ttl == MESSAGE_PUSH_TTL  # retried for minutes, not for the message's 7 days
    assert waker.push_stats.by_kind["message"][DELIVERED] == 1


def test_an_ios_message_push_goes_to_the_alert_token_never_to_the_voip_one() -> None:
    clock = Clock()
    sender = FakeSender("apns")
    waker = PushWaker(clock, PushRouter([sender]))
    fired(waker.notify_message(dev(1, alert="alert-token-1"), _msg(clock), None))
    [req] = sender.sent
    assert req.prid == "alert-token-1" and req.kind == "message"
    result = fired(waker.notify_message(dev(2), _msg(clock), None))  # no pn-alert-prid
    assert result.outcome == CONFIG_ERROR and len(sender.sent) == 1
    assert waker.counters["message_without_alert_token"] == 1
