"""cluster/ordering.py on a Clock: a relayed INVITE held until the REGISTER on its flow is answered;
and in the two-node relay (test_relay_two_nodes.py's Pair), B holds A's INVITE until the device's
REGISTER 200 OK is sent."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from libon_tsilo.cluster.ordering import hold_until_answered
from libon_tsilo.registrar.pending_answers import PendingAnswers
from libon_tsilo.sip.message import parse_message
from tests.cluster.test_relay_two_nodes import AOR, Pair, _public, invite, register
from tests.cluster.ua import wait_for


def _held(answers: PendingAnswers, clock: Clock) -> tuple[Any, list[str]]:
    done: list[str] = []
    held = hold_until_answered(clock, answers.when_answered, "f1", lambda: done.append("sent"),
                               lambda: done.append("dropped"), bound=1.0)
    return held, done


def test_the_invite_goes_once_the_register_is_answered():
    clock, answers = Clock(), PendingAnswers()
    assert _held(answers, clock)[0] is None  # nothing to wait for: the relay sends at once
    answers.begin("f1")
    held, done = _held(answers, clock)
    assert held is not None and done == []
    answers.done("f1")
    assert done == ["sent"] and not clock.getDelayedCalls()
    clock.advance(2.0)
    held.cancel()  # too late: it went
    assert done == ["sent"]


def test_the_invite_goes_after_the_bound_when_the_answer_never_comes():
    clock, answers = Clock(), PendingAnswers()
    answers.begin("f1")
    held, done = _held(answers, clock)
    clock.advance(0.99)
    assert done == []
    clock.advance(0.01)
    assert done == ["sent"] and answers._waiters == {}
    answers.done("f1")
    assert done == ["sent"]


def test_a_cancel_while_held_drops_the_invite():
    clock, answers = Clock(), PendingAnswers()
    answers.begin("f1")
    held, done = _held(answers, clock)
    held.cancel()
    answers.done("f1")
    clock.advance(2.0)
    assert done == ["dropped"]


class SlowCommits:
    """A persistence whose commits the test completes (a Redis that has not answered yet)."""

    feeds_replica = False

    def __init__(self) -> None:
        self.waiting: list[Any] = []

    def save(self, binding: Any) -> None:
        pass

    def delete(self, binding: Any, reason: str = "") -> None:
        pass

    def when_committed(self, aor: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d

    def notify_committed(self, aor: str, waiter: Any) -> bool:
        self.waiting.append(waiter)  # the registrar's answer: a Deferred's callback and errback
        return True

    def hold_writes(self) -> None:
        pass

    def release_writes(self) -> None:
        pass

    def flush(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def pending(self) -> int:
        return len(self.waiting)


@pytest_twisted.ensureDeferred
async def test_b_holds_the_invite_a_forked_until_the_devices_register_is_answered():
    """A hears of the binding (from Redis, in a cluster) before B has its commit's reply and sends
    the 200: B relays A's INVITE only after that 200."""
    pair = Pair()
    pair.start()
    shared = pair.a.parts.location
    commits = shared.persistence = SlowCommits()
    try:
        caller = await pair.ua(pair.a)
        caller.send(invite(caller, _public(pair.a, "udp")[1]))
        await wait_for(lambda: pair.a.parts.silo.stats()["stored_transactions"] == 1, "the call parked on A")
        device = await pair.ua(pair.b)
        device.send(register(device))
        await wait_for(lambda: commits.waiting and shared.lookup(AOR), "B to store the binding")
        pair.a.parts.silo.binding_added(shared.lookup(AOR)[0], None)  # A hears of it first
        relay = pair.b.parts.extra["cluster_relay"]
        await wait_for(lambda: relay.counters["held_for_register"] == 1, "B to hold A's INVITE")
        assert not device.received
        commits.waiting.pop().callback(None)
        await device.request("INVITE")
        kinds = [getattr(m, "method", None) or getattr(m, "status", None) for m in device.received]
        assert kinds[:2] == [200, "INVITE"], kinds
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_cancel_while_b_holds_the_invite_drops_it():
    pair = Pair()
    pair.start()
    shared = pair.a.parts.location
    commits = shared.persistence = SlowCommits()
    try:
        caller = await pair.ua(pair.a)
        text = invite(caller, _public(pair.a, "udp")[1])
        caller.send(text)
        await wait_for(lambda: pair.a.parts.silo.stats()["stored_transactions"] == 1, "the call parked on A")
        device = await pair.ua(pair.b)
        device.send(register(device))
        await wait_for(lambda: commits.waiting and shared.lookup(AOR), "B to store the binding")
        pair.a.parts.silo.binding_added(shared.lookup(AOR)[0], None)
        relay = pair.b.parts.extra["cluster_relay"]
        await wait_for(lambda: relay.counters["held_for_register"] == 1, "B to hold A's INVITE")
        sent = parse_message(text.encode())
        caller.send(
            f"CANCEL {sent.raw_uri} SIP/2.0\r\nVia: {sent.header('via')}\r\nMax-Forwards: 70\r\n"
            f"From: {sent.header('from')}\r\nTo: {sent.header('to')}\r\nCall-ID: {sent.call_id}\r\n"
            f"CSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
        )
        await caller.response(487, "INVITE")
        await wait_for(lambda: relay.counters["cancelled"] == 1, "B to drop the held INVITE")
        assert relay.stats()["pending_invites"] == 0
        commits.waiting.pop().callback(None)
        await device.response(200, "REGISTER")
        # what the released hold would have sent, it would have sent in the same turn as the 200
        assert pair.b.parts.transactions.client_count == 0
        assert not any(getattr(m, "method", "") == "INVITE" for m in device.received)
    finally:
        await pair.stop()
