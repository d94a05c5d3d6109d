"""The CDR-like line every call ends with: one `twisted.logger` event, fields plus readable text.

Fields: caller (the B-leg's From: the authenticated identity when there is one), callee (the AOR's
URI, or tel:+E164 for a call out), trunk ("-" for a local call), start / answer / end (seconds of the
reactor clock: the epoch in production; answer None when nobody answered), ring (seconds until the
answer or the end), duration (seconds talking, 0 when unanswered), status (our final failure to the
caller, None once answered), reason (why it ended: "BYE from the caller", "BYE from the callee",
"caller cancelled", "ring timeout", "486 from a device", "no device can answer", ...), voicemail
(why the call was forwarded to voicemail: "no-answer", "user-busy", "unavailable"; None when not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from libon_tsilo.b2bua.call import Call

__all__ = ["FORMAT", "fields"]

FORMAT = ("call ended: {reason} ({caller} -> {callee}, trunk {trunk}, status {status}, "
          "ring {ring}s, duration {duration}s)")


def fields(call: Call, reason: str) -> dict[str, Any]:
    end = call.clock.seconds()
    answered = call.answered_at
    return {
        "cdr": True,
        "reason": reason,
        "caller": call.caller_uri,
        "callee": call.callee_uri,
        "trunk": call.cdr_trunk(),
        "start": round(call.created_at, 3),
        "answer": round(answered, 3) if answered is not None else None,
        "end": round(end, 3),
        "ring": round((answered if answered is not None else end) - call.created_at, 3),
        "duration": round(end - answered, 3) if answered is not None else 0,
        "status": call.final_status if answered is None else 200,
        "voicemail": call.voicemail_reason,
    }
