"""Via branch ids that prove we made them (RFC 3261 §8.1.1.7, §18.1.2).

A response that matches no client transaction is either a late 2xx to an INVITE we sent (a forked
INVITE's second 2xx, or one retransmitted after its transaction ended: RFC 6026 wants it ACKed,
and we BYE the dialog we do not want) or something we never asked for. Answering the latter with
ACK and BYE reflects and amplifies traffic towards whatever address its Contact names. So a branch
carries a MAC under a per-process key: checking it needs no table of branches sent, costs one keyed
BLAKE2 call, and cannot be forged from outside. A 2xx arriving after a restart no longer verifies
and is dropped; its sender gives up after 64*T1 (RFC 3261 §13.3.1.4).

Branches come in blocks of ten: "z9hG4bK" + block number (12 hex) + one of the ten 48-bit MACs
that one keyed BLAKE2 call gives for that block (a blind guess wins ten times in 2**48). The block
number is a counter from a random start, not os.urandom: the MAC is what no one outside can predict.
Each branch then costs about what the os.urandom call it replaces did (a call makes three).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
from collections.abc import Iterator

MAGIC_COOKIE = "z9hG4bK"

_KEY = os.urandom(32)  # per process: only this process sends, and so only it checks, its branches
_SLOTS = 10
_MAC_BYTES = 6
_BLOCKS = itertools.count(int.from_bytes(os.urandom(6), "big"))
_LENGTH = len(MAGIC_COOKIE) + 12 + 2 * _MAC_BYTES
_pending: Iterator[str] = iter(())


def _macs(block_hex: str) -> list[str]:
    """The ten MACs of a block, as hex: one keyed hash, split in C (hex with a separator)."""
    digest = hashlib.blake2b(block_hex.encode("ascii"), key=_KEY, digest_size=_SLOTS * _MAC_BYTES)
    return digest.digest().hex(" ", -_MAC_BYTES).split()


def new_branch() -> str:
    """A fresh branch for a request we send (unique, and verifiable by is_our_branch)."""
    global _pending
    branch = next(_pending, None)
    if branch is None:
        block_hex = f"{next(_BLOCKS) & 0xFFFFFFFFFFFF:012x}"
        _pending = iter(list(map((MAGIC_COOKIE + block_hex).__add__, _macs(block_hex))))
        branch = next(_pending)
    return branch


def is_our_branch(branch: str | None) -> bool:
    """True when ``branch`` came from new_branch() in this process."""
    if (branch is None or len(branch) != _LENGTH or not branch.startswith(MAGIC_COOKIE)
            or not branch.isascii()):
        return False
    start = len(MAGIC_COOKIE)
    block_hex, mac = branch[start:start + 12], branch[start + 12:]
    return any(hmac.compare_digest(ours, mac) for ours in _macs(block_hex))
