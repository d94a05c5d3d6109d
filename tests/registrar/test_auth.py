"""Digest policy: 401 for REGISTER, 407 for INVITE, MD5 and SHA-256, stale, replay, ownership."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from libon_tsilo.registrar.auth import AuthPolicy
from libon_tsilo.registrar.users import UsersDB
from libon_tsilo.sip import digest
from libon_tsilo.sip.message import parse_message
from tests.fakes.sip import FakeFlow
from tests.registrar.helpers import digest_authorization, register_text
from tests.registrar.test_registrar import AOR, Env

RFC4475 = Path(__file__).resolve().parents[1] / "data" / "rfc4475"
REALM = "example.com"


class AuthEnv(Env):
    def __init__(self, **kw: Any) -> None:
        self.users = UsersDB(":memory:")
        self.users.add("alice", "wonderland", REALM)
        self.users.add("bob", "builder", REALM)
        super().__init__()
        if not kw.pop("default_algorithms", False):
            kw.setdefault("algorithms", ("SHA-256", "MD5"))  # both, to test each one
        self.policy = AuthPolicy(
            self.clock, self.users, REALM, "server-secret", nonce_lifetime=300,
            local_domains=["example.com"], **kw,
        )
        self.registrar.auth = self.policy

    def challenge(self, **kw: Any) -> Any:
        resp = self.register(["<sip:alice@192.0.2.10:40000>"], **kw)
        assert resp.status == 401
        return resp

    def answer(self, challenge: str, user: str = "alice", password: str = "wonderland", nc: int = 1,
               **kw: Any) -> Any:
        auth = digest_authorization(challenge, user, password, "REGISTER", "sip:example.com", nc=nc)
        extra = kw.pop("extra", []) + [f"Authorization: {auth}"]
        return self.register(["<sip:alice@192.0.2.10:40000>"], extra=extra, **kw)


@pytest.fixture
def env() -> AuthEnv:
    return AuthEnv()


def test_challenge_offers_sha256_then_md5(env: AuthEnv) -> None:
    resp = env.challenge()
    values = resp.header_values("WWW-Authenticate")
    assert [digest.parse_authorization(v)["algorithm"] for v in values] == ["SHA-256", "MD5"]
    for v in values:
        p = digest.parse_authorization(v)
        assert p["realm"] == REALM and p["qop"] == "auth" and "stale" not in p
    assert resp.to.tag
    assert env.store.lookup(AOR) == []


def test_default_challenge_is_md5_only() -> None:
    """libre gives up on a SHA-256 challenge even next to an MD5 one; SIPp answers the first only."""
    env = AuthEnv(default_algorithms=True)
    values = env.challenge().header_values("WWW-Authenticate")
    assert [digest.parse_authorization(v)["algorithm"] for v in values] == ["MD5"]


@pytest.mark.parametrize("index,algorithm", [(0, "SHA-256"), (1, "MD5")])
def test_register_with_each_algorithm(env: AuthEnv, index: int, algorithm: str) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[index]
    assert digest.parse_authorization(challenge)["algorithm"] == algorithm
    resp = env.answer(challenge, cseq=2)
    assert resp.status == 200
    assert len(env.store.lookup(AOR)) == 1


def test_wrong_password_rechallenged(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    assert env.answer(challenge, password="nope", cseq=2).status == 401
    assert env.store.lookup(AOR) == []


def test_unknown_user_rechallenged(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    assert env.answer(challenge, user="mallory", password="x", cseq=2).status == 401


def test_wrong_user_403(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    resp = env.answer(challenge, user="bob", password="builder", cseq=2)
    assert resp.status == 403
    assert env.store.lookup(AOR) == []


def test_stale_nonce(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    env.clock.advance(301)
    resp = env.answer(challenge, cseq=2)
    assert resp.status == 401
    fresh = resp.header_values("WWW-Authenticate")
    assert all(digest.parse_authorization(v).get("stale") == "true" for v in fresh)
    assert env.answer(fresh[0], cseq=3).status == 200


def test_stale_with_wrong_password_is_not_flagged_stale(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    env.clock.advance(301)
    resp = env.answer(challenge, password="nope", cseq=2)
    assert resp.status == 401
    assert "stale" not in resp.header("WWW-Authenticate")


def test_nonce_count_replay_refused(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    assert env.answer(challenge, nc=1, cseq=2).status == 200
    # the same nc again (a captured request replayed with a new CSeq is impossible without the
    # password, so replay the exact Authorization): refused
    assert env.answer(challenge, nc=1, cseq=3).status == 401
    assert env.answer(challenge, nc=2, cseq=4).status == 200
    assert env.answer(challenge, nc=2, cseq=5).status == 401


def test_replay_table_swept(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    env.answer(challenge, cseq=2)
    assert env.policy.replay_table_size() == 1
    env.clock.advance(301)
    env.clock.advance(300)
    assert env.policy.replay_table_size() == 0
    assert all(getattr(c.func, "__self__", None) is not env.policy.nonce_counts
               for c in env.clock.getDelayedCalls())


def test_forged_nonce_rechallenged(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    forged = challenge.replace(digest.parse_authorization(challenge)["nonce"], "1.2.3")
    assert env.answer(forged, cseq=2).status == 401


@pytest.mark.parametrize(
    "value,status",
    [
        ('Digest username="alice", realm="example.com", nonce="n", uri="sip:example.com", response="x"', 400),
        ('Digest username="alice", realm="example.com", nonce="n", uri="sip:example.com", response="x",'
         ' qop=auth-int, nc=00000001, cnonce="c"', 400),
        ('Digest username="alice", realm="example.com", nonce="n", uri="sip:example.com", response="x",'
         ' qop=auth, nc=1, cnonce="c"', 400),
        ('Digest username="alice", realm="other.realm", nonce="n", uri="u", response="x"', 401),
        ("Digest garbage", 401),
    ],
)
def test_malformed_credentials(env: AuthEnv, value: str, status: int) -> None:
    resp = env.register(["<sip:alice@h>"], extra=[f"Authorization: {value}"])
    assert resp.status == status


def test_non_ascii_response_is_malformed_not_a_crash(env: AuthEnv) -> None:
    # hmac.compare_digest raises TypeError on non-ASCII text: hostile bytes must get a 400, not a 500
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    auth = digest_authorization(challenge, "alice", "wonderland", "REGISTER", "sip:example.com")
    auth = re.sub(r'response="[^"]*"', 'response="\u00e9"', auth)
    resp = env.register(["<sip:alice@192.0.2.10:40000>"], extra=[f"Authorization: {auth}"], cseq=2)
    assert resp.status == 400
    assert env.policy.limiter.counters["failures"] == 1
    assert env.store.lookup(AOR) == []


def test_non_utf8_username_is_an_unknown_user_not_a_crash(env: AuthEnv) -> None:
    # a str with surrogates (bytes that are not UTF-8) cannot be bound by sqlite3: UnicodeEncodeError
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    auth = digest_authorization(challenge, "alice", "wonderland", "REGISTER", "sip:example.com")
    data = register_text(["<sip:alice@192.0.2.10:40000>"], cseq=2, extra=[f"Authorization: {auth}"])
    resp = env.send(data.replace(b'username="alice"', b'username="al\xffice"'))
    assert resp.status == 401
    assert env.policy.limiter.counters["failures"] == 1
    assert env.store.lookup(AOR) == []


def test_rfc4475_regaut01_unknown_scheme_challenged(env: AuthEnv) -> None:
    env.users.add("j.user", "pw", REALM)
    resp = env.send((RFC4475 / "regaut01.dat").read_bytes())
    assert resp.status == 401
    assert len(resp.header_values("WWW-Authenticate")) == 2


def test_trusted_source_exempt() -> None:
    env = AuthEnv(trusted_sources=["198.51.100.0/24"])
    flow = FakeFlow(remote=("198.51.100.7", 5060))
    assert env.register(["<sip:alice@h>"], flow=flow).status == 200
    assert env.register(["<sip:alice@h2>"], cseq=2).status == 401  # from elsewhere


@pytest.mark.parametrize("remote,trusted", [
    ("::ffff:198.51.100.7", True), ("[::ffff:198.51.100.7]", True), ("::ffff:203.0.113.7", False),
    ("2001:db8::7", True), ("2001:db9::7", False),
])
def test_trusted_source_in_any_spelling(remote: str, trusted: bool) -> None:
    env = AuthEnv(trusted_sources=["198.51.100.0/24", "2001:db8::/32"])
    assert env.policy.is_trusted(FakeFlow(remote=(remote, 5060))) is trusted


def test_disabled_auth() -> None:
    env = AuthEnv(enabled=False)
    assert env.register(["<sip:alice@h>"]).status == 200


# -- INVITE: 407 with Proxy-Authenticate ---------------------------------------------------------

def _invite(frm: str = "sip:alice@example.com", extra: list[str] | None = None) -> Any:
    data = register_text(method="INVITE", to=frm, ruri="sip:bob@example.com", extra=extra)
    return parse_message(data)


def test_invite_challenged_with_407(env: AuthEnv) -> None:
    result = env.policy.check(_invite(), env.flow, "invite")
    assert not result.ok and result.response.status == 407
    values = result.response.header_values("Proxy-Authenticate")
    assert len(values) == 2 and "SHA-256" in values[0]
    auth = digest_authorization(values[1], "alice", "wonderland", "INVITE", "sip:bob@example.com")
    result = env.policy.check(_invite(extra=[f"Proxy-Authorization: {auth}"]), env.flow, "invite")
    assert result.ok and result.user == "alice"
    # the WWW form of the header is not accepted for a proxy challenge
    result = env.policy.check(_invite(extra=[f"Authorization: {auth}"]), env.flow, "invite")
    assert result.response.status == 407


def test_invite_spoofing_another_local_user_403(env: AuthEnv) -> None:
    values = env.policy.check(_invite("sip:bob@example.com"), env.flow).response.header_values(
        "Proxy-Authenticate")
    auth = digest_authorization(values[0], "alice", "wonderland", "INVITE", "sip:bob@example.com")
    result = env.policy.check(_invite("sip:bob@example.com", [f"Proxy-Authorization: {auth}"]), env.flow)
    assert result.response.status == 403


def test_invite_from_foreign_domain_not_challenged(env: AuthEnv) -> None:
    result = env.policy.check(_invite("sip:carol@elsewhere.org"), env.flow, "invite")
    assert result.ok and result.user is None and result.exempt


def test_stop_cancels_sweeper(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    env.answer(challenge, cseq=2)
    env.policy.stop()
    env.store.stop()
    assert env.clock.getDelayedCalls() == []


# -- issue 11 item 3: "is this From ours?" on the canonical host ----------------------------------

LOCAL_SPELLINGS = [
    "localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.0.0.1.", "127.1", "2130706433",
    "0x7f.1", "[::ffff:127.0.0.1]",
]


@pytest.mark.parametrize("host", LOCAL_SPELLINGS)
def test_invite_from_any_spelling_of_a_local_domain_is_challenged(host: str) -> None:
    env = AuthEnv()
    env.policy = AuthPolicy(env.clock, env.users, REALM, "server-secret",
                            local_domains=["localhost", "127.0.0.1"])
    result = env.policy.check(_invite(f"sip:alice@{host}"), env.flow, "invite")
    assert not result.ok and result.response.status == 407


def test_invite_from_a_lookalike_domain_is_foreign() -> None:
    env = AuthEnv()
    env.policy = AuthPolicy(env.clock, env.users, REALM, "server-secret",
                            local_domains=["localhost", "127.0.0.1"])
    for host in ("127.0.0.2", "localhost.evil.org", "localhost-evil"):
        assert env.policy.check(_invite(f"sip:alice@{host}"), env.flow, "invite").exempt


# -- issue 11 item 6: a captured Authorization is not accepted again after a restart / elsewhere --

def _captured_register(env: AuthEnv) -> tuple[str, Any]:
    """An Authorization that one server accepted (what an eavesdropper captures)."""
    challenge = env.challenge().header_values("WWW-Authenticate")[0]
    auth = digest_authorization(challenge, "alice", "wonderland", "REGISTER", "sip:example.com")
    assert env.register(["<sip:alice@192.0.2.10:40000>"], extra=[f"Authorization: {auth}"],
                        cseq=2).status == 200
    return auth, env


def _other_instance(env: AuthEnv) -> AuthEnv:
    """Another AuthPolicy with the same [auth] secret and users: the same server after a restart,
    or another node of a cluster."""
    other = AuthEnv()
    other.clock.advance(env.clock.seconds() - other.clock.seconds())
    return other


@pytest.mark.parametrize("replay_cseq", [2, 3])
def test_captured_authorization_refused_after_restart(replay_cseq: int) -> None:
    auth, env = _captured_register(AuthEnv())
    restarted = _other_instance(env)
    resp = restarted.register(["<sip:alice@192.0.2.10:40000>"], extra=[f"Authorization: {auth}"],
                              cseq=replay_cseq)
    assert resp.status == 401
    # the nonce is ours (right secret) but of another epoch: stale, so a real UA retries silently
    fresh = resp.header_values("WWW-Authenticate")
    assert all(digest.parse_authorization(v).get("stale") == "true" for v in fresh)
    assert restarted.store.lookup(AOR) == []
    # and the real owner gets in with the fresh nonce
    assert restarted.answer(fresh[0], cseq=replay_cseq + 1).status == 200


def test_each_node_accepts_its_own_nonces_only() -> None:
    auth, env = _captured_register(AuthEnv())
    node_b = _other_instance(env)
    assert node_b.policy.nonce_counts.epoch != env.policy.nonce_counts.epoch
    challenge_b = node_b.challenge().header_values("WWW-Authenticate")[0]
    assert node_b.answer(challenge_b, cseq=2).status == 200
    # B's nonce on A is stale too: a shared replay table (one epoch) is what a cluster needs
    auth_b = digest_authorization(challenge_b, "alice", "wonderland", "REGISTER", "sip:example.com", nc=2)
    assert env.register(["<sip:alice@192.0.2.10:40000>"], extra=[f"Authorization: {auth_b}"],
                        cseq=3).status == 401


def test_a_shared_nonce_table_refuses_replays_across_instances() -> None:
    """The seam the cluster work fills: two policies on one NonceCounts (one epoch) accept each
    other's nonces, and a replay on the second is refused."""
    from libon_tsilo.registrar.nonce_counts import MemoryNonceCounts

    a = AuthEnv()
    shared = MemoryNonceCounts(a.clock, 300, epoch="cluster1")
    a.policy = a.registrar.auth = AuthPolicy(a.clock, a.users, REALM, "server-secret",
                                             nonce_counts=shared)
    auth, _ = _captured_register(a)
    b = _other_instance(a)
    b.policy = b.registrar.auth = AuthPolicy(b.clock, b.users, REALM, "server-secret",
                                             nonce_counts=shared)
    assert b.register(["<sip:alice@192.0.2.10:40000>"], extra=[f"Authorization: {auth}"],
                      cseq=3).status == 401
    challenge = b.challenge(cseq=4).header_values("WWW-Authenticate")[0]
    assert b.answer(challenge, cseq=5).status == 200


def test_each_refusal_is_logged_with_its_outcome(env: AuthEnv) -> None:
    """A structured ``outcome`` field (kept by the JSON log) says why credentials were refused, so
    tools and tests don't parse the wording (issue 10 leftover)."""
    from twisted.logger import globalLogPublisher

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        challenge = env.challenge().header_values("WWW-Authenticate")[0]
        assert env.answer(challenge, password="nope", cseq=2).status == 401
        assert env.answer(challenge, user="mallory", password="x", cseq=3).status == 401
        assert env.answer(challenge, user="bob", password="builder", nc=2, cseq=4).status == 403
        assert env.answer(challenge, nc=3, cseq=5).status == 200
        assert env.answer(challenge, nc=3, cseq=6).status == 401
    finally:
        globalLogPublisher.removeObserver(logged.append)
    outcomes = [(e["outcome"], e["user"]) for e in logged if "outcome" in e]
    assert outcomes == [("wrong_password", "alice"), ("unknown_user", "mallory"), ("not_owner", "bob"),
                        ("replayed_nc", "alice")]


# -- review of issue 13: credentials bound to the request they were challenged for ---------------

def _invite_to(ruri: str, extra: list[str] | None = None) -> Any:
    return parse_message(register_text(method="INVITE", to="sip:alice@example.com", ruri=ruri, extra=extra))


def _proxy_challenge(env: AuthEnv, ruri: str) -> str:
    return env.policy.check(_invite_to(ruri), env.flow).response.header_values("Proxy-Authenticate")[1]


def test_credentials_for_one_call_cannot_place_another(env: AuthEnv) -> None:
    # an on-path attacker drops alice's INVITE to bob (its nonce-count stays unused) and sends her
    # credentials on an INVITE to a premium number: the nonce was challenged for bob's URI, so the
    # answer is a fresh stale challenge only alice's password can answer (toll fraud before: 200)
    challenge = _proxy_challenge(env, "sip:bob@example.com")
    auth = digest_authorization(challenge, "alice", "wonderland", "INVITE", "tel:+19005550100")
    result = env.policy.check(_invite_to("tel:+19005550100", [f"Proxy-Authorization: {auth}"]), env.flow)
    assert result.response is not None and result.response.status == 407
    assert "stale=true" in result.response.header_values("Proxy-Authenticate")[0]
    # alice's own retry on the request that was challenged passes, with the same credentials
    auth = digest_authorization(challenge, "alice", "wonderland", "INVITE", "sip:bob@example.com")
    result = env.policy.check(_invite_to("sip:bob@example.com", [f"Proxy-Authorization: {auth}"]), env.flow)
    assert result.ok and result.user == "alice"


def test_bound_nonce_accepts_any_digest_uri_on_its_own_request(env: AuthEnv) -> None:
    # SIPp (and some phones) write the server's address as digest-uri: the binding is the nonce's,
    # so they still authenticate on the request that was challenged
    challenge = _proxy_challenge(env, "tel:+33123456789")
    auth = digest_authorization(challenge, "alice", "wonderland", "INVITE", "sip:127.0.0.1:5060")
    result = env.policy.check(_invite_to("tel:+33123456789", [f"Proxy-Authorization: {auth}"]), env.flow)
    assert result.ok and result.user == "alice"


def test_register_nonce_cannot_authenticate_an_invite(env: AuthEnv) -> None:
    challenge = env.challenge().header_values("WWW-Authenticate")[1]
    auth = digest_authorization(challenge, "alice", "wonderland", "INVITE", "sip:bob@example.com")
    result = env.policy.check(_invite_to("sip:bob@example.com", [f"Proxy-Authorization: {auth}"]), env.flow)
    assert result.response is not None and result.response.status == 407
    assert "stale=true" in result.response.header_values("Proxy-Authenticate")[0]
