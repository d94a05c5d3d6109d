"""Push payload builders.

The call payload carries what the app needs to correlate the push with the INVITE it will fetch
(``call_id``: the Call-ID of that INVITE, and of the CANCEL of a missed call, not the caller's), to
show the caller as the INVITE's From will name it (``caller_name``, ``caller_uri``) before the SIP
leg arrives, and to drop a stale push (send time + ttl: APNs may deliver late even with a short
expiration). ``push_id`` lets the app and our logs talk about the same push. README "Clients" lists
the fields per provider.

Sizes are measured on the bytes ``encode`` gives, the body the APNs sender puts on the wire, so
"fits" here means "fits on the wire".
"""

from __future__ import annotations

import json
from typing import Any, Callable

from libon_tsilo.push.base import PushRequest

__all__ = [
    "VOIP_LIMIT",
    "ALERT_LIMIT",
    "PayloadTooLarge",
    "encode",
    "utf8_clean",
    "encoded_size",
    "call_fields",
    "call_data",
    "voip_payload",
    "cancel_alert_payload",
    "refresh_payload",
    "message_fields",
    "message_alert_payload",
]

VOIP_LIMIT = 5120
ALERT_LIMIT = 4096
ELLIPSIS = "…"


class PayloadTooLarge(ValueError):
    """Even with the display name (and URI) cut, the payload exceeds the provider's limit."""


def encode(payload: dict[str, Any]) -> bytes:
    """The body as sent: UTF-8 JSON, non-ASCII kept as is (escapes would eat into the size limit)."""
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def utf8_clean(text: str) -> str:
    """``text`` fit for UTF-8: a caller's bytes that were not UTF-8 (the SIP parser keeps them as
    surrogates, which no encoder takes) become U+FFFD, as any UTF-8 decoder shows them."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate no decoder made (not from a byte): "?"
        return text.encode("utf-8", "replace").decode("utf-8")


def encoded_size(payload: dict[str, Any]) -> int:
    return len(encode(payload))


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + ELLIPSIS


def _fit(build: Callable[[str, str], dict[str, Any]], name: str, uri: str, limit: int) -> dict[str, Any]:
    """Shorten ``name`` first (cosmetic), then ``uri``, to the longest prefix that fits.

    Binary search on characters: UTF-8 widths vary, so the byte budget can't be divided directly.
    """
    payload = build(name, uri)
    if encoded_size(payload) <= limit:
        return payload

    def longest(fits: Callable[[int], bool], hi: int) -> int | None:
        if not fits(0):
            return None
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    n = longest(lambda k: encoded_size(build(_cut(name, k), uri)) <= limit, len(name))
    if n is not None:
        return build(_cut(name, n), uri)
    short_name = _cut(name, 0) if name else ""
    m = longest(lambda k: encoded_size(build(short_name, _cut(uri, k))) <= limit, len(uri))
    if m is not None:
        return build(short_name, _cut(uri, m))
    raise PayloadTooLarge(f"payload over {limit} bytes even without caller details")


def call_fields(req: PushRequest, now: float) -> dict[str, Any]:
    """The provider-neutral fields of a call push (JSON types kept)."""
    return {
        "type": req.kind,
        "call_id": utf8_clean(req.payload_call_id),
        "caller_name": utf8_clean(req.caller_name or ""),
        "caller_uri": utf8_clean(req.caller_uri or ""),
        "aor": utf8_clean(req.aor),
        "push_id": req.push_id,
        "send_time": round(now, 3),
        "ttl": req.ttl,
    }


def message_fields(req: PushRequest) -> dict[str, Any]:
    """What a "message" push adds: the stored message's id and, unless turned off, a preview."""
    fields: dict[str, Any] = {"message_id": req.message_id or ""}
    if req.preview is not None:
        fields["preview"] = utf8_clean(req.preview)
    return fields


def call_data(req: PushRequest, now: float, limit: int = ALERT_LIMIT) -> dict[str, str]:
    """Flat string->string map (FCM ``data`` only accepts strings), trimmed to ``limit`` bytes."""

    def build(name: str, uri: str) -> dict[str, Any]:
        f = call_fields(req, now)
        if req.kind == "message":
            f.update(message_fields(req))
        f["caller_name"], f["caller_uri"] = name, uri
        return {k: str(v) for k, v in f.items()}

    return _fit(build, utf8_clean(req.caller_name or ""), utf8_clean(req.caller_uri or ""), limit)


def voip_payload(req: PushRequest, now: float, limit: int = VOIP_LIMIT) -> dict[str, Any]:
    """PushKit payload for an incoming call; ``aps`` stays empty (PushKit ignores it)."""

    def build(name: str, uri: str) -> dict[str, Any]:
        f = call_fields(req, now)
        f["caller_name"], f["caller_uri"] = name, uri
        return {"aps": {}, **f}

    return _fit(build, utf8_clean(req.caller_name or ""), utf8_clean(req.caller_uri or ""), limit)


def cancel_alert_payload(req: PushRequest, now: float, limit: int = ALERT_LIMIT) -> dict[str, Any]:
    """A visible "missed call" alert: iOS must not get a VoIP push that reports no call."""

    def build(name: str, uri: str) -> dict[str, Any]:
        who = name or uri or "unknown caller"
        f = call_fields(req, now)
        f["caller_name"], f["caller_uri"] = name, uri
        return {"aps": {"alert": {"title": "Missed call", "body": f"Missed call from {who}"}}, **f}

    return _fit(build, utf8_clean(req.caller_name or ""), utf8_clean(req.caller_uri or ""), limit)


def refresh_payload(req: PushRequest, now: float) -> dict[str, Any]:
    """Background (content-available) push asking the app to re-REGISTER."""
    return {
        "aps": {"content-available": 1},
        "type": "refresh",
        "aor": utf8_clean(req.aor),
        "push_id": req.push_id,
        "send_time": round(now, 3),
    }


def message_alert_payload(req: PushRequest, now: float, limit: int = ALERT_LIMIT) -> dict[str, Any]:
    """A visible alert for a waiting message: the sender as title, the preview (or a neutral line
    when previews are off) as body; the app fetches the message by registering."""
    extra = message_fields(req)
    text = extra.get("preview") or "New message"

    def build(name: str, uri: str) -> dict[str, Any]:
        f = call_fields(req, now)
        f["caller_name"], f["caller_uri"] = name, uri
        return {"aps": {"alert": {"title": name or uri or "New message", "body": text}}, **f, **extra}

    return _fit(build, utf8_clean(req.caller_name or ""), utf8_clean(req.caller_uri or ""), limit)
