"""TimerSet and the UA core's TwoXXRetransmitter (RFC 3261 §13.3.1.4) on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.sip.timers import ExpiryQueue, ExpiryTimer, TimerSet, TwoXXRetransmitter, backoff
from libon_tsilo.sip.transaction import TwoXXRetransmitter as Exported
from tests.sip.fakes import run_until


def test_backoff_doubles_up_to_the_cap():
    assert [backoff(x, 4.0) for x in (0.5, 1.0, 2.0, 4.0)] == [1.0, 2.0, 4.0, 4.0]


def test_timerset_replaces_a_running_timer_and_cancels_all():
    clock = Clock()
    fired: list[str] = []
    timers = TimerSet(clock)
    timers.start("A", 1, fired.append, "first")
    timers.start("A", 2, fired.append, "second")
    timers.start("B", 3, fired.append, "b")
    clock.advance(2)
    assert fired == ["second"] and "A" not in timers and "B" in timers
    timers.cancel_all()
    clock.advance(10)
    assert fired == ["second"] and clock.getDelayedCalls() == []


def test_2xx_retransmitter_is_exported_by_the_transaction_module():
    assert Exported is TwoXXRetransmitter


def test_2xx_retransmitter_doubles_to_T2_and_gives_up_at_64_T1():
    clock = Clock()
    sent: list[float] = []
    gave_up: list[bool] = []
    retx = TwoXXRetransmitter(clock, lambda: sent.append(clock.seconds()), 0.5, 4.0, lambda: gave_up.append(True))
    times = run_until(clock, 40, lambda: len(sent))
    assert times[:6] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]
    assert times[-1] == 31.5 and len(times) == 10
    assert gave_up == [True] and not retx.active
    assert clock.getDelayedCalls() == []


def test_2xx_retransmitter_stops_on_ack():
    clock = Clock()
    sent: list[int] = []
    gave_up: list[bool] = []
    retx = TwoXXRetransmitter(clock, lambda: sent.append(1), 0.5, 4.0, lambda: gave_up.append(True))
    clock.advance(0.5)
    clock.advance(1.0)
    assert len(sent) == 2
    retx.stop()
    clock.advance(100)
    assert len(sent) == 2 and gave_up == [] and clock.getDelayedCalls() == []


def test_2xx_retransmitter_on_reliable_flow_only_keeps_the_deadline():
    clock = Clock()
    sent: list[int] = []
    gave_up: list[bool] = []
    TwoXXRetransmitter(clock, lambda: sent.append(1), 0.5, 4.0, lambda: gave_up.append(True), retransmit=False)
    clock.advance(32)
    assert sent == [] and gave_up == [True]


def test_2xx_retransmitter_survives_a_failing_send():
    clock = Clock()
    gave_up: list[bool] = []

    def send() -> None:
        raise OSError("gone")

    TwoXXRetransmitter(clock, send, 0.5, 4.0, lambda: gave_up.append(True))
    clock.advance(32)
    assert gave_up == [True] and clock.getDelayedCalls() == []


def _shared_queues(clock: Clock) -> tuple[dict[float, ExpiryQueue], object]:
    queues: dict[float, ExpiryQueue] = {}

    def expiry(delay: float) -> ExpiryQueue:
        return queues.setdefault(delay, ExpiryQueue(clock, delay))
    return queues, expiry


def test_2xx_retransmitter_on_shared_queues_keeps_the_same_schedule():
    clock = Clock()
    queues, expiry = _shared_queues(clock)
    sent: list[float] = []
    gave_up: list[bool] = []
    retx = TwoXXRetransmitter(clock, lambda: sent.append(clock.seconds()), 0.5, 4.0,
                              lambda: gave_up.append(True), expiry=expiry)
    assert retx.active and set(queues) == {0.5, 32.0}
    times = run_until(clock, 40, lambda: len(sent))
    assert times[:6] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]
    assert times[-1] == 31.5 and len(times) == 10
    assert gave_up == [True] and not retx.active
    assert clock.getDelayedCalls() == []


def test_2xx_retransmitter_on_shared_queues_stops_on_ack_and_leaves_them():
    clock = Clock()
    queues, expiry = _shared_queues(clock)
    sent: list[int] = []
    gave_up: list[bool] = []
    retx = TwoXXRetransmitter(clock, lambda: sent.append(1), 0.5, 4.0, lambda: gave_up.append(True),
                              expiry=expiry)
    retx.stop()
    assert not retx.active and all(len(q) == 0 for q in queues.values())
    clock.advance(100)
    assert sent == [] and gave_up == [] and clock.getDelayedCalls() == []


def test_expiry_queue_fires_in_order_with_one_delayed_call_and_cancels_when_empty():
    clock = Clock()
    queue = ExpiryQueue(clock, 32)
    fired: list[str] = []
    queue.add(lambda: fired.append("a"))
    clock.advance(1)
    b = queue.add(lambda: fired.append("b"))
    clock.advance(1)
    queue.add(lambda: fired.append("c"))
    assert len(clock.getDelayedCalls()) == 1 and len(queue) == 3
    queue.discard(b)
    clock.advance(30)
    assert fired == ["a"]  # exactly 32 s after it was added
    clock.advance(2)
    assert fired == ["a", "c"] and len(queue) == 0 and clock.getDelayedCalls() == []
    d = queue.add(lambda: fired.append("d"))
    queue.discard(d)
    queue.discard(d)  # twice is harmless
    assert len(queue) == 0 and clock.getDelayedCalls() == []


def test_expiry_queue_drops_discarded_entries_long_before_their_deadline():
    """Timers B and F are discarded by nearly every response but would sit 64*T1 in the queue:
    the queue keeps its dead entries to a third of its length, and still fires the live ones on time."""
    clock = Clock()
    queue = ExpiryQueue(clock, 32)
    fired: list[int] = []
    for i in range(1000):
        queue.add(lambda i=i: fired.append(i))
        gone = queue.add(lambda: fired.append(-1))
        if i % 10:  # every 10th stays
            queue.discard(gone)
        clock.advance(0.01)
    assert len(queue) == 1000 + 100
    assert len(queue._queue) <= 1100 * 3 // 2 + 1
    clock.advance(32)
    assert len(fired) == 1100 and fired.count(-1) == 100
    assert [i for i in fired if i >= 0] == list(range(1000))
    assert len(queue) == 0 and clock.getDelayedCalls() == []


def test_expiry_queue_survives_a_purge_from_inside_an_expiring_callback():
    """A callback that discards many entries makes discard() replace the deque mid-expiry: every
    live entry still fires once, on time, and nothing fires twice."""
    clock = Clock()
    queue = ExpiryQueue(clock, 10)
    fired: list[int] = []
    later = []

    def first() -> None:
        fired.append(0)
        for entry in later[:150]:
            queue.discard(entry)

    queue.add(first)
    for i in range(1, 201):
        later.append(queue.add(lambda i=i: fired.append(i)))
    clock.advance(10)
    assert fired == [0, *range(151, 201)]
    assert len(queue) == 0 and clock.getDelayedCalls() == []


def test_expiry_queue_entry_added_by_an_expiring_callback_does_not_hold_back_older_ones():
    # Timer F ending a BYE can start another transaction, whose timer F joins the same 64*T1 queue
    # from inside the expiry: B (added at 10 s) must still end at 42 s, not with the new entry at
    # 64 s (found by bench/overload.py: ~10,000 transactions left 64*T1 after the load)
    clock = Clock()
    queue = ExpiryQueue(clock, 32)
    fired: list[tuple[str, float]] = []
    queue.add(lambda: (fired.append(("a", clock.seconds())),
                       queue.add(lambda: fired.append(("c", clock.seconds())))))
    clock.advance(10)
    queue.add(lambda: fired.append(("b", clock.seconds())))
    for _ in range(70):
        clock.advance(1)
    assert fired == [("a", 32.0), ("b", 42.0), ("c", 64.0)]
    assert clock.getDelayedCalls() == [] and len(queue) == 0


def test_expiry_queues_sharing_one_timer_fire_on_time_and_leave_no_timer_when_all_empty():
    """The layer's queues (T1, 64*T1...) share one DelayedCall, armed for their earliest deadline:
    an entry leaving its queue early arms nothing and cancels nothing while another queue waits."""
    clock = Clock()
    timer = ExpiryTimer(clock)
    long, short = ExpiryQueue(clock, 32, timer), ExpiryQueue(clock, 0.5, timer)
    fired: list[tuple[str, float]] = []
    long.add(lambda: fired.append(("long", clock.seconds())))
    [only] = clock.getDelayedCalls()
    assert only.getTime() == 32
    first = short.add(lambda: fired.append(("gone", clock.seconds())))  # sooner: the timer moves
    [only] = clock.getDelayedCalls()
    assert only.getTime() == 0.5
    short.discard(first)  # the timer stays (it fires, finds nothing due, re-arms for 32 s)
    assert clock.getDelayedCalls() == [only]
    clock.advance(0.25)
    short.add(lambda: fired.append(("short", clock.seconds())))  # due at 0.75: after the armed 0.5
    assert clock.getDelayedCalls() == [only]
    clock.advance(0.25)
    assert fired == [] and [c.getTime() for c in clock.getDelayedCalls()] == [0.75]
    clock.advance(0.25)
    assert fired == [("short", 0.75)] and [c.getTime() for c in clock.getDelayedCalls()] == [32]
    clock.advance(31.25)
    assert fired == [("short", 0.75), ("long", 32.0)]
    assert clock.getDelayedCalls() == [] and len(long) == len(short) == 0
    # an entry that leaves early, with every queue then empty, leaves no timer behind
    entry = short.add(lambda: fired.append(("never", clock.seconds())))
    long.add(lambda: fired.append(("never", clock.seconds())))
    long.clear()
    assert len(clock.getDelayedCalls()) == 1
    short.discard(entry)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(fired) == 2
