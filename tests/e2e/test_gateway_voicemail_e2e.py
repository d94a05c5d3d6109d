"""Issue 13 end to end, on the real twistd: calls in from a gateway and voicemail on no answer.

Cast: SIPp as the PSTN gateway (gateway_call.xml, from 127.0.0.2, the only [[gateways]] source),
SIPp as the voicemail server (voicemail_answer.xml: its regexp actions fail the call unless the
forwarded INVITE carries the exact Request-URI, Diversion and History-Info), SIPp as an untrusted
caller (caller_number_refused.xml, from 127.0.0.1), the Python push device (tests/e2e/pushdevice.py)
woken by the webhook fake (tests/fakes/webhook_fake.py), and bob, who owns +33123456789
(`libon-tsilo-admin user add bob --number +33123456789`).

- a gateway call to bob's number wakes his sleeping device by push, which registers and is
  late-forked the call; it answers, the gateway hangs up;
- the same call unanswered: at the ring timeout the device gets CANCEL and the call lands on the
  voicemail SIPp, which answers; the gateway hangs up, voicemail gets the BYE;
- an untrusted source's call to the number gets 403: no push, no INVITE, its PAI goes nowhere.
"""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, admin_rpc, free_port
from tests.e2e.pushdevice import DeviceConfig, PushDevice
from tests.e2e.sipp import Sipp, sipp_available
from tests.e2e.test_calls_sipp import assert_caller_ok, procs  # noqa: F401
from tests.e2e.test_registrar_e2e import ADMIN
from tests.fakes import webhook_fake
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(not sipp_available(), reason="sipp is missing (package sip-tester)")

GATEWAY_IP = "127.0.0.2"  # loopback is a /8 on Linux: the gateway SIPp binds here
NUMBER = "+33123456789"


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    record = tmp_path / "webhook.jsonl"
    proc, port = webhook_fake.spawn(["--port", "0", "--record", str(record)])
    yield f"http://{HOST}:{port}/push", record
    proc.terminate()
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def devices() -> Iterator[list[PushDevice]]:
    made: list[PushDevice] = []
    yield made
    for d in made:
        d.stop()


def _server(start_sip_server: Callable[..., ServerProcess], hook_url: str, voicemail: str = "") -> ServerProcess:
    server = start_sip_server(extra={
        "auth": {"enabled": False},
        "location": {"backend": "memory"},
        "calls": {"ring_timeout": 4, "invite_cancel_grace": 0},
        "push": {"providers": ["webhook"], "webhook": [{"name": "webhook", "url": hook_url}]},
        "dialplan": {"country_code": "33"},
        "gateways": [{"name": "pstn", "sources": [f"{GATEWAY_IP}/32"]}],
        "voicemail": {"target": voicemail},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
        "log": JSON_LOG,
    }, tls=False)
    proc = subprocess.run(
        [str(ADMIN), "--config", str(server.config_path), "user", "add", "bob", "--password", "pw",
         "--number", "01 23 45 67 89"],  # national spelling: the dial plan stores +33123456789
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return server


def _device(server: ServerProcess, record: Path, made: list[PushDevice], answer: bool) -> PushDevice:
    dev = PushDevice((HOST, server.sip_port), DeviceConfig(
        user="bob", provider="webhook", prid=f"tok-{free_port()}", param="app", record=record, answer=answer,
    ))
    made.append(dev)
    assert dev.register().status == 200
    return dev.start()


def _gateway(procs: list[Any], server: ServerProcess, tmp_path: Path) -> Sipp:  # noqa: F811
    caller = Sipp(server, "gateway_call.xml", tmp_path, service=NUMBER, extra_args=["-i", GATEWAY_IP])
    procs.append(caller)
    return caller


def _call_state_left(server: ServerProcess) -> dict[str, int]:
    stats, silo = admin_rpc(server, "stats"), admin_rpc(server, "ts.dump")
    left = {"calls": stats["calls"]["calls"], "dialogs": stats["calls"]["dialogs"],
            "silo_stored": silo["stats"]["stored_transactions"], "silo_lingering": silo["stats"]["lingering"],
            "push_pending_calls": stats["push"]["pending_calls"]}
    return {k: v for k, v in left.items() if v}


def assert_no_leaked_state(server: ServerProcess, expected_calls: int) -> None:
    """No call, dialog, silo entry or push record left (the device's binding stays: it is asleep)."""
    wait_until(lambda: not _call_state_left(server), 5, "no call state left",
               explain=lambda: f"left: {_call_state_left(server)}\n{server.output()[-4000:]}")
    assert admin_rpc(server, "stats")["calls"]["total_calls"] == expected_calls
    assert not server.tracebacks(), server.output()[-6000:]


def _metrics(server: ServerProcess) -> str:
    port = int(server.sections["admin"]["listen"].split(":")[1])
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_gateway_call_to_a_number_wakes_the_device_and_late_forks(
    start_sip_server: Any, webhook: tuple[str, Path], devices: list[PushDevice], procs: list[Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    hook_url, record = webhook
    server = _server(start_sip_server, hook_url)
    dev = _device(server, record, devices, answer=True)
    gateway = _gateway(procs, server, tmp_path)
    assert_caller_ok(gateway, server)
    (push,) = dev.seen("push")
    (invite,) = dev.seen("invite")
    assert dev.when("push") < dev.when("register_sent") < dev.when("invite")  # type: ignore[operator]
    assert push["body"]["type"] == "call" and push["body"]["call_id"] == invite["call_id"]
    assert "+442079460000" in invite["from"]  # the gateway's caller, as the gateway said
    dev.wait("bye", 5)
    assert_no_leaked_state(server, expected_calls=1)
    assert 'libon_tsilo_gateway_calls_total{gateway="pstn"} 1.0' in _metrics(server)


def test_unanswered_gateway_call_lands_on_voicemail(
    start_sip_server: Any, webhook: tuple[str, Path], devices: list[PushDevice], procs: list[Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    hook_url, record = webhook
    vm = Sipp((HOST, 9), "voicemail_answer.xml", tmp_path, name="voicemail", timeout_s=30)
    procs.append(vm)
    server = _server(start_sip_server, hook_url, voicemail=f"sip:vm@{HOST}:{vm.local_port}")
    dev = _device(server, record, devices, answer=False)  # rings, never answers
    gateway = _gateway(procs, server, tmp_path)
    assert_caller_ok(gateway, server)
    assert vm.wait(15) == 0, vm.explain() + server.output()[-4000:]  # every check_it regexp matched
    trace = vm.messages()
    start = trace.find("INVITE sip:vm@")
    invite = trace[start:trace.find("\n\n", start)]
    target = f"sip:vm@{HOST}:{vm.local_port};target=sip:bob%40{HOST};cause=408"
    assert invite.startswith(f"INVITE {target} SIP/2.0"), invite
    assert f"Diversion: <sip:bob@{HOST}>;reason=no-answer;counter=1" in invite, invite
    assert ("History-Info: <sip:bob@127.0.0.1?Reason=SIP%3Bcause%3D408%3Btext%3D%22Request%20Timeout%22>"
            f";index=1, <{target}>;index=1.1;mp=1") in invite, invite
    assert 'P-Asserted-Identity: "Carol" <tel:+442079460000>' in invite, invite  # a gateway is trusted
    (cancel_reason,) = dev.seen("cancel")
    assert "Ring timeout" in cancel_reason
    assert_no_leaked_state(server, expected_calls=1)
    metrics = _metrics(server)
    assert 'libon_tsilo_voicemail_calls_total{reason="no-answer"} 1.0' in metrics, metrics
    assert "libon_tsilo_voicemail_failed_total 0.0" in metrics


def test_untrusted_source_may_not_call_a_number(
    start_sip_server: Any, webhook: tuple[str, Path], devices: list[PushDevice], procs: list[Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    hook_url, record = webhook
    server = _server(start_sip_server, hook_url)
    dev = _device(server, record, devices, answer=True)
    caller = Sipp(server, "caller_number_refused.xml", tmp_path, service=NUMBER)
    procs.append(caller)
    assert caller.wait(20) == 0, caller.explain() + server.output()[-4000:]
    # the refusal is counted: the server has handled the INVITE, so nothing can still be on its way
    wait_until(lambda: 'libon_tsilo_limit_hits_total{limit="call_out_unauthenticated"} 1.0' in _metrics(server),
               5, "the refusal counted")
    assert dev.seen("push") == [] and dev.seen("invite") == []
    assert webhook_fake.read_records(record) == []
    assert_no_leaked_state(server, expected_calls=0)
