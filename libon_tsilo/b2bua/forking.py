"""RFC 3261 §16.7 response choice, as a B2BUA applies it to its B-legs. Pure functions."""

from __future__ import annotations

from typing import Iterable

__all__ = ["best_final", "caller_status", "is_global_failure", "reason_for", "REASON_ANSWERED",
           "REASON_RING_TIMEOUT"]

# RFC 3326 Reason values sent on the CANCELs of the losing branches
REASON_ANSWERED = 'SIP;cause=200;text="Call completed elsewhere"'
REASON_RING_TIMEOUT = 'SIP;cause=480;text="Ring timeout"'
# a device's branch moved to its new connection: the CANCEL has the live branch's Call-ID (one per
# device), so it says why, for apps that would otherwise end the call they are ringing for
REASON_REPLACED = 'SIP;cause=480;text="Replaced by a new branch"'


def reason_for(status: int, phrase: str | None) -> str:
    """The Reason for the CANCELs after a device's final answer (a 603 Decline says cause=603)."""
    text = (phrase or "").replace("\\", "").replace('"', "")
    return f'SIP;cause={status};text="{text}"' if text else f"SIP;cause={status}"

# within one class, these say the most about what the caller can do next (§16.7 step 6)
_PREFERRED = (486, 600, 603, 404, 415, 420, 484, 488, 403)


def is_global_failure(status: int) -> bool:
    """A 6xx ends the whole fork (§16.7 step 5)."""
    return 600 <= status < 700


def best_final(statuses: Iterable[int]) -> int | None:
    """Pick the status to give the caller when every branch failed (§16.7 step 6).

    6xx first; else the lowest class; inside a class a preferred code, else the lowest.
    None when there was no final response at all.
    """
    finals = [s for s in statuses if s >= 300]
    if not finals:
        return None
    six = [s for s in finals if s >= 600]
    pool = six or [s for s in finals if s // 100 == min(f // 100 for f in finals)]
    for code in _PREFERRED:
        if code in pool:
            return code
    return min(pool)


def caller_status(status: int | None) -> int:
    """Map the chosen branch status to what the caller should see.

    Device challenges (401/407) are meaningless to the caller, a local 408 means nobody answered,
    a 422 is about the session interval of our own leg to the device (RFC 4028), and a 503 must
    not be passed on (§16.7 step 6), so these become 480 / 500.
    """
    if status is None or status in (401, 407, 408, 422):
        return 480
    if status == 503:
        return 500
    return status
