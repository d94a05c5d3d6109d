"""sip/overload.py: the lag detector, its admission fraction and the stateless 503, all on a Clock.

Lag is simulated by advancing the Clock past a tick's due time: the tick then runs late by exactly
the extra amount, as it would behind a burst of work on the real reactor.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from libon_tsilo.sip.message import parse_message
from libon_tsilo.sip.overload import EarlyShedder, OverloadDetector, OverloadGate, install, stateless_503
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, request_text

INTERVAL = 0.1


def detector(clock: Clock, **kw) -> OverloadDetector:
    d = OverloadDetector(clock, enter_lag=0.1, leave_lag=0.02, interval=INTERVAL, **kw)
    d.start()
    return d


def tick(clock: Clock, lag: float = 0.0, n: int = 1) -> None:
    """Let ``n`` ticks fire, each ``lag`` seconds late."""
    for _ in range(n):
        clock.advance(INTERVAL + lag)


def overload(clock: Clock, d: OverloadDetector) -> None:
    """Two ticks 0.5 s late (capped at 0.3 s, smoothed: 0.09 then 0.153): overloaded, fraction 0.65."""
    tick(clock, lag=0.5, n=2)
    assert d.overloaded


# -- the detector -------------------------------------------------------------------------------


def test_on_time_ticks_admit_everything():
    clock = Clock()
    d = detector(clock)
    tick(clock, lag=0.0, n=50)
    assert not d.overloaded and d.fraction == 1.0 and d.lag == 0.0
    assert all(d.admit() for _ in range(1000))
    assert d.stats()["state"] == "normal" and d.stats()["shed"] == 0


def test_lag_is_smoothed_one_late_tick_under_the_threshold_does_not_trip():
    clock = Clock()
    d = detector(clock)
    tick(clock, lag=0.2)  # smoothed: 0.3 * 0.2 = 0.06 < 0.1
    assert not d.overloaded
    assert d.lag == pytest.approx(0.06)
    assert d.max_lag == pytest.approx(0.2)
    tick(clock, lag=0.2)  # 0.06 + 0.3 * (0.2 - 0.06) = 0.102
    assert d.overloaded and d.episodes == 1


def test_pressure_shrinks_the_admitted_fraction_each_tick_down_to_nothing():
    clock = Clock()
    d = detector(clock)
    overload(clock, d)  # smoothed lag 0.153: cut to enter_lag / lag, harder than 0.7
    assert d.fraction == pytest.approx(0.1 / 0.153)
    tick(clock, lag=0.5)  # smoothed lag 0.1971
    assert d.fraction == pytest.approx(0.1 / 0.153 * 0.1 / 0.1971)
    tick(clock, lag=0.5, n=20)
    assert d.fraction == 0.0
    assert not any(d.admit() for _ in range(100))
    assert d.shed == 100


def test_admitted_fraction_is_exact_and_even_not_random():
    clock = Clock()
    d = detector(clock)
    overload(clock, d)
    d.fraction = 0.25
    decisions = [d.admit() for _ in range(12)]
    assert decisions == [False, False, False, True] * 3
    assert (d.admitted, d.shed) == (3, 9)


def test_lag_between_leave_and_enter_raises_the_fraction_in_small_steps_but_stays_overloaded():
    # an AIMD loop around enter_lag: holding the fraction in the band would stick it at 0 when the
    # work that is never refused keeps the lag there on its own
    clock = Clock()
    d = detector(clock)
    overload(clock, d)
    tick(clock, lag=0.5, n=20)
    assert d.fraction == 0.0
    tick(clock, lag=0.05, n=10)  # the smoothed lag falls into the band (0.02 < lag < 0.1)
    assert 0.02 < d.lag < 0.1
    before = d.fraction
    tick(clock, lag=0.05)  # the nearer enter_lag, the smaller the step
    assert d.fraction == pytest.approx(before + 0.1 * (0.1 - d.lag) / (0.1 - 0.02), abs=1e-6)
    assert d.fraction - before < 0.1
    tick(clock, lag=0.05, n=40)
    assert d.fraction == 1.0 and d.overloaded  # all admitted, but not calm yet
    tick(clock, n=10)
    assert not d.overloaded


def test_the_fraction_settles_where_the_lag_stays_near_enter_lag():
    # a toy server: the lag grows with what is admitted (0.2 s when everything is): the loop keeps
    # the lag near enter_lag (0.1 s) by admitting about half, instead of swinging between all and none
    clock = Clock()
    d = detector(clock)
    fractions = []
    for _ in range(300):
        tick(clock, lag=0.2 * d.fraction if d.overloaded else 0.2)
        fractions.append(d.fraction)
    late = fractions[100:]
    assert d.overloaded
    assert 0.3 < sum(late) / len(late) < 0.7
    assert min(late) > 0.15 and max(late) < 0.9


def test_calm_ticks_raise_the_fraction_back_to_all_then_leave_overload():
    clock = Clock()
    d = detector(clock)
    overload(clock, d)
    tick(clock, lag=0.5, n=20)
    assert d.fraction == 0.0
    # the smoothed lag must first decay under leave_lag (0.02), then +0.1 per tick
    calm = 0
    while d.overloaded:
        tick(clock)
        calm += 1
        assert calm < 40
    assert d.fraction == 1.0 and d.lag <= 0.02
    assert 10 <= calm <= 25  # ~10 ticks of decay, 10 of increase: back to normal in ~2 s
    assert all(d.admit() for _ in range(100))
    assert d.stats()["state"] == "normal" and d.episodes == 1


def test_one_isolated_stall_never_trips_two_late_ticks_in_a_row_do():
    # a full garbage collection, a VM pause or a wall-clock step is not load: the sample is capped
    # at 3 * enter_lag, which smoothed stays under enter_lag
    clock = Clock()
    d = detector(clock)
    tick(clock, lag=3600.0)
    assert d.max_lag == pytest.approx(3600.0)
    assert d.lag == pytest.approx(0.09) and not d.overloaded
    tick(clock, n=10)
    assert not d.overloaded
    tick(clock, lag=0.3, n=2)
    assert d.overloaded


def test_queue_delay_reported_by_the_transport_counts_as_lag():
    # the timer on time, but datagrams waited 0.4 s in the socket buffer
    clock = Clock()
    d = detector(clock)
    for _ in range(2):
        clock.advance(INTERVAL / 2)
        d.observe_delay(0.5)
        d.observe_delay(0.4)  # a standing queue: every wake-up found an old datagram
        clock.advance(INTERVAL / 2)
    assert d.overloaded and d.max_lag == pytest.approx(0.4)
    tick(clock, n=30)  # nothing reported any more: the queue is empty
    assert not d.overloaded


def test_a_burst_absorbed_within_the_tick_is_not_a_backlog():
    # the least delay of a tick counts: one wake-up found the queue fresh, so it empties
    clock = Clock()
    d = detector(clock)
    for _ in range(20):
        clock.advance(INTERVAL / 2)
        d.observe_delay(0.8)
        d.observe_delay(0.001)
        clock.advance(INTERVAL / 2)
    assert not d.overloaded and d.max_lag < 0.1  # never the 0.8 s burst


def test_queue_depth_at_its_bound_is_overload_without_lag():
    clock = Clock()
    depth = [0]
    d = detector(clock, depth=lambda: depth[0], max_depth=100)
    tick(clock, n=5)
    assert not d.overloaded
    depth[0] = 100
    tick(clock)
    assert d.overloaded and d.fraction == pytest.approx(0.7)
    tick(clock, n=20)
    assert d.fraction == 0.0
    depth[0] = 99
    tick(clock, n=10)
    assert not d.overloaded and d.fraction == 1.0


def test_max_depth_zero_means_no_bound():
    clock = Clock()
    d = detector(clock, depth=lambda: 10**9, max_depth=0)
    tick(clock, n=5)
    assert not d.overloaded


def test_episodes_are_logged_start_and_end_at_most_one_start_per_10_s():
    clock = Clock()
    d = detector(clock)
    with capturedLogs() as events:
        overload(clock, d)
        tick(clock, lag=0.5, n=3)
        while d.overloaded:
            tick(clock)
        overload(clock, d)  # within 10 s of the last line: not logged, counted
        while d.overloaded:
            tick(clock)
        tick(clock, n=100)  # 10 s later
        overload(clock, d)
    lines = [e for e in events if e.get("log_namespace") == "libon_tsilo.sip.overload"]
    assert [e["log_level"].name for e in lines] == ["warn", "warn", "warn"]
    assert "refusing new INVITEs" in lines[0]["log_format"] and lines[0]["cause"] == "reactor lag"
    assert "overload over" in lines[1]["log_format"]
    assert lines[2]["also"] == " (+1 short episode(s) not logged)"
    assert d.episodes == 3


def test_stop_cancels_the_timer():
    clock = Clock()
    d = detector(clock)
    tick(clock, n=3)
    assert len(clock.getDelayedCalls()) == 1
    d.stop()
    assert clock.getDelayedCalls() == []


def test_leave_must_be_under_enter():
    with pytest.raises(ValueError):
        OverloadDetector(Clock(), enter_lag=0.05, leave_lag=0.05)


# -- the gate and the stateless 503 -------------------------------------------------------------


def gate_overloaded(fraction: float = 0.0) -> tuple[OverloadGate, OverloadDetector]:
    clock = Clock()
    d = detector(clock)
    overload(clock, d)
    d.fraction = fraction
    return OverloadGate(d, retry_after=7), d


def req(method: str = "INVITE", **kw):
    return parse_message(request_text(method, **kw).encode())


def test_gate_refuses_only_new_invites():
    gate, d = gate_overloaded()
    refusal = gate(req("INVITE"))
    assert refusal is not None and refusal.status == 503
    for method in ("REGISTER", "OPTIONS", "BYE", "MESSAGE", "SUBSCRIBE"):
        assert gate(req(method)) is None, method
    assert gate(req("INVITE", to_tag="dlg1")) is None  # a re-INVITE of an answered call
    assert gate(req("BYE", to_tag="dlg1")) is None
    assert d.shed == 1


def test_gate_lets_everything_in_when_not_overloaded():
    d = detector(Clock())
    gate = OverloadGate(d, retry_after=7)
    assert gate(req("INVITE")) is None
    assert d.shed == 0 and d.admitted == 0


def test_stateless_503_has_retry_after_and_the_same_to_tag_on_a_retransmission():
    first = stateless_503(req("INVITE"), 7)
    again = stateless_503(req("INVITE"), 7)
    other = stateless_503(req("INVITE", branch="z9hG4bKother", call_id="call-2@example.net"), 7)
    wire = parse_message(first.to_bytes())
    assert wire.status == 503 and wire.header("Retry-After") == "7"
    assert wire.to.tag and wire.to.tag == parse_message(again.to_bytes()).to.tag
    assert wire.to.tag != other.to.tag
    assert wire.call_id == "call-1@example.net" and wire.cseq.method == "INVITE"


# -- in the transaction layer: no transaction is kept ------------------------------------------


def test_transaction_layer_answers_a_shed_invite_statelessly():
    env = Env()
    gate, d = gate_overloaded()
    env.layer.gate = gate
    flow = FakeFlow()
    env.feed(request_text("INVITE"), flow)
    assert env.transport.statuses() == [503]  # no 100 Trying: nothing was started
    assert env.tu.requests == []
    assert len(env.layer) == 0 and env.clock.getDelayedCalls() == []
    env.feed(request_text("INVITE"), flow)  # its retransmission: the same answer, again stateless
    first, again = (r for r, _ in env.transport.responses)
    assert again.status == 503 and again.to.tag == first.to.tag
    tag = first.to.tag
    env.feed(request_text("ACK", to_tag=tag, cseq_method="ACK"), flow)
    assert [(r.method, stx) for r, stx, _ in env.tu.requests] == [("ACK", None)]  # a stray ACK
    assert len(env.layer) == 0 and d.shed == 2


def test_transaction_layer_keeps_registers_and_accepted_invites_under_overload():
    env = Env()
    env.tu.auto_status = None
    flow = FakeFlow()
    env.feed(request_text("INVITE", branch="z9hG4bKearly"), flow)  # accepted before the overload
    gate, _ = gate_overloaded()
    env.layer.gate = gate
    env.feed(request_text("INVITE", branch="z9hG4bKearly"), flow)  # its retransmission
    env.feed(request_text("REGISTER", branch="z9hG4bKreg", call_id="reg-1"), flow)
    env.feed(request_text("OPTIONS", branch="z9hG4bKopt", call_id="opt-1"), flow)
    env.feed(request_text("BYE", branch="z9hG4bKbye", call_id="dlg-1", to_tag="t1"), flow)
    assert env.transport.statuses() == [100, 100]  # the first INVITE's Trying, then resent
    assert [r.method for r, _, _ in env.tu.requests] == ["INVITE", "REGISTER", "OPTIONS", "BYE"]


INTERNAL = ("10.0.0.1", 5071)


def _peer_on_internal(local: tuple[str, int], remote: tuple[str, int]) -> bool:
    return local == INTERNAL and remote[0] == "10.0.0.2"


def test_gate_and_transaction_layer_let_an_exempt_source_through():
    """A cluster peer's relayed INVITE on the internal listener was admitted by that peer."""
    env = Env()
    env.tu.auto_status = None
    gate, d = gate_overloaded()
    gate.exempt = _peer_on_internal
    env.layer.gate = gate
    env.feed(request_text("INVITE", branch="z9hG4bKpeer"), FakeFlow(remote=("10.0.0.2", 5071), local=INTERNAL))
    env.feed(request_text("INVITE", branch="z9hG4bKpub"), FakeFlow(remote=("10.0.0.2", 5071)))  # public
    env.feed(request_text("INVITE", branch="z9hG4bKodd"), FakeFlow(remote=("10.0.0.9", 5071), local=INTERNAL))
    assert [r.branch for r, _, _ in env.tu.requests] == ["z9hG4bKpeer"]
    assert sorted(env.transport.statuses()) == [100, 503, 503] and d.shed == 2


def test_early_path_lets_an_exempt_source_through():
    _, d = gate_overloaded()
    shed = EarlyShedder(d, retry_after=7, accepted=lambda req: False, exempt=_peer_on_internal)
    data = request_text("INVITE").encode()
    assert shed(data, INTERNAL, ("10.0.0.2", 5071)) is None
    assert shed(data, ("192.0.2.5", 5060), ("10.0.0.2", 5071)) is not None  # the public listener
    assert shed(data, INTERNAL, ("192.0.2.9", 5071)) is not None  # not a peer
    assert d.shed == 2


# -- the early path: refused on the UDP datagram's bytes, before the full parse --------------------


def early(accepted=lambda req: False, fraction: float = 0.0) -> tuple[EarlyShedder, OverloadDetector]:
    _, d = gate_overloaded(fraction)
    return EarlyShedder(d, retry_after=7, accepted=accepted), d


def test_early_path_answers_a_new_invite_with_the_503_bytes():
    shed, d = early()
    answer = shed(request_text("INVITE").encode())
    resp = parse_message(answer)
    assert resp.status == 503 and resp.header("Retry-After") == "7"
    assert resp.to.tag.startswith("ovl") and resp.call_id == "call-1@example.net"
    assert resp.top_via.branch == "z9hG4bKtest1"
    assert d.shed == 1
    assert shed(request_text("INVITE").encode()) == answer  # a retransmission: the same bytes


def test_early_path_leaves_everything_else_to_the_normal_path():
    shed, d = early()
    for data in (
        request_text("REGISTER"), request_text("OPTIONS"), request_text("BYE", to_tag="t1"),
        request_text("INVITE", to_tag="t1"),  # a re-INVITE
        request_text("ACK", to_tag="abc123", cseq_method="ACK"),  # an ACK for a dialog of ours
        "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
        "CSeq: x INVITE\r\n\r\n",  # malformed: the normal path answers 400
    ):
        assert shed(data.encode()) is None, data
    assert d.shed == 0


def test_early_path_lets_a_retransmitted_accepted_invite_reach_its_transaction():
    seen = []
    shed, d = early(accepted=lambda req: seen.append(req.branch) or True)
    assert shed(request_text("INVITE").encode()) is None
    assert seen == ["z9hG4bKtest1"] and d.shed == 0


def test_early_path_drops_the_ack_of_a_stateless_503():
    shed, _ = early()
    tag = parse_message(shed(request_text("INVITE").encode())).to.tag
    assert shed(request_text("ACK", to_tag=tag, cseq_method="ACK").encode()) == b""


def test_early_path_does_nothing_when_not_overloaded_and_agrees_with_the_gate_on_credit():
    clock = Clock()
    d = detector(clock)
    shed = EarlyShedder(d, 7, accepted=lambda req: False)
    assert shed(request_text("INVITE").encode()) is None
    overload(clock, d)
    d.fraction = 0.5
    gate = OverloadGate(d, retry_after=7)
    # every 2nd INVITE is admitted: the early path lets it through without counting it, and the
    # gate (the normal path, after the transaction lookup) admits it
    outcomes = []
    for n in range(6):
        data = request_text("INVITE", branch=f"z9hG4bKn{n}", call_id=f"c{n}").encode()
        answer = shed(data)
        outcomes.append("503" if answer else ("admitted" if gate(parse_message(data)) is None else "gate-503"))
    assert outcomes == ["503", "admitted"] * 3
    assert (d.shed, d.admitted) == (3, 3)


def test_early_path_finds_accepted_invites_in_the_real_transaction_table():
    env = Env()
    env.feed(request_text("INVITE", branch="z9hG4bKearly"), FakeFlow())
    _, d = gate_overloaded()
    shed = EarlyShedder(d, 7, env.layer.has_server_transaction)
    assert shed(request_text("INVITE", branch="z9hG4bKearly").encode()) is None
    assert shed(request_text("INVITE", branch="z9hG4bKnew", call_id="new").encode()) is not None


def test_install_puts_the_refusal_hooks_in_place_only_while_overloaded():
    from types import SimpleNamespace

    clock = Clock()
    d = detector(clock)
    env = Env()
    transport = SimpleNamespace(early=None, on_queue_delay=None)
    install(d, transport, env.layer, retry_after=7)
    assert transport.on_queue_delay == d.observe_delay
    assert transport.early is None and env.layer.gate is None  # normal: nothing to pay per message
    overload(clock, d)
    assert isinstance(transport.early, EarlyShedder) and isinstance(env.layer.gate, OverloadGate)
    assert transport.early.accepted == env.layer.has_server_transaction
    while d.overloaded:
        tick(clock)
    assert transport.early is None and env.layer.gate is None
