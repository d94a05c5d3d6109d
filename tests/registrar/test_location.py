"""LocationStore: indexes, events, expiry on a Clock, flows."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.registrar.location import BindingEvent, LocationStore
from tests.fakes.sip import FakeFlow
from tests.registrar.helpers import BrokenObserver, RecordingObserver, make_binding


def _store() -> tuple[Clock, LocationStore, RecordingObserver]:
    clock = Clock()
    store = LocationStore(clock)
    obs = RecordingObserver()
    store.subscribe(obs)
    return clock, store, obs


def test_add_refresh_remove_events() -> None:
    clock, store, obs = _store()
    flow = FakeFlow()
    b1 = make_binding(expires_at=100.0)
    assert store.add_or_update(b1, flow) == "added"
    b2 = make_binding(expires_at=200.0, cseq=2)
    assert store.add_or_update(b2, flow) == "refreshed"
    assert store.lookup("sip:alice@example.com") == [b2]
    assert store.all_count() == 1
    assert store.remove(b2, "unregistered")
    assert not store.remove(b2, "unregistered")
    assert obs.kinds() == ["added", "refreshed", "removed"]
    assert obs.events[0][2] is flow and obs.events[2][2] == "unregistered"
    assert store.lookup("sip:alice@example.com") == []
    assert store.all_count() == 0 and store.aor_count() == 0
    store.stop()


def test_lookup_orders_by_q_then_recency() -> None:
    _, store, _ = _store()
    a = make_binding(uri="sip:a@h", q=0.5, registered_at=1.0)
    b = make_binding(uri="sip:b@h", q=1.0, registered_at=0.0)
    c = make_binding(uri="sip:c@h", q=0.5, registered_at=2.0)
    for x in (a, b, c):
        store.add_or_update(x)
    assert store.lookup("sip:alice@example.com") == [b, c, a]
    assert set(store.dump()) == {"sip:alice@example.com"}
    store.stop()


def test_replaces_other_key() -> None:
    _, store, obs = _store()
    old = make_binding(uri="sip:a@1.1.1.1", pn_provider="apns", pn_prid="tok")
    store.add_or_update(old)
    new = make_binding(uri="sip:a@2.2.2.2", instance="<urn:uuid:1>")
    assert store.add_or_update(new, replaces=old) == "refreshed"
    assert store.lookup("sip:alice@example.com") == [new]
    assert store.all_count() == 1
    store.stop()


def test_expiry_purge_on_clock() -> None:
    clock, store, obs = _store()
    store.add_or_update(make_binding(uri="sip:a@h", expires_at=60.0))
    store.add_or_update(make_binding(uri="sip:b@h", expires_at=30.0))
    clock.advance(29)
    assert store.all_count() == 2
    clock.advance(1)
    assert store.all_count() == 1
    assert obs.events[-1][0] == "removed" and obs.events[-1][2] == "expired"
    # a refresh pushes the deadline: the old heap entry must not remove it
    store.add_or_update(make_binding(uri="sip:a@h", expires_at=120.0, cseq=2))
    clock.advance(40)
    assert store.all_count() == 1
    clock.advance(50)
    assert store.all_count() == 0
    assert not clock.getDelayedCalls()
    store.stop()


def test_expired_but_unpurged_counts_as_new() -> None:
    clock, store, obs = _store()
    store.add_or_update(make_binding(expires_at=10.0))
    store._timer.cancel()  # simulate the purge timer not having run yet
    clock.advance(20)
    assert store.lookup("sip:alice@example.com") == []
    assert store.add_or_update(make_binding(expires_at=100.0)) == "added"
    assert obs.kinds() == ["added", "removed", "added"]
    store.stop()


def test_flow_closed_marks_bindings_not_live() -> None:
    _, store, _ = _store()
    f1 = FakeFlow(id="tcp#1")
    b1 = make_binding(uri="sip:a@h", flow_id="tcp#1", flow_live=True)
    b2 = make_binding(uri="sip:b@h", flow_id="tcp#2", flow_live=True)
    store.add_or_update(b1, f1)
    store.add_or_update(b2)
    assert store.by_flow("tcp#1") == [b1]
    assert store.flow_closed("tcp#1") == [b1]
    assert b1.flow_live is False and b2.flow_live is True
    assert store.lookup("sip:alice@example.com") != []  # still registered
    assert store.flow_closed("tcp#1") == []
    assert store.by_flow("tcp#1") == []
    store.remove(b2, "admin")
    assert store._by_flow == {}
    store.stop()


def test_broken_observer_does_not_break_store() -> None:
    _, store, obs = _store()
    store.unsubscribe(obs)
    store.subscribe(BrokenObserver())
    store.subscribe(obs)
    b = make_binding()
    assert store.add_or_update(b) == "added"
    assert store.remove(b, "x")
    assert obs.kinds() == ["added", "removed"]
    store.stop()


def test_stop_cancels_timer() -> None:
    clock, store, _ = _store()
    store.add_or_update(make_binding(expires_at=50.0))
    assert clock.getDelayedCalls()
    d = store.stop()
    assert not clock.getDelayedCalls()
    assert d.called


def test_held_events_are_typed_records_delivered_through_the_observer_methods() -> None:
    clock, store, obs = _store()
    flow = FakeFlow()
    store.hold_events()
    b1 = make_binding(expires_at=100.0)
    store.add_or_update(b1, flow)
    b2 = make_binding(expires_at=200.0, cseq=2)
    store.add_or_update(b2, flow)
    store.remove(b2, "unregistered")
    held = store.release_events()
    assert obs.events == []  # held until the REGISTER is answered
    assert held == [
        BindingEvent("added", b1, flow),
        BindingEvent("refreshed", b2, flow),
        BindingEvent("removed", b2, reason="unregistered"),
    ]
    store.emit_events(held)
    assert obs.events == [("added", b1, flow), ("refreshed", b2, flow), ("removed", b2, "unregistered")]
    store.stop()
