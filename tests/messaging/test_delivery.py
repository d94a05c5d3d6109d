"""Delivery of stored messages to every device of the user (messaging/delivery.py, outbox.py), on a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from libon_tsilo.messaging.delivery import MessageDelivery, device_key
from libon_tsilo.messaging.outbox import Outbox
from libon_tsilo.messaging.store import MemoryMessageStore, StoredMessage
from tests.fakes.calls import FakeLocation
from tests.messaging.helpers import AOR, FakeNotifier, FakeSender, phone

TTL = 3600.0


class World:
    def __init__(self, store: MemoryMessageStore | None = None, location: FakeLocation | None = None,
                 clock: Clock | None = None, notifier: Any = "fake", preview: bool = True) -> None:
        self.clock = clock or Clock()
        self.store = store or MemoryMessageStore()
        self.location = location or FakeLocation()
        self.sender = FakeSender()
        self.notifier = FakeNotifier() if notifier == "fake" else notifier
        self.outbox = Outbox(self.clock, self.store, ttl=TTL)
        self.delivery = MessageDelivery(self.clock, self.outbox, self.location, self.sender, self.notifier,
                                        push_preview=preview)
        self.outbox.start()
        self.delivery.start()

    def send(self, body: bytes, sender: str = "sip:alice@example.com", aor: str = AOR,
             content_type: str = "text/plain") -> StoredMessage:
        got: list[StoredMessage] = []
        d = self.outbox.add(aor, "sip:bob@example.com", sender, None, content_type, body, "Mon, 07 Dec 2026")
        d.addCallback(got.append)
        assert got, "the memory store commits at once"
        self.delivery.message_stored(got[0])
        return got[0]


def test_a_reachable_device_gets_the_message_at_once_and_it_is_deleted_after_its_2xx():
    w = World()
    desk = phone()  # no push token: reachable (a desk phone, a softphone)
    w.location.add(desk)
    msg = w.send(b"hello")
    assert w.sender.bodies() == [b"hello"]
    assert w.notifier.pushes == []
    assert len(w.outbox) == 1  # not before the 2xx
    w.sender.answer(0, 200)
    assert len(w.outbox) == 0 and w.store.rows == {}
    assert w.outbox.counters["done"] == 1 and w.delivery.counters["delivered"] == 1
    assert msg.delivered == {device_key(desk)}


def test_a_sleeping_device_is_pushed_and_gets_the_message_when_it_registers():
    w = World()
    ios = phone(push=True)
    w.location.add(ios)
    msg = w.send(b"are you there?")
    assert w.sender.sent == []  # asleep: nothing sent into the void
    [(pushed, pushed_msg, preview)] = w.notifier.pushes
    assert pushed is ios and pushed_msg is msg and preview == "are you there?"
    w.clock.advance(5)
    w.delivery.binding_refreshed(ios, None)  # the push woke the app: it registers
    assert w.sender.bodies() == [b"are you there?"]
    w.sender.answer(0, 200)
    assert len(w.outbox) == 0


def test_push_preview_off_sends_the_sender_only():
    w = World(preview=False)
    w.location.add(phone(push=True))
    w.send(b"secret")
    assert w.notifier.pushes[0][2] is None


def test_no_preview_of_a_body_that_is_not_text():
    w = World()
    w.location.add(phone(push=True))
    w.send(b"\x89PNG...", content_type="image/png")
    assert w.notifier.pushes[0][2] is None


def test_each_device_gets_a_message_once_and_is_not_pushed_again_for_it():
    w = World()
    desk, ios = phone("sip:bob@192.0.2.20:5060"), phone("sip:bob@192.0.2.30:5060", push=True)
    w.location.add(desk)
    w.location.add(ios)
    w.send(b"one")
    assert w.sender.bodies() == [b"one"] and len(w.notifier.pushes) == 1
    w.sender.answer(0, 200)
    assert len(w.outbox) == 1  # the phone still waits for it
    w.delivery.binding_refreshed(desk, None)  # the desk phone refreshes: it has it already
    w.delivery.message_stored(w.outbox.pending(AOR)[0])  # asked again (e.g. another message's kick)
    assert len(w.sender.sent) == 1 and len(w.notifier.pushes) == 1
    w.delivery.binding_refreshed(ios, None)
    assert w.sender.bodies(ios.contact_uri) == [b"one"]
    w.sender.answer(1, 200)
    assert len(w.outbox) == 0
    w.delivery.binding_refreshed(ios, None)
    assert len(w.sender.sent) == 2


def test_order_per_device_the_next_waits_for_the_previous_2xx():
    w = World()
    w.location.add(phone())
    w.send(b"first")
    w.send(b"second")
    w.send(b"third")
    assert w.sender.bodies() == [b"first"]
    w.sender.answer(0, 200)
    assert w.sender.bodies() == [b"first", b"second"]
    w.sender.answer(1, 202)
    w.sender.answer(2, 200)
    assert w.sender.bodies() == [b"first", b"second", b"third"]
    assert len(w.outbox) == 0


def test_a_failed_delivery_waits_for_the_next_registration_and_pushes_the_device():
    w = World()
    ios = phone(push=True, flow_id="f1", flow_live=True)
    w.sender.live_flows.add("f1")
    w.delivery.notifier = None  # no push sender: a push-capable device is tried directly
    w.location.add(ios)
    w.send(b"x")
    w.sender.answer(0, 408)  # the app did not answer over its old connection
    assert len(w.sender.sent) == 1 and len(w.outbox) == 1
    assert w.delivery.counters["failed"] == 1
    w.delivery.binding_refreshed(phone(push=True, registered_at=10), None)
    assert len(w.sender.sent) == 2
    w.sender.answer(1, 200)
    assert len(w.outbox) == 0


def test_a_device_that_times_out_is_pushed_once():
    w = World()
    ios = phone(push=True)
    w.location.add(ios)
    w.send(b"x")
    w.delivery.binding_refreshed(ios, None)  # woke up on its own, then went to sleep again
    w.sender.answer(0, 408)
    assert len(w.notifier.pushes) == 1  # already pushed for this message before: not again
    w.delivery.binding_refreshed(ios, None)
    w.sender.answer(1, 200)
    assert len(w.outbox) == 0


def test_a_message_nobody_takes_expires_after_its_ttl():
    w = World()
    w.location.add(phone(push=True))
    w.send(b"x")
    w.clock.advance(TTL - 1)
    assert len(w.outbox) == 1
    w.clock.advance(1)
    assert len(w.outbox) == 0 and w.store.rows == {}
    assert w.outbox.counters["expired"] == 1
    assert w.clock.getDelayedCalls() == []
    assert w.delivery._pushed == {}  # its push record went with it


def test_messages_survive_a_restart_with_their_delivery_marks():
    store, location, clock = MemoryMessageStore(), FakeLocation(), Clock()
    desk, ios = phone("sip:bob@192.0.2.20:5060"), phone("sip:bob@192.0.2.30:5060", push=True)
    location.add(desk)
    location.add(ios)
    w = World(store, location, clock)
    w.send(b"one")
    w.send(b"two")
    w.sender.answer(0, 200)
    w.sender.answer(1, 200)  # the desk phone has both; the iPhone sleeps
    assert len(w.outbox) == 2
    w.outbox.stop()

    clock.advance(60)
    again = World(store, location, clock)  # a new process on the same store
    assert len(again.outbox) == 2
    assert again.sender.sent == [] and again.notifier.pushes == []  # nothing sent twice, nobody re-pushed
    again.delivery.binding_added(ios, None)
    assert again.sender.bodies() == [b"one"]
    again.sender.answer(0, 200)
    assert again.sender.bodies() == [b"one", b"two"]
    again.sender.answer(1, 200)
    assert len(again.outbox) == 0 and store.rows == {}
    assert again.outbox.counters["done"] == 2


def test_a_restart_delivers_to_reachable_devices_at_once():
    store, location, clock = MemoryMessageStore(), FakeLocation(), Clock()
    w = World(store, location, clock)
    w.send(b"waiting")  # bob has no device at all
    again = World(store, location, clock)
    assert again.sender.sent == []
    location.add(phone())
    third = World(store, location, clock)
    assert third.sender.bodies() == [b"waiting"]


def test_a_message_is_deleted_when_the_devices_that_did_not_get_it_unregistered():
    w = World()
    desk, ios = phone("sip:bob@192.0.2.20:5060"), phone("sip:bob@192.0.2.30:5060", push=True)
    w.location.add(desk)
    w.location.add(ios)
    w.send(b"x")
    w.sender.answer(0, 200)
    assert len(w.outbox) == 1
    w.location.bindings[AOR].remove(ios)
    w.delivery.binding_removed(ios, "unregistered")  # the app said goodbye (REGISTER expires=0)
    assert len(w.outbox) == 0


def test_a_phone_whose_registration_lapsed_still_gets_its_message_when_it_is_back():
    # the desk phone got it; the mobile was off (a flight) and its binding expired, or its push token
    # died: it is still bob's phone, and what waited for it is delivered when it registers again
    # (before: deleted at the expiry, lost for the phone although answered 202 for it)
    w = World()
    desk = phone("sip:bob@192.0.2.20:5060")
    ios = phone("sip:bob@192.0.2.30:5060", push=True, instance="<urn:uuid:phone>")
    w.location.add(desk)
    w.location.add(ios)
    w.send(b"x")
    w.sender.answer(0, 200)
    for reason in ("expired", "dead push token"):
        w.location.bindings[AOR].remove(ios)
        w.delivery.binding_removed(ios, reason)
        assert len(w.outbox) == 1
        ios = phone("sip:bob@192.0.2.31:5060", push=True, instance="<urn:uuid:phone>", registered_at=5)
        w.location.add(ios)
    w.delivery.binding_added(ios)
    assert w.sender.bodies() == [b"x", b"x"]
    w.sender.answer(1, 200)
    assert len(w.outbox) == 0


def test_a_device_with_two_flows_is_one_device():
    w = World()
    a = phone("sip:bob@192.0.2.20:5060", instance="<urn:uuid:1>", reg_id=1, registered_at=1)
    b = phone("sip:bob@192.0.2.20:5061", instance="<urn:uuid:1>", reg_id=2, registered_at=2)
    w.location.add(a)
    w.location.add(b)
    w.send(b"x")
    assert len(w.sender.sent) == 1 and w.sender.sent[0][0] is b  # the most recent flow
    w.sender.answer(0, 200)
    assert len(w.outbox) == 0


def test_a_sender_that_raises_is_logged_and_the_message_waits():
    w = World()
    w.location.add(phone())

    def broken(binding: Any, msg: Any) -> Any:
        raise RuntimeError("bug")

    w.sender.send = broken  # type: ignore[method-assign]
    w.send(b"x")
    assert len(w.outbox) == 1 and w.delivery.counters["failed"] == 1
    assert w.delivery._inflight == {}
