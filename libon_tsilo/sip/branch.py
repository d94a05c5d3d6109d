"""Via branch ids that prove we made them (RFC 3261 §8.1.1.7, §18.1.2).

A response that matches no client transaction is either a late 2xx to an INVITE we sent (a forked
INVITE's second 2xx, or one retransmitted after its transaction ended: RFC 6026 wants it ACKed,
and we BYE the dialog we do not want) or something we never asked for. Answering the latter with
ACK and BYE reflects and amplifies traffic towards whatever address its Contact names. So the branch
carries a MAC of its random part under a per-process key: checking it needs no table of branches
sent, costs one keyed BLAKE2 call, and cannot be forged from outside. A 2xx arriving after a
restart no longer verifies and is dropped; its sender gives up after 64*T1 (RFC 3261 §13.3.1.4).
"""

from __future__ import annotations

import hashlib
import hmac
import os

MAGIC_COOKIE = "z9hG4bK"

_KEY = os.urandom(32)  # per process: only this process sends, and so only it checks, its branches
_NONCE_HEX = 16  # 8 random bytes: unique per request
_MAC_HEX = 12  # 48 bits: a blind guess succeeds once in 2**48
_LENGTH = len(MAGIC_COOKIE) + _NONCE_HEX + _MAC_HEX


def _mac(nonce: bytes) -> bytes:
    return hashlib.blake2b(nonce, key=_KEY, digest_size=_MAC_HEX // 2).hexdigest().encode("ascii")


def new_branch() -> str:
    """A fresh branch for a request we send: magic cookie, random part, and its MAC."""
    nonce = os.urandom(_NONCE_HEX // 2).hex().encode("ascii")
    return (MAGIC_COOKIE.encode("ascii") + nonce + _mac(nonce)).decode("ascii")


def is_our_branch(branch: str | None) -> bool:
    """True when ``branch`` came from new_branch() in this process."""
    if branch is None or len(branch) != _LENGTH or not branch.startswith(MAGIC_COOKIE):
        return False
    raw = branch.encode("utf-8", "surrogateescape")
    start = len(MAGIC_COOKIE)
    return hmac.compare_digest(_mac(raw[start:start + _NONCE_HEX]), raw[start + _NONCE_HEX:])
