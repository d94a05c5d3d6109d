"""Graceful shutdown (ops/shutdown.py and the root service's drain), on a Clock with fake calls.

The real process (SIGTERM, 480 to a parked call, 503 during the drain, exit status 0) is tested in
tests/e2e/test_ops_e2e.py.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.service import LibonTsiloService, Parts
from libon_tsilo.ops.shutdown import GracefulShutdown
from libon_tsilo.sip.message import parse_message
from tests.fakes.calls import FakeCall, FakeLocation
from tests.ops.test_rpc import build


def request(method: str) -> Any:
    return parse_message(
        (
            f"{method} sip:alice@127.0.0.1 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKsd1;rport\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:bob@127.0.0.1>;tag=1\r\nTo: <sip:alice@127.0.0.1>\r\n"
            f"Call-ID: sd1@x\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )


class FakeCalls:
    """The CallManager surface the shutdown uses: calls, shutdown_parked(code)."""

    def __init__(self) -> None:
        self.calls: dict[str, FakeCall] = {}
        self.shutdown_codes: list[int] = []
        self.shutting_down = False

    def shutdown_parked(self, code: int = 480) -> int:
        self.shutting_down = True
        self.shutdown_codes.append(code)
        parked = [k for k, c in self.calls.items() if c.state.name == "parked"]
        for k in parked:
            del self.calls[k]
        return len(parked)


class FakeRouter:
    refuse_new = None


class FakeReactor:
    def __init__(self) -> None:
        self.running = True
        self.stops = 0
        self.when_running: list[Any] = []
        self.from_thread: list[Any] = []

    def stop(self) -> None:
        self.stops += 1

    def callWhenRunning(self, f: Any, *a: Any) -> None:
        self.when_running.append((f, a))
        f(*a)

    def callFromThread(self, f: Any, *a: Any) -> None:
        self.from_thread.append(f)
        f(*a)


def tree(
    drain_timeout: int = 30, **kwargs: Any
) -> tuple[LibonTsiloService, GracefulShutdown, Clock, FakeCalls]:
    clock = Clock()
    cfg = config_from_dict({"ops": {"drain_timeout": drain_timeout}, "location": {"backend": "memory"}})
    root = LibonTsiloService(cfg, clock)
    parts: Parts = root.parts
    parts.b2bua = FakeCalls()
    parts.router = FakeRouter()
    parts.location = FakeLocation()
    svc = GracefulShutdown(root, parts, retry_after=max(1, drain_timeout), handle_sigterm=False, **kwargs)
    svc.setServiceParent(root)
    root.drainers.append(svc.drain)
    return root, svc, clock, parts.b2bua


def test_the_service_tree_has_a_graceful_shutdown(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    svc = root.parts.extra["shutdown"]
    assert isinstance(svc, GracefulShutdown)
    assert svc.drain in root.drainers
    assert svc.handle_sigterm is False  # a Clock is not a reactor: no signal handler in tests
    assert root.getServiceNamed("shutdown") is svc


def test_begin_refuses_new_invites_and_ends_parked_calls():
    root, svc, _clock, calls = tree(drain_timeout=20)
    calls.calls.update({"p1": FakeCall.in_state("p1", "parked"), "p2": FakeCall.in_state("p2", "parked"), "c1": FakeCall.in_state("c1", "connected")})
    svc.begin()
    svc.begin()  # idempotent
    assert calls.shutdown_codes == [480]
    assert svc.parked_ended == 2
    assert list(calls.calls) == ["c1"]
    assert root.draining
    refuse = root.parts.router.refuse_new
    answer = refuse(request("INVITE"))
    assert answer.status == 503 and answer.reason == "Service Unavailable"
    assert answer.header("Retry-After") == "20"
    assert answer.to.tag  # a final response of ours carries a To tag
    assert refuse(request("REGISTER")) is None  # registrations still served while draining


def test_drain_fires_when_the_last_call_ends():
    root, svc, clock, calls = tree()
    calls.calls["c1"] = FakeCall.in_state("c1", "connected")
    d = svc.drain()
    fired: list[Any] = []
    d.addCallback(fired.append)
    clock.advance(1)
    assert not fired
    del calls.calls["c1"]
    clock.advance(0.25)
    assert fired == ["calls ended"]
    assert not clock.getDelayedCalls()  # polling stopped


def test_drain_without_calls_is_immediate():
    _root, svc, _clock, _calls = tree()
    fired: list[Any] = []
    svc.drain().addCallback(fired.append)
    assert fired == ["no calls"]


def test_root_stop_drains_then_flushes_then_stops_children():
    root, svc, clock, calls = tree(drain_timeout=10)
    root.startService()
    calls.calls["c1"] = FakeCall.in_state("c1", "connected")
    stopped: list[Any] = []
    root.stopService().addCallback(stopped.append)
    assert svc.running  # children keep running (ports open) while calls drain
    assert root.parts.location.flushes == 0
    clock.advance(3)
    del calls.calls["c1"]
    clock.advance(0.25)
    assert len(stopped) == 1
    assert root.parts.location.flushes == 1
    assert not svc.running
    assert not clock.getDelayedCalls()


def test_root_stop_gives_up_after_drain_timeout():
    root, svc, clock, calls = tree(drain_timeout=5)
    root.startService()
    calls.calls["c1"] = FakeCall.in_state("c1", "connected")
    stopped: list[Any] = []
    root.stopService().addCallback(stopped.append)
    clock.advance(4.9)
    assert not stopped
    clock.advance(0.2)
    assert len(stopped) == 1
    assert root.parts.location.flushes == 1
    assert not clock.getDelayedCalls()  # the drain's polling was cancelled


def test_second_sigterm_stops_waiting():
    reactor = FakeReactor()
    root, svc, clock, calls = tree(drain_timeout=60, reactor=reactor)
    root.startService()
    calls.calls["c1"] = FakeCall.in_state("c1", "connected")
    svc.sigterm()
    assert reactor.stops == 1
    stopped: list[Any] = []
    root.stopService().addCallback(stopped.append)  # what reactor.stop() triggers in real life
    clock.advance(1)
    assert not stopped
    svc.sigterm()
    assert reactor.stops == 1
    assert len(stopped) == 1


def test_cancelled_drain_errbacks_with_cancelled():
    _root, svc, clock, calls = tree()
    calls.calls["c1"] = FakeCall.in_state("c1", "connected")
    d = svc.drain()
    d.cancel()
    with pytest.raises(CancelledError):
        d.result.raiseException()  # type: ignore[attr-defined]
    d.addErrback(lambda f: None)
    assert not clock.getDelayedCalls()


def test_sigterm_handler_installed_while_running_and_restored():
    reactor = FakeReactor()
    before = signal.getsignal(signal.SIGTERM)
    root, svc, _clock, _calls = tree(reactor=reactor)
    svc.handle_sigterm = True
    root.startService()
    try:
        assert signal.getsignal(signal.SIGTERM) == svc._on_sigterm
        svc._on_sigterm(signal.SIGTERM, None)  # what the signal does: work handed to the reactor
        assert reactor.from_thread and reactor.stops == 1
    finally:
        root.stopService()
    assert signal.getsignal(signal.SIGTERM) == before
