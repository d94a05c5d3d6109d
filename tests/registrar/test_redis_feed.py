"""ChangeFeed (registrar/redis_feed.py): the other processes' change messages applied to a replica,
on a Clock, without Redis: its own messages skipped, held while the feed loads, applied in order,
an unreadable one logged and skipped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from libon_tsilo.registrar import redis_codec
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.registrar.location import LocationStore
from libon_tsilo.registrar.redis_feed import ChangeFeed
from tests.registrar.helpers import RecordingObserver, make_binding

OWN = b"0123456789abcdef "


def _message(token: bytes, *ops: object) -> bytes:
    """A change message as redis_writes.py publishes it."""
    return token + redis_codec.dumps({"n": "b", "ops": list(ops)})


def _set(binding: Binding) -> list[object]:
    return ["s", binding.to_dict()]


def _feed() -> tuple[ChangeFeed, LocationStore, RecordingObserver]:
    replica = LocationStore(Clock(), node_id="a")
    observer = RecordingObserver()
    replica.subscribe(observer)
    feed = ChangeFeed(OWN)
    feed.replica = replica
    return feed, replica, observer


@pytest.fixture()
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observer(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def test_another_process_changes_are_applied_in_order_and_counted() -> None:
    feed, replica, observer = _feed()
    phone = make_binding(node="b")
    refreshed = make_binding(node="b", cseq=2, expires_at=7200.0)
    feed.on_message(_message(b"fedcba9876543210 ", _set(phone), _set(refreshed)))
    assert replica.lookup(phone.aor) == [refreshed]
    feed.on_message(_message(b"fedcba9876543210 ", ["d", phone.aor, phone.key, "unregistered"]))
    assert replica.lookup(phone.aor) == []
    assert observer.kinds() == ["added", "refreshed", "removed"]
    assert observer.events[2][2] == "unregistered"
    assert feed.applied == 3


def test_its_own_messages_are_skipped() -> None:
    feed, replica, observer = _feed()
    feed.on_message(_message(OWN, _set(make_binding(node="a"))))
    assert replica.lookup("sip:alice@example.com") == [] and observer.events == [] and feed.applied == 0


def test_messages_are_held_while_the_feed_loads() -> None:
    feed, replica, observer = _feed()
    feed.backlog = []
    held = _message(b"fedcba9876543210 ", _set(make_binding(node="b")))
    feed.on_message(held)
    assert feed.backlog == [held] and observer.events == [] and feed.applied == 0
    backlog, feed.backlog = feed.backlog, None
    for data in backlog:
        feed.apply(data)
    assert observer.kinds() == ["added"] and feed.applied == 1


def test_without_a_replica_nothing_is_applied() -> None:
    feed = ChangeFeed(OWN)
    feed.on_message(_message(b"fedcba9876543210 ", _set(make_binding(node="b"))))
    assert feed.applied == 0


@pytest.mark.parametrize("payload", [
    b"not json",
    b'{"n":"b"}',  # no ops
    b'["n","b"]',  # not an object
    b'{"n":"b","ops":{"s":1}}',  # ops not a list
    b'{"n":"b","ops":["s"]}',  # an op not a list
    b'{"n":"b","ops":[["s",{"aor":"sip:x@h"}]]}',  # a binding without its required fields
    b'{"n":"b","ops":[["d","sip:x@h"]]}',  # a removal cut short
    b'{"n":"b","ops":[["s",["not","a","dict"]]]}',
    # the shape of one binding set (decoded without the message around it) but not JSON: skipped too
    b'{"n":"b\x01","ops":[["s",' + redis_codec.dumps(make_binding(node="b").to_compact_dict()) + b"]]}",
    b'{"n":"b","ops":[["s",' + redis_codec.dumps(make_binding(node="b").to_compact_dict()) + b"],]]}",
    b'{"n":"b","ops":[["s",{"aor":"sip:x@h"}]]}',
    b'{"n":"b","ops":[["s",{}]]}',
])
def test_an_unreadable_message_is_logged_and_skipped(payload: bytes, logged: list[str]) -> None:
    feed, replica, observer = _feed()
    feed.on_message(b"fedcba9876543210 " + payload)
    assert any("skipping an unreadable change message" in line for line in logged)
    assert observer.events == [] and feed.applied == 0
    feed.on_message(_message(b"fedcba9876543210 ", _set(make_binding(node="b"))))  # the next one goes on
    assert observer.kinds() == ["added"] and feed.applied == 1


@pytest.mark.parametrize("message", [
    # a node id that JSON escapes, an earlier version's spacing (json.dumps), a binding with "],["
    # in a string, a set then a removal: each decoded whole, each applied as the plain one is
    lambda b: b'{"n":"b\\"q","ops":[["s",' + redis_codec.dumps(b.to_compact_dict()) + b"]]}",
    lambda b: json.dumps({"n": "b", "ops": [["s", b.to_dict()]]}).encode(),
    lambda b: b'{"n":"","ops":[["s",' + redis_codec.dumps(b.to_compact_dict()) + b"]]}",
    lambda b: redis_codec.dumps({"n": "b", "ops": [["s", b.to_compact_dict()], ["d", "sip:x@h", "k", "removed"]]}),
])
def test_every_shape_of_a_message_is_applied_alike(message: Any) -> None:
    for binding in (make_binding(node="b"), make_binding(node="b", user_agent='UA "],[" x', path=["<sip:p;lr>"])):
        feed, replica, observer = _feed()
        feed.on_message(b"fedcba9876543210 " + message(binding))
        assert replica.lookup(binding.aor) == [binding] and observer.kinds() == ["added"]
