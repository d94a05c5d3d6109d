"""A REGISTER's 200 OK is a promise: it goes out once the binding is committed (group commit), a
binding that cannot be stored gets 5xx + Retry-After, and the binding events (the silo's late fork)
follow the answer instead of overtaking it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from libon_tsilo.registrar.location import LocationStore
from libon_tsilo.registrar.registrar import Registrar
from libon_tsilo.registrar.sqlite_store import SqliteBindingStore
from libon_tsilo.sip.message import parse_message
from tests.fakes.sip import FakeFlow, FakeStx
from tests.registrar.helpers import register_text
from tests.registrar.test_sqlite_store import Manual

AOR = "sip:alice@example.com"


class AnswerWatcher:
    """An observer that notes, for each event, how many answers the REGISTER had at that moment."""

    def __init__(self, stx: list[FakeStx]) -> None:
        self.stx = stx
        self.seen: list[tuple[str, int]] = []

    def _note(self, kind: str) -> None:
        self.seen.append((kind, sum(len(s.responses) for s in self.stx)))

    def binding_added(self, binding: Any, flow: Any) -> None:
        self._note("added")

    def binding_refreshed(self, binding: Any, flow: Any) -> None:
        self._note("refreshed")

    def binding_removed(self, binding: Any, reason: str) -> None:
        self._note("removed")


class Env:
    def __init__(self, tmp_path: Path | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.runner = Manual()
        self.persistence = None
        if tmp_path is not None:
            self.persistence = SqliteBindingStore(
                str(tmp_path / "loc.sqlite"), self.clock, flush_interval=0.002, run_in_thread=self.runner
            )
        self.store = LocationStore(self.clock, self.persistence)
        self.store.start()
        self.registrar = Registrar(self.clock, self.store, domains=["example.com"], default_expires=600)
        self.sent: list[FakeStx] = []
        self.watcher = AnswerWatcher(self.sent)
        self.store.subscribe(self.watcher)

    def register(self, contacts: list[str] | None = None, **kw: Any) -> FakeStx:
        stx = FakeStx()
        self.sent.append(stx)
        self.registrar.handle_register(parse_message(register_text(contacts, **kw)), stx, FakeFlow())
        return stx

    def commit(self) -> None:
        self.clock.advance(0.002)
        self.runner.run_one()


def test_the_200_waits_for_the_commit(tmp_path: Path) -> None:
    env = Env(tmp_path)
    stx = env.register(["<sip:alice@192.0.2.10:40000>"])
    assert stx.responses == [] and env.watcher.seen == []
    env.clock.advance(0.002)
    assert stx.responses == []  # the commit is running
    env.runner.run_one()
    assert [r.status for r in stx.responses] == [200]
    assert [str(c.uri) for c in stx.last.contacts] == ["sip:alice@192.0.2.10:40000"]
    assert env.watcher.seen == [("added", 1)]


def test_registers_that_arrive_during_a_commit_share_the_next_one(tmp_path: Path) -> None:
    env = Env(tmp_path)
    first = env.register(["<sip:alice@192.0.2.10:40000>"])
    env.clock.advance(0.002)
    others = [env.register(["<sip:bob@192.0.2.11>"], to=f"sip:u{i}@example.com", call_id=f"c{i}") for i in range(5)]
    env.runner.run_one()
    assert len(first.responses) == 1 and all(s.responses == [] for s in others)
    env.clock.advance(0.002)  # at most one commit per flush interval
    assert len(env.runner.queued) == 1  # one commit for the five of them
    env.runner.run_one()
    assert all([r.status for r in s.responses] == [200] for s in others)


def test_a_binding_that_cannot_be_stored_gets_500_with_retry_after(tmp_path: Path) -> None:
    env = Env(tmp_path)
    stx = env.register(["<sip:alice@192.0.2.10:40000>"])
    env.clock.advance(0.002)
    _, _, d = env.runner.queued.pop(0)
    d.errback(sqlite3.OperationalError("database or disk is full"))
    assert stx.last.status == 500 and stx.last.header("Retry-After") == "5"
    # the device is reachable: the binding stays in memory, its event follows the answer
    assert len(env.store.lookup(AOR)) == 1 and env.watcher.seen == [("added", 1)]
    # the device registers again, and this time it is stored
    env.clock.advance(0.5)
    env.runner.run_one()
    again = env.register(["<sip:alice@192.0.2.10:40000>"], cseq=2)
    env.commit()
    assert again.last.status == 200


def test_a_register_after_shutdown_gets_503(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.store.stop()
    stx = env.register(["<sip:alice@192.0.2.10:40000>"])
    assert stx.last.status == 503 and stx.last.header("Retry-After")


def test_shutdown_flush_answers_the_register_in_flight(tmp_path: Path) -> None:
    env = Env(tmp_path)
    stx = env.register(["<sip:alice@192.0.2.10:40000>"])
    stopped = env.store.stop()  # SIGTERM: the final flush starts at once
    assert stx.responses == []
    env.runner.run_one()
    assert stx.last.status == 200 and stopped.called


def test_a_register_that_changes_nothing_is_answered_at_once(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.register(["<sip:alice@192.0.2.10:40000>"])
    env.clock.advance(0.002)  # that commit is in flight
    fetch = env.register(None, call_id="fetch-1")
    assert [r.status for r in fetch.responses] == [200]  # a query promises nothing new
    refused = env.register(["<sip:alice@192.0.2.10:40001>"], expires=10, call_id="short")
    assert [r.status for r in refused.responses] == [423]


def test_memory_backend_answers_at_once_and_events_follow_the_answer() -> None:
    env = Env()
    stx = env.register(["<sip:alice@192.0.2.10:40000>"])
    assert [r.status for r in stx.responses] == [200]
    env.register(["<sip:alice@192.0.2.10:40000>"], cseq=2)
    env.register(["*"], cseq=3, expires=0)
    # every event saw its REGISTER answered already
    assert env.watcher.seen == [("added", 1), ("refreshed", 2), ("removed", 3)]


class BrokenStx(FakeStx):
    def respond(self, resp: Any) -> None:
        raise RuntimeError("transport gone")


def test_an_answer_that_cannot_be_sent_is_logged_and_the_events_still_go(tmp_path: Path) -> None:
    from twisted.logger import globalLogPublisher

    env = Env(tmp_path)
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        stx = BrokenStx()
        env.registrar.handle_register(
            parse_message(register_text(["<sip:alice@192.0.2.10:40000>"])), stx, FakeFlow()
        )
        env.commit()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert env.watcher.seen == [("added", 0)]
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert len(failures) == 1 and "answering after the commit failed" in failures[0]["log_format"]
    assert failures[0]["call_id"] == "reg-1@192.0.2.10"


def test_when_answered_fires_once_the_registers_answer_is_sent(tmp_path: Path) -> None:
    """What the cluster relay waits on before it relays a new INVITE to the flow (issue 14)."""
    env = Env(tmp_path)
    flow_id = FakeFlow().id
    assert env.registrar.when_answered(flow_id) is None  # no REGISTER waits: relay at once
    stx = env.register(["<sip:alice@192.0.2.10:40000>"])
    d = env.registrar.when_answered(flow_id)
    assert d is not None
    fired: list[int] = []
    d.addCallback(lambda _: fired.append(len(stx.responses)))
    assert env.registrar.when_answered("udp:198.51.100.1:5060") is None  # another flow
    env.commit()
    assert fired == [1]  # after the 200 went out
    assert env.registrar.when_answered(flow_id) is None and len(env.registrar.answers) == 0


def test_a_waiter_that_gives_up_is_forgotten() -> None:
    from libon_tsilo.registrar.pending_answers import PendingAnswers

    answers = PendingAnswers()
    answers.begin("f1")
    answers.begin("f1")  # two REGISTERs on one flow: the waiter waits for both
    d = answers.when_answered("f1")
    assert d is not None
    d.addErrback(lambda f: None)
    d.cancel()  # the relay's bound ran out
    answers.done("f1")
    answers.done("f1")
    assert len(answers) == 0 and answers._waiters == {}


class HandsOverWaiters:
    """A persistence that keeps what each REGISTER waits on, for the test to complete: a Redis or
    SQLite commit not returned yet."""

    feeds_replica = False

    def __init__(self) -> None:
        self.waiters: list[tuple[str, Any]] = []
        self.calls: list[str] = []

    def save(self, binding: Any) -> None:
        self.calls.append("save")

    def delete(self, binding: Any, reason: str = "") -> None:
        pass

    def notify_committed(self, aor: str, waiter: Any) -> bool:
        self.calls.append("wait")
        self.waiters.append((aor, waiter))
        return True

    def hold_writes(self) -> None:
        self.calls.append("hold")

    def release_writes(self) -> None:
        self.calls.append("release")


def test_a_register_waits_for_its_commit_with_its_answer_not_a_deferred() -> None:
    """The store gets the REGISTER's answer itself as its waiter (a Deferred and its callback chain
    cost ~25k instructions per REGISTER on the Redis store); the answer, its events and the flow's
    pending answer behave as they did with the Deferred."""
    from twisted.internet.defer import Deferred

    from libon_tsilo.registrar.location import NotStored, StoreClosed

    env = Env()
    env.store.persistence = persistence = HandsOverWaiters()  # type: ignore[assignment]
    flow_id = FakeFlow().id
    outcomes = []
    for i, finish in enumerate((lambda w: w.callback(None), lambda w: w.errback(NotStored("redis is down")),
                                lambda w: w.errback(StoreClosed("stopped")))):
        stx = env.register(["<sip:alice@192.0.2.10:40000>"], cseq=i + 1)
        [(aor, waiter)] = persistence.waiters
        persistence.waiters.clear()
        assert aor == AOR and not isinstance(waiter, Deferred)
        assert stx.responses == [] and env.registrar.when_answered(flow_id) is not None
        finish(waiter)
        outcomes.append((stx.last.status, stx.last.header("Retry-After")))
        assert env.registrar.when_answered(flow_id) is None and len(env.registrar.answers) == 0
    assert outcomes == [(200, None), (500, "5"), (503, "5")]
    # each event went after its REGISTER's answer
    assert env.watcher.seen == [("added", 1), ("refreshed", 2), ("refreshed", 3)]


def test_an_answer_that_fails_after_the_commit_never_raises_into_the_store() -> None:
    """The store calls its waiters one after another from its write's completion: a waiter that
    raised there would leave the batch's other REGISTERs unanswered. A failing send is logged; the
    events still go out and the flow's pending answer still ends."""
    from libon_tsilo.registrar.location import NotStored

    env = Env()
    env.store.persistence = persistence = HandsOverWaiters()  # type: ignore[assignment]
    flow_id = FakeFlow().id
    for i, finish in enumerate((lambda w: w.callback(None), lambda w: w.errback(NotStored("redis is down")))):
        stx = env.register(["<sip:alice@192.0.2.10:40000>"], cseq=i + 1)
        [(_, waiter)] = persistence.waiters
        persistence.waiters.clear()

        def broken(*_: object) -> None:
            raise RuntimeError("bug")

        stx.respond = broken  # type: ignore[method-assign]
        finish(waiter)  # does not raise
        assert env.registrar.when_answered(flow_id) is None and len(env.registrar.answers) == 0
    assert [kind for kind, _ in env.watcher.seen] == ["added", "refreshed"]


def test_a_registers_changes_are_held_until_its_answer_waits_on_them() -> None:
    """The store writes a REGISTER's changes together, started once the last is in and its answer
    waits on them (group_commit.py hold/release: on the Redis store, at once, without a loop turn of
    its own)."""
    env = Env()
    env.store.persistence = persistence = HandsOverWaiters()  # type: ignore[assignment]
    env.register(["<sip:alice@192.0.2.10:40000>", "<sip:alice@192.0.2.11:40000>"])
    assert persistence.calls == ["hold", "save", "save", "wait", "release"]
    assert len(persistence.waiters) == 1


def test_a_write_that_fails_as_it_is_sent_fails_the_register_never_a_200() -> None:
    """The REGISTER's write starts once its answer waits on it (not before: the write would fail
    with nobody waiting, and the answer, finding nothing to wait for, would be a 200 for a binding
    Redis does not have)."""
    import asyncio

    from libon_tsilo.registrar.redis_wire import RespConnection
    from libon_tsilo.registrar.redis_writes import RedisWrites

    env = Env()
    writes = RedisWrites(env.clock, b"t:", "b", b"tok ", lambda *a: None, True)
    loop = asyncio.new_event_loop()
    # a connection whose transport is gone (the feed has not noticed yet): a send raises at once
    writes.state, writes.conn = "up", RespConnection(loop, 2.0)
    writes.commit.soon = lambda f: None

    class OnRedis:  # the Redis store's per-REGISTER calls, straight to its writer
        feeds_replica = False
        save, delete, notify_committed = writes.save, writes.delete, writes.notify_committed
        hold_writes, release_writes = writes.commit.hold, writes.commit.release

    env.store.persistence = OnRedis()  # type: ignore[assignment]
    try:
        stx = env.register(["<sip:alice@192.0.2.10:40000>"])
    finally:
        loop.close()
    assert [r.status for r in stx.responses] == [500]
    assert writes.rows_skipped == 1
