"""PushWaker: the RFC 8599 wake-up flow, alone and under the real call layer (fake SIP port)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from libon_tsilo.b2bua.forking import REASON_ANSWERED
from libon_tsilo.push.base import CONFIG_ERROR, DEAD_TOKEN, DELIVERED, RETRYABLE, PushRequest, PushResult
from libon_tsilo.push.payload import voip_payload
from libon_tsilo.push.router import PushRouter
from libon_tsilo.latency import LatencyWindow
from libon_tsilo.push.waker import INVITE_CANCEL, MISSED_CALL_PUSH, PushWaker
from libon_tsilo.registrar.binding import Binding
from tests.b2bua.helpers import SDP_B, Env

AOR = "sip:bob@example.com"
APNS_PARAM = "TEAM123456.com.example.app.voip"


@dataclass
class FakeSender:
    """An IPushSender whose answers the test scripts: a PushResult now, or a Deferred fired later."""

    provider: str
    bundle_id: str = "com.example.app"
    project_id: str = "proj-1"
    script: list[Any] = field(default_factory=list)  # PushResult | "hold" | Exception
    sent: list[PushRequest] = field(default_factory=list)
    held: list[Deferred[PushResult]] = field(default_factory=list)
    closed: bool = False

    def send(self, req: PushRequest) -> Deferred[PushResult]:
        self.sent.append(req)
        step = self.script.pop(0) if self.script else PushResult(DELIVERED, "ok", 200)
        if isinstance(step, Exception):
            raise step
        if step == "hold":
            d: Deferred[PushResult] = Deferred()
            self.held.append(d)
            return d
        return succeed(step)

    def close(self) -> None:
        self.closed = True


def dev(n: int, provider: str | None = "apns", registered_at: float = 0.0, flow_live: bool = False,
        flow_id: str | None = None, prid: str | None = None, expires_at: float = 100_000.0,
        alert: str | None = None) -> Binding:
    param = APNS_PARAM if provider == "apns" else ("proj-1" if provider == "fcm" else None)
    return Binding(
        aor=AOR,
        contact_uri=f"sip:bob@10.0.0.{n + 1}:5080;transport=tcp" + (f";pn-alert-prid={alert}" if alert else ""),
        contact=f"<sip:bob@10.0.0.{n + 1}:5080;transport=tcp>",
        expires_at=expires_at,
        registered_at=registered_at,
        call_id=f"reg-{n}",
        cseq=1,
        instance=f"<urn:uuid:dev-{n}>",
        flow_id=flow_id if flow_id is not None else f"tcp:dev{n}#1",
        flow_live=flow_live,
        received=("tcp", f"10.0.0.{n + 1}", 5080),
        pn_provider=provider,
        pn_prid=prid or (f"device-token-{n}-0123456789abcdef" if provider else None),
        pn_param=param,
    )


def call_info(call_id: str = "c1", deadline: float = 30.0) -> SimpleNamespace:
    return SimpleNamespace(call_id=call_id, aor=AOR, caller_uri="sip:alice@example.com",
                           caller_name="Alice", ring_deadline=deadline)


class Removals:
    def __init__(self) -> None:
        self.removed: list[tuple[Binding, str]] = []

    def __call__(self, binding: Binding, reason: str) -> bool:
        self.removed.append((binding, reason))
        return True


def make(clock: Clock | None = None, senders: list[Any] | None = None, **kw: Any) -> tuple[PushWaker, Removals]:
    removals = Removals()
    waker = PushWaker(clock or Clock(), PushRouter(senders or []), remove_binding=removals, **kw)
    return waker, removals


def fired(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- wake() alone ---------------------------------------------------------------------------------


def test_wake_pushes_each_device_with_the_ring_deadline_as_ttl() -> None:
    clock = Clock()
    clock.advance(100)
    a, f = FakeSender("apns"), FakeSender("fcm")
    waker, _ = make(clock, [a, f])
    res = fired(waker.wake(call_info(deadline=130.0), [dev(1), dev(2, "fcm")]))
    assert (res.woken, res.all_failed) == (2, False)
    (ra,), (rf,) = a.sent, f.sent
    assert ra.kind == rf.kind == "call"
    assert ra.ttl == rf.ttl == 30.0
    assert (ra.prid, ra.param, ra.call_id, ra.caller_name, ra.aor) == (
        "device-token-1-0123456789abcdef", APNS_PARAM, "c1", "Alice", AOR)
    assert rf.param == "proj-1"
    st = waker.stats()
    assert st["by_provider"]["apns"][DELIVERED] == 1 and st["by_provider"]["fcm"][DELIVERED] == 1
    assert st["by_kind"]["call"][DELIVERED] == 2 and st["calls_woken"] == 1


def test_dead_token_removes_the_binding_redacted_and_every_push_failed(logged: list[dict[str, Any]]) -> None:
    a = FakeSender("apns", script=[PushResult(DEAD_TOKEN, "Unregistered", 410)])
    waker, removals = make(senders=[a])
    b = dev(1)
    res = fired(waker.wake(call_info(), [b]))
    assert res.all_failed and res.woken == 0 and "Unregistered" in res.reason
    assert removals.removed == [(b, "push: Unregistered")]
    st = waker.stats()
    assert st["dead_tokens"] == 1 and st["dead_tokens_removed"] == 1 and st["calls_all_failed"] == 1
    text = " ".join(str(e) for e in logged)
    assert "device-token-1-0123456789abcdef" not in text
    assert any("dead push token" in str(e.get("log_format")) for e in logged)


def test_config_error_without_a_sender_is_permanent_and_logged_once(logged: list[dict[str, Any]]) -> None:
    waker, _ = make(senders=[FakeSender("apns", bundle_id="com.other")])
    for n in range(3):
        res = fired(waker.wake(call_info(f"c{n}"), [dev(1)]))
        assert res.all_failed
    crit = [e for e in logged if e.get("log_level") is not None and e["log_level"].name == "critical"]
    assert len(crit) == 1
    assert waker.stats()["by_provider"]["apns"][CONFIG_ERROR] == 3


def test_one_delivered_push_is_enough_to_wait() -> None:
    a = FakeSender("apns", script=[PushResult(DEAD_TOKEN, "BadDeviceToken", 400), PushResult(DELIVERED, "ok")])
    waker, removals = make(senders=[a])
    res = fired(waker.wake(call_info(), [dev(1), dev(2)]))
    assert (res.woken, res.all_failed) == (1, False)
    assert len(removals.removed) == 1


def test_pushes_that_failed_after_their_retries_woke_nobody() -> None:
    """A sender returns "retryable" only once its retries are over: nothing is in flight or planned."""
    a = FakeSender("apns", script=[PushResult(RETRYABLE, "HTTP 500", 500), PushResult(RETRYABLE, "timeout")])
    waker, removals = make(senders=[a])
    res = fired(waker.wake(call_info(), [dev(1), dev(2)]))
    assert (res.woken, res.all_failed) == (0, True) and removals.removed == []
    assert waker.stats()["calls_all_failed"] == 1


def test_a_sender_that_raises_is_a_failed_push() -> None:
    a = FakeSender("apns", script=[RuntimeError("bug")])
    waker, _ = make(senders=[a])
    res = fired(waker.wake(call_info(), [dev(1)]))
    assert (res.woken, res.all_failed) == (0, True)


def test_wake_fires_only_when_every_push_settled() -> None:
    a = FakeSender("apns", script=["hold", "hold"])
    waker, _ = make(senders=[a])
    d = waker.wake(call_info(), [dev(1), dev(2)])
    assert not d.called
    a.held[0].callback(PushResult(DELIVERED, "ok"))
    assert not d.called
    a.held[1].callback(PushResult(CONFIG_ERROR, "BadTopic"))
    assert fired(d).woken == 1


def test_one_voip_push_per_device_per_call() -> None:
    a = FakeSender("apns")
    waker, _ = make(senders=[a])
    fired(waker.wake(call_info(), [dev(1)]))
    res = fired(waker.wake(call_info(), [dev(1)]))
    assert len(a.sent) == 1 and res.woken == 0 and not res.all_failed
    assert waker.stats()["duplicates_suppressed"] == 1
    fired(waker.wake(call_info("c2"), [dev(1)]))  # another call: a new push
    assert len(a.sent) == 2
    same_token = dev(7, prid=dev(1).pn_prid)  # another contact of the same app install
    res = fired(waker.wake(call_info("c3"), [dev(1), same_token]))
    assert len(a.sent) == 3 and res.woken == 1


def test_no_push_once_the_ring_time_is_over() -> None:
    clock = Clock()
    clock.advance(50)
    a = FakeSender("apns")
    waker, _ = make(clock, [a])
    res = fired(waker.wake(call_info(deadline=40.0), [dev(1)]))
    assert a.sent == [] and (res.woken, res.all_failed) == (0, True)  # nothing will come


def test_fork_directly_only_for_devices_that_registered_recently() -> None:
    clock = Clock()
    clock.advance(1000)
    waker, _ = make(clock, skip_push_if_registered_within=30)
    assert waker.fork_directly(dev(1, registered_at=975.0))
    assert not waker.fork_directly(dev(1, registered_at=900.0))
    off, _ = make(clock)
    assert not off.fork_directly(dev(1, registered_at=1000.0))


def test_push_to_register_latency_is_recorded_once_in_push_stats() -> None:
    clock = Clock()
    a = FakeSender("apns")
    waker, _ = make(clock, [a])
    fired(waker.wake(call_info(deadline=30.0), [dev(1)]))
    clock.advance(1.5)
    waker.binding_refreshed(dev(1, flow_id="tcp:dev1#2"), None)
    ps = waker.push_stats
    assert ps.by_provider["apns"][DELIVERED] == 1 and ps.latency["apns"].count == 1
    assert (ps.push_to_register.count, ps.push_to_register.sum) == (1, 1.5)
    st = waker.stats()
    assert st["push_to_register"]["count"] == 1 and st["push_to_register"]["mean"] == 1.5
    waker.binding_refreshed(dev(1), None)  # a later REGISTER is not another sample
    assert waker.stats()["push_to_register"]["count"] == 1


def test_push_to_register_when_the_device_beats_the_providers_answer() -> None:
    clock = Clock()
    a = FakeSender("apns", script=["hold"])
    waker, _ = make(clock, [a])
    d = waker.wake(call_info(), [dev(1)])
    clock.advance(0.7)
    waker.binding_refreshed(dev(1), None)
    clock.advance(0.3)
    a.held[0].callback(PushResult(DELIVERED, "ok"))
    assert fired(d).woken == 1
    st = waker.stats()
    assert st["push_to_register"]["count"] == 1 and st["push_to_register"]["max"] == 0.7
    assert st["awaiting_register"] == 0


def test_push_to_register_matches_the_token_when_the_identity_changed() -> None:
    clock = Clock()
    waker, _ = make(clock, [FakeSender("apns")])
    fired(waker.wake(call_info(), [dev(1)]))
    clock.advance(2)
    reinstalled = dev(1)
    reinstalled.key = "instance:<urn:uuid:new>"
    waker.binding_added(reinstalled, None)
    assert waker.stats()["push_to_register"]["count"] == 1
    assert waker.stats()["awaiting_register"] == 0


def test_delivered_pushes_without_register_are_forgotten() -> None:
    clock = Clock()
    waker, _ = make(clock, [FakeSender("apns")], register_wait=60)
    fired(waker.wake(call_info(), [dev(1)]))
    waker.call_ended(call_info(), False)
    assert waker.stats()["awaiting_register"] == 1
    clock.advance(61)
    waker.binding_refreshed(dev(2), None)
    st = waker.stats()
    assert st["awaiting_register"] == 0 and st["pushes_without_register"] == 1 and st["pending_calls"] == 0


def test_latency_window_summary() -> None:
    w = LatencyWindow(size=4)
    assert w.summary()["count"] == 0
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        w.add(v)
    s = w.summary()
    # the window holds 2..5; nearest rank, as the silo's register_to_invite (one LatencyWindow)
    assert s["count"] == 5 and s["samples"] == 4 and s["max"] == 5.0 and s["p50"] == 3.0 and s["mean"] == 3.0


# -- the end of a call ----------------------------------------------------------------------------


def test_invite_cancel_mode_leaves_ios_devices_to_the_call_layer() -> None:
    a = FakeSender("apns")
    waker, _ = make(senders=[a], cancelled_ios_call=INVITE_CANCEL)
    assert waker.invite_cancel_wanted(dev(1)) and not waker.invite_cancel_wanted(dev(2, "fcm"))
    fired(waker.wake(call_info(), [dev(1)]))
    waker.call_ended(call_info(), answered_elsewhere=True)
    assert [r.kind for r in a.sent] == ["call"]
    assert waker.stats()["pending_calls"] == 0


def test_missed_call_push_for_ios_devices_that_did_not_register() -> None:
    a, f = FakeSender("apns"), FakeSender("fcm")
    waker, _ = make(senders=[a, f], cancelled_ios_call=MISSED_CALL_PUSH)
    assert not waker.invite_cancel_wanted(dev(1))
    fired(waker.wake(call_info(), [dev(1, alert="alert-1"), dev(2, alert="alert-2"), dev(3, "fcm")]))
    waker.binding_refreshed(dev(2), None)  # this one came: it got its INVITE
    waker.call_ended(call_info(), answered_elsewhere=False)
    # the alert goes to the app's alert token: APNs refuses alerts to a PushKit token
    assert [(r.kind, r.prid) for r in a.sent] == [
        ("call", dev(1).pn_prid), ("call", dev(2).pn_prid), ("cancel", "alert-1")]
    assert a.sent[-1].call_id == "c1" and a.sent[-1].caller_name == "Alice"
    assert [r.kind for r in f.sent] == ["call"]
    assert waker.stats()["missed_call_pushes"] == 1 and waker.stats()["pending_calls"] == 0
    waker.call_ended(call_info(), answered_elsewhere=False)  # once only
    assert len(a.sent) == 3


def test_missed_call_push_waits_for_a_push_still_in_flight() -> None:
    a = FakeSender("apns", script=["hold", "hold"])
    waker, _ = make(senders=[a], cancelled_ios_call=MISSED_CALL_PUSH)
    waker.wake(call_info(), [dev(1, alert="alert-1"), dev(2, alert="alert-2")])
    waker.call_ended(call_info(), answered_elsewhere=True)
    assert waker.stats()["pending_calls"] == 1
    a.held[0].callback(PushResult(DELIVERED, "ok"))
    a.held[1].callback(PushResult(RETRYABLE, "timeout"))  # never reached the device: no alert
    assert [r.kind for r in a.sent] == ["call", "call", "cancel"]
    assert a.sent[-1].prid == "alert-1"
    assert waker.stats()["pending_calls"] == 0


def test_no_missed_call_push_without_an_alert_token(logged: list[dict[str, Any]]) -> None:
    """Issue 12 item 13: an alert to the PushKit token is refused by APNs (DeviceTokenNotForTopic)."""
    a = FakeSender("apns")
    waker, _ = make(senders=[a], cancelled_ios_call=MISSED_CALL_PUSH)
    fired(waker.wake(call_info(), [dev(1)]))
    waker.call_ended(call_info(), answered_elsewhere=False)
    assert [r.kind for r in a.sent] == ["call"]
    stats = waker.stats()
    assert (stats["missed_call_pushes"], stats["missed_call_without_alert_token"]) == (0, 1)
    assert any(e.get("param") == "pn-alert-prid" for e in logged)


def test_a_dead_alert_token_keeps_the_voip_binding() -> None:
    a = FakeSender("apns", script=[PushResult(DELIVERED, "ok"), PushResult(DEAD_TOKEN, "BadDeviceToken", 400)])
    waker, removals = make(senders=[a], cancelled_ios_call=MISSED_CALL_PUSH)
    fired(waker.wake(call_info(), [dev(1, alert="alert-1")]))
    waker.call_ended(call_info(), answered_elsewhere=False)
    assert [r.prid for r in a.sent] == [dev(1).pn_prid, "alert-1"]
    assert removals.removed == []


def test_stop_closes_senders_and_refuses_new_work() -> None:
    clock = Clock()
    a = FakeSender("apns")
    waker, _ = make(clock, [a], refresh_before_expiry=120)
    waker.binding_added(_pnsreg(dev(1, expires_at=3600.0)), None)
    assert clock.getDelayedCalls()
    fired(waker.stop())
    assert a.closed and clock.getDelayedCalls() == []
    assert fired(waker.wake(call_info(), [dev(1)])).woken == 0 and len(a.sent) == 0


def test_replace_senders_closes_the_old_ones_later() -> None:
    clock = Clock()
    old, new = FakeSender("apns"), FakeSender("apns")
    waker, _ = make(clock, [old], close_grace=10)
    waker.replace_senders([new])
    fired(waker.wake(call_info(), [dev(1)]))
    assert new.sent and not old.sent and not old.closed
    clock.advance(10)
    assert old.closed and not new.closed


def _pnsreg(b: Binding) -> Binding:
    b.pnsreg = True
    return b


# -- under the call layer -------------------------------------------------------------------------


class Setup:
    """The real CallManager + Silo with a fake SIP port, and a PushWaker with fake senders."""

    def __init__(self, script: list[Any] | None = None, **kw: Any) -> None:
        self.apns = FakeSender("apns", script=list(script or []))
        self.fcm = FakeSender("fcm")
        self.removed: list[tuple[Binding, str]] = []
        self.env: Env | None = None
        settings = {k: kw.pop(k) for k in ("invite_cancel_grace", "ring_timeout") if k in kw}
        # Env builds the clock; the waker needs the same one
        env = Env(waker=SimpleNamespace(), **settings)
        self.waker = PushWaker(env.clock, PushRouter([self.apns, self.fcm]), remove_binding=self.remove, **kw)
        env.mgr.waker = self.waker
        self.env = env

    def remove(self, b: Binding, reason: str) -> bool:
        assert self.env is not None
        self.removed.append((b, reason))
        self.env.location.bindings[b.aor] = [x for x in self.env.location.bindings[b.aor] if x.key != b.key]
        self.waker.binding_removed(b, reason)
        return True

    def register(self, b: Binding, refreshed: bool = True) -> None:
        assert self.env is not None
        self.env.register(b, refreshed=refreshed)
        (self.waker.binding_refreshed if refreshed else self.waker.binding_added)(b, None)


def test_call_pushes_a_sleeping_device_and_forks_when_it_registers() -> None:
    s = Setup()
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    _, stx = env.invite()
    call = env.call()
    assert call.state.name == "parked" and env.port.invites() == []
    (req,) = s.apns.sent
    assert req.kind == "call" and req.ttl == 30.0 and req.call_id == call.call_id
    env.clock.advance(1.2)
    s.register(dev(1, flow_id="tcp:dev1#2", registered_at=env.clock.seconds(), flow_live=True))
    (ctx,) = env.port.invites()
    assert ctx.hop.flow_id == "tcp:dev1#2"
    ctx.respond(200, body=SDP_B)
    assert stx.statuses == [200]
    assert s.waker.stats()["push_to_register"]["count"] == 1
    assert s.waker.stats()["pending_calls"] == 0


def test_push_names_the_call_id_and_caller_of_the_invite_the_device_will_get() -> None:
    """Issue 12 item 3: CallKit / Android report the call from the push, then match the INVITE."""
    s = Setup()
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    env.invite()
    call = env.call()
    (req,) = s.apns.sent
    payload = voip_payload(req, env.clock.seconds())
    assert payload["call_id"] == req.device_call_id and payload["call_id"] != call.call_id
    assert req.call_id == call.call_id  # our logs still name the call by the caller's Call-ID
    s.register(dev(1, flow_id="tcp:dev1#2", flow_live=True))
    (ctx,) = env.port.invites()
    sent = ctx.request
    assert sent.call_id == payload["call_id"]
    assert (payload["caller_uri"], payload["caller_name"]) == (str(sent.from_.uri), sent.from_.display)
    # the device reconnects while ringing: its new branch keeps the Call-ID the push named
    s.register(dev(1, flow_id="tcp:dev1#3", flow_live=True))
    old, new = env.port.invites()
    assert old.cancelled and new.request.call_id == payload["call_id"]
    assert new.request.from_.tag != old.request.from_.tag
    new.respond(200, body=SDP_B)
    old.respond(487)
    assert env.mgr.dialogs.get((payload["call_id"], new.request.from_.tag)) is not None


def test_live_flow_forks_directly_only_within_the_skip_window() -> None:
    s = Setup(skip_push_if_registered_within=60)
    env = s.env
    assert env is not None
    now = env.clock.seconds()
    env.location.add(dev(1, flow_live=True, registered_at=now - 10))  # awake: fork now
    env.location.add(dev(2, flow_live=True, registered_at=now - 600))  # live flow but old: push
    env.location.add(dev(3, provider=None, flow_live=True))  # no pn params: fork now
    env.invite()
    assert sorted(c.request.raw_uri for c in env.port.invites()) == [
        "sip:bob@10.0.0.2:5080;transport=tcp", "sip:bob@10.0.0.4:5080;transport=tcp"]
    assert [r.prid for r in s.apns.sent] == [dev(2).pn_prid]
    assert s.waker.stats()["skipped_recently_registered"] == 1


def test_dead_token_gives_480_at_once_and_removes_the_binding() -> None:
    s = Setup(script=[PushResult(DEAD_TOKEN, "Unregistered", 410)], invite_cancel_grace=20.0)
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    _, stx = env.invite()
    assert stx.statuses == [480]
    assert env.silo.stats()["lingering"] == 0  # a dead token wakes nobody: no Invite/Cancel wait
    assert [r for _, r in s.removed] == ["push: Unregistered"]
    assert env.location.lookup(AOR) == []
    env.assert_clean()
    assert s.waker.stats()["pending_calls"] == 0


@pytest.mark.parametrize("reason,status", [("HTTP 500", 500), ("connection refused", None)])
def test_every_push_failed_after_retries_gives_480_at_once(reason: str, status: int | None) -> None:
    """Issue 12 item 6: no branch, no push in flight, no retry planned: the caller does not wait."""
    s = Setup(script=[PushResult(RETRYABLE, reason, status)], invite_cancel_grace=20.0)
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    _, stx = env.invite()
    assert stx.statuses == [480]
    assert env.silo.stats()["lingering"] == 0  # the push never reached the device: no Invite/Cancel
    assert env.location.lookup(AOR) != []  # not a dead token: the binding stays
    env.assert_clean()
    assert s.waker.stats()["pending_calls"] == 0


def test_failed_push_with_a_delivered_one_keeps_waiting() -> None:
    s = Setup(script=[PushResult(RETRYABLE, "HTTP 500", 500), PushResult(DELIVERED, "ok", 200)], ring_timeout=5)
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    env.location.add(dev(2))
    _, stx = env.invite()
    assert stx.statuses == []
    env.clock.advance(5)
    assert stx.statuses == [480]
    env.clock.advance(30)  # [calls] invite_cancel_grace: the iOS device whose push was delivered
    env.assert_clean()


def test_dead_token_with_another_branch_ringing_keeps_the_call() -> None:
    s = Setup(script=[PushResult(DEAD_TOKEN, "Unregistered", 410)])
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    env.location.add(dev(2, provider=None, flow_live=True))
    _, stx = env.invite()
    assert stx.statuses == []
    env.port.invites()[0].respond(486)
    assert stx.statuses == [486]
    env.assert_clean()


def test_push_timeout_ends_at_the_ring_timeout_with_480() -> None:
    s = Setup(script=["hold"], ring_timeout=3)
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    _, stx = env.invite()
    env.clock.advance(2.9)
    assert stx.statuses == []
    env.clock.advance(0.1)
    assert stx.statuses == [480]
    s.apns.held[0].callback(PushResult(RETRYABLE, "timeout"))  # the sender gives up at its ttl
    env.clock.advance(30)  # [calls] invite_cancel_grace: the push was in flight when the call ended
    env.assert_clean()
    assert s.waker.stats()["pending_calls"] == 0
    assert s.waker.stats()["calls_all_failed"] == 0  # the ring timeout ended it, not the failure


def test_invite_cancel_for_a_cancelled_call_and_a_late_ios_device() -> None:
    s = Setup(invite_cancel_grace=20.0)
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    env.location.add(dev(2, "fcm"))
    req, stx = env.invite()
    env.mgr.handle_cancel(req, None, env.caller_flow)
    assert stx.statuses == [487]
    assert env.silo.stats()["lingering"] == 1
    s.register(dev(2, "fcm", flow_id="tcp:dev2#2", flow_live=True))  # Android: nothing to end
    assert env.port.invites() == []
    s.register(dev(1, flow_id="tcp:dev1#2", flow_live=True))
    (late,) = env.port.invites()
    assert late.cancelled and late.reason is not None and "cause=487" in late.reason
    # the INVITE and its CANCEL (same Call-ID, RFC 3261 §9.1) are the ones the push announced
    assert late.request.call_id == s.apns.sent[0].device_call_id != req.call_id
    assert env.silo.stats()["lingering"] == 0
    assert [r.kind for r in s.apns.sent] == ["call"]
    late.respond(487)
    env.assert_clean()


def test_invite_cancel_reason_when_answered_elsewhere() -> None:
    s = Setup(invite_cancel_grace=20.0)
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    env.location.add(dev(3, provider=None, flow_live=True))
    _, stx = env.invite()
    env.port.invites()[0].respond(200, body=SDP_B)
    assert stx.statuses == [200]
    s.register(dev(1, flow_id="tcp:dev1#2", flow_live=True))
    late = env.port.invites()[-1]
    assert late.cancelled and late.reason == REASON_ANSWERED


def test_missed_call_push_mode_sends_an_alert_instead_of_invite_cancel() -> None:
    s = Setup(invite_cancel_grace=20.0, cancelled_ios_call=MISSED_CALL_PUSH)
    env = s.env
    assert env is not None
    env.location.add(dev(1, alert="alert-1"))
    req, stx = env.invite()
    env.mgr.handle_cancel(req, None, env.caller_flow)
    assert stx.statuses == [487]
    assert env.silo.stats()["lingering"] == 0
    assert [r.kind for r in s.apns.sent] == ["call", "cancel"]
    call_push, alert = s.apns.sent
    assert alert.device_call_id == call_push.device_call_id is not None
    assert (call_push.prid, alert.prid) == (dev(1).pn_prid, "alert-1")
    s.register(dev(1, flow_id="tcp:dev1#2", flow_live=True))
    assert env.port.invites() == []
    env.assert_clean()


# -- wiring (ops/service.py _add_push) ------------------------------------------------------------


def _push_config(tmp_path: Any, **push: Any) -> Any:
    from libon_tsilo.ops.config import config_from_dict
    from tests.fakes.keys import make_team_key
    from tests.fakes.sa_keys import make_service_account

    p8, _ = make_team_key().write(tmp_path)
    sa = make_service_account("proj-1").write(tmp_path, "http://127.0.0.1:9/token")
    section = {
        "providers": ["apns", "fcm", "relay"],
        "apns": [{"bundle_id": "com.example.app", "team_id": "TEAM123456", "key_id": "KEY1234567",
                  "key_file": str(p8), "server": "https://127.0.0.1:9"}],
        "fcm": [{"project_id": "proj-1", "service_account_file": str(sa), "endpoint": "http://127.0.0.1:9"}],
        "webhook": [{"name": "relay", "url": "http://127.0.0.1:9/push"}],
        "skip_push_if_registered_within": 20,
        "refresh_before_expiry": 120,
        **push,
    }
    # tmp_path: the users' SQLite file goes there, not into the checkout
    return config_from_dict({"sip": {"listen": ["udp:127.0.0.1:0"]}, "location": {"backend": "memory"},
                             "push": section}, tmp_path)


def test_wiring_builds_the_waker_from_the_config(tmp_path: Any) -> None:
    from libon_tsilo.ops.service import make_service

    svc = make_service(_push_config(tmp_path), clock=Clock())
    parts = svc.parts
    waker = parts.waker
    assert isinstance(waker, PushWaker) and parts.extra["push"] is waker
    assert parts.b2bua.waker is waker
    assert waker.router.providers == ["apns", "fcm", "relay"]
    assert waker.skip_within == 20 and waker.refresher is not None
    assert waker.remove_binding == parts.registrar.remove
    assert waker in parts.location._observers
    assert callable(parts.extra["reload_push"])
    old = waker.router.senders
    assert parts.extra["reload_push"]() is True  # built-in config (no file): same credentials, new senders
    assert all(s not in old for s in waker.router.senders)
    assert "stats" in dir(waker) and waker.stats()["providers"] == ["apns", "fcm", "relay"]
    fcm_pool = svc.getServiceNamed("push-fcm-threads").pool
    assert fcm_pool.max == 4


def test_wiring_logs_bad_credentials_once_and_keeps_the_rest(tmp_path: Any, logged: list[dict[str, Any]]) -> None:
    from libon_tsilo.ops.service import make_service

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    cfg = _push_config(tmp_path)
    import dataclasses

    cfg = dataclasses.replace(cfg, push=dataclasses.replace(
        cfg.push, fcm=(dataclasses.replace(cfg.push.fcm[0], service_account_file=str(bad)),)))
    svc = make_service(cfg, clock=Clock())
    assert svc.parts.waker.router.providers == ["apns", "relay"]
    crit = [e for e in logged if e.get("log_level") is not None and e["log_level"].name == "critical"]
    assert len(crit) == 1 and "push.fcm[0]" in str(crit[0].get("what"))


def test_wiring_without_providers_leaves_the_logging_waker(tmp_path: Any) -> None:
    from libon_tsilo.b2bua.waker import LoggingWaker
    from libon_tsilo.ops.service import make_service

    svc = make_service(_push_config(tmp_path, providers=[]), clock=Clock())
    assert svc.parts.waker is None and "push" not in svc.parts.extra
    assert isinstance(svc.parts.b2bua.waker, LoggingWaker)


def test_reload_push_takes_the_new_credentials(tmp_path: Any) -> None:
    import dataclasses

    from libon_tsilo.ops.service import make_service

    cfg = _push_config(tmp_path)
    clock = Clock()
    svc = make_service(cfg, clock=clock)
    waker = svc.parts.waker
    old = waker.router.senders
    only_relay = dataclasses.replace(cfg, push=dataclasses.replace(cfg.push, providers=("relay",)))
    assert svc.parts.extra["reload_push"](only_relay) is True
    assert waker.router.providers == ["relay"]
    nothing = dataclasses.replace(cfg, push=dataclasses.replace(cfg.push, providers=()))
    assert svc.parts.extra["reload_push"](nothing) is False  # keeps the running senders
    assert waker.router.providers == ["relay"]
    clock.advance(cfg.calls.ring_timeout + 5)  # the replaced senders are closed after a grace period
    assert waker._close_timers == [] or not any(t.active() for t in waker._close_timers)
    assert all(s not in waker.router.senders for s in old)


# -- pushes per device per minute ([limits] pushes_per_device_per_minute) --------------------------


def test_call_pushes_per_device_are_limited_per_minute(logged: list[dict[str, Any]]) -> None:
    clock = Clock()
    a = FakeSender("apns")
    waker, _ = make(clock, [a], pushes_per_device_per_minute=3)
    results = []
    for n in range(5):
        results.append(fired(waker.wake(call_info(f"c{n}", deadline=clock.seconds() + 30), [dev(1), dev(2)])))
        clock.advance(1)
    # device 1 and device 2 (another token) each got 3 pushes; the 4th and 5th calls pushed nobody
    assert [r.prid for r in a.sent].count(dev(1).pn_prid) == 3
    assert [r.prid for r in a.sent].count(dev(2).pn_prid) == 3
    assert [(r.woken, r.all_failed) for r in results] == [(2, False)] * 3 + [(0, True)] * 2
    assert results[-1].reason == "push rate limit per device"
    assert waker.stats()["rate_limited"] == 4 and waker.limit_hits() == {"push_per_device": 4}
    lines = [e for e in logged if "call pushes within a minute" in str(e.get("log_format"))]
    assert len(lines) == 1  # throttled: one line for the four skips within 10 s
    assert dev(1).pn_prid not in " ".join(str(e) for e in logged)  # the token is redacted
    clock.advance(57)  # the first push is a minute old now: one more is allowed
    res = fired(waker.wake(call_info("late", deadline=clock.seconds() + 30), [dev(1)]))
    assert (res.woken, res.all_failed) == (1, False)


def test_no_device_limit_by_default() -> None:
    a = FakeSender("apns")
    waker, _ = make(senders=[a])
    for n in range(30):
        fired(waker.wake(call_info(f"c{n}"), [dev(1)]))
    assert len(a.sent) == 30


def test_a_call_whose_pushes_are_all_limited_gets_480_at_once_and_leaves_nothing() -> None:
    s = Setup(pushes_per_device_per_minute=2)
    env = s.env
    assert env is not None
    env.location.add(dev(1))
    statuses = []
    for n in range(3):
        _, stx = env.invite(call_id=f"spam-{n}")
        if n < 2:  # INVITE + CANCEL, as the spammer does
            env.call(f"spam-{n}").caller_cancel(None)
        statuses.append(stx.statuses)
    assert len(s.apns.sent) == 2
    assert statuses[:2] == [[487], [487]] and statuses[2] == [480]
    env.clock.advance(60)
    env.assert_clean()
    assert s.waker.stats()["pending_calls"] == 0
