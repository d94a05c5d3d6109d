"""Push wake-up end to end: the real twistd server, the APNs / FCM fakes as separate processes, a
Python device (tests/e2e/pushdevice.py) that registers over UDP with RFC 8599 pn params and then
only wakes up when the fake records a push for it, and a Python caller.

Scenarios: a call completes through an APNs push and through an FCM push; a dead token (APNs 410,
FCM UNREGISTERED) removes the binding and the caller gets 480 at once; a push that hangs still ends
with 480 at the ring timeout; 429 then 200 delivers within the ring time; a call cancelled before
the iOS device registered gives it INVITE then CANCEL (or a missed-call alert push, when configured);
a device that registered moments ago is forked to without a push; a +sip.pnsreg binding gets a
refresh push before it expires. After each scenario the admin API must show no call, dialog or
silo entry left and no call record left in the waker (`assert_no_leaked_state`), and the push
statistics must tell what happened; the server fixture checks a clean SIGTERM exit and no tracebacks.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from libon_tsilo.util import redact
from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, admin_rpc, free_port, log_events
from tests.e2e.pushdevice import Caller, DeviceConfig, PushDevice, push_records
from tests.fakes import apns_fake, fcm_fake
from tests.fakes.keys import make_team_key
from tests.fakes.sa_keys import make_service_account
from tests.waiting import wait_until

BUNDLE = "com.example.app"
TEAM = "TEAM123456"
KEY_ID = "KEY1234567"
APNS_PARAM = f"{TEAM}.{BUNDLE}.voip"
PROJECT = "tsilo-e2e"


@dataclass
class Fake:
    provider: str
    proc: Any
    port: int
    record: Path
    config: dict[str, Any]  # the [push] section for the server

    def records(self) -> list[dict[str, Any]]:
        return push_records(self.record, self.provider)


def _stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except Exception:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def fakes(tmp_path: Path, test_certs: Any) -> Iterator[Callable[..., Fake]]:
    procs: list[Any] = []

    def start(provider: str, script: dict[str, Any] | None = None) -> Fake:
        directory = tmp_path / f"{provider}-fake{len(procs)}"
        directory.mkdir()
        record = directory / "record.jsonl"
        if provider == "apns":
            team_key = make_team_key(TEAM, KEY_ID)
            p8, pub = team_key.write(directory)
            args = ["--port", "0", "--cert", str(test_certs.cert), "--key", str(test_certs.key),
                    "--ca", str(test_certs.ca), "--team-key-pub", str(pub), "--team-id", TEAM,
                    "--key-id", KEY_ID, "--record", str(record)]
            if script is not None:
                (directory / "script.json").write_text(json.dumps(script))
                args += ["--script", str(directory / "script.json")]
            proc, port = apns_fake.spawn(args)
            procs.append(proc)
            section = {"providers": ["apns"], "apns": [{
                "bundle_id": BUNDLE, "team_id": TEAM, "key_id": KEY_ID, "key_file": str(p8),
                "server": f"https://{HOST}:{port}", "ca_file": str(test_certs.ca), "timeout": 5.0,
            }]}
        else:
            sa = make_service_account(PROJECT)
            pub = sa.write_public_key(directory)
            args = ["--port", "0", "--sa-pub", str(pub), "--project", PROJECT, "--record", str(record)]
            if script is not None:
                (directory / "script.json").write_text(json.dumps(script))
                args += ["--script", str(directory / "script.json")]
            proc, port = fcm_fake.spawn(args)
            procs.append(proc)
            sa_file = sa.write(directory, f"http://{HOST}:{port}/token")
            section = {"providers": ["fcm"], "fcm_threads": 2, "fcm": [{
                "project_id": PROJECT, "service_account_file": str(sa_file),
                "endpoint": f"http://{HOST}:{port}", "timeout": 5.0,
            }]}
        return Fake(provider, proc, port, record, section)

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture
def devices() -> Iterator[list[PushDevice]]:
    made: list[PushDevice] = []
    yield made
    for d in made:
        d.stop()


def token(provider: str) -> str:
    # APNs device tokens are hex; FCM registration tokens are longer opaque strings
    return uuid.uuid4().hex * 2 if provider == "apns" else f"fcm-{uuid.uuid4().hex}:APA91b{uuid.uuid4().hex}"


def server_for(start_sip_server: Callable[..., ServerProcess], fake: Fake, ring_timeout: float = 10,
               grace: int = 10, **push: Any) -> ServerProcess:
    return start_sip_server(extra={
        "auth": {"enabled": False},
        "calls": {"ring_timeout": ring_timeout, "invite_cancel_grace": grace},
        "push": {**fake.config, **push},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
        "log": JSON_LOG,
    }, tls=False)


def push_stats(server: ServerProcess) -> dict[str, Any]:
    return admin_rpc(server, "stats")["push"]


def assert_no_leaked_state(server: ServerProcess, timeout: float = 5.0) -> dict[str, Any]:
    """No call, dialog or silo entry (stored or lingering) and no call record in the waker; returns
    the push statistics."""
    wait_until(lambda: not _state_left(server), timeout, "no call state left",
               explain=lambda: f"state left: {_state_left(server)}\n{server.output()[-4000:]}")
    return push_stats(server)


def _state_left(server: ServerProcess) -> dict[str, int]:
    stats = admin_rpc(server, "stats")
    silo = admin_rpc(server, "ts.dump")
    left = {
        "calls": stats["calls"]["calls"],
        "dialogs": stats["calls"]["dialogs"],
        "silo_stored": silo["stats"]["stored_transactions"],
        "silo_lingering": silo["stats"]["lingering"],
        "push_pending_calls": stats["push"]["pending_calls"],
    }
    return {k: v for k, v in left.items() if v}


def device(server: ServerProcess, fake: Fake, made: list[PushDevice], **cfg: Any) -> PushDevice:
    cfg.setdefault("prid", token(fake.provider))
    cfg.setdefault("param", APNS_PARAM if fake.provider == "apns" else PROJECT)
    dev = PushDevice((HOST, server.sip_port), DeviceConfig(provider=fake.provider, record=fake.record, **cfg))
    made.append(dev)
    answer = dev.register()
    assert answer.status == 200, answer.first
    return dev.start()


def call(server: ServerProcess) -> Caller:
    caller = Caller((HOST, server.sip_port))
    caller.invite()
    return caller


# -- calls that complete ------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["apns", "fcm"])
def test_call_wakes_a_silent_device_and_completes(provider: str, fakes: Any, start_sip_server: Any,
                                                 devices: list[PushDevice]) -> None:
    fake = fakes(provider)
    server = server_for(start_sip_server, fake)
    dev = device(server, fake, devices)
    caller = call(server)
    final = caller.wait_final(10)
    assert final.status == 200, [r.first for r in caller.responses]
    assert 180 in [r.status for r in caller.responses]
    (push,) = dev.seen("push")
    (invite,) = dev.seen("invite")
    assert dev.when("push") < dev.when("register_sent") < dev.when("invite")  # type: ignore[operator]
    assert "pn-prid=" + dev.cfg.prid in invite["uri"]
    if provider == "apns":
        assert push["headers"]["apns-push-type"] == "voip"
        assert push["headers"]["apns-topic"] == BUNDLE + ".voip"
        fields = push["json"]
    else:
        message = push["json"]["message"]
        assert message["token"] == dev.cfg.prid and message["android"]["priority"] == "high"
        fields = message["data"]
    # the push names the INVITE the device gets (its B-leg Call-ID), not the caller's (issue 12 item 3)
    assert fields["call_id"] == invite["call_id"] != caller.call_id and fields["type"] == "call"
    assert fields["caller_uri"] in invite["from"]
    assert caller.bye().status == 200
    dev.wait("bye", 5)
    wait_until(lambda: push_stats(server)["push_to_register"]["count"] == 1, 5, "push-to-REGISTER latency measured")
    assert len(fake.records()) == 1
    stats = assert_no_leaked_state(server)
    assert stats["by_provider"][provider]["delivered"] == 1
    assert stats["push_to_register"]["count"] == 1 and stats["calls_woken"] == 1


def test_429_then_200_delivers_within_the_ring_time(fakes: Any, start_sip_server: Any,
                                                   devices: list[PushDevice]) -> None:
    tok = token("apns")
    fake = fakes("apns", {"tokens": {tok: ["429", "200"]}})
    server = server_for(start_sip_server, fake, ring_timeout=5)
    dev = device(server, fake, devices, prid=tok)
    caller = call(server)
    assert caller.wait_final(6).status == 200
    assert [r["status"] for r in fake.records()] == [429, 200]
    assert len(dev.seen("push")) == 1 and len(dev.seen("invite")) == 1
    caller.bye()
    assert assert_no_leaked_state(server)["by_provider"]["apns"]["delivered"] == 1


def test_a_device_that_registered_moments_ago_is_forked_to_without_a_push(
        fakes: Any, start_sip_server: Any, devices: list[PushDevice]) -> None:
    fake = fakes("apns")
    server = server_for(start_sip_server, fake, skip_push_if_registered_within=60)
    dev = device(server, fake, devices)
    caller = call(server)
    assert caller.wait_final(5).status == 200
    # the server decided not to push (its counter), so the fake's empty record is not a matter of timing
    assert push_stats(server)["skipped_recently_registered"] == 1
    assert fake.records() == [] and dev.seen("push") == []
    caller.bye()
    stats = assert_no_leaked_state(server)
    assert stats["skipped_recently_registered"] == 1 and stats["by_provider"] == {}


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider,script", [("apns", ["410"]), ("fcm", ["unregistered"])])
def test_dead_token_removes_the_binding_and_480_at_once(provider: str, script: list[str], fakes: Any,
                                                       start_sip_server: Any, devices: list[PushDevice]) -> None:
    tok = token(provider)
    fake = fakes(provider, {"tokens": {tok: script}} if provider == "apns" else {tok: script})
    server = server_for(start_sip_server, fake, ring_timeout=10)
    dev = device(server, fake, devices, prid=tok)
    caller = call(server)
    final = caller.wait_final(5)
    assert final.status == 480 and caller.elapsed < 3.0
    (dead,) = wait_until(lambda: log_events(server, "libon_tsilo.push.waker", token=redact(tok)), 5,
                         "the dead token to be logged", explain=lambda: server.output()[-4000:])
    assert dead["level"] == "warn" and dead["provider"] == provider and tok not in json.dumps(dead), dead
    assert dev.seen("invite") == []
    # the binding is gone: the next call pushes nobody and waits for a device until the ring timeout
    second = call(server)
    # the server has handled the INVITE once the call is parked; by then the waker would hold it had
    # it been given a device to push (it is asked synchronously, while the INVITE is handled)
    wait_until(lambda: admin_rpc(server, "ts.dump")["stats"]["stored_transactions"] == 1,
               what="the second call to be parked", explain=lambda: server.output()[-4000:])
    assert push_stats(server)["pending_calls"] == 0
    assert len(fake.records()) == 1
    second.cancel()
    assert second.wait_final(5).status == 487
    stats = assert_no_leaked_state(server)
    assert stats["dead_tokens_removed"] == 1 and stats["calls_all_failed"] == 1
    assert admin_rpc(server, "ul.dump")["binding_count"] == 0


def test_push_that_hangs_ends_with_480_at_the_ring_timeout(fakes: Any, start_sip_server: Any,
                                                          devices: list[PushDevice]) -> None:
    tok = token("apns")
    fake = fakes("apns", {"tokens": {tok: ["hang"]}})
    # the push may have reached the phone all the same: the call lingers for its Invite/Cancel
    server = server_for(start_sip_server, fake, ring_timeout=3, grace=2)
    dev = device(server, fake, devices, prid=tok)
    caller = call(server)
    final = caller.wait_final(8)
    assert final.status == 480
    assert 2.5 <= caller.elapsed <= 4.5, caller.elapsed
    assert dev.seen("push") == [] and dev.seen("invite") == []
    assert len(fake.records()) >= 1
    assert admin_rpc(server, "ts.dump")["stats"]["lingering"] == 1
    stats = assert_no_leaked_state(server, timeout=5)
    assert stats["by_provider"]["apns"]["retryable"] == 1 and stats["calls_all_failed"] == 0


def test_fcm_push_that_hangs_ends_with_480_at_the_ring_timeout(fakes: Any, start_sip_server: Any,
                                                              devices: list[PushDevice]) -> None:
    tok = token("fcm")
    fake = fakes("fcm", {tok: ["hang"]})
    server = server_for(start_sip_server, fake, ring_timeout=3)
    device(server, fake, devices, prid=tok)
    caller = call(server)
    assert caller.wait_final(8).status == 480
    assert 2.5 <= caller.elapsed <= 4.5, caller.elapsed
    assert assert_no_leaked_state(server)["by_provider"]["fcm"]["retryable"] == 1


# -- the end of a call before the iOS device came -----------------------------------------------


def test_cancelled_call_sends_invite_then_cancel_to_a_late_ios_device(
        fakes: Any, start_sip_server: Any, devices: list[PushDevice]) -> None:
    fake = fakes("apns")
    server = server_for(start_sip_server, fake)
    dev = device(server, fake, devices, react_to_push=False, answer=False)
    caller = call(server)
    dev.wait("push", 5)
    caller.cancel()
    assert caller.wait_final(5).status == 487
    dev.refresh()  # the woken app registers late
    dev.wait("invite", 5)
    (reason,) = dev.wait("cancel", 5)
    assert reason is not None and "cause=487" in reason
    assert [r["raw"]["headers"]["apns-push-type"] for r in fake.records()] == ["voip"]  # one VoIP push only
    assert assert_no_leaked_state(server)["by_kind"]["call"]["delivered"] == 1


def test_cancelled_call_with_missed_call_push(fakes: Any, start_sip_server: Any,
                                             devices: list[PushDevice]) -> None:
    fake = fakes("apns")
    server = server_for(start_sip_server, fake, cancelled_ios_call="missed_call_push")
    alert = token("apns")
    dev = device(server, fake, devices, react_to_push=False, answer=False, alert_prid=alert)
    caller = call(server)
    dev.wait("push", 5)
    caller.cancel()
    assert caller.wait_final(5).status == 487
    dev.wait("push", 5, count=2)
    kinds = [(r["raw"]["headers"]["apns-push-type"], r["raw"]["headers"]["apns-topic"]) for r in fake.records()]
    assert kinds == [("voip", BUNDLE + ".voip"), ("alert", BUNDLE)]
    # the alert goes to the app's alert token, never to the PushKit one (issue 12 item 13)
    assert [r["token"] for r in fake.records()] == [dev.cfg.prid, alert]
    assert fake.records()[1]["raw"]["json"]["type"] == "cancel"
    dev.refresh()
    dev.wait("register_ok", 5, count=2)
    # one more round trip: an INVITE the late REGISTER caused would reach the device before this answer
    dev.refresh()
    dev.wait("register_ok", 5, count=3)
    assert dev.seen("invite") == []
    stats = assert_no_leaked_state(server)
    assert stats["missed_call_pushes"] == 1 and stats["by_kind"]["cancel"]["delivered"] == 1


# -- refresh push -------------------------------------------------------------------------------


def test_refresh_push_before_a_pnsreg_binding_expires(fakes: Any, start_sip_server: Any,
                                                     devices: list[PushDevice]) -> None:
    fake = fakes("fcm")
    server = start_sip_server(extra={
        "auth": {"enabled": False},
        "registrar": {"min_expires": 60},
        "push": {**fake.config, "refresh_before_expiry": 59},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
    }, tls=False)
    dev = device(server, fake, devices, expires=61, pnsreg=True, react_to_push=False)
    (push,) = dev.wait("push", 6)
    assert push["json"]["message"]["data"]["type"] == "refresh"
    wait_until(lambda: push_stats(server)["by_kind"].get("refresh", {}).get("delivered") == 1, 5,
               "the refresh push to be counted delivered", explain=lambda: str(push_stats(server)))
    assert push_stats(server)["refresh"]["scheduled"] == 0
