"""Failed digest attempts limited per source and per user (issue 11 item 7), on a Clock."""

from __future__ import annotations

from typing import Any

import pytest

from libon_tsilo.registrar.auth import AuthPolicy
from libon_tsilo.registrar.auth_limits import FailureLimiter, FailureLimits, source_key
from tests.fakes.sip import FakeFlow
from tests.registrar.helpers import digest_authorization
from tests.registrar.test_auth import REALM, AuthEnv

LIMITS = FailureLimits(per_source=5, per_user=8, window=60, block=300, known_source_ttl=3600)


def _flow(ip: str) -> FakeFlow:
    return FakeFlow(remote=(ip, 40000), id=f"udp:{ip}#1")


class LimitEnv(AuthEnv):
    def __init__(self, limits: FailureLimits = LIMITS, **kw: Any) -> None:
        super().__init__()
        self.policy = self.registrar.auth = AuthPolicy(
            self.clock, self.users, REALM, "server-secret", local_domains=["example.com"],
            limits=limits, **kw,
        )
        self.cseq = 0

    def attempt(self, ip: str, password: str, user: str = "alice") -> int:
        """One full REGISTER try from ``ip``: get a challenge, answer it; the final status."""
        flow = _flow(ip)
        self.cseq += 1
        resp = self.register(["<sip:alice@192.0.2.10:40000>"], flow=flow, cseq=self.cseq)
        if resp.status != 401:
            return resp.status
        challenge = resp.header_values("WWW-Authenticate")[0]
        auth = digest_authorization(challenge, user, password, "REGISTER", "sip:example.com")
        self.cseq += 1
        return self.register(["<sip:alice@192.0.2.10:40000>"], flow=flow, cseq=self.cseq,
                             extra=[f"Authorization: {auth}"]).status


@pytest.fixture
def env() -> LimitEnv:
    return LimitEnv()


def test_source_blocked_after_n_failures_even_with_the_right_password(env: LimitEnv) -> None:
    for _ in range(LIMITS.per_source):
        assert env.attempt("203.0.113.9", "guess") == 401
    # blocked: no challenge, and the right password is not even checked (no oracle)
    assert env.attempt("203.0.113.9", "wonderland") == 403
    stats = env.policy.limiter.stats()
    assert stats["blocked_sources"] == 1 and stats["refused_source"] == 1
    assert stats["blocked_sources_now"] == 1
    # another source is not affected
    assert env.attempt("203.0.113.10", "wonderland") == 200
    env.clock.advance(LIMITS.block + 1)
    assert env.attempt("203.0.113.9", "wonderland") == 200


def test_failures_spread_over_windows_do_not_block(env: LimitEnv) -> None:
    for _ in range(3):
        for _ in range(LIMITS.per_source - 1):
            assert env.attempt("203.0.113.9", "guess") == 401
        env.clock.advance(LIMITS.window)
    assert env.attempt("203.0.113.9", "wonderland") == 200


def test_requests_without_credentials_and_stale_nonces_are_not_failures(env: LimitEnv) -> None:
    flow = _flow("203.0.113.9")
    for cseq in range(1, 3 * LIMITS.per_source):
        assert env.register(["<sip:alice@h>"], flow=flow, cseq=cseq).status == 401
    assert env.policy.limiter.stats()["failures"] == 0


def test_ipv6_source_counts_as_its_64() -> None:
    assert source_key("2001:db8:1:2::5") == source_key("[2001:db8:1:2:ffff::9]") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_user_throttled_against_new_sources_but_known_phones_keep_working(env: LimitEnv) -> None:
    # alice's phone registered from its address before the attack
    assert env.attempt("198.51.100.20", "wonderland") == 200
    # a botnet: one guess per address, below every per-source limit
    for i in range(LIMITS.per_user):
        assert env.attempt(f"203.0.113.{i + 1}", "guess") == 401
    # the next guess, right or wrong, from a new address: refused unchecked
    assert env.attempt("203.0.113.200", "wonderland") == 403
    assert env.attempt("203.0.113.201", "guess") == 403
    # alice's known phone is still let in (the limit slows guessing; it does not lock her out)
    assert env.attempt("198.51.100.20", "wonderland") == 200
    stats = env.policy.limiter.stats()
    assert stats["throttled_users"] == 1 and stats["refused_user"] == 2
    env.clock.advance(LIMITS.block + 1)
    assert env.attempt("203.0.113.200", "wonderland") == 200


def test_unknown_users_count_like_known_ones(env: LimitEnv) -> None:
    """No enumeration oracle: a made-up user name is throttled the same way as a real one."""
    for i in range(LIMITS.per_user):
        assert env.attempt(f"203.0.113.{i + 1}", "x", user="nobody") == 401
    assert env.attempt("203.0.113.200", "x", user="nobody") == 403


def test_trusted_sources_are_never_counted() -> None:
    env = LimitEnv(trusted_sources=["203.0.113.0/24"])
    for cseq in range(1, 3 * LIMITS.per_source):
        assert env.register(["<sip:alice@h>"], flow=_flow("203.0.113.9"), cseq=cseq,
                            extra=['Authorization: Digest username="alice", realm="example.com", '
                                   'nonce="n", uri="u", response="r", qop=auth, nc=1, cnonce="c"']).status == 200
    assert env.policy.limiter.stats()["failures"] == 0


def test_zero_turns_a_limit_off() -> None:
    env = LimitEnv(FailureLimits(per_source=0, per_user=0))
    for _ in range(50):
        assert env.attempt("203.0.113.9", "guess") == 401
    assert env.attempt("203.0.113.9", "wonderland") == 200


def test_tables_are_swept_and_bounded() -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    limiter = FailureLimiter(clock, FailureLimits(per_source=3, per_user=3, window=60, block=300,
                                                  known_source_ttl=600, max_tracked=100))
    for i in range(500):  # spoofed sources, made-up users
        limiter.failed(f"user{i}", f"10.0.{i // 256}.{i % 256}")
    assert limiter.stats()["tracked"] == 200  # 100 sources + 100 users, no more
    limiter.succeeded("alice", "10.9.9.9")
    clock.advance(60)
    assert limiter.stats()["tracked"] == 1  # the known source lives longer
    clock.advance(600)
    assert limiter.stats()["tracked"] == 0
    assert clock.getDelayedCalls() == []


def test_stop_cancels_the_sweeper(env: LimitEnv) -> None:
    env.attempt("203.0.113.9", "guess")
    env.policy.stop()
    env.store.stop()
    assert env.clock.getDelayedCalls() == []
