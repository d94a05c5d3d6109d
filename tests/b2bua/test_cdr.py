"""The CDR-like line at the end of every call (b2bua/cdr.py): one event with fields."""

from __future__ import annotations

import json
from typing import Any

from libon_tsilo.ops.logging import json_line
from tests.b2bua.test_relay import Connected
from tests.b2bua.test_call_setup import two_device_call


def _cdrs(logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logged if e.get("cdr")]


def test_answered_call_hung_up_by_the_callee(logged) -> None:
    c = Connected()
    c.env.clock.advance(42)
    c.from_b("BYE")
    [cdr] = _cdrs(logged)
    assert cdr["reason"] == "BYE from the callee"
    assert cdr["caller"] == "sip:alice@example.com" and cdr["callee"] == "sip:bob@example.com"
    assert cdr["trunk"] == "-" and cdr["status"] == 200
    assert cdr["start"] == 1000.0 and cdr["answer"] == 1000.0 and cdr["end"] == 1042.0
    assert cdr["ring"] == 0 and cdr["duration"] == 42
    line = json.loads(json_line(cdr))  # the JSON log keeps every field
    assert line["duration"] == 42 and line["trunk"] == "-"
    assert line["msg"].startswith("call ended: BYE from the callee (sip:alice@example.com -> sip:bob@example.com")


def test_answered_call_hung_up_by_the_caller(logged) -> None:
    c = Connected()
    c.env.clock.advance(5)
    c.from_a("BYE")
    [cdr] = _cdrs(logged)
    assert cdr["reason"] == "BYE from the caller" and cdr["duration"] == 5


def test_cancelled_call(logged) -> None:
    env, stx = two_device_call()
    env.clock.advance(7)
    env.call().caller_cancel(None)
    [cdr] = _cdrs(logged)
    assert cdr["reason"] == "caller cancelled" and cdr["status"] == 487
    assert cdr["answer"] is None and cdr["duration"] == 0 and cdr["ring"] == 7


def test_ring_timeout(logged) -> None:
    env, stx = two_device_call()
    env.clock.advance(30)
    [cdr] = _cdrs(logged)
    assert cdr["reason"] == "ring timeout" and cdr["status"] == 480 and cdr["ring"] == 30
