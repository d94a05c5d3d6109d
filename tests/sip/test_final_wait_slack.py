"""The final waits of transactions end in batches (sip/timers.py ``final_wait_slack``): a wait may
end up to a sixteenth of it late (at most a second), so one timer firing ends every wait due within
that span, while the retransmission timers keep their exact times on the same shared timer."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from libon_tsilo.sip.timers import SERVER_SLACK_SHARE, ExpiryQueue, ExpiryTimer, State, final_wait_slack
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, request_text
from tests.sip.test_transaction_client import _send

UDP = FakeFlow("udp")


def _pass(clock: Clock, seconds: float, step: float = 0.1) -> None:
    """Let ``seconds`` go by in steps, as a reactor would: Clock.advance(n) runs the calls due in
    between with the clock already n later."""
    for _ in range(round(seconds / step)):
        clock.advance(step)


class CountingClock(Clock):
    """A Clock that counts its callLater calls: each one is a timer the reactor would arm."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = 0

    def callLater(self, delay, fn, *args, **kw):  # noqa: N802 (Twisted's name)
        self.armed += 1
        return super().callLater(delay, fn, *args, **kw)


def test_the_server_share_is_a_sixteenth_capped_at_a_second():
    assert final_wait_slack(5.0, SERVER_SLACK_SHARE) == 5.0 / 16  # T4: timers I, K
    assert final_wait_slack(32.0, SERVER_SLACK_SHARE) == 1.0  # 64*T1: capped
    assert final_wait_slack(32.0, 0.0) == 0.0  # the layer's default: RFC 3261's times exactly


def test_entries_due_within_the_slack_run_in_one_firing_no_earlier_than_their_deadline():
    clock = CountingClock()
    queue = ExpiryQueue(clock, 5.0, ExpiryTimer(clock), slack=0.5)
    ran: list[tuple[str, float]] = []
    for name in ("a", "b", "c"):
        queue.add(lambda name=name: ran.append((name, clock.seconds())))
        clock.advance(0.2)  # added at 0, 0.2, 0.4: due at 5, 5.2, 5.4
    clock.advance(5.5 - 0.6 - 0.001)
    assert ran == []  # the first is due at 5 and may wait until 5.5
    clock.advance(0.001)
    assert [name for name, _ in ran] == ["a", "b", "c"]
    assert [at for _, at in ran] == pytest.approx([5.5, 5.5, 5.5])
    assert clock.armed == 1  # one DelayedCall for the three
    assert clock.getDelayedCalls() == []


def test_an_exact_queue_on_the_same_timer_keeps_its_time_and_takes_the_slack_queues_due_entries():
    clock = Clock()
    timer = ExpiryTimer(clock)
    lazy = ExpiryQueue(clock, 5.0, timer, slack=1.0)
    exact = ExpiryQueue(clock, 5.5, timer)
    ran: list[tuple[str, float]] = []
    lazy.add(lambda: ran.append(("lazy", clock.seconds())))  # due 5, may wait until 6
    exact.add(lambda: ran.append(("exact", clock.seconds())))  # due 5.5, exactly
    clock.advance(5.5)
    # the exact one's firing ended the lazy wait too
    assert [name for name, _ in ran] == ["lazy", "exact"]
    assert [at for _, at in ran] == pytest.approx([5.5, 5.5])
    assert clock.getDelayedCalls() == []


def test_timer_j_with_the_server_share_ends_within_a_second_after_64_t1_one_firing_for_two():
    env = Env(slack_share=SERVER_SLACK_SHARE)
    env.tu.auto_status = 200
    env.feed(request_text("OPTIONS", branch="z9hG4bKone"), UDP)
    env.clock.advance(0.5)
    env.feed(request_text("OPTIONS", branch="z9hG4bKtwo", call_id="call-2@example.net"), UDP)
    first, second = (entry[1] for entry in env.tu.requests)
    assert first.state is State.COMPLETED and second.state is State.COMPLETED
    _pass(env.clock, 32 - 0.5)  # 64*T1 after the first
    env.feed(request_text("OPTIONS", branch="z9hG4bKone"), UDP)  # a retransmission, still absorbed
    assert env.transport.statuses() == [200, 200, 200] and len(env.tu.requests) == 2
    assert first.state is State.COMPLETED
    _pass(env.clock, 1.0)  # 64*T1 + its slack (1 s): both waits end in that one firing
    assert first.state is State.TERMINATED and second.state is State.TERMINATED
    env.assert_clean()


def test_timer_b_with_the_server_share_reports_408_within_a_second_after_64_t1():
    env = Env(slack_share=SERVER_SLACK_SHARE)
    ctx, got = _send(env)
    _pass(env.clock, 32)
    assert got == []
    _pass(env.clock, 1.0)
    assert got.statuses() == [408]
    assert ctx.state is State.TERMINATED
    env.assert_clean()


def test_retransmissions_keep_their_exact_times_with_the_server_share():
    env = Env(slack_share=SERVER_SLACK_SHARE)
    _send(env)
    env.clock.advance(0.5 - 0.001)
    assert env.transport.methods() == ["INVITE"]
    env.clock.advance(0.001)  # timer A: T1, not a sixteenth of anything later
    assert env.transport.methods() == ["INVITE", "INVITE"]
