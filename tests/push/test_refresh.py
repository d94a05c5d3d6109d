"""Refresh pushes before a +sip.pnsreg binding expires (RefreshScheduler, through the PushWaker)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from libon_tsilo.push.base import DEAD_TOKEN, DELIVERED, PushRequest, PushResult
from libon_tsilo.push.refresh import RefreshScheduler
from libon_tsilo.push.router import PushRouter
from libon_tsilo.push.waker import PushWaker
from libon_tsilo.registrar.binding import Binding

AOR = "sip:carol@example.com"


def dev(n: int = 1, expires_at: float = 3600.0, pnsreg: bool = True, provider: str | None = "fcm") -> Binding:
    return Binding(
        aor=AOR, contact_uri=f"sip:carol@10.1.0.{n}:5060", contact=f"<sip:carol@10.1.0.{n}:5060>",
        expires_at=expires_at, registered_at=0.0, call_id=f"r{n}", cseq=1,
        pn_provider=provider, pn_prid=f"fcm-token-{n}-abcdefgh" if provider else None,
        pn_param="proj-1" if provider else None, pnsreg=pnsreg,
    )


class Recorder:
    def __init__(self, result: PushResult | None = None) -> None:
        self.sent: list[tuple[Binding, PushRequest]] = []
        self.result = result or PushResult(DELIVERED, "ok")

    def __call__(self, binding: Binding, req: PushRequest) -> Deferred[PushResult]:
        self.sent.append((binding, req))
        return succeed(self.result)


class Location:
    def __init__(self, bindings: list[Binding]) -> None:
        self.bindings = bindings

    def dump(self) -> dict[str, list[Binding]]:
        return {AOR: list(self.bindings)}


def test_refresh_push_before_expiry() -> None:
    clock = Clock()
    send = Recorder()
    sched = RefreshScheduler(clock, send, before=120)
    b = dev()
    sched.binding_added(b, None)
    clock.advance(3479)
    assert send.sent == []
    clock.advance(1)
    ((sent_b, req),) = send.sent
    assert sent_b is b and req.kind == "refresh" and req.ttl == 120.0
    assert (req.provider, req.prid, req.param, req.aor, req.call_id) == ("fcm", b.pn_prid, "proj-1", AOR, None)
    assert clock.getDelayedCalls() == [] and sched.stats()["sent"] == 1 and sched.stats()[DELIVERED] == 1


def test_a_register_before_the_timer_rearms_it() -> None:
    clock = Clock()
    send = Recorder()
    sched = RefreshScheduler(clock, send, before=120)
    sched.binding_added(dev(), None)
    clock.advance(3000)
    sched.binding_refreshed(dev(expires_at=6600.0), None)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(480)
    assert send.sent == []
    clock.advance(3000)
    assert len(send.sent) == 1


def test_removal_cancels_the_timer_and_only_pnsreg_bindings_get_one() -> None:
    clock = Clock()
    send = Recorder()
    sched = RefreshScheduler(clock, send, before=120)
    b = dev()
    sched.binding_added(b, None)
    sched.binding_removed(dev(), "other object")  # not the current one: timer stays
    assert sched.pending() == 1
    sched.binding_removed(b, "unregistered")
    assert sched.pending() == 0 and clock.getDelayedCalls() == []
    sched.binding_added(dev(pnsreg=False), None)
    sched.binding_added(dev(2, provider=None), None)
    sched.binding_added(dev(3, expires_at=100.0), None)  # shorter than the lead time
    assert clock.getDelayedCalls() == [] and sched.stats()["too_short"] == 1
    clock.advance(10_000)
    assert send.sent == []


def test_start_arms_restored_bindings_and_stop_cancels_everything() -> None:
    clock = Clock()
    send = Recorder()
    sched = RefreshScheduler(clock, send, before=120)
    sched.start(Location([dev(1), dev(2, expires_at=7200.0), dev(3, pnsreg=False)]))
    assert sched.pending() == 2
    sched.stop()
    assert clock.getDelayedCalls() == [] and sched.pending() == 0
    sched.binding_added(dev(4), None)
    assert clock.getDelayedCalls() == []


class FcmSender:
    provider = "fcm"
    project_id = "proj-1"

    def __init__(self, result: PushResult) -> None:
        self.result = result
        self.sent: list[PushRequest] = []

    def send(self, req: PushRequest) -> Deferred[PushResult]:
        self.sent.append(req)
        return succeed(self.result)


def test_through_the_waker_a_dead_token_removes_the_binding_and_is_counted() -> None:
    clock = Clock()
    removed: list[tuple[Any, str]] = []
    sender = FcmSender(PushResult(DEAD_TOKEN, "UNREGISTERED Requested entity was not found.", 404))
    waker = PushWaker(clock, PushRouter([sender]), remove_binding=lambda b, r: removed.append((b, r)) or True,
                      refresh_before_expiry=120)
    b = dev()
    waker.binding_added(b, None)
    clock.advance(3480)
    assert [r.kind for r in sender.sent] == ["refresh"]
    assert removed == [(b, "push: UNREGISTERED Requested entity was not found.")]
    waker.binding_removed(b, "push: UNREGISTERED")
    st = waker.stats()
    assert st["by_kind"]["refresh"][DEAD_TOKEN] == 1 and st["dead_tokens_removed"] == 1
    assert st["refresh"]["scheduled"] == 0 and st["refresh"][DEAD_TOKEN] == 1
    assert clock.getDelayedCalls() == []
