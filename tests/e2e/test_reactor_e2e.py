"""[ops] reactor against the real twistd process: a late-fork call (SIPp caller_answered.xml, the
device's REGISTER 150 ms after the INVITE, device_register.xml + device_answer.xml) completes on the
epoll reactor ("auto" without APNs, the default) and on the asyncio reactor, and the server says
at start-up which one it runs."""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_calls_sipp import (
    _server_config,
    add_device,
    assert_caller_ok,
    assert_no_leaked_state,
    ended_reasons,
    procs,  # noqa: F401  (the fixture)
    run_caller,
    wait_parked,
)


@pytest.mark.parametrize("setting, running", [("auto", "epoll"), ("asyncio", "asyncio")])
def test_late_fork_call_on_each_reactor(start_sip_server, procs, tmp_path, setting, running):  # noqa: F811
    server = start_sip_server(extra={**_server_config(), "ops": {"reactor": setting}}, tls=False)
    assert f"running on the {running} reactor ([ops] reactor = {setting})" in server.output()
    caller = run_caller(procs, server, tmp_path, "caller_answered.xml", "bob", pause_ms=100)
    wait_parked(server, "bob")
    time.sleep(0.15)  # the device comes after the INVITE was parked: a late fork
    device = add_device(procs, server, tmp_path, "bob")
    assert_caller_ok(caller, server)
    device.stop()
    device.assert_no_failures()
    assert ended_reasons(server) == ["BYE from the caller"]
    assert_no_leaked_state(server, 1)
