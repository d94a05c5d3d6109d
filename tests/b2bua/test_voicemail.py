"""Issue 13, voicemail on no answer (b2bua/voicemail.py, Call.divert): which failures forward the call,
the exact Diversion / History-Info / Request-URI, and the forwarded call's life (answer, BYE both
ways, CANCEL, a failing voicemail leg), all on a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed

from libon_tsilo.b2bua.voicemail import VoicemailPolicy, diversion, history_info, voicemail_uri
from libon_tsilo.b2bua.waker import WakeResult
from tests.b2bua.helpers import SDP_B, SDP_C, Env, binding, flow, in_dialog, parse
from tests.fakes.sip import FakeStx

VM = "sip:vm@192.0.2.50:5070;transport=tcp"
CALLER = "<sip:alice@example.com>;tag=a-tag"


def _env(voicemail_for: dict[str, bool] | None = None, **policy: Any) -> Env:
    env = Env(ring_timeout=30.0)
    wants = voicemail_for or {}
    env.mgr.voicemail = VoicemailPolicy.build(
        VM, policy.pop("on_busy", (486, 600, 603)), policy.pop("on_no_answer", True),
        policy.pop("on_unavailable", True), lambda user: wants.get(user, True),
    )
    return env


def _vm_leg(env: Env) -> Any:
    [leg] = [c for c in env.port.invites() if c.request.raw_uri.startswith("sip:vm@")]
    return leg


# -- the headers, exact (RFC 5806, RFC 7044, RFC 4458) --------------------------------------------


def test_headers_per_rfc() -> None:
    uri = voicemail_uri(VM, "sip:bob@example.com", "no-answer")
    assert uri == "sip:vm@192.0.2.50:5070;transport=tcp;target=sip:bob%40example.com;cause=408"
    assert diversion("sip:bob@example.com", "user-busy") == "<sip:bob@example.com>;reason=user-busy;counter=1"
    assert history_info("sip:bob@example.com", uri, "no-answer") == (
        "<sip:bob@example.com?Reason=SIP%3Bcause%3D408%3Btext%3D%22Request%20Timeout%22>;index=1, "
        "<sip:vm@192.0.2.50:5070;transport=tcp;target=sip:bob%40example.com;cause=408>;index=1.1;mp=1"
    )
    # a target that already names a target/cause gets ours, once
    assert voicemail_uri("sip:vm@192.0.2.50;cause=302", "sip:bob@example.com", "unavailable") == \
        "sip:vm@192.0.2.50;target=sip:bob%40example.com;cause=503"


@pytest.mark.parametrize("status, timeout, expected", [
    (480, True, "no-answer"), (486, False, "user-busy"), (603, False, "user-busy"), (600, False, "user-busy"),
    (480, False, "unavailable"), (404, False, "unavailable"), (500, False, "unavailable"),
    (488, False, None), (487, False, None), (403, False, None),
])
def test_policy_reason(status: int, timeout: bool, expected: str | None) -> None:
    assert VoicemailPolicy(VM).reason_for(status, timeout) == expected


def test_policy_switches() -> None:
    policy = VoicemailPolicy.build(VM, (486,), on_no_answer=False, on_unavailable=False)
    assert policy.reason_for(480, True) is None
    assert policy.reason_for(603, False) is None and policy.reason_for(486, False) == "user-busy"
    assert policy.reason_for(480, False) is None


# -- each reason, end to end through the call layer ----------------------------------------------


def test_ring_timeout_forwards_with_no_answer_and_the_call_completes() -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    [device] = env.port.invites()
    device.respond(180)
    env.clock.advance(30)
    assert device.cancelled and device.reason == 'SIP;cause=480;text="Ring timeout"'
    vm = _vm_leg(env)
    req = vm.request
    assert req.raw_uri == "sip:vm@192.0.2.50:5070;transport=tcp;target=sip:bob%40example.com;cause=408"
    assert req.header_values("Diversion") == ["<sip:bob@example.com>;reason=no-answer;counter=1"]
    assert req.header("History-Info") == (
        "<sip:bob@example.com?Reason=SIP%3Bcause%3D408%3Btext%3D%22Request%20Timeout%22>;index=1, "
        "<sip:vm@192.0.2.50:5070;transport=tcp;target=sip:bob%40example.com;cause=408>;index=1.1;mp=1"
    )
    assert str(req.to.uri) == "sip:bob@example.com" and req.from_.uri.user == "alice"
    assert (vm.hop.transport, vm.hop.host, vm.hop.port) == ("tcp", "192.0.2.50", 5070)
    assert stx.statuses == [180]  # no final answer: the caller now waits for voicemail
    assert env.mgr.voicemail_counts["no-answer"] == 1
    device.respond(487)  # the device's answer to our CANCEL does not end the forwarded call
    assert stx.statuses == [180]
    vm.respond(183, body=SDP_C)  # the greeting as early media
    vm.respond(200, body=SDP_C, to_tag="vm-tag", contact="<sip:vm@192.0.2.50:5070;transport=tcp>")
    assert stx.statuses == [180, 183, 200] and stx.responses[-1].body == SDP_C
    call = env.call()
    assert call.state.name == "connected" and call.winner.dialog.call_id == req.call_id
    tag = stx.responses[-1].to.tag
    env.mgr.handle_ack(in_dialog("ACK", call.call_id, CALLER, f"<sip:bob@example.com>;tag={tag}", 10),
                       env.caller_flow)
    # the caller hangs up: BYE to voicemail
    bye_stx = FakeStx(in_dialog("BYE", call.call_id, CALLER, f"<sip:bob@example.com>;tag={tag}", 11))
    env.mgr.handle_in_dialog(bye_stx.request, bye_stx, env.caller_flow)
    assert bye_stx.statuses == [200]
    bye = env.port.last("BYE").request
    assert bye.call_id == req.call_id and bye.to.tag == "vm-tag"
    assert bye.raw_uri == "sip:vm@192.0.2.50:5070;transport=tcp"  # voicemail's 2xx Contact
    env.assert_clean()


def test_voicemail_hangs_up_bye_reaches_the_caller() -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.clock.advance(30)
    env.port.invites()[0].respond(487)
    vm = _vm_leg(env)
    vm.respond(200, body=SDP_C, to_tag="vm-tag")
    call = env.call()
    tag = stx.responses[-1].to.tag
    env.mgr.handle_ack(in_dialog("ACK", call.call_id, CALLER, f"<sip:bob@example.com>;tag={tag}", 10),
                       env.caller_flow)
    bye = in_dialog("BYE", vm.request.call_id, "<sip:bob@example.com>;tag=vm-tag", str(vm.request.from_), 5)
    bye_stx = FakeStx(bye)
    env.mgr.handle_in_dialog(bye, bye_stx, flow("tcp:vm#1"))
    assert bye_stx.statuses == [200]
    to_caller = env.port.last("BYE").request
    assert to_caller.call_id == call.call_id and to_caller.to.tag == "a-tag"
    env.assert_clean()


@pytest.mark.parametrize("codes", [[486], [486, 486], [603]])
def test_every_device_declined_forwards_user_busy(codes: list[int]) -> None:
    env = _env()
    for n in range(1, len(codes) + 1):
        env.location.add(binding(n))
    _, stx = env.invite()
    for ctx, code in zip(env.port.invites(), codes):
        ctx.respond(code)
    vm = _vm_leg(env)
    assert vm.request.raw_uri.endswith(";target=sip:bob%40example.com;cause=486")
    assert vm.request.header("Diversion") == "<sip:bob@example.com>;reason=user-busy;counter=1"
    assert "cause%3D486%3Btext%3D%22Busy%20Here%22" in vm.request.header("History-Info")
    assert stx.statuses == [] and env.mgr.voicemail_counts["user-busy"] == 1
    vm.respond(200, body=SDP_C, to_tag="vm-tag")
    assert stx.statuses == [200]


def test_every_push_failed_forwards_unavailable() -> None:
    waker: Any = type("FailingWaker", (), {
        "wake": lambda self, call, bindings: succeed(WakeResult(all_failed=True, reason="dead tokens")),
        "call_ended": lambda self, call, answered_elsewhere: None,
    })()
    env = Env(waker=waker)
    env.mgr.voicemail = VoicemailPolicy(VM)
    env.location.add(binding(1, live=False, push="apns"))
    _, stx = env.invite()
    vm = _vm_leg(env)
    assert vm.request.header("Diversion") == "<sip:bob@example.com>;reason=unavailable;counter=1"
    assert vm.request.raw_uri.endswith(";cause=503")
    assert env.mgr.voicemail_counts["unavailable"] == 1


def test_no_device_at_all_forwards_at_once() -> None:
    env = _env()
    _, stx = env.invite()
    vm = _vm_leg(env)  # at once, not after the ring timeout
    assert vm.request.header("Diversion") == "<sip:bob@example.com>;reason=unavailable;counter=1"
    assert env.silo.get("call-1@10.0.0.1") is None  # nothing waits for a REGISTER any more
    vm.respond(200, body=SDP_C, to_tag="vm-tag")
    assert stx.statuses == [200]


def test_without_a_waker_a_user_with_no_device_still_reaches_voicemail() -> None:
    from libon_tsilo.b2bua.manager import CallManager, CallSettings

    env = Env()
    env.mgr = CallManager(env.clock, env.port, env.silo, env.location, None, CallSettings(),
                          user_exists=lambda user: True, voicemail=VoicemailPolicy(VM))
    _, stx = env.invite()
    assert _vm_leg(env) and stx.statuses == []


def test_user_with_voicemail_off_gets_the_failure_as_before() -> None:
    env = _env(voicemail_for={"bob": False})
    env.location.add(binding(1))
    _, stx = env.invite()
    env.clock.advance(30)
    assert stx.statuses == [480]
    assert all(not c.request.raw_uri.startswith("sip:vm@") for c in env.port.invites())
    env.port.invites()[0].respond(487)
    env.assert_clean()


def test_reason_switched_off_gets_the_failure() -> None:
    env = _env(on_no_answer=False)
    env.location.add(binding(1))
    _, stx = env.invite()
    env.clock.advance(30)
    assert stx.statuses == [480] and env.mgr.voicemail_counts["no-answer"] == 0


def test_caller_cancel_is_not_forwarded() -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.mgr.handle_cancel(_cancel(), stx, env.caller_flow, FakeStx(_cancel()))
    assert stx.statuses == [487] and len(env.port.invites()) == 1


@pytest.mark.parametrize("status", [404, 486, 500])
def test_failing_voicemail_leg_gives_the_original_failure(status: int) -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.clock.advance(30)
    env.port.invites()[0].respond(487)
    _vm_leg(env).respond(status)
    assert stx.statuses == [480]  # what the devices gave, not what voicemail said
    assert env.mgr.voicemail_counts["failed"] == 1
    env.assert_clean()


def test_unreachable_voicemail_gives_the_busy_of_the_devices() -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.port.invites()[0].respond(486)
    _vm_leg(env).fail_locally(503)  # a transport error towards voicemail
    assert stx.statuses == [486]
    env.assert_clean()


def test_voicemail_that_never_answers_ends_at_its_own_ring_timeout() -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.clock.advance(30)
    env.port.invites()[0].respond(487)
    vm = _vm_leg(env)
    vm.respond(180)
    env.clock.advance(30)
    assert vm.cancelled and stx.statuses == [180, 480]
    vm.respond(487)
    env.assert_clean()


def test_caller_cancels_while_voicemail_rings() -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.clock.advance(30)
    env.port.invites()[0].respond(487)
    vm = _vm_leg(env)
    vm.respond(180)
    cstx = FakeStx(_cancel())
    env.mgr.handle_cancel(_cancel(), stx, env.caller_flow, cstx)
    assert cstx.statuses == [200] and stx.statuses[-1] == 487 and vm.cancelled
    vm.respond(487)
    env.assert_clean()


def test_device_answering_as_its_cancel_crosses_wins_over_voicemail() -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.clock.advance(30)
    device = env.port.invites()[0]
    vm = _vm_leg(env)
    device.respond(200, body=SDP_B)  # picked up at the last moment
    assert stx.statuses == [200] and stx.responses[-1].body == SDP_B
    assert vm.cancelled


def test_late_register_does_not_fork_a_forwarded_call() -> None:
    env = _env()
    env.location.add(binding(1))
    env.invite()
    env.clock.advance(30)
    env.register(binding(2))
    assert len(env.port.invites()) == 2  # the device's and voicemail's, none for the new device


def _cancel() -> Any:
    return parse(
        """CANCEL sip:bob@example.com SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKcallercall-1;rport
Max-Forwards: 70
From: "Alice Liddell" <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>
Call-ID: call-1@10.0.0.1
CSeq: 10 CANCEL"""
    )


def test_reliable_early_sdp_is_not_binding_while_voicemail_may_still_answer() -> None:
    """RFC 3264: a caller that took a device's early SDP reliably cannot get voicemail's in the 2xx.
    With voicemail possible, one ringing device is not "the one that can answer": its SDP is a preview."""
    from tests.b2bua.test_reliable import device_18x

    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite(extra="Supported: 100rel\n")
    device_18x(env.port.invites()[0], 183, 1, SDP_B)
    early = stx.responses[-1]
    assert early.status == 183 and early.header("RSeq") is None and early.body == SDP_B


@pytest.mark.parametrize("status", [486, 480, None], ids=["busy", "unavailable", "ring-timeout"])
def test_a_call_out_is_never_forwarded_to_voicemail(status: int | None) -> None:
    """A trunk's busy, unavailable or silence is the phone network's answer: no mailbox of ours."""
    from tests.b2bua.test_calls_out import OutEnv

    env = OutEnv()
    env.mgr.voicemail = VoicemailPolicy(VM)
    stx = env.call_out()
    [trunk] = env.port.invites()
    trunk.respond(180)
    if status is not None:
        trunk.respond(status)
    else:
        env.clock.advance(60)  # OutEnv's [calls_out] ring_timeout
    assert stx.statuses == [180, status or 480]
    assert all(not c.request.raw_uri.startswith("sip:vm@") for c in env.port.invites())
    assert env.mgr.voicemail_counts == {"no-answer": 0, "user-busy": 0, "unavailable": 0, "failed": 0}


def test_parked_call_whose_device_never_woke_goes_to_voicemail_with_the_callers_offer() -> None:
    """Parked (its INVITE kept as bytes only) until the ring timeout: the voicemail leg still carries
    the caller's SDP and identity, read back from those bytes."""
    from tests.b2bua.helpers import SDP_A

    env = _env()
    env.location.add(binding(1, live=False, push="apns"))
    _, stx = env.invite()
    assert env.call().state.name == "parked" and env.port.invites() == []
    env.clock.advance(30)
    vm = _vm_leg(env)
    assert vm.request.body == SDP_A and vm.request.from_.uri.user == "alice"
    assert vm.request.header("Diversion") == "<sip:bob@example.com>;reason=no-answer;counter=1"
    assert env.waker.ended == [("call-1@10.0.0.1", False)]  # the push layer hears the call is over
    vm.respond(200, body=SDP_C, to_tag="vm-tag")
    assert stx.statuses == [200]


def test_the_cdr_says_the_call_went_to_voicemail_and_why(logged: list[dict[str, Any]]) -> None:
    env = _env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.port.invites()[0].respond(486)
    _vm_leg(env).respond(404)  # voicemail refused it: the caller gets the devices' 486
    [cdr] = [e for e in logged if e.get("cdr")]
    assert cdr["voicemail"] == "user-busy" and cdr["status"] == 486
    env2 = _env(voicemail_for={"bob": False})
    env2.location.add(binding(1))
    env2.invite(call_id="call-2")
    env2.port.invites()[0].respond(486)
    assert [e["voicemail"] for e in logged if e.get("cdr")] == ["user-busy", None]
