"""RFC 5626 at the call layer: one branch per device instance, failover between its flows, and a
local failure to reach a device read as "unavailable" (480), never as a crash (500)."""

from __future__ import annotations

from typing import Any

from libon_tsilo.registrar.binding import Binding
from tests.b2bua.helpers import AOR, Env, binding


def flow_of(n: int, reg_id: int, registered_at: float, instance: str = "<urn:uuid:phone>") -> Binding:
    """One flow (reg-id) of a device: its own connection, contact and registration time."""
    b = binding(n)
    return Binding(
        aor=AOR, contact_uri=b.contact_uri, contact=b.contact, expires_at=b.expires_at,
        registered_at=registered_at, call_id=b.call_id, cseq=1, instance=instance, reg_id=reg_id,
        flow_id=b.flow_id, flow_live=True, received=b.received,
    )


def hops(env: Env) -> list[Any]:
    return [ctx.hop.flow_id for ctx in env.port.invites()]


def test_two_flows_of_one_instance_get_one_branch_over_the_newest() -> None:
    env = Env()
    env.location.add(flow_of(1, reg_id=1, registered_at=900.0))
    env.location.add(flow_of(2, reg_id=2, registered_at=950.0))
    _, stx = env.invite()
    assert hops(env) == ["tcp:dev2#1"]
    env.port.invites()[0].respond(200)
    assert stx.statuses[-1] == 200


def test_second_flow_registering_while_ringing_adds_no_branch() -> None:
    env = Env()
    env.location.add(flow_of(1, reg_id=1, registered_at=900.0))
    env.invite()
    env.register(flow_of(2, reg_id=2, registered_at=1_000.0))
    assert hops(env) == ["tcp:dev1#1"]


def test_a_dead_flow_is_skipped_for_the_live_one() -> None:
    env = Env()
    env.location.add(flow_of(1, reg_id=1, registered_at=900.0))
    env.location.add(flow_of(2, reg_id=2, registered_at=950.0))
    env.port.dead_flows.add("tcp:dev2#1")
    env.invite()
    assert hops(env) == ["tcp:dev1#1"]


def test_branch_fails_over_to_the_next_flow_then_480() -> None:
    env = Env()
    env.location.add(flow_of(1, reg_id=1, registered_at=900.0))
    env.location.add(flow_of(2, reg_id=2, registered_at=950.0))
    _, stx = env.invite()
    env.port.invites()[0].fail_locally(503)
    assert hops(env) == ["tcp:dev2#1", "tcp:dev1#1"]
    assert env.mgr.counters["flow_failovers"] == 1
    assert stx.statuses == []  # the caller saw nothing of the first flow's failure
    env.port.invites()[1].respond(430)  # an edge proxy on the Path: Flow Failed
    assert stx.statuses == [480]
    env.assert_clean()


def test_local_transport_failure_gives_the_caller_480_not_500() -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.port.invites()[0].fail_locally(503)
    assert stx.statuses == [480]
    env.assert_clean()


def test_a_devices_own_503_is_still_500() -> None:
    # RFC 3261 §16.7 step 6: a 503 from downstream is not passed on as such
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.port.invites()[0].respond(503)
    assert stx.statuses == [500]


def test_local_failure_loses_to_a_real_answer_of_another_device() -> None:
    env = Env()
    env.location.add(binding(1))
    env.location.add(binding(2))
    _, stx = env.invite()
    a, b = env.port.invites()
    a.fail_locally(503)
    b.respond(486)
    assert stx.statuses == [486]


def test_a_sleeping_device_with_two_flows_is_pushed_once() -> None:
    env = Env()
    for n, reg_id in ((1, 1), (2, 2)):
        b = flow_of(n, reg_id=reg_id, registered_at=900.0 + n)
        b.pn_provider, b.pn_prid, b.pn_param = "apns", "token-1", "TEAM.com.example.voip"
        b.flow_live = False
        env.location.add(b)
    env.invite()
    (_, pushed, _), = env.waker.calls
    assert len(pushed) == 1
    assert env.port.invites() == []


def test_a_lost_flows_branch_answered_anyway_is_acked_and_hung_up() -> None:
    from types import SimpleNamespace

    env = Env()
    env.location.add(flow_of(1, reg_id=1, registered_at=900.0))
    env.location.add(flow_of(2, reg_id=2, registered_at=950.0))
    _, stx = env.invite()
    first = env.port.invites()[0]
    env.port.dead_flows.add("tcp:dev2#1")
    env.mgr.flow_closed(SimpleNamespace(id="tcp:dev2#1"))
    first.respond(200)  # over a new connection of its own
    assert env.port.acks and env.port.last("BYE").request.call_id == first.request.call_id
    assert stx.statuses == []  # the caller still waits for the branch on the live flow
    env.port.invites()[1].respond(200)
    assert stx.statuses == [200]


def test_flow_closing_while_ringing_moves_the_branch_then_480() -> None:
    from types import SimpleNamespace

    env = Env()
    env.location.add(flow_of(1, reg_id=1, registered_at=900.0))
    env.location.add(flow_of(2, reg_id=2, registered_at=950.0))
    _, stx = env.invite()
    first = env.port.invites()[0]
    first.respond(180)
    env.port.dead_flows.add("tcp:dev2#1")
    env.mgr.flow_closed(SimpleNamespace(id="tcp:dev2#1"))
    assert hops(env) == ["tcp:dev2#1", "tcp:dev1#1"]
    first.fail_locally(408)  # its transaction's timer B, later: ignored, no third branch
    assert hops(env) == ["tcp:dev2#1", "tcp:dev1#1"] and stx.statuses == [180]
    env.port.dead_flows.add("tcp:dev1#1")
    env.mgr.flow_closed(SimpleNamespace(id="tcp:dev1#1"))
    assert stx.statuses == [180, 480]
    env.assert_clean()


def test_a_udp_flow_idle_past_the_flow_table_is_still_its_address() -> None:
    env = Env()
    b = flow_of(1, reg_id=1, registered_at=900.0)
    b.received, b.flow_id = ("udp", "10.0.0.2", 5080), "udp:dev1"
    env.location.add(b)
    env.port.dead_flows.add("udp:dev1")  # the UDP pseudo-flow expired from the flow table
    env.invite()
    (ctx,) = env.port.invites()
    assert (ctx.hop.transport, ctx.hop.host, ctx.hop.port, ctx.hop.flow_id) == ("udp", "10.0.0.2", 5080, None)


def test_ts_append_to_counts_one_branch_per_instance() -> None:
    env = Env()
    _, stx = env.invite()  # nothing registered: parked
    env.location.add(flow_of(1, reg_id=1, registered_at=1_000.0))
    env.location.add(flow_of(2, reg_id=2, registered_at=1_001.0))
    assert env.silo.append_to("call-1@10.0.0.1", AOR) == 1
    assert hops(env) == ["tcp:dev2#1"] and env.silo.stats()["added_branches"] == 1


def test_a_device_with_one_live_flow_among_its_push_bindings_is_forked_not_pushed() -> None:
    env = Env()
    for n, live in ((1, True), (2, False)):  # the newest flow is the dead one
        b = flow_of(n, reg_id=n, registered_at=900.0 + n)
        b.pn_provider, b.pn_prid, b.pn_param = "apns", "token-1", "TEAM.com.example.voip"
        b.flow_live = live
        env.location.add(b)
    env.port.dead_flows.add("tcp:dev2#1")
    env.location.bindings[AOR].reverse()  # lookup order: the newest (dead) one first
    env.invite()
    assert hops(env) == ["tcp:dev1#1"] and env.waker.calls == []


def test_failover_is_not_blocked_by_dead_branches_and_counted_once_each() -> None:
    env = Env(max_branches=2)
    for n, r, t in ((1, 1, 900.0), (2, 2, 950.0), (3, 3, 960.0)):
        env.location.add(flow_of(n, reg_id=r, registered_at=t))
    _, stx = env.invite()
    env.port.invites()[0].fail_locally(503)
    env.port.invites()[1].fail_locally(503)
    assert hops(env) == ["tcp:dev3#1", "tcp:dev2#1", "tcp:dev1#1"]  # the last live flow is tried
    assert stx.statuses == []
    assert env.mgr.counters["flow_failovers"] == 2
    env.port.invites()[2].respond(200)
    assert stx.statuses[-1] == 200


def test_max_branches_refusal_is_counted() -> None:
    env = Env(max_branches=1)
    env.location.add(binding(1))
    env.location.add(binding(2))
    _, stx = env.invite()
    assert len(env.port.invites()) == 1
    assert env.mgr.limit_hits()["max_branches"] == 1
