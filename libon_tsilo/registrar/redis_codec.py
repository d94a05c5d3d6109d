"""The JSON the Redis store writes and reads: each binding's value, and the change messages.

Encoded and decoded by orjson (C, ~15x cheaper than the stdlib's ``json.dumps`` for a binding:
json's encoder was ~65k of the ~600k instructions of a REGISTER on the Redis store,
bench/redis_cost.py). The text is the same JSON, compact (no spaces) and UTF-8 where json wrote
``\\uXXXX`` escapes: a node of an earlier version reads what this one writes, and the other way
round (a rolling upgrade mixes both). orjson refuses lone surrogates (the ``surrogateescape`` form
of non-UTF-8 bytes in a SIP header): those strings go through json, which escapes them, and
``loads`` reads such an escape through json again.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps", "loads"]


def dumps(obj: Any) -> bytes:
    """``obj`` as JSON bytes (UTF-8)."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # a lone surrogate (or a type neither knows: json raises it again)
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def loads(data: bytes) -> Any:
    """The value of JSON ``data``; ValueError when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # an escaped lone surrogate, which only json reads
        return json.loads(data)
