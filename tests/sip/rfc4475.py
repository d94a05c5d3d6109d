"""The RFC 4475 torture-test corpus: the categories of its README and a loader.

Other tests reuse this: ``load(name)`` gives a message's bytes, the tuples below name the files of
each section of the RFC (see /work/shared/testdata/rfc4475/README.md for what each section means).
"""

from __future__ import annotations

import os
from pathlib import Path

# A copy of the corpus lives in the repo so that CI on a fresh clone has it.
CORPUS_DIR = Path(os.environ.get("RFC4475_DIR", Path(__file__).resolve().parents[1] / "data" / "rfc4475"))

# 3.1.1: valid, must parse, a server handles them normally.
VALID = (
    "wsinv", "intmeth", "esc01", "escnull", "esc02", "lwsdisp", "longreq", "dblreq", "semiuri",
    "transports", "mpart01", "unreason", "noreason",
)
# 3.1.2: invalid, must be rejected (400 where a response can be formed, else dropped).
INVALID = (
    "badinv01", "clerr", "ncl", "scalar02", "scalarlg", "quotbal", "ltgtruri", "lwsruri", "lwsstart",
    "trws", "escruri", "baddate", "regbadct", "badaspec", "baddn", "badvers", "mismatch01", "mismatch02",
    "bigcode",
)
# 3.2: transaction layer.
TRANSACTION = ("badbranch",)
# 3.3: application layer: they parse; the element answers per its role.
APPLICATION = (
    "insuf", "unkscm", "novelsc", "unksm2", "bext01", "invut", "regaut01", "multi01", "mcl01", "bcast",
    "zeromf", "cparam01", "cparam02", "regescrt", "sdp01",
)
# 3.4: RFC 2543 syntax, accept.
BACKWARD = ("inv2543",)

ALL = VALID + INVALID + TRANSACTION + APPLICATION + BACKWARD

# Invalid messages that are well-formed SIP: only the UAS core can reject them (CSeq method differs
# from the request method, RFC 3261 §8.2 / RFC 4475 §3.1.2.17-18).
UAS_CORE_INVALID = ("mismatch01", "mismatch02")

# Responses in the corpus (everything else is a request).
RESPONSES = ("bigcode", "unreason", "noreason", "bcast", "scalarlg")


def path(name: str) -> Path:
    return CORPUS_DIR / f"{name}.dat"


def load(name: str) -> bytes:
    """The message's bytes, exactly as in the corpus file."""
    return path(name).read_bytes()


def available() -> bool:
    return CORPUS_DIR.is_dir()


def corpus_names() -> list[str]:
    """Every .dat file actually present (to check the lists above are complete)."""
    return sorted(p.stem for p in CORPUS_DIR.glob("*.dat"))
