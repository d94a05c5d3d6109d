"""Via branch ids that prove we made them (RFC 3261 §8.1.1.7, §18.1.2).

A response that matches no client transaction is either a late 2xx to an INVITE we sent (a forked
INVITE's second 2xx, or one retransmitted after its transaction ended: RFC 6026 wants it ACKed,
and we BYE the dialog we do not want) or something we never asked for. Answering the latter with
ACK and BYE reflects and amplifies traffic towards whatever address its Contact names. So the branch
carries a MAC of its unique part under a per-process key: checking it needs no table of branches
sent, costs one keyed BLAKE2 call, and cannot be forged from outside. A 2xx arriving after a
restart no longer verifies and is dropped; its sender gives up after 64*T1 (RFC 3261 §13.3.1.4).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os

MAGIC_COOKIE = "z9hG4bK"

# per process: only this process sends, and so only it checks, its branches
_KEYED = hashlib.blake2b(key=os.urandom(32), digest_size=6)  # a 48-bit MAC: a blind guess wins once in 2**48
_MAC_HEX = 12
# The unique part is a counter from a random start, not os.urandom (a system call per branch, and
# the hot path makes three per call): the MAC beside it is what no one outside can predict.
_COUNTER = itertools.count(int.from_bytes(os.urandom(6), "big"))
_COUNT_HEX = 12
_LENGTH = len(MAGIC_COOKIE) + _COUNT_HEX + _MAC_HEX


def _mac(unique: bytes) -> bytes:
    keyed = _KEYED.copy()  # the key is absorbed once; a copy costs less than a new keyed hash
    keyed.update(unique)
    return keyed.hexdigest().encode("ascii")


def new_branch() -> str:
    """A fresh branch for a request we send: magic cookie, unique part, and its MAC."""
    unique = b"%012x" % (next(_COUNTER) & 0xFFFFFFFFFFFF)
    return (MAGIC_COOKIE.encode("ascii") + unique + _mac(unique)).decode("ascii")


def is_our_branch(branch: str | None) -> bool:
    """True when ``branch`` came from new_branch() in this process."""
    if branch is None or len(branch) != _LENGTH or not branch.startswith(MAGIC_COOKIE):
        return False
    raw = branch.encode("utf-8", "surrogateescape")
    start = len(MAGIC_COOKIE)
    return hmac.compare_digest(_mac(raw[start:start + _COUNT_HEX]), raw[start + _COUNT_HEX:])
