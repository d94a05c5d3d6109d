"""Small helpers shared by every layer (kept dependency-free so sip/ can import them)."""

from __future__ import annotations

import secrets

__all__ = ["redact", "random_token"]


def redact(secret: str | None) -> str:
    """Return a log-safe form of a token or password: its first 6 characters, an ellipsis and its length.

    Enough to correlate two log lines about the same device token without ever writing it whole.
    """
    if not secret:
        return "(empty)"
    return f"{secret[:6]}…({len(secret)})"


def random_token(n: int = 16) -> str:
    """Return an URL-safe random string of ``n`` characters (n >= 1)."""
    if n < 1:
        raise ValueError("random_token: n must be >= 1")
    # token_urlsafe(k) yields ~1.3 chars per byte; ask for enough bytes and trim
    return secrets.token_urlsafe(n)[:n]
