"""Call-layer limits: unanswered calls per caller source and in total (503), and users that cannot be
reached answered at once (404 unknown, 480 no device and nothing to wake) instead of parking."""

from __future__ import annotations

from typing import Any


from libon_tsilo.b2bua.admission import CallerSources
from libon_tsilo.b2bua.manager import CallManager, CallSettings
from libon_tsilo.sip.limits import SourceFilter
from tests.fakes.sip import FakeStx
from tests.b2bua.helpers import SDP_B, Env, ScriptedWaker, binding, caller_invite, flow


def make(sources: CallerSources | None = None, user_exists: Any = None, waker: Any = "scripted",
         max_total: int = 0) -> Env:
    env = Env()
    env.silo.max_total = max_total
    env.waker = ScriptedWaker() if waker == "scripted" else waker
    env.mgr = CallManager(env.clock, env.port, env.silo, env.location, env.waker, CallSettings(),
                          sources=sources, user_exists=user_exists)
    return env


def invite_from(env: Env, call_id: str, host: str = "10.0.0.1", ruri: str = "sip:bob@example.com") -> FakeStx:
    req = caller_invite(call_id=call_id, ruri=ruri)
    stx = FakeStx(req)
    env.mgr.handle_invite(req, stx, flow(fid=f"tcp:{host}#1", remote=(host, 5070)))
    return stx



def test_unanswered_calls_per_source_get_503_over_the_limit(logged: list[dict[str, Any]]) -> None:
    sources = CallerSources(2)
    env = make(sources)
    first, second, third = (invite_from(env, f"c{n}") for n in range(3))
    assert first.statuses == second.statuses == []  # parked
    assert third.statuses == [503]
    assert third.final is not None and third.final.header("Retry-After") == "30"
    assert "c2" not in env.mgr.calls and len(env.silo) == 2
    assert invite_from(env, "other", host="10.0.0.9").statuses == []  # another source is not affected
    assert env.mgr.limit_hits()["parked_per_source"] == 1
    # a caller that got its answer no longer counts: the device answers the first call
    env.register(binding(1))
    env.port.invites()[0].respond(200, body=SDP_B)
    assert first.statuses == [200]
    assert invite_from(env, "c3").statuses == []
    # nor does an ended call
    env.mgr.calls["c1"].caller_cancel(None)
    assert invite_from(env, "c4").statuses == []
    assert invite_from(env, "c5").statuses == [503]
    lines = [e for e in logged if "INVITE refused" in str(e.get("log_format"))]
    assert len(lines) == 1 and lines[0]["source"] == "10.0.0.1"  # throttled: one line per 10 s
    for call in list(env.mgr.calls.values()):
        call.caller_cancel(None)
    env.clock.advance(60)
    assert len(sources) == 0


def test_exempt_sources_and_ipv6_slash_64() -> None:
    sources = CallerSources(1, exempt=SourceFilter(["10.0.0.0/24"]))
    env = make(sources)
    assert [invite_from(env, f"t{n}").statuses for n in range(5)] == [[]] * 5
    assert invite_from(env, "v6a", host="2001:db8:0:1::a").statuses == []
    assert invite_from(env, "v6b", host="2001:db8:0:1::b").statuses == [503]  # same /64
    assert invite_from(env, "v6c", host="2001:db8:0:2::a").statuses == []
    assert len(sources) == 2


def test_total_parked_calls_get_503() -> None:
    env = make(max_total=2)
    assert [invite_from(env, f"c{n}", host=f"10.0.0.{n + 1}").statuses for n in range(3)] == [[], [], [503]]
    assert env.mgr.limit_hits()["parked_total"] == 1
    env.mgr.calls["c0"].caller_cancel(None)
    assert invite_from(env, "c9").statuses == []


def test_a_refused_call_leaves_nothing_behind() -> None:
    sources = CallerSources(1)
    env = make(sources, max_total=5)
    invite_from(env, "c1")
    assert invite_from(env, "c2").statuses == [503]
    env.mgr.calls["c1"].caller_cancel(None)
    env.assert_clean()
    assert len(sources) == 0


def test_a_call_refused_by_the_aor_limit_does_not_count_against_its_source() -> None:
    sources = CallerSources(20)
    env = Env(max_pending=1)
    env.mgr = CallManager(env.clock, env.port, env.silo, env.location, env.waker, CallSettings(), sources=sources)
    assert invite_from(env, "c1").statuses == []
    assert invite_from(env, "c2").statuses == [486]
    assert len(sources) == 1


# -- unknown users: 404 at once; known but unreachable: 480 ----------------------------------------


def test_unknown_user_gets_404_at_once_and_nothing_parks() -> None:
    env = make(user_exists=lambda user: user == "bob")
    stx = invite_from(env, "c1", ruri="sip:nobody@example.com")
    assert stx.statuses == [404]
    assert env.mgr.calls == {} and len(env.silo) == 0
    assert env.mgr.limit_hits()["unknown_user"] == 1
    assert invite_from(env, "c2").statuses == []  # bob exists: parked (a waker may wake him)
    assert env.mgr.calls["c2"].state.name == "parked"


def test_known_user_without_binding_and_nothing_to_wake_gets_480() -> None:
    env = make(user_exists=lambda user: True, waker=None)
    assert invite_from(env, "c1").statuses == [480]
    assert env.mgr.calls == {} and env.mgr.limit_hits()["unreachable_user"] == 1
    env.location.add(binding(1))  # with a device it forks as before
    assert invite_from(env, "c2").statuses == []
    assert len(env.port.invites()) == 1


def test_a_registered_user_missing_from_the_users_db_is_still_called() -> None:
    # e.g. registered from a trusted source, which skips digest: the location store knows the user
    env = make(user_exists=lambda user: False)
    env.location.add(binding(1))
    assert invite_from(env, "c1").statuses == []
    assert len(env.port.invites()) == 1


def test_without_a_users_db_unknown_users_park_as_before() -> None:
    env = make(waker=None)
    assert invite_from(env, "c1", ruri="sip:nobody@example.com").statuses == []
    assert env.mgr.calls["c1"].state.name == "parked"


def test_a_broken_users_db_does_not_refuse_calls() -> None:
    def broken(user: str) -> bool:
        raise RuntimeError("database is locked")

    env = make(user_exists=broken)
    assert invite_from(env, "c1").statuses == []


def test_a_local_caller_is_challenged_before_it_learns_whether_the_user_exists() -> None:
    from types import SimpleNamespace

    from libon_tsilo.b2bua.manager import authorizer_from_policy
    from libon_tsilo.sip.message import make_response

    class Policy:
        def check(self, request: Any, flow: Any, kind: str) -> Any:
            return SimpleNamespace(response=make_response(request, 407, to_tag="t"))

    env = make(user_exists=lambda user: False)
    env.mgr.authorize = authorizer_from_policy(Policy())
    assert invite_from(env, "c1", ruri="sip:nobody@example.com").statuses == [407]
    assert env.mgr.limit_hits()["unknown_user"] == 0
