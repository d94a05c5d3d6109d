"""sip/limits.py: the per-source request limiter (pike-like), on a Clock, and its transaction-layer hook."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from libon_tsilo.sip.limits import ALLOW, DROP, REFUSE, SourceFilter, SourceLimiter, source_key
from libon_tsilo.sip.message import parse_message
from tests.fakes.sip import FakeFlow
from tests.sip.fakes import Env, request_text


def _limiter(clock: Clock, **kw) -> SourceLimiter:
    args = {"rate": 10.0, "burst": 5, "ban_time": 30.0}
    args.update(kw)
    return SourceLimiter(clock, **args)


def test_burst_then_refuse_once_then_drop_while_banned():
    clock = Clock()
    lim = _limiter(clock)
    verdicts = [lim.check("192.0.2.1") for _ in range(8)]
    assert verdicts == [ALLOW] * 5 + [REFUSE, DROP, DROP]
    assert lim.banned() == ["192.0.2.1"]
    # another source is not affected
    assert lim.check("192.0.2.2") == ALLOW


def test_rate_is_sustainable_below_the_limit():
    clock = Clock()
    lim = _limiter(clock)
    for _ in range(200):  # 10/s exactly, for 20 s
        assert lim.check("192.0.2.1") == ALLOW
        clock.advance(0.1)


def test_ban_ends_after_ban_time_when_the_source_calmed_down():
    clock = Clock()
    lim = _limiter(clock)
    while lim.check("192.0.2.1") != REFUSE:
        pass
    clock.advance(29.9)
    assert lim.check("192.0.2.1") == DROP
    clock.advance(0.2)
    assert [lim.check("192.0.2.1") for _ in range(5)] == [ALLOW] * 5
    assert lim.banned() == []


def test_a_source_that_keeps_flooding_is_banned_again_at_once():
    clock = Clock()
    lim = _limiter(clock)
    for _ in range(6):
        lim.check("192.0.2.1")
    verdicts = []
    for _ in range(int(31 / 0.05)):  # 20 requests/s, twice the rate, through the ban and past it
        clock.advance(0.05)
        verdicts.append(lim.check("192.0.2.1"))
    assert verdicts.count(REFUSE) == 1  # re-banned as the ban ended: one more 503, no burst let through
    assert verdicts.count(ALLOW) == 0


def test_ipv6_sources_share_their_slash_64_and_mapped_ipv4_is_ipv4():
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("192.0.2.7") == "192.0.2.7"
    clock = Clock()
    lim = _limiter(clock)
    hosts = [f"2001:db8:1:2::{i:x}" for i in range(1, 7)]
    assert [lim.check(h) for h in hosts] == [ALLOW] * 5 + [REFUSE]
    assert lim.check("2001:db8:1:3::1") == ALLOW


def test_exempt_networks_are_never_limited():
    clock = Clock()
    lim = _limiter(clock, exempt=SourceFilter(["10.0.0.0/8", "::1/128"]))
    assert all(lim.check("10.1.2.3") == ALLOW for _ in range(100))
    assert all(lim.check("::1") == ALLOW for _ in range(100))
    assert "::ffff:10.9.9.9" in SourceFilter(["10.0.0.0/8"])
    assert "192.0.2.1" not in SourceFilter(["10.0.0.0/8"])
    assert "not-an-ip" not in SourceFilter(["10.0.0.0/8"])


def test_an_exempt_address_exempts_neither_its_64_nor_is_limited_with_it():
    clock = Clock()
    lim = _limiter(clock, exempt=SourceFilter(["2001:db8:1:2::10/128"]))
    assert all(lim.check("2001:db8:1:2::10") == ALLOW for _ in range(20))  # the trusted SBC first
    assert [lim.check("2001:db8:1:2::99") for _ in range(6)] == [ALLOW] * 5 + [REFUSE]  # its neighbour
    assert all(lim.check("2001:db8:1:2::10") == ALLOW for _ in range(20))  # the /64 is banned, not the SBC


def test_table_is_bounded_idle_entries_expire_and_the_least_recent_is_evicted():
    clock = Clock()
    lim = _limiter(clock, max_sources=100)
    for i in range(100):
        lim.check(f"198.51.100.{i}")
    assert len(lim) == 100
    lim.check("203.0.113.1")  # full, none idle yet: the least recently used goes
    assert len(lim) == 100 and lim.counters["evicted"] == 1
    clock.advance(lim.hold)  # everyone has refilled and served any ban: dropped by the next newcomer
    lim.check("203.0.113.2")
    assert len(lim) == 1 and lim.counters["evicted"] == 1


def test_a_banned_source_is_not_forgotten_while_it_is_used():
    clock = Clock()
    lim = _limiter(clock, max_sources=3)
    for _ in range(6):
        lim.check("192.0.2.1")
    for i in range(50):  # newcomers keep coming, the banned source keeps sending
        clock.advance(0.5)
        assert lim.check("192.0.2.1") == DROP
        lim.check(f"198.51.100.{i}")
    assert "192.0.2.1" in lim.banned()


@pytest.mark.parametrize("bad", [{"rate": 0}, {"burst": 0}, {"ban_time": 0}, {"max_sources": 0}])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        _limiter(Clock(), **bad)


# -- the transaction layer's hook ------------------------------------------------------------------


def _env_with_limiter(**kw) -> tuple[Env, SourceLimiter]:
    env = Env()
    env.tu.auto_status = 200
    lim = _limiter(env.clock, respond=env.transport.send_response, **kw)
    env.layer.admit = lim.admit
    return env, lim


def _options(i: int) -> str:
    return request_text("OPTIONS", branch=f"z9hG4bKopt{i}", call_id=f"opt-{i}", ruri="sip:example.com")


def test_hook_answers_one_503_with_retry_after_then_drops_and_creates_no_transaction():
    env, lim = _env_with_limiter()
    flow = FakeFlow(remote=("192.0.2.1", 5060))
    for i in range(10):
        env.feed(_options(i), flow)
    assert env.transport.statuses() == [200] * 5 + [503]
    resp = env.transport.responses[-1][0]
    assert resp.header("Retry-After") == "30"
    assert resp.to.tag
    assert len(env.tu.requests) == 5
    assert env.layer.server_count == 5  # the refused and dropped ones left nothing behind
    assert lim.limit_hits() == {"source_rate_refused": 1, "source_rate_dropped": 4, "source_table_evicted": 0}
    # another source still gets its answer
    env.feed(_options(99), FakeFlow(remote=("192.0.2.2", 5060)))
    assert env.transport.statuses()[-1] == 200


def test_hook_never_charges_acks():
    env, lim = _env_with_limiter()
    flow = FakeFlow(remote=("192.0.2.1", 5060))
    for i in range(20):
        env.feed(request_text("ACK", branch=f"z9hG4bKack{i}", to_tag="x", call_id=f"a{i}"), flow)
    assert len(env.tu.requests) == 20  # every ACK reached the TU
    assert lim.check("192.0.2.1") == ALLOW


def test_the_refusal_is_logged_once_per_interval():
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        env, _ = _env_with_limiter()
        for n in range(3):
            flow = FakeFlow(remote=(f"192.0.2.{n + 1}", 5060))
            for i in range(6):
                env.feed(_options(n * 10 + i), flow)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if "requests/s" in e.get("log_format", "")]
    assert len(lines) == 1 and lines[0]["source"] == "192.0.2.1"


def test_a_banned_source_still_gets_its_responses_delivered():
    """Responses belong to our own transactions (a call in progress): a ban never drops them."""
    from tests.sip.fakes import FakeTarget, response_text

    env, lim = _env_with_limiter()
    peer = FakeFlow(remote=("192.0.2.9", 5060))
    for i in range(7):
        env.feed(_options(i), peer)
    assert "192.0.2.9" in lim.banned()
    got = []
    invite = parse_message(request_text("INVITE", branch="z9hG4bKout1", via_host="127.0.0.1:5060").encode())
    ctx = env.layer.send_request(invite, FakeTarget("udp", "192.0.2.9"), None, got.append)
    env.feed(response_text(ctx.request, 180), peer)
    env.feed(response_text(ctx.request, 486), peer)
    assert [r.status for r in got] == [180, 486]
