"""Who may call out, to where, how many at once (routing/policy.py)."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.registrar.users import UserRecord
from libon_tsilo.routing.policy import CallOutPolicy
from libon_tsilo.routing.trunks import Trunk, parse_target

TRUNK = Trunk("t", (parse_target("sip:127.0.0.1"),), max_calls=2)


def reason(refusal) -> str | None:
    return refusal.reason if refusal is not None else None


def test_only_authenticated_users_not_gateways() -> None:
    p = CallOutPolicy(Clock())
    assert reason(p.check_caller(trusted=False, user=None)) == "unauthenticated"
    assert reason(p.check_caller(trusted=True, user=None)) == "from_gateway"
    assert reason(p.check_caller(trusted=True, user="alice")) == "from_gateway"
    assert p.check_caller(trusted=False, user="alice") is None


def test_allowed_prefixes() -> None:
    p = CallOutPolicy(Clock())
    fr_only = UserRecord("alice", "r", allowed_prefixes=("+33", "+32"))
    assert p.check_call(fr_only, "+33123456789", TRUNK) is None
    assert reason(p.check_call(fr_only, "+44207946000", TRUNK)) == "prefix_not_allowed"
    assert reason(p.check_call(fr_only, None, TRUNK)) == "prefix_not_allowed"  # a domain route
    assert p.check_call(UserRecord("bob", "r"), "+44207946000", TRUNK) is None
    assert reason(p.check_call(None, "+33123456789", TRUNK)) == "unknown_user"
    assert reason(p.check_call(fr_only, "+33123456789", None)) == "no_route"


def test_per_user_limit_default_and_own() -> None:
    p = CallOutPolicy(Clock(), max_calls_per_user=1)
    big = Trunk("big", TRUNK.targets)
    alice, bob = UserRecord("alice", "r"), UserRecord("bob", "r", max_calls_out=2)
    p.admit("c1", "alice", big)
    assert reason(p.check_call(alice, "+331", big)) == "user_limit"
    p.admit("c2", "bob", big)
    assert p.check_call(bob, "+331", big) is None
    p.admit("c3", "bob", big)
    assert reason(p.check_call(bob, "+331", big)) == "user_limit"
    p.release("c1")
    p.release("c1")  # idempotent
    assert p.check_call(alice, "+331", big) is None
    assert reason(p.check_call(UserRecord("carl", "r", max_calls_out=0), "+331", big)) == "user_limit"  # barred
    assert CallOutPolicy(Clock(), 0).check_call(alice, "+331", big) is None  # a 0 default: no limit


def test_per_trunk_limit_and_counts() -> None:
    clock = Clock()
    p = CallOutPolicy(clock)
    p.admit("c1", "alice", TRUNK)
    p.admit("c2", "bob", TRUNK)
    refusal = p.check_call(UserRecord("carl", "r"), "+331", TRUNK)
    assert refusal is not None and refusal.reason == "trunk_limit" and refusal.status == 503
    p.refuse(refusal, "x", authenticated=True)
    p.refuse(p.check_caller(False, None), "y", authenticated=False)
    assert p.limit_hits()["call_out_trunk_limit"] == 1 and p.limit_hits()["call_out_unauthenticated"] == 1
    assert p.active() == {"t": 2} and p.active_calls() == 2
    p.release("c1")
    p.release("c2")
    assert p.active() == {} and p.active_calls() == 0
