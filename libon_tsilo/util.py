"""Small helpers shared by every layer (kept dependency-free so sip/ can import them)."""

from __future__ import annotations

import re
import secrets

__all__ = ["redact", "redact_uri", "redact_key", "random_token"]

# pn-prid (RFC 8599) and pn-alert-prid (push/waker.py: the app's alert token) are both push tokens
_PN_PRID = re.compile(r"(pn-(?:alert-)?prid=)([^;>?&\s]+)", re.IGNORECASE)


def redact(secret: str | None) -> str:
    """Return a log-safe form of a token or password: its first 6 characters, an ellipsis and its length.

    Enough to correlate two log lines about the same device token without ever writing it whole.
    """
    if not secret:
        return "(empty)"
    return f"{secret[:6]}…({len(secret)})"


def redact_uri(uri: object) -> str:
    """A URI or Contact value fit for logs: a push token (``pn-prid``, ``pn-alert-prid``) is redacted."""
    text = "" if uri is None else str(uri)
    return _PN_PRID.sub(lambda m: m.group(1) + redact(m.group(2)), text)


def redact_key(key: str | None) -> str:
    """A binding key fit for logs: the token of a ``pn:provider|prid|param`` key is redacted, and a
    ``uri:`` key goes through :func:`redact_uri`."""
    if not key:
        return ""
    if key.startswith("pn:"):
        provider, _, rest = key[3:].partition("|")
        prid, sep, param = rest.partition("|")
        return f"pn:{provider}|{redact(prid)}{sep}{param}"
    return redact_uri(key)


def random_token(n: int = 16) -> str:
    """Return an URL-safe random string of ``n`` characters (n >= 1)."""
    if n < 1:
        raise ValueError("random_token: n must be >= 1")
    # token_urlsafe(k) yields ~1.3 chars per byte; ask for enough bytes and trim
    return secrets.token_urlsafe(n)[:n]
