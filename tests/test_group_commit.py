"""The group-commit schedule on its own: one batch in flight, the next one goes when it returns."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.group_commit import GroupCommit, Waiter


class Ops:
    """A group_commit.Batch (a protocol: compiled, it cannot be subclassed by an interpreted class)."""

    __slots__ = ("waiters", "ops")

    def __init__(self) -> None:
        self.waiters: list[tuple[object, Waiter]] = []
        self.ops: list[str] = []

    def __len__(self) -> int:
        return len(self.ops)


class Writer:
    def __init__(self, clock: Clock, interval: float = 0.002) -> None:
        self.written: list[list[str]] = []
        self.commit: GroupCommit[Ops] = GroupCommit(clock, interval, Ops, self.write)

    def add(self, op: str) -> None:
        self.commit.open.ops.append(op)
        self.commit.changed()

    def write(self, batch: Ops) -> None:
        self.written.append(list(batch.ops))


def test_an_idle_store_waits_flush_interval_so_a_burst_shares_one_write() -> None:
    clock = Clock()
    w = Writer(clock)
    w.add("a")
    clock.advance(0.001)
    w.add("b")
    assert w.written == []
    clock.advance(0.001)
    assert w.written == [["a", "b"]]
    assert w.commit.pending() == 2  # in flight until finished()


def test_what_queues_during_a_write_goes_when_it_returns_not_before() -> None:
    clock = Clock()
    w = Writer(clock)
    w.add("a")
    clock.advance(0.002)
    w.add("b")
    w.add("c")
    clock.advance(10)
    assert w.written == [["a"]]  # one batch in flight at a time, whatever the timer
    w.commit.finished()
    assert w.written == [["a"], ["b", "c"]]


def test_finished_with_a_wait_delays_the_next_batch() -> None:
    clock = Clock()
    w = Writer(clock)
    w.add("a")
    w.commit.flush()
    w.add("b")
    w.commit.finished(0.5)
    clock.advance(0.4)
    assert w.written == [["a"]]
    clock.advance(0.1)
    assert w.written == [["a"], ["b"]]


def test_waiters_join_the_batch_holding_what_was_queued() -> None:
    clock = Clock()
    w = Writer(clock)
    assert w.commit.wait("k") is None  # nothing queued: nothing to wait for
    w.add("a")
    d_open = w.commit.wait("k1")
    w.commit.start()
    d_inflight = w.commit.wait("k2")  # nothing new queued: waits for the batch in flight
    w.add("b")
    d_next = w.commit.wait("k3")
    batch = w.commit.inflight
    assert batch is not None and [k for k, _ in batch.waiters] == ["k1", "k2"]
    assert [k for k, _ in w.commit.open.waiters] == ["k3"]
    assert d_open is not d_inflight is not d_next


def test_flush_writes_now_and_close_returns_what_was_never_written() -> None:
    clock = Clock()
    w = Writer(clock)
    w.add("a")
    d = w.commit.flush()
    assert w.written == [["a"]] and not d.called
    w.add("b")
    lost = w.commit.close()
    assert lost.ops == ["b"] and w.commit.pending() == 1  # "a" still in flight
    w.commit.finished()
    clock.advance(10)
    assert w.written == [["a"]]  # closed: "b" never goes
    assert clock.getDelayedCalls() == []


class Soon:
    """An event loop's call_soon, run by hand: ``turn()`` runs what was queued."""

    def __init__(self) -> None:
        self.queued: list[object] = []

    def __call__(self, f: object) -> None:
        self.queued.append(f)

    def turn(self) -> None:
        queued, self.queued = self.queued, []
        for f in queued:
            f()  # type: ignore[operator]


def test_with_soon_and_no_interval_an_idle_store_writes_on_the_next_turn_without_a_timer() -> None:
    clock, soon = Clock(), Soon()
    written: list[list[str]] = []
    commit: GroupCommit[Ops] = GroupCommit(clock, 0.0, Ops, lambda b: written.append(list(b.ops)), soon=soon)
    for op in ("a", "b"):  # one REGISTER's changes, queued in the same turn
        commit.open.ops.append(op)
        commit.changed()
    assert clock.getDelayedCalls() == [] and len(soon.queued) == 1
    assert written == []
    soon.turn()
    assert written == [["a", "b"]]
    commit.open.ops.append("c")
    commit.changed()  # one in flight: nothing scheduled, it goes when that one returns
    assert soon.queued == [] and clock.getDelayedCalls() == []
    commit.finished()
    assert written == [["a", "b"], ["c"]]
    commit.finished()
    commit.open.ops.append("d")
    commit.changed()
    commit.flush()  # written now; the turn already asked for finds nothing left to write
    soon.turn()
    assert written == [["a", "b"], ["c"], ["d"]]


def test_soon_is_not_used_with_a_flush_interval() -> None:
    clock, soon = Clock(), Soon()
    commit: GroupCommit[Ops] = GroupCommit(clock, 0.002, Ops, lambda b: None, soon=soon)
    commit.open.ops.append("a")
    commit.changed()
    assert soon.queued == [] and len(clock.getDelayedCalls()) == 1


def test_held_changes_wait_for_release_then_an_idle_store_with_soon_writes_at_once() -> None:
    # a REGISTER's changes on the Redis store: written as soon as they are all in, without the
    # loop turn that ``soon`` would wait for (none is asked for)
    clock = Clock()
    turns: list[object] = []
    w = Writer(clock, interval=0.0)
    w.commit.soon = turns.append
    w.commit.hold()
    w.add("a")
    w.add("b")
    assert w.written == [] and turns == []
    w.commit.release()
    assert w.written == [["a", "b"]]
    assert turns == []
    assert not clock.getDelayedCalls()


def test_held_changes_of_a_busy_store_go_when_its_batch_returns() -> None:
    clock = Clock()
    w = Writer(clock, interval=0.0)
    w.commit.soon = lambda f: None
    w.commit.hold()
    w.add("a")
    w.commit.release()
    w.commit.hold()
    w.add("b")
    w.commit.release()
    assert w.written == [["a"]]  # one in flight at a time
    w.commit.finished()
    assert w.written == [["a"], ["b"]]


def test_held_changes_of_a_store_with_a_flush_interval_wait_it_as_before() -> None:
    clock = Clock()
    w = Writer(clock)  # 2 ms
    w.commit.hold()
    w.add("a")
    w.commit.release()
    assert w.written == []
    clock.advance(0.002)
    assert w.written == [["a"]]


def test_a_release_with_nothing_held_writes_nothing() -> None:
    clock = Clock()
    w = Writer(clock, interval=0.0)
    w.commit.soon = lambda f: None
    w.commit.hold()
    w.commit.release()
    assert w.written == [] and w.commit.inflight is None
