from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from libon_tsilo.registrar.binding import Binding
from libon_tsilo.silo.silo import CANNOT_APPEND, NO_RECORD, NOT_FOUND, Silo
from libon_tsilo.sip.timers import ExpiryQueue, ExpiryTimer
from libon_tsilo.latency import LatencyWindow, percentile
from tests.fakes.calls import FakeCall, FakeLocation


def FakeBinding(aor: str, contact_uri: str, registered_at: float = 0.0) -> Binding:  # noqa: N802
    """A real Binding: the silo is compiled (mypyc), and its methods check their arguments' types."""
    return Binding(aor, contact_uri, f"<{contact_uri}>", expires_at=3600.0, registered_at=registered_at,
                   call_id="reg", cseq=1)


def make(max_pending: int = 8) -> tuple[Silo, Clock, FakeLocation]:
    clock = Clock()
    loc = FakeLocation()
    return Silo(clock, loc, max_pending_per_aor=max_pending), clock, loc


def test_store_counts_and_duplicate_ignored() -> None:
    silo, _, _ = make()
    a1, a2, b1 = FakeCall("c1", "alice"), FakeCall("c2", "alice"), FakeCall("c3", "bob")
    assert silo.store(a1) and silo.store(a2) and silo.store(b1)
    assert silo.store(a1)  # ts_store semantics: a duplicate is accepted and ignored
    st = silo.stats()
    assert (st["stored_ruris"], st["stored_transactions"]) == (2, 3)
    assert (st["total_ruris"], st["total_transactions"]) == (2, 3)
    silo.remove(a1)
    silo.remove(a1)  # idempotent
    silo.remove(a2)
    silo.remove(b1)
    st = silo.stats()
    assert (st["stored_ruris"], st["stored_transactions"]) == (0, 0)
    assert (st["total_ruris"], st["total_transactions"]) == (2, 3)
    assert len(silo) == 0


def test_max_pending_per_aor_refuses_and_counts() -> None:
    silo, _, _ = make(max_pending=2)
    assert silo.store(FakeCall("c1", "alice"))
    assert silo.store(FakeCall("c2", "alice"))
    assert not silo.store(FakeCall("c3", "alice"))
    assert silo.store(FakeCall("c4", "bob"))  # the limit is per AOR
    assert silo.stats()["rejected_full"] == 1
    assert silo.pending_count("alice") == 2


def test_binding_event_forks_every_open_call_of_the_aor() -> None:
    silo, _, _ = make()
    c1, c2, closed, other = (
        FakeCall("c1", "alice"),
        FakeCall("c2", "alice"),
        FakeCall("c3", "alice", open=False),
        FakeCall("c4", "bob"),
    )
    for c in (c1, c2, closed, other):
        silo.store(c)
    b = FakeBinding("alice", "sip:alice@10.0.0.1:5060")
    silo.binding_added(b, None)
    assert c1.branches == [b] and c2.branches == [b]
    assert closed.branches == [] and other.branches == []
    silo.binding_refreshed(b, None)
    assert c1.branches == [b, b]  # dedup is the call's decision, not the silo's
    assert silo.stats()["added_branches"] == 4


def test_refused_branch_is_not_counted() -> None:
    silo, _, _ = make()
    silo.store(FakeCall("c1", "alice", refuse=True))
    assert silo.append_by_contact("alice", FakeBinding("alice", "sip:a@h")) == 0
    assert silo.stats()["added_branches"] == 0


def test_append_and_append_to_use_the_location_store() -> None:
    silo, _, loc = make()
    loc.bindings["alice"] = [FakeBinding("alice", "sip:a@1"), FakeBinding("alice", "sip:a@2")]
    c1 = FakeCall("c1", "alice")
    silo.store(c1)
    assert silo.append("nobody") == NO_RECORD
    assert silo.append_to("nope", "alice") == NOT_FOUND
    assert silo.append("alice") == 2
    assert [b.contact_uri for b in c1.branches] == ["sip:a@1", "sip:a@2"]
    c1.open = False
    assert silo.append_to("c1", "alice") == CANNOT_APPEND


def test_append_survives_a_call_removing_itself_and_a_crashing_call() -> None:
    silo, _, _ = make()

    class Ending(FakeCall):
        def add_branch(self, binding: Any) -> bool:
            silo.remove(self)
            return False

    class Broken(FakeCall):
        def add_branch(self, binding: Any) -> bool:
            raise RuntimeError("boom")

    ok = FakeCall("c3", "alice")
    silo.store(Ending("c1", "alice"))
    silo.store(Broken("c2", "alice"))
    silo.store(ok)
    assert silo.append_by_contact("alice", FakeBinding("alice", "sip:a@1")) == 1
    assert len(ok.branches) == 1
    assert silo.get("c1") is None


def test_register_to_invite_latency_is_measured() -> None:
    silo, clock, _ = make()
    clock.advance(1000)
    silo.store(FakeCall("c1", "alice", clock=clock, send_delay=0.25))
    silo.binding_added(FakeBinding("alice", "sip:a@1"), None)
    lat = silo.stats()["register_to_invite"]
    assert lat["samples"] == 1
    assert lat["p50"] == pytest.approx(0.25)
    assert lat["p99"] == pytest.approx(0.25)


def test_lingering_call_gets_late_bindings_until_grace_ends() -> None:
    silo, clock, _ = make()
    call = FakeCall("c1", "alice")
    silo.store(call)
    silo.linger(call, 10.0)
    assert silo.stats()["stored_transactions"] == 0
    b = FakeBinding("alice", "sip:a@1")
    silo.binding_added(b, None)
    assert call.branches == [] and call.late == [b]
    assert silo.stats()["late_after_end"] == 1
    clock.advance(10.0)
    assert len(silo) == 0 and clock.getDelayedCalls() == []
    silo.binding_added(b, None)
    assert call.late == [b]


def test_linger_without_grace_just_removes_and_unlinger_cancels_timer() -> None:
    silo, clock, _ = make()
    a, b = FakeCall("c1", "alice"), FakeCall("c2", "alice")
    silo.store(a)
    silo.store(b)
    silo.linger(a, 0)
    silo.linger(b, 5)
    silo.unlinger(b)
    silo.unlinger(b)
    assert len(silo) == 0 and clock.getDelayedCalls() == []


def test_linger_on_a_shared_expiry_queue_fires_on_time_and_is_cancelled() -> None:
    """With the call layer's queue for the grace delay, lingering takes a queue entry, not a
    DelayedCall per call: the queues' one shared timer serves every lingering call."""
    silo, clock, _ = make()
    timer = ExpiryTimer(clock)
    queue = ExpiryQueue(clock, 10.0, timer)
    other = ExpiryQueue(clock, 64.0, timer)  # e.g. the transactions' final waits, already busy
    other.add(lambda: None)
    a, b, c = FakeCall("c1", "alice"), FakeCall("c2", "alice"), FakeCall("c3", "bob")
    for call in (a, b, c):
        silo.store(call)
    silo.linger(a, 10.0, queue)
    clock.advance(4.0)
    silo.linger(b, 10.0, queue)
    silo.linger(c, 10.0, queue)
    assert len(queue) == 3 and len(clock.getDelayedCalls()) == 1
    assert silo.stats()["lingering"] == 3
    silo.unlinger(c)  # its device woke: the entry leaves the queue
    assert len(queue) == 2
    silo.linger(b, 10.0, queue)  # lingering again restarts its grace, one entry still
    assert len(queue) == 2
    clock.advance(5.5)
    assert silo.stats()["lingering"] == 2
    clock.advance(0.5)  # 10 s after a lingered
    assert silo.stats()["lingering"] == 1 and len(queue) == 1
    silo.binding_added(FakeBinding("alice", "sip:a@1"), None)
    assert a.late == [] and len(b.late) == 1
    clock.advance(4.0)  # 10 s after b lingered again
    assert len(silo) == 0 and len(queue) == 0
    silo.store(a)
    silo.linger(a, 10.0, queue)
    silo.stop()  # service stop leaves nothing queued
    assert len(queue) == 0 and len(silo) == 0


def test_lookup_and_dump() -> None:
    silo, _, _ = make()
    silo.store(FakeCall("c1", "alice"))
    assert silo.lookup("alice") == [{"call_id": "c1", "aor": "alice", "state": "parked", "branches": 0}]
    assert silo.lookup("bob") == []
    d = silo.dump()
    assert d["aors"] == {"alice": [{"call_id": "c1", "aor": "alice", "state": "parked", "branches": 0}]}
    assert d["stats"]["stored_transactions"] == 1
    assert "aors" not in silo.dump(brief=True)


def test_percentile_and_bounded_window() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    w = LatencyWindow(3)
    for v in (5.0, 1.0, 2.0, 3.0, -1.0):
        w.add(v)
    assert len(w) == 3 and w.count == 5
    assert w.summary()["max"] == 3.0 and w.summary()["p50"] == 2.0
    with pytest.raises(ValueError):
        LatencyWindow(0)
    with pytest.raises(ValueError):
        Silo(Clock(), None, max_pending_per_aor=0)


def test_max_total_refuses_new_calls_until_one_leaves() -> None:
    silo = Silo(Clock(), FakeLocation(), max_total=3)
    calls = [FakeCall(f"c{n}", f"user{n}") for n in range(4)]
    assert [silo.store(c) for c in calls[:3]] == [True] * 3
    assert silo.at_capacity()
    assert not silo.store(calls[3])
    assert silo.store(calls[0])  # a duplicate is still accepted and ignored
    assert silo.stats()["rejected_capacity"] == 1 and silo.stats()["rejected_full"] == 0
    silo.remove(calls[1])
    assert not silo.at_capacity() and silo.store(calls[3])
    assert not Silo(Clock(), FakeLocation()).at_capacity()  # 0 = no limit


RegisteredBinding = FakeBinding


def test_register_to_invite_latency_counts_from_the_register() -> None:
    # the binding event waits for the REGISTER's commit and 200 OK: that wait is part of the latency
    silo, clock, _ = make()
    clock.advance(1000)
    silo.store(FakeCall("c1", "alice"))
    silo.binding_added(RegisteredBinding("alice", "sip:a@1", registered_at=1000 - 0.004), None)
    assert silo.stats()["register_to_invite"]["p50"] == pytest.approx(0.004)
    # a restored binding's old registered_at is not a REGISTER that just arrived
    silo.store(FakeCall("c2", "bob"))
    silo.binding_added(RegisteredBinding("bob", "sip:b@1", registered_at=10.0), None)
    lat = silo.stats()["register_to_invite"]
    assert lat["samples"] == 2 and lat["max"] == pytest.approx(0.004)


def test_one_latency_summary_for_silo_and_push() -> None:
    """The silo's register_to_invite and push/'s latencies are one LatencyWindow: same keys, same
    nearest-rank percentiles (push/ once had its own, with p95 and another rank rule)."""
    from libon_tsilo.push.stats import PushStats

    push = PushStats()
    silo = Silo(Clock(), None)
    for v in (0.1, 0.2, 0.3, 0.4):
        push.record_push_to_register(v)
        silo.counters.latency.add(v)
    assert push.push_to_register_window.summary() == silo.stats()["register_to_invite"]
    assert silo.stats()["register_to_invite"]["p50"] == 0.2
