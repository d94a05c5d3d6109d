"""End-to-end: an answered call whose parties both go silent is ended by the server.

The real twistd process, a SIPp caller (scenarios/caller_silent.xml: offers timers, ACKs, then
sends nothing) and a SIPp device (scenarios/device_answer_silent.xml: no timer support, answers,
then sends nothing). RFC 4028 forbids intervals under 90 s, too long for a test, so the server runs
with `[calls] max_call_duration = 2`: the call must end about 2 s after the answer, with a BYE
carrying a Reason to both parties. On the wire the test also checks the timer negotiation: the
caller's 200 carries Session-Expires with a refresher, the device's INVITE Session-Expires and
Min-SE (sent when not the RFC's default of 90, hence min_se = 120 here). The RFC 4028 expiry itself is covered on a Clock in tests/b2bua/test_session_timer.py.
"""

from __future__ import annotations

import time

import pytest

from libon_tsilo.b2bua.session_timer import REASON_MAX_DURATION
from tests.e2e.proc import admin_rpc
from tests.e2e.sipp import sipp_available
from tests.e2e.test_calls_sipp import (  # noqa: F401  (procs is a fixture)
    _server_config,
    add_device,
    assert_caller_ok,
    assert_no_leaked_state,
    ended_reasons,
    procs,
    run_caller,
)

pytestmark = pytest.mark.skipif(not sipp_available(), reason="sipp is missing (package sip-tester)")

MAX_CALL_DURATION = 2


def _words(lines: list[str]) -> list[str]:
    # SIPp keeps the blank after a header's colon in what it extracts
    return [" ".join(line.split()) for line in lines]


def test_silent_answered_call_is_ended_by_max_call_duration(start_sip_server, procs, tmp_path):  # noqa: F811
    config = _server_config()
    config["calls"].update(max_call_duration=MAX_CALL_DURATION, min_se=120)  # 90 would not be sent
    server = start_sip_server(extra=config, tls=False)
    device = add_device(procs, server, tmp_path, "henry", answer="device_answer_silent.xml")
    device.wait_registered()
    started = time.monotonic()
    caller = run_caller(procs, server, tmp_path, "caller_silent.xml", "henry")
    assert_caller_ok(caller, server)  # its scenario ends only with the server's BYE
    elapsed = time.monotonic() - started
    assert MAX_CALL_DURATION <= elapsed < MAX_CALL_DURATION + 10, elapsed  # slack for a loaded box

    # the caller supports timers and did not pick a refresher: it refreshes, the server watches
    assert _words(caller.log_lines("SESSION-EXPIRES ")) == ["SESSION-EXPIRES 1800;refresher=uac"], \
        caller.explain()
    assert _words(caller.log_lines("BYE-RECEIVED ")) == [f"BYE-RECEIVED {REASON_MAX_DURATION}"], \
        caller.explain()
    device.stop()
    device.assert_no_failures()
    assert _words(device.sipp.log_lines("INVITED ")) == ["INVITED SE=1800 MIN-SE=120"], \
        device.sipp.explain()
    assert _words(device.sipp.log_lines("HUNG-UP-BY-SERVER ")) == \
        [f"HUNG-UP-BY-SERVER {REASON_MAX_DURATION}"], device.sipp.explain()

    assert ended_reasons(server) == ["maximum call duration"]
    assert admin_rpc(server, "stats")["calls"]["total_duration_limit"] == 1
    assert_no_leaked_state(server, 1)
