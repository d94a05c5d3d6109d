"""End-to-end calls: the real twistd process, SIPp callers (UAC) and SIPp devices.

A device (tests/e2e/sipp.py `Device`) is one SIPp process that REGISTERs a Contact on its own port
and answers (or rings, or re-INVITEs...) every INVITE the server forks there. Auth is off except
where a test says otherwise; the location store is in memory; the ring timeout is short.

After each scenario the server must hold nothing (`assert_no_leaked_state`): the admin API
(`[admin] listen` on loopback) must show empty call and dialog tables (`/rpc/stats`), an empty
silo (`/rpc/ts.dump`: no AOR, no stored or lingering call) and, once the devices unregistered, no
binding (`/rpc/ul.dump`); and every call the server logged as started must have logged its end.
At teardown the server must exit cleanly on SIGTERM without a traceback (the `start_sip_server`
fixture).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, admin_rpc, free_port, log_events
from tests.e2e.sipp import Device, Sipp, sipp_available, stop_all
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(not sipp_available(), reason="sipp is missing (package sip-tester)")

RING_TIMEOUT = 3
REASON_ANSWERED = 'SIP;cause=200;text="Call completed elsewhere"'

def _server_config(auth: bool = False) -> dict:
    extra: dict = {
        "location": {"backend": "memory"},
        "calls": {"ring_timeout": RING_TIMEOUT, "invite_cancel_grace": 0},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
        "log": JSON_LOG,  # ended_reasons reads the structured "call ended" events
    }
    if auth:
        extra["auth"] = {"enabled": True, "trusted_sources": ["127.0.0.0/8"]}
    else:
        extra["auth"] = {"enabled": False}
    return extra


@pytest.fixture
def server(start_sip_server) -> ServerProcess:
    return start_sip_server(extra=_server_config(), tls=False)


@pytest.fixture
def procs() -> Iterator[list]:
    """SIPp processes of a test; whatever still runs at the end is killed."""
    started: list = []
    yield started
    stop_all(started)


def ended_reasons(server: ServerProcess) -> list[str]:
    """The end reason of every call the server ended, in order (the ``reason`` field of the
    "call ended" events, not their wording)."""
    return [e["reason"] for e in log_events(server, "libon_tsilo.b2bua.call") if "reason" in e]


def wait_parked(server: ServerProcess, user: str, count: int = 1) -> None:
    """Until the silo holds ``count`` calls to ``user`` parked (waiting for a device)."""
    aor = f"sip:{user}@{HOST}"

    def parked() -> int:
        return [c["state"] for c in admin_rpc(server, "ts.dump")["aors"].get(aor, [])].count("parked")

    wait_until(lambda: parked() == count, 10, f"{count} call(s) to {aor} parked",
               explain=lambda: server.output()[-6000:])


def silo_branches(server: ServerProcess) -> int:
    """Branches the silo added to parked calls: forks that came out of a REGISTER."""
    return admin_rpc(server, "ts.dump")["stats"]["added_branches"]


def _leftovers(server: ServerProcess) -> dict:
    stats = admin_rpc(server, "stats")
    silo = admin_rpc(server, "ts.dump")
    bindings = admin_rpc(server, "ul.dump")
    left = {
        "calls": stats["calls"]["calls"],
        "dialogs": stats["calls"]["dialogs"],
        "silo_stored": silo["stats"]["stored_transactions"],
        "silo_lingering": silo["stats"]["lingering"],
        "silo_aors": len(silo["aors"]) + len(silo["lingering"]),
        "bindings": bindings["binding_count"],
    }
    return {k: v for k, v in left.items() if v}


def assert_no_leaked_state(server: ServerProcess, expected_calls: int, timeout: float = 5.0) -> None:
    """No call, dialog, silo entry or binding is left (admin API), and every call the server
    started has ended; exactly ``expected_calls`` calls were started."""
    wait_until(lambda: not _leftovers(server), timeout, "every call to end and its state to go",
               explain=lambda: f"left: {_leftovers(server)}\n{server.output()[-6000:]}")
    started = admin_rpc(server, "stats")["calls"]["total_calls"]
    assert started == expected_calls, f"{started} call(s) started, {expected_calls} expected"
    assert server.alive(), server.output()[-6000:]
    assert not server.tracebacks(), server.output()[-6000:]


def run_caller(procs: list, server: ServerProcess, tmp_path, scenario: str, callee: str, **kw) -> Sipp:
    caller = Sipp(server, scenario, tmp_path, service=callee, **kw)
    procs.append(caller)
    return caller


def add_device(procs: list, server: ServerProcess, tmp_path, aor: str, answer: str = "device_answer.xml",
               **kw) -> Device:
    device = Device(server, tmp_path, aor, answer=answer, **kw)
    procs.append(device)
    return device


def assert_caller_ok(caller: Sipp, server: ServerProcess, timeout: float = 30.0) -> None:
    """The caller's scenario passed, and the server has finished the call on the device side too.

    The B2BUA answers the caller's BYE itself and hangs up the device with a BYE of its own: the
    caller may be done before the device's leg is, so a test must not stop the device before that."""
    code = caller.wait(timeout)
    assert code == 0, caller.explain() + "\n--- server log\n" + server.output()[-6000:]
    wait_until(lambda: not {"calls", "dialogs"} & set(_leftovers(server)), 10.0, "the calls to end",
               explain=lambda: f"calls still up after the caller finished: {_leftovers(server)}\n"
                               f"{server.output()[-6000:]}")


# -- 1. a registered device answers --------------------------------------------------------------


@pytest.mark.parametrize(
    "transport,auth", [("u1", False), ("t1", False), ("u1", True)], ids=["udp", "tcp", "udp-auth-trusted"]
)
def test_registered_device_answers(start_sip_server, procs, tmp_path, transport, auth):
    """Caller gets 200 (with the device's SDP) and ACKs; its BYE reaches the device and the 200
    comes back: the call completes both ways. With auth on, the trusted loopback source skips digest."""
    server = start_sip_server(extra=_server_config(auth=auth), tls=False)
    device = add_device(procs, server, tmp_path, "alice", transport=transport)
    device.wait_registered()
    caller = run_caller(procs, server, tmp_path, "caller_answered.xml", "alice", pause_ms=100,
                        transport=transport)
    assert_caller_ok(caller, server)
    assert _leftovers(server) == {"bindings": 1}  # the admin API does see what is there
    device.stop()
    device.assert_no_failures()
    assert len(device.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, device.sipp.explain()
    assert ended_reasons(server) == ["BYE from the caller"]
    assert_no_leaked_state(server, 1)


# -- 2. late fork: INVITE first, REGISTER 150 ms later ------------------------------------------------


def test_late_fork_register_after_invite(server, procs, tmp_path):
    caller = run_caller(procs, server, tmp_path, "caller_answered.xml", "bob", pause_ms=100)
    wait_parked(server, "bob")
    # the call was parked with no binding: the fork can only come later, out of the REGISTER
    assert admin_rpc(server, "ul.dump")["binding_count"] == 0 and silo_branches(server) == 0
    time.sleep(0.15)  # the scenario itself: the device registers 150 ms after the call was parked
    device = add_device(procs, server, tmp_path, "bob")
    assert_caller_ok(caller, server)
    device.stop()
    device.assert_no_failures()
    assert len(device.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, device.sipp.explain()
    assert silo_branches(server) == 1  # the silo added the branch to the parked call
    assert ended_reasons(server) == ["BYE from the caller"]
    assert_no_leaked_state(server, 1)


# -- 3. early device rings, late device answers, early one gets CANCEL with Reason --------------------


def test_late_device_answers_early_device_cancelled(server, procs, tmp_path):
    early = add_device(procs, server, tmp_path, "carol", answer="device_ring_cancel.xml", name="early")
    early.wait_registered()
    caller = run_caller(procs, server, tmp_path, "caller_answered.xml", "carol", pause_ms=100)
    wait_until(lambda: early.sipp.log_lines("INVITED "), 10, "the early device to get the INVITE",
               explain=early.sipp.explain)
    time.sleep(0.15)  # the scenario itself: the late device registers while the early one rings
    late = add_device(procs, server, tmp_path, "carol", name="late")
    assert_caller_ok(caller, server)
    for device in (early, late):
        device.stop()
        device.assert_no_failures()
    assert len(late.sipp.log_lines("ANSWERED-AND-HUNG-UP ")) == 1, late.sipp.explain()
    cancelled = early.sipp.log_lines("CANCELLED ")
    assert len(cancelled) == 1, early.sipp.explain()
    assert cancelled[0].removeprefix("CANCELLED ").strip() == REASON_ANSWERED, early.sipp.explain()
    assert len(early.sipp.log_lines("TERMINATED ")) == 1, early.sipp.explain()  # 487 was ACKed
    assert ended_reasons(server) == ["BYE from the caller"]
    assert_no_leaked_state(server, 1)


# -- 4. caller CANCEL while parked ------------------------------------------------------------------


def test_caller_cancel_while_parked(server, procs, tmp_path):
    caller = run_caller(procs, server, tmp_path, "caller_cancel.xml", "dave", pause_ms=1000)
    wait_parked(server, "dave")
    pending = admin_rpc(server, "ts.dump")  # the CANCEL comes 1 s after the 100
    assert [c["state"] for c in pending["aors"]["sip:dave@127.0.0.1"]] == ["parked"], pending
    assert _leftovers(server) == {"calls": 1, "dialogs": 1, "silo_stored": 1, "silo_aors": 1}
    assert_caller_ok(caller, server)
    assert caller.log_lines("CANCEL-OK ") and caller.log_lines("TERMINATED "), caller.explain()
    assert ended_reasons(server) == ["caller cancelled"]
    assert_no_leaked_state(server, 1)


# -- 5. ring timeout -----------------------------------------------------------------------------


def test_ring_timeout_gives_480(server, procs, tmp_path):
    started = time.monotonic()
    caller = run_caller(procs, server, tmp_path, "caller_unanswered.xml", "erin")
    assert_caller_ok(caller, server)
    elapsed = time.monotonic() - started
    assert RING_TIMEOUT - 0.5 <= elapsed <= RING_TIMEOUT + 5, elapsed
    assert caller.log_lines("FINAL 480 "), caller.explain()
    assert ended_reasons(server) == ["ring timeout"]
    assert_no_leaked_state(server, 1)


# -- 6. two parked calls to one AOR, both forked by one REGISTER ----------------------------------


def test_one_register_forks_two_parked_calls(server, procs, tmp_path):
    caller = run_caller(procs, server, tmp_path, "caller_answered.xml", "frank", pause_ms=100,
                        calls=2, rate=20, limit=2)
    wait_parked(server, "frank", count=2)
    assert admin_rpc(server, "ul.dump")["binding_count"] == 0 and silo_branches(server) == 0
    device = add_device(procs, server, tmp_path, "frank")
    assert_caller_ok(caller, server)
    device.stop()
    device.assert_no_failures()
    invited = device.sipp.log_lines("INVITED ")
    answered = device.sipp.log_lines("ANSWERED-AND-HUNG-UP ")
    assert len(invited) == 2 and len(set(invited)) == 2, device.sipp.explain()
    assert len(answered) == 2, device.sipp.explain()
    # both calls were parked before the device's one REGISTER; the silo added both branches
    assert len(device.sipp.log_lines("REGISTERED ")) == 1, device.sipp.explain()
    assert silo_branches(server) == 2
    assert ended_reasons(server) == ["BYE from the caller"] * 2
    assert_no_leaked_state(server, 2)


# -- 7. re-INVITE and BYE from the callee side -------------------------------------------------------


def test_callee_reinvite_and_bye(server, procs, tmp_path):
    device = add_device(procs, server, tmp_path, "grace", answer="device_reinvite_bye.xml")
    device.wait_registered()
    caller = run_caller(procs, server, tmp_path, "caller_callee_hangs_up.xml", "grace")
    assert_caller_ok(caller, server)
    device.stop()
    device.assert_no_failures()
    assert caller.log_lines("REINVITED ") and caller.log_lines("BYE-RECEIVED "), caller.explain()
    assert device.sipp.log_lines("REINVITE-ANSWERED ") and device.sipp.log_lines("HUNG-UP "), \
        device.sipp.explain()
    assert len(ended_reasons(server)) == 1 and "BYE" in ended_reasons(server)[0], server.output()[-4000:]
    assert_no_leaked_state(server, 1)
