"""Call set-up and the fork rules (RFC 3261 §16.7 as a B2BUA), on a Clock with a recording port."""

from __future__ import annotations

import pytest

from libon_tsilo.b2bua.capabilities import DIALOG_METHODS, SUPPORTED_OPTION_TAGS
from libon_tsilo.b2bua.forking import REASON_ANSWERED
from tests.b2bua.helpers import AOR, SDP_A, SDP_B, SDP_C, Env, binding, in_dialog

# session timers are on by default ([calls] session_expires = 1800): RFC 4028 adds "timer"
OUR_TAGS = [*SUPPORTED_OPTION_TAGS, "100rel", "timer"]


def two_device_call() -> tuple[Env, object]:
    env = Env()
    env.location.add(binding(1))
    env.location.add(binding(2))
    _, stx = env.invite()
    return env, stx


def test_branch_invites_are_new_dialogs_with_the_callers_identity() -> None:
    env, stx = two_device_call()
    a, b = env.port.invites()
    assert stx.statuses == []  # the 100 is the INVITE server transaction's job
    for ctx, n in ((a, 1), (b, 2)):
        req = ctx.request
        assert req.raw_uri == f"sip:bob@10.0.0.{n + 1}:5080;transport=tcp"
        assert req.from_.display == "Alice Liddell"
        assert str(req.from_.uri) == "sip:alice@example.com"
        assert req.from_.tag not in (None, "a-tag")
        assert str(req.to.uri) == AOR and req.to.tag is None
        assert req.call_id != "call-1@10.0.0.1"
        assert str(req.contacts[0].uri).startswith("sip:b2bua@192.0.2.10")
        assert req.body == SDP_A and req.content_type == "application/sdp"
        assert req.header("Subject") == "lunch?"
        assert req.header("X-Private") is None  # only the allow-list passes
        # our own capabilities, not the caller's (issue 12 item 8); 100rel hop by hop (reliable.py)
        assert req.header_values("Supported") == OUR_TAGS
        assert req.header_values("Allow") == list(DIALOG_METHODS)
        assert req.max_forwards == 69
        assert ctx.hop.flow_id == f"tcp:dev{n}#1" and ctx.hop.host == f"10.0.0.{n + 1}"
    assert a.request.call_id != b.request.call_id


def test_each_leg_gets_the_b2buas_allow_and_supported_even_if_allowlisted() -> None:
    """Issue 12 item 8: a caller's REFER, 100rel, replaces or gruu are not ours to promise."""
    env = Env(header_allowlist=("Subject", "Allow", "Supported", "Require"))
    env.location.add(binding(1))
    _, stx = env.invite(extra="Allow: INVITE, ACK, BYE, CANCEL, REFER, SUBSCRIBE, NOTIFY\n"
                              "Supported: 100rel, replaces, gruu\nRequire: 100rel, foo\n")
    (ctx,) = env.port.invites()
    sent = ctx.request
    assert sent.header_values("Allow") == list(DIALOG_METHODS)
    assert "SUBSCRIBE" not in sent.header_values("Allow") and "MESSAGE" in sent.header_values("Allow")
    assert sent.header_values("Supported") == OUR_TAGS
    assert sent.header_values("Require") == ["foo"]  # allow-listed, minus the 100rel we cannot do
    assert sent.header("Subject") == "lunch?"
    ctx.respond(200, body=SDP_B)
    (ok,) = stx.responses
    assert ok.header_values("Allow") == list(DIALOG_METHODS)
    assert ok.header_values("Supported") == OUR_TAGS


def test_first_2xx_wins_others_cancelled_with_reason() -> None:
    env, stx = two_device_call()
    a, b = env.port.invites()
    a.respond(180)
    b.respond(183, body=SDP_C)
    a.respond(183, body=SDP_B)
    assert stx.statuses == [180, 183, 183]
    assert stx.responses[1].body == SDP_C  # the first early SDP only
    assert stx.responses[2].body == b""
    tag = stx.responses[0].to.tag
    assert tag and all(r.to.tag == tag for r in stx.responses)

    b.respond(200, body=SDP_B)
    assert stx.statuses[-1] == 200
    ok = stx.responses[-1]
    assert ok.body == SDP_B and ok.to.tag == tag and ok.contacts
    assert a.cancelled and a.reason == REASON_ANSWERED
    assert not b.cancelled
    ack, hop = env.port.acks[-1]
    assert ack.call_id == b.request.call_id and ack.cseq.method == "ACK" and ack.to.tag == "dev-tag"
    # answered: no longer a pending call of the AOR (it must not count against
    # max_pending_per_aor), and closed to appends
    assert env.silo.lookup(AOR) == [] and env.silo.pending_count(AOR) == 0
    assert not env.call().can_append()
    env.register(binding(3))
    assert len(env.port.invites()) == 2
    a.respond(487)
    assert stx.statuses[-1] == 200 and len(stx.responses) == 4

    call = env.call()
    assert call.state.name == "connected"
    # caller ACKs, then hangs up: BYE to the device, everything released
    env.mgr.handle_ack(in_dialog("ACK", call.call_id, '<sip:alice@example.com>;tag=a-tag',
                                 f"<sip:bob@example.com>;tag={tag}", 10), env.caller_flow)
    assert env.port.retransmits[-1].stopped
    bye_stx = _stx(env, in_dialog("BYE", call.call_id, '<sip:alice@example.com>;tag=a-tag',
                                  f"<sip:bob@example.com>;tag={tag}", 11))
    assert bye_stx.statuses == [200]
    bye = env.port.last("BYE").request
    assert bye.call_id == b.request.call_id and bye.to.tag == "dev-tag"
    assert bye.raw_uri == "sip:bob@10.0.0.2:5080;transport=tcp"
    env.assert_clean()


def _stx(env: Env, req):  # type: ignore[no-untyped-def]
    from tests.fakes.sip import FakeStx

    stx = FakeStx(req)
    env.mgr.handle_in_dialog(req, stx, env.caller_flow)
    return stx


def test_2xx_from_a_second_branch_gets_ack_then_bye() -> None:
    env, stx = two_device_call()
    a, b = env.port.invites()
    a.respond(200, body=SDP_B)
    b.respond(200, body=SDP_C, to_tag="other")
    assert [r.status for r in stx.responses] == [200]
    acks = [ack for ack, _ in env.port.acks if ack.call_id == b.request.call_id]
    assert len(acks) == 1 and acks[0].to.tag == "other"
    bye = env.port.last("BYE").request
    assert bye.call_id == b.request.call_id and bye.to.tag == "other"
    # a retransmission of the same 2xx is ACKed again, never BYEd twice
    b.respond(200, body=SDP_C, to_tag="other")
    assert len([c for c in env.port.sent if c.request.method == "BYE"]) == 1
    assert len([ack for ack, _ in env.port.acks if ack.call_id == b.request.call_id]) == 2


@pytest.mark.parametrize("status,reason", [
    (603, 'SIP;cause=603;text="Decline"'),  # not cause=600 (issue 12 item 14)
    (600, 'SIP;cause=600;text="Busy Everywhere"'),
])
def test_6xx_ends_the_fork_and_cancels_with_its_cause(status: int, reason: str) -> None:
    env, stx = two_device_call()
    a, b = env.port.invites()
    a.respond(180)
    b.respond(status)
    assert stx.statuses == [180, status]
    assert a.cancelled and a.reason == reason
    a.respond(487)
    assert stx.statuses == [180, status]
    env.assert_clean()


def test_a_cancelled_reconnect_branch_does_not_count_as_a_failure() -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    (old,) = env.port.invites()
    env.register(binding(1, flow_id="tcp:dev1#2"), refreshed=True)
    new = env.port.invites()[1]
    old.respond(487)
    assert stx.statuses == []
    new.respond(404)
    assert stx.statuses == [404]
    env.assert_clean()


def test_every_branch_failed_gives_the_best_response() -> None:
    env, stx = two_device_call()
    a, b = env.port.invites()
    a.respond(404)
    assert stx.statuses == []
    b.respond(486)
    assert stx.statuses == [486]
    env.assert_clean()


def test_503_and_timeouts_are_not_passed_on() -> None:
    env, stx = two_device_call()
    a, b = env.port.invites()
    a.respond(503)
    b.respond(408)
    # 408 and 503 are 4xx/5xx: lowest class is 4xx -> 408 -> shown as 480
    assert stx.statuses == [480]
    env.assert_clean()


def test_ring_timeout_gives_480_and_cancels_everything() -> None:
    env, stx = two_device_call()
    a, b = env.port.invites()
    a.respond(180)
    env.clock.advance(29.9)
    assert stx.statuses == [180]
    env.clock.advance(0.1)
    assert stx.statuses == [180, 480]
    assert a.cancelled and b.cancelled
    assert a.reason == b.reason == 'SIP;cause=480;text="Ring timeout"'  # RFC 3326 (issue 12 item 14)
    a.respond(487)
    b.respond(200, body=SDP_B)  # answered while the CANCEL crossed: ACK and BYE
    assert env.port.last("BYE").request.call_id == b.request.call_id
    env.assert_clean()


def test_caller_cancel() -> None:
    env, stx = two_device_call()
    a, b = env.port.invites()
    a.respond(180)
    from tests.fakes.sip import FakeStx
    from tests.b2bua.helpers import parse

    cancel = parse(
        """CANCEL sip:bob@example.com SIP/2.0
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKcallercall-1;rport
Max-Forwards: 70
From: "Alice Liddell" <sip:alice@example.com>;tag=a-tag
To: <sip:bob@example.com>
Call-ID: call-1@10.0.0.1
CSeq: 10 CANCEL
Reason: SIP;cause=600;text="Busy Everywhere\""""
    )
    cstx = FakeStx(cancel)
    env.mgr.handle_cancel(cancel, stx, env.caller_flow, cstx)
    assert cstx.statuses == [200]
    assert stx.statuses == [180, 487]
    assert a.cancelled and b.cancelled
    assert a.reason == 'SIP;cause=600;text="Busy Everywhere"'  # the caller's Reason goes on
    env.assert_clean()
    # a second CANCEL finds nothing
    again = FakeStx(cancel)
    env.mgr.handle_cancel(cancel, stx, env.caller_flow, again)
    assert again.statuses == [481]


def test_late_offer_ack_carries_the_callers_answer() -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite(body=b"")
    (a,) = env.port.invites()
    assert a.request.body == b""
    a.respond(200, body=SDP_B)
    assert stx.responses[-1].body == SDP_B
    assert env.port.acks == []  # the answer is in the caller's ACK
    tag = stx.responses[-1].to.tag
    ack = in_dialog("ACK", "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                    f"<sip:bob@example.com>;tag={tag}", 10, body=SDP_A)
    env.mgr.handle_ack(ack, env.caller_flow)
    (b_ack, _), = env.port.acks
    assert b_ack.body == SDP_A and b_ack.cseq.seq == a.request.cseq.seq


def test_max_branches_limits_forking() -> None:
    env = Env(max_branches=2)
    for n in (1, 2, 3):
        env.location.add(binding(n))
    env.invite()
    assert len(env.port.invites()) == 2
    env.register(binding(4))
    assert len(env.port.invites()) == 2


def test_max_pending_per_aor_gives_486() -> None:
    env = Env(max_pending=1)
    env.location.add(binding(1))
    env.invite(call_id="c1")
    _, stx = env.invite(call_id="c2")
    assert stx.statuses == [486]
    assert list(env.mgr.calls) == ["c1"]


def test_exception_in_connect_answers_the_caller_and_hangs_up_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    ctx = env.port.invites()[0]
    # raised where connect() answers the caller: the call layer is compiled (mypyc), so a patched
    # module function (session_timer.start, as this test did) is not what its native calls reach
    monkeypatch.setattr(env.port, "respond_2xx", lambda *a, **k: 1 / 0)
    ctx.respond(200, to_tag="dev-tag", body=SDP_B)
    assert [s for s in stx.statuses if s >= 200] == [500]
    byes = [c for c in env.port.sent if c.request.method == "BYE"]
    assert len(byes) == 1 and byes[0].request.call_id == ctx.request.call_id
    assert env.mgr.calls == {}


def test_call_ended_event_carries_its_reason_as_a_field(logged) -> None:
    """The end reason is a structured field that the JSON log keeps (issue 10 leftover), so
    operators' tools and the e2e tests don't parse the wording of the message."""
    import json

    from libon_tsilo.ops.logging import json_line

    env, stx = two_device_call()
    env.clock.advance(30)
    assert stx.statuses == [480]
    ended = [e for e in logged if e.get("log_format", "").startswith("call ended")]
    assert [e.get("reason") for e in ended] == ["ring timeout"]
    line = json.loads(json_line(ended[0]))
    assert line["reason"] == "ring timeout" and line["msg"].startswith("call ended: ring timeout (")
    assert line["call_id"] == ended[0]["call_id"]
