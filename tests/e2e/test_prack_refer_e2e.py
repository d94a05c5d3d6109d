"""End to end, RFC 3262 and RFC 3515 against the real twistd process with SIPp on both legs.

- 100rel: a caller that requires reliable provisionals (scenarios/caller_100rel.xml) calls a
  registered device that sends a reliable 183 with SDP (scenarios/device_answer_100rel.xml): each
  leg does its own PRACK, the caller's 183 is reliable and carries the device's SDP byte for byte,
  and the call completes (before: 420 Bad Extension).
- REFER: a caller (scenarios/caller_refer.xml) transfers its callee (device_transferee.xml) to
  another registered user (device_answer.xml): 202, NOTIFY 100 then 200, the callee is re-INVITEd
  with the target's SDP and talks to it, the referrer gets BYE (before: 501). A REFER to a foreign
  target (caller_refer_refused.xml) gets 403 and the call goes on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.proc import ServerProcess, admin_rpc
from tests.e2e.sipp import sipp_available, stop_all
from tests.e2e.test_calls_sipp import (
    _server_config,
    add_device,
    assert_caller_ok,
    assert_no_leaked_state,
    ended_reasons,
    run_caller,
)

pytestmark = pytest.mark.skipif(not sipp_available(), reason="sipp is missing (package sip-tester)")


@pytest.fixture
def server(start_sip_server) -> ServerProcess:
    return start_sip_server(extra=_server_config(), tls=False)


@pytest.fixture
def procs() -> Iterator[list]:
    started: list = []
    yield started
    stop_all(started)


@pytest.mark.parametrize("transport", ["u1", "t1"], ids=["udp", "tcp"])
def test_caller_requiring_100rel_gets_a_reliable_183_with_the_devices_sdp(server, procs, tmp_path, transport):
    device = add_device(procs, server, tmp_path, "alice", answer="device_answer_100rel.xml", transport=transport)
    device.wait_registered()
    caller = run_caller(procs, server, tmp_path, "caller_100rel.xml", "alice", pause_ms=100, transport=transport)
    assert_caller_ok(caller, server)
    assert caller.log_lines("PRACK-OK"), caller.explain()
    early = caller.log_lines("EARLY-SDP ")
    assert len(early) == 1 and "o=device 7 7 IN IP4 127.0.0.1" in early[0], caller.explain()
    device.stop()
    device.assert_no_failures()
    assert len(device.sipp.log_lines("PRACKED 1 ")) == 1, device.sipp.explain()  # our own PRACK, RAck 1
    assert len(device.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, device.sipp.explain()
    assert ended_reasons(server) == ["BYE from the caller"]
    assert_no_leaked_state(server, 1)


def test_refer_from_the_caller_transfers_the_callee_to_another_user(server, procs, tmp_path):
    transferee = add_device(procs, server, tmp_path, "alice", answer="device_transferee.xml", name="alice")
    target = add_device(procs, server, tmp_path, "carol", name="carol")
    transferee.wait_registered()
    target.wait_registered()
    caller = run_caller(procs, server, tmp_path, "caller_refer.xml", "alice", pause_ms=100,
                        keys={"target": "carol"})
    assert_caller_ok(caller, server)
    assert caller.log_lines("NOTIFIED SIP/2.0 100 Trying"), caller.explain()
    assert caller.log_lines("NOTIFIED SIP/2.0 200 OK"), caller.explain()
    assert caller.log_lines("TRANSFERRED"), caller.explain()
    for device in (transferee, target):
        device.stop()
        device.assert_no_failures()
    # the transferee got the target's SDP (device_answer.xml: o=device 1 1), then hung up itself
    assert transferee.sipp.log_lines("REINVITED o=device 1 1"), transferee.sipp.explain()
    assert len(transferee.sipp.log_lines("TRANSFEREE-HUNG-UP ")) == 1, transferee.sipp.explain()
    assert len(target.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, target.sipp.explain()
    assert ended_reasons(server) == ["transferred", "BYE from the caller"]
    assert admin_rpc(server, "stats")["calls"]["total_transfers"] == 1
    assert_no_leaked_state(server, 2)


def test_refused_refer_leaves_the_call_up(server, procs, tmp_path):
    device = add_device(procs, server, tmp_path, "alice")
    device.wait_registered()
    caller = run_caller(procs, server, tmp_path, "caller_refer_refused.xml", "alice", pause_ms=100)
    assert_caller_ok(caller, server)
    assert caller.log_lines("REFUSED"), caller.explain()
    assert admin_rpc(server, "stats")["calls"]["total_transfers_refused"] == 1
    device.stop()
    device.assert_no_failures()
    assert len(device.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, device.sipp.explain()
    assert ended_reasons(server) == ["BYE from the caller"]
    assert_no_leaked_state(server, 1)


def test_refer_from_the_callee_transfers_the_caller_to_another_user(server, procs, tmp_path):
    referrer = add_device(procs, server, tmp_path, "alice", answer="device_refer.xml", name="alice")
    target = add_device(procs, server, tmp_path, "carol", name="carol")
    referrer.wait_registered()
    target.wait_registered()
    caller = run_caller(procs, server, tmp_path, "caller_transferee.xml", "alice", pause_ms=200)
    assert_caller_ok(caller, server)
    # the caller was moved to carol (device_answer.xml's SDP: o=device 1 1) and hung up on her
    assert caller.log_lines("REINVITED o=device 1 1"), caller.explain()
    for device in (referrer, target):
        device.stop()
        device.assert_no_failures()
    assert referrer.sipp.log_lines("NOTIFIED SIP/2.0 100 Trying"), referrer.sipp.explain()
    assert referrer.sipp.log_lines("NOTIFIED SIP/2.0 200 OK"), referrer.sipp.explain()
    assert len(referrer.sipp.log_lines("TRANSFERRED-AND-HUNG-UP ")) == 1, referrer.sipp.explain()
    assert len(target.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, target.sipp.explain()
    assert ended_reasons(server) == ["transferred", "BYE from the caller"]
    assert_no_leaked_state(server, 2)
