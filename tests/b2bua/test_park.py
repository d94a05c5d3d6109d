"""Suspend/resume: parked calls, late forking on binding events, waking devices, Invite/Cancel."""

from __future__ import annotations

from typing import Any


from libon_tsilo.b2bua.call import PARKED_COMPACT_DELAY
from libon_tsilo.b2bua.forking import REASON_ANSWERED, REASON_REPLACED
from libon_tsilo.b2bua.waker import LoggingWaker, WakeResult
from tests.fakes.sip import FakeStx
from tests.b2bua.helpers import SDP_B, Env, binding, caller_invite, parse


def test_no_binding_parks_and_resumes_on_register() -> None:
    env = Env()
    _, stx = env.invite()
    call = env.call()
    assert call.state.name == "parked" and env.port.sent == []
    env.clock.advance(2.5)
    env.register(binding(1))
    (ctx,) = env.port.invites()
    assert call.state.name == "forking"
    assert env.silo.stats()["added_branches"] == 1
    assert env.silo.stats()["register_to_invite"]["samples"] == 1
    ctx.respond(200, body=SDP_B)
    assert stx.statuses == [200]


def test_a_parked_invite_is_kept_as_bytes_once_it_has_waited() -> None:
    env = Env()
    invite, _ = env.invite()
    call = env.call()
    assert call.state.name == "parked" and not invite.compacted
    env.clock.advance(PARKED_COMPACT_DELAY)
    assert invite.compacted  # a long wait: bytes only (memory per parked call)
    env.register(binding(1))
    (ctx,) = env.port.invites()
    assert ctx.request.header("From").startswith('"Alice Liddell" <sip:alice@example.com>')
    ctx.respond(200, body=SDP_B)
    assert env.call().state.name == "connected"


def test_a_call_forked_soon_after_parking_is_not_compacted_nor_parsed_again() -> None:
    env = Env()
    invite = caller_invite()
    parsed_from = invite.from_  # what the parse gave, before the call sees the INVITE
    stx = FakeStx(invite)
    env.mgr.handle_invite(invite, stx, env.caller_flow)
    call = env.call()
    assert call.state.name == "parked"
    env.clock.advance(PARKED_COMPACT_DELAY / 2)
    env.register(binding(1))
    (ctx,) = env.port.invites()
    env.clock.advance(PARKED_COMPACT_DELAY)
    # the INVITE was never dropped to bytes: what the fork read is what the INVITE's parse gave
    assert invite.from_ is parsed_from and not invite.compacted
    ctx.respond(200, body=SDP_B)
    assert stx.statuses == [200] and call.state.name == "connected"


def test_a_call_ended_while_parked_leaves_no_compaction_waiting() -> None:
    env = Env()
    _, stx = env.invite()
    env.clock.advance(PARKED_COMPACT_DELAY / 2)
    env.mgr.shutdown_parked(480)
    assert stx.statuses == [480]
    env.assert_clean()  # no DelayedCall left on the clock


def test_parked_call_times_out_with_480() -> None:
    env = Env()
    _, stx = env.invite()
    assert env.call().state.name == "parked"
    env.clock.advance(30)
    assert stx.statuses == [480]
    env.assert_clean()


def test_parked_call_cancelled_by_caller() -> None:
    env = Env()
    _, stx = env.invite()
    assert env.call().state.name == "parked"
    cancel = parse(
        """CANCEL sip:bob@example.com SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKcallercall-1;rport
Max-Forwards: 70
From: <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>
Call-ID: call-1@10.0.0.1
CSeq: 10 CANCEL"""
    )
    env.mgr.handle_cancel(cancel, stx, env.caller_flow, FakeStx(cancel))
    assert stx.statuses == [487]
    env.assert_clean()
    env.register(binding(1))  # nothing is waiting any more
    assert env.port.sent == []


def test_sleeping_push_device_is_woken_and_forked_when_it_registers() -> None:
    env = Env()
    env.location.add(binding(1, push="apns", live=False))
    _, stx = env.invite()
    call = env.call()
    assert env.port.sent == [] and call.state.name == "parked"
    (woke_call, woke, d) = env.waker.calls[0]
    assert woke_call is call and [b.key for b in woke] == [binding(1).key]
    assert call.ring_deadline == env.clock.seconds() + 30
    d.callback(WakeResult(woken=1))
    assert call.state.name == "parked"  # a delivered push: keep waiting
    env.clock.advance(1.8)
    env.register(binding(1, push="apns", flow_id="tcp:dev1#2"), refreshed=True)
    (ctx,) = env.port.invites()
    assert ctx.hop.flow_id == "tcp:dev1#2"
    ctx.respond(200, body=SDP_B)
    assert stx.statuses == [200]
    assert env.waker.ended == [("call-1@10.0.0.1", True)]


def test_every_push_failed_gives_480_at_once() -> None:
    env = Env()
    env.location.add(binding(1, push="fcm", live=False))
    _, stx = env.invite()
    assert env.call().state.name == "parked"
    env.waker.calls[0][2].callback(WakeResult(all_failed=True, reason="UNREGISTERED"))
    assert stx.statuses == [480]
    env.assert_clean()


def test_push_failure_waits_for_a_branch_still_ringing() -> None:
    env = Env()
    env.location.add(binding(1))
    env.location.add(binding(2, push="fcm", live=False))
    _, stx = env.invite()
    (ctx,) = env.port.invites()
    env.waker.calls[0][2].callback(WakeResult(all_failed=True))
    assert stx.statuses == []
    ctx.respond(486)
    assert stx.statuses == [486]
    env.assert_clean()


def test_branch_failing_while_push_pending_parks_again() -> None:
    env = Env()
    env.location.add(binding(1))
    env.location.add(binding(2, push="apns", live=False))
    _, stx = env.invite()
    (ctx,) = env.port.invites()
    ctx.respond(486)
    assert stx.statuses == [] and env.call().state.name == "parked"
    env.register(binding(2, push="apns", flow_id="tcp:dev2#9"))
    ctx2 = env.port.invites()[-1]
    ctx2.respond(603)
    assert stx.statuses == [603]


def test_logging_waker_keeps_the_call_parked_until_timeout() -> None:
    env = Env(waker=LoggingWaker())
    env.location.add(binding(1, push="apns", live=False))
    _, stx = env.invite()
    assert env.call().state.name == "parked"
    env.clock.advance(30)
    assert stx.statuses == [480]
    env.clock.advance(30)  # [calls] invite_cancel_grace: the pushed iOS device may still register
    env.assert_clean()


def test_same_binding_twice_gets_one_branch_but_a_reconnected_one_replaces_it() -> None:
    env = Env()
    env.location.add(binding(1))
    env.invite()
    (first,) = env.port.invites()
    env.register(binding(1), refreshed=True)
    assert len(env.port.invites()) == 1
    env.register(binding(1, flow_id="tcp:dev1#2"), refreshed=True)  # new connection
    assert len(env.port.invites()) == 2 and first.cancelled
    env.register(binding(1, flow_id="tcp:dev1#2", contact="sip:bob@10.9.0.2:6000;transport=tcp"),
                 refreshed=True)  # new contact
    assert len(env.port.invites()) == 3
    assert env.port.invites()[1].cancelled


def test_no_append_after_the_answer() -> None:
    env = Env()
    env.location.add(binding(1))
    env.invite()
    env.port.invites()[0].respond(200, body=SDP_B)
    env.register(binding(2))
    assert len(env.port.invites()) == 1


def test_invite_cancel_for_a_pushed_ios_device_that_wakes_late() -> None:
    env = Env(invite_cancel_grace=20.0)
    env.location.add(binding(1))
    env.location.add(binding(2, push="apns", live=False))
    env.location.add(binding(3, push="fcm", live=False))
    _, stx = env.invite()
    env.waker.calls[0][2].callback(WakeResult(woken=2))
    env.port.invites()[0].respond(200, body=SDP_B)
    assert stx.statuses == [200]
    assert env.silo.stats()["lingering"] == 1
    env.register(binding(3, push="fcm", flow_id="tcp:dev3#2"))  # Android: no ghost call needed
    assert len(env.port.invites()) == 1
    env.register(binding(2, push="apns", flow_id="tcp:dev2#2"))
    late = env.port.invites()[-1]
    assert late.request.raw_uri.startswith("sip:bob@10.0.0.3")
    assert late.cancelled and late.reason == REASON_ANSWERED
    assert env.silo.stats()["lingering"] == 0  # nobody else to wait for
    late.respond(487)
    assert stx.statuses == [200]


def test_invite_cancel_grace_expires() -> None:
    env = Env(invite_cancel_grace=5.0)
    env.location.add(binding(2, push="apns", live=False))
    _, stx = env.invite()
    env.waker.calls[0][2].callback(WakeResult(woken=1))
    env.clock.advance(30)  # ring timeout
    assert stx.statuses == [480]
    assert env.silo.stats()["lingering"] == 1
    env.clock.advance(5)
    env.assert_clean()


def test_invite_cancel_grace_waits_in_the_shared_expiry_queue() -> None:
    """The grace period is an entry in the manager's queue for its delay, not a DelayedCall per call."""
    env = Env(invite_cancel_grace=5.0)
    env.location.add(binding(2, push="apns", live=False))
    env.invite()
    env.waker.calls[0][2].callback(WakeResult(woken=1))
    env.clock.advance(30)  # ring timeout
    assert env.silo.stats()["lingering"] == 1
    assert len(env.mgr.expiry(5.0)) == 1
    env.clock.advance(4.9)
    assert env.silo.stats()["lingering"] == 1
    env.clock.advance(0.1)
    assert env.silo.stats()["lingering"] == 0 and len(env.mgr.expiry(5.0)) == 0
    env.assert_clean()


def test_shutdown_parked() -> None:
    env = Env()
    _, parked = env.invite(call_id="c1")
    env.location.add(binding(1))
    _, ringing = env.invite(call_id="c2")
    assert env.mgr.shutdown_parked(480) == 1
    assert parked.statuses == [480] and ringing.statuses == []
    _, late = env.invite(call_id="c3")
    assert late.statuses == [503]


def test_states_take_events_through_explicit_methods() -> None:
    """One suspend/resume mechanism, followable by name: the silo's add_branch reaches
    Parked.binding_appeared, which resumes; the same event in Forking adds a branch."""
    from libon_tsilo.b2bua.states import CallState, Forking, Parked

    env = Env()
    env.invite()
    call = env.call()
    assert isinstance(call.state, Parked) and call.park() is None
    Parked().binding_appeared(call, binding(1))
    assert isinstance(call.state, Forking) and len(env.port.invites()) == 1
    Forking().binding_appeared(call, binding(2))
    assert len(env.port.invites()) == 2
    assert not hasattr(CallState, "handle")  # no string dispatch left to hide the route



def test_a_bug_in_a_state_method_ends_the_call_with_one_500(logged: list[dict[str, Any]]) -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    (ctx,) = env.port.invites()
    call = env.call()
    respond = env.port.respond

    def broken(stx: Any, resp: Any) -> None:
        # inside Forking.provisional, where it relays the 180 to the caller; the states are
        # compiled (mypyc): their methods cannot be replaced on an instance, as this test did
        if resp.status == 180:
            raise RuntimeError("bug")
        respond(stx, resp)

    env.port.respond = broken  # type: ignore[method-assign]
    ctx.respond(180)
    assert stx.statuses == [500]
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert len(failures) == 1 and failures[0]["call_id"] == call.call_id
    env.assert_clean()


def test_a_reconnected_device_old_branch_cancel_says_it_was_replaced() -> None:
    env = Env()
    env.location.add(binding(1))
    env.invite()
    (first,) = env.port.invites()
    env.register(binding(1, flow_id="tcp:dev1#2"), refreshed=True)
    second = env.port.invites()[1]
    # one Call-ID per device: the Reason tells the app this CANCEL is not for the live branch
    assert first.cancelled and first.reason == REASON_REPLACED
    assert second.request.call_id == first.request.call_id


def test_a_reconnected_device_old_branch_over_a_closed_flow_gets_no_cancel() -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    (first,) = env.port.invites()
    env.port.dead_flows.add("tcp:dev1#1")
    env.register(binding(1, flow_id="tcp:dev1#2"), refreshed=True)
    second = env.port.invites()[1]
    assert not first.cancelled and "CANCEL" not in env.port.sent_methods()
    first.respond(408)  # its timer B
    assert stx.statuses == []
    second.respond(200, body=SDP_B)
    assert stx.statuses == [200]


def test_a_cancelling_branch_provisionals_are_pracked_but_not_relayed() -> None:
    """Review finding 14: the replaced branch of a reconnected device rings late; its 18x must not
    reach the caller (nor become the call's early media), though a reliable one is still PRACKed."""
    from tests.b2bua.test_reliable import device_18x

    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite(extra="Supported: 100rel\n")
    (first,) = env.port.invites()
    env.register(binding(1, flow_id="tcp:dev1#2"), refreshed=True)
    second = env.port.invites()[1]
    assert first.cancelled
    device_18x(first, 180, None, tag="old-tag")
    device_18x(first, 183, 1, SDP_B, tag="old-tag")
    assert stx.statuses == []
    assert env.port.sent_methods().count("PRACK") == 1  # the device's reliable 183 is still acknowledged
    device_18x(second, 180, None, tag="new-tag")
    assert stx.statuses == [180]
    second.respond(200, body=SDP_B)
    assert stx.statuses == [180, 200]
