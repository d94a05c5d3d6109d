"""Reliable provisional responses (RFC 3262) hop by hop, on a Clock with a recording port:
the device's reliable 18x is PRACKed on its branch, and relayed to the caller reliably (our RSeq,
retransmitted until the caller's PRACK) or not, as the caller's INVITE asks."""

from __future__ import annotations

from typing import Any

from libon_tsilo.sip.message import make_response, parse_message
from tests.b2bua.helpers import SDP_A, SDP_B, SDP_C, Env, binding, in_dialog
from tests.fakes.sip import FakeStx

CALLER = "<sip:alice@example.com>;tag=a-tag"
REQUIRE = "Require: 100rel\n"
T1 = 0.5


def device_18x(ctx: Any, status: int, rseq: int | None, body: bytes = b"", tag: str = "dev-tag") -> Any:
    """A device's 18x to a branch INVITE, reliable when `rseq` is given."""
    resp = make_response(ctx.request, status, None, to_tag=tag)
    resp.add_header("Contact", "<sip:bob@10.0.0.2:5080;transport=tcp>")
    if rseq is not None:
        resp.add_header("Require", "100rel")
        resp.add_header("RSeq", str(rseq))
    if body:
        resp.add_header("Content-Type", "application/sdp")
        resp.body = body
    parsed = parse_message(resp.to_bytes())
    ctx.on_response(parsed)
    return parsed


def caller_prack(env: Env, to_tag: str, rseq: int, seq: int = 11, body: bytes = b"",
                 rack_cseq: int = 10) -> FakeStx:
    req = in_dialog("PRACK", "call-1@10.0.0.1", CALLER, f"<sip:bob@example.com>;tag={to_tag}", seq, body,
                    extra=f"RAck: {rseq} {rack_cseq} INVITE\n")
    stx = FakeStx(req)
    env.mgr.request_received(req, stx, env.caller_flow)
    return stx


def invite(env: Env, extra: str = "", **kw: Any) -> FakeStx:
    _, stx = env.invite(extra=extra, **kw)
    return stx


def finish(env: Env, stx: FakeStx) -> None:
    """Device answers, caller ACKs and hangs up: the call ends with every table empty."""
    ctx = env.port.invites()[0]
    ctx.respond(200, body=SDP_B)
    assert stx.final is not None and stx.final.status == 200
    tag = stx.final.to.tag
    env.mgr.handle_ack(in_dialog("ACK", "call-1@10.0.0.1", CALLER, f"<sip:bob@example.com>;tag={tag}", 10),
                       env.caller_flow)
    bye = FakeStx(in_dialog("BYE", "call-1@10.0.0.1", CALLER, f"<sip:bob@example.com>;tag={tag}", 50))
    env.mgr.request_received(bye.request, bye, env.caller_flow)
    assert bye.statuses == [200]
    env.assert_clean()


def rseq_of(resp: Any) -> int | None:
    value = resp.header("RSeq")
    return int(value) if value is not None else None


# -- the device side ---------------------------------------------------------------------------


def test_branch_invite_with_an_offer_supports_100rel_never_requires_it() -> None:
    env = Env()
    env.location.add(binding(1))
    invite(env, REQUIRE)
    req = env.port.invites()[0].request
    assert "100rel" in req.header_values("Supported")
    assert req.header_values("Require") == []  # hop by hop: the caller's Require is met on its own leg


def test_late_offer_branch_does_not_offer_100rel() -> None:
    env = Env()
    env.location.add(binding(1))
    invite(env, body=b"")
    assert "100rel" not in env.port.invites()[0].request.header_values("Supported")


def test_reliable_183_is_pracked_on_the_branch_and_relayed_reliably_with_its_sdp() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    device_18x(ctx, 183, 7, SDP_B)
    prack = env.port.last("PRACK")
    req = prack.request
    assert req.header("RAck") == "7 1 INVITE"
    assert req.call_id == ctx.request.call_id and req.to.tag == "dev-tag"
    assert req.from_.tag == ctx.request.from_.tag
    assert req.raw_uri == "sip:bob@10.0.0.2:5080;transport=tcp"  # the 18x's Contact: the early dialog
    assert req.cseq.seq == 2 and req.cseq.method == "PRACK"
    prack.respond(200)  # consumed: nothing reaches the caller
    out = stx.responses[-1]
    assert out.status == 183 and out.body == SDP_B  # byte for byte
    assert out.header_values("Require") == ["100rel"]
    rseq = rseq_of(out)
    assert rseq is not None and 1 <= rseq < 2**31
    # the device resends its 183 (our PRACK was slow): no second PRACK, nothing relayed
    device_18x(ctx, 183, 7, SDP_B)
    assert env.port.sent_methods().count("PRACK") == 1 and len(stx.responses) == 1
    ok = caller_prack(env, out.to.tag, rseq)
    assert ok.statuses == [200]
    assert env.clock.getDelayedCalls() != []  # the ring timer only
    env.clock.advance(T1 * 4)
    assert len(stx.responses) == 1  # PRACKed: no retransmission
    finish(env, stx)


def test_reliable_18x_in_order_only() -> None:
    env = Env()
    env.location.add(binding(1))
    invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    device_18x(ctx, 180, 1)
    device_18x(ctx, 183, 3, SDP_B)  # 2 was lost: out of order, not PRACKed (§4)
    device_18x(ctx, 183, 2, SDP_B)
    assert [c.request.header("RAck") for c in env.port.sent if c.request.method == "PRACK"] == [
        "1 1 INVITE", "2 1 INVITE"]
    env.call().caller_cancel(None)
    ctx.respond(487)
    env.assert_clean()


def test_reliable_18x_relayed_unreliably_to_a_caller_without_100rel() -> None:
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    env.mgr.calls["call-1@10.0.0.1"].a.invite.remove_header("Supported")
    ctx = env.port.invites()[0]
    device_18x(ctx, 183, 1, SDP_B)
    assert env.port.last("PRACK").request.header("RAck") == "1 1 INVITE"  # PRACKed all the same
    out = stx.responses[-1]
    assert out.status == 183 and out.body == SDP_B
    assert out.header("RSeq") is None and out.header_values("Require") == []
    env.clock.advance(T1 * 8)
    assert len(stx.responses) == 1
    finish(env, stx)


def test_caller_that_supports_100rel_gets_reliable_18x_only_for_reliable_ones() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env)  # the helper's INVITE says "Supported: 100rel, timer"
    ctx = env.port.invites()[0]
    device_18x(ctx, 180, None)
    assert stx.responses[-1].header("RSeq") is None
    device_18x(ctx, 183, 1, SDP_B)
    out = stx.responses[-1]
    assert out.status == 183 and rseq_of(out) is not None and out.body == SDP_B
    assert caller_prack(env, out.to.tag, rseq_of(out)).statuses == [200]
    finish(env, stx)


# -- the caller side: retransmission, queue, PRACK checks --------------------------------------


def test_reliable_18x_is_retransmitted_doubling_until_the_prack() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    device_18x(env.port.invites()[0], 180, None)  # unreliable from the device, reliable to the caller
    first = stx.responses[-1]
    rseq = rseq_of(first)
    assert rseq is not None
    times = []
    start = env.clock.seconds()
    for _ in range(40):
        env.clock.advance(T1 / 4)
        if len(stx.responses) > len(times) + 1:
            times.append(env.clock.seconds() - start)
        if len(times) == 3:
            break
    assert times == [T1, 3 * T1, 7 * T1]  # T1, 2*T1, 4*T1 apart
    assert all(rseq_of(r) == rseq for r in stx.responses)
    assert caller_prack(env, first.to.tag, rseq).statuses == [200]
    count = len(stx.responses)
    env.clock.advance(16 * T1)
    assert len(stx.responses) == count
    finish(env, stx)


def test_no_prack_gives_up_at_64_t1_with_a_5xx_and_cancels_the_branch() -> None:
    env = Env(ring_timeout=120)
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    device_18x(ctx, 180, None)
    env.clock.advance(64 * T1 - 0.01)
    assert stx.final is None
    env.clock.advance(0.02)
    assert stx.final is not None and stx.final.status == 500
    assert ctx.cancelled
    ctx.respond(487)
    env.assert_clean()


def test_second_18x_waits_for_the_prack_of_the_first() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    device_18x(ctx, 180, None)
    device_18x(ctx, 183, None, SDP_B)
    assert [r.status for r in stx.responses] == [180]
    first = rseq_of(stx.responses[0])
    assert caller_prack(env, stx.responses[0].to.tag, first).statuses == [200]
    out = stx.responses[-1]
    assert out.status == 183 and rseq_of(out) == first + 1 and out.body == SDP_B
    assert caller_prack(env, out.to.tag, first + 1, seq=12).statuses == [200]
    finish(env, stx)


def test_prack_checks() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    device_18x(env.port.invites()[0], 180, None)
    out = stx.responses[-1]
    rseq = rseq_of(out)
    tag = out.to.tag
    assert caller_prack(env, tag, rseq + 1, seq=11).statuses == [481]  # no such reliable 18x
    assert caller_prack(env, tag, rseq, seq=12, rack_cseq=9).statuses == [481]  # another INVITE
    assert caller_prack(env, tag, rseq, seq=12).statuses == [500]  # CSeq not above the last one
    assert caller_prack(env, tag, rseq, seq=13, body=SDP_A).statuses == [488]  # no offer in PRACK
    assert caller_prack(env, tag, rseq, seq=14).statuses == [481]  # acknowledged by the 488's PRACK
    bad = in_dialog("PRACK", "call-1@10.0.0.1", CALLER, f"<sip:bob@example.com>;tag={tag}", 15,
                    extra="RAck: x\n")
    bad_stx = FakeStx(bad)
    env.mgr.request_received(bad, bad_stx, env.caller_flow)
    assert bad_stx.statuses == [400]
    finish(env, stx)


def test_late_offer_caller_requiring_100rel_gets_its_18x_without_sdp() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE, body=b"")
    device_18x(env.port.invites()[0], 183, None, SDP_B)
    out = stx.responses[-1]
    assert out.status == 183 and rseq_of(out) is not None
    assert out.body == b"" and out.header("Content-Type") is None  # an offer would need a PRACK answer
    assert caller_prack(env, out.to.tag, rseq_of(out)).statuses == [200]
    finish(env, stx)


def test_final_response_stops_retransmission_and_a_late_prack_still_matches() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    device_18x(ctx, 180, None)
    out = stx.responses[-1]
    ctx.respond(200, body=SDP_B)
    count = len(stx.responses)
    env.clock.advance(T1 * 8)
    assert len(stx.responses) == count  # no 180 after the 200
    assert caller_prack(env, out.to.tag, rseq_of(out)).statuses == [200]
    finish_connected(env, stx)


def finish_connected(env: Env, stx: FakeStx) -> None:
    tag = stx.final.to.tag
    env.mgr.handle_ack(in_dialog("ACK", "call-1@10.0.0.1", CALLER, f"<sip:bob@example.com>;tag={tag}", 10),
                       env.caller_flow)
    bye = FakeStx(in_dialog("BYE", "call-1@10.0.0.1", CALLER, f"<sip:bob@example.com>;tag={tag}", 50))
    env.mgr.request_received(bye.request, bye, env.caller_flow)
    env.assert_clean()


def test_forked_branches_each_prack_on_their_own_dialog() -> None:
    env = Env()
    env.location.add(binding(1))
    env.location.add(binding(2))
    stx = invite(env)
    one, two = env.port.invites()
    device_18x(one, 183, 4, SDP_B, tag="one")
    device_18x(two, 180, 9, tag="two")
    pracks = [c.request for c in env.port.sent if c.request.method == "PRACK"]
    assert [(p.call_id, p.to.tag, p.header("RAck")) for p in pracks] == [
        (one.request.call_id, "one", "4 1 INVITE"), (two.request.call_id, "two", "9 1 INVITE")]
    two.respond(200, to_tag="two", body=SDP_B)  # the other branch is cancelled
    assert one.cancelled
    one.respond(487, to_tag="one")
    finish_connected(env, stx)


def _early_from_caller(env: Env, method: str, body: bytes = b"") -> FakeStx:
    stx = invite(env, REQUIRE)
    device_18x(env.port.invites()[0], 183, 1, SDP_B)
    early = stx.responses[-1]
    caller_prack(env, early.to.tag, rseq_of(early))
    req = in_dialog(method, "call-1@10.0.0.1", "<sip:alice@example.com>;tag=a-tag",
                    f"<sip:bob@example.com>;tag={early.to.tag}", 12, body)
    u = FakeStx(req)
    env.mgr.request_received(req, u, env.caller_flow)
    return u


def test_early_update_without_offer_is_accepted_and_the_call_goes_on() -> None:
    env = Env()
    env.location.add(binding(1))
    u = _early_from_caller(env, "UPDATE")
    assert u.statuses == [200] and u.responses[-1].header("Contact")
    assert env.call() is not None and "CANCEL" not in env.port.sent_methods()


def test_early_update_with_offer_fails_only_that_transaction() -> None:
    env = Env()
    env.location.add(binding(1))
    u = _early_from_caller(env, "UPDATE", SDP_A)
    assert u.statuses == [488]
    assert env.call() is not None and "CANCEL" not in env.port.sent_methods()


def test_early_info_gets_469_not_481() -> None:
    env = Env()
    env.location.add(binding(1))
    u = _early_from_caller(env, "INFO", b"Signal=5\n")
    assert u.statuses == [469]
    assert env.call() is not None


def test_forking_caller_supporting_100rel_gets_early_sdp_unreliably() -> None:
    env = Env()
    env.location.add(binding(1))
    env.location.add(binding(2))
    stx = invite(env, "Supported: 100rel\n")
    c1, c2 = env.port.invites()[:2]
    device_18x(c1, 183, 1, SDP_B, tag="d1")
    early = stx.responses[-1]
    assert early.status == 183 and early.header("RSeq") is None and early.body == SDP_B  # a preview
    c2.respond(200, to_tag="d2", body=SDP_C)
    assert stx.responses[-1].status == 200 and stx.responses[-1].body == SDP_C


def test_forking_caller_requiring_100rel_gets_reliable_18x_without_sdp() -> None:
    env = Env()
    env.location.add(binding(1))
    env.location.add(binding(2))
    stx = invite(env, REQUIRE)
    device_18x(env.port.invites()[0], 183, 1, SDP_B, tag="d1")
    early = stx.responses[-1]
    assert early.status == 183 and early.header("RSeq") and early.body == b""
    assert early.header("Content-Type") is None


def test_single_branch_caller_supporting_100rel_still_gets_reliable_sdp() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, "Supported: 100rel\n")
    device_18x(env.port.invites()[0], 183, 1, SDP_B)
    early = stx.responses[-1]
    assert early.header("RSeq") and early.body == SDP_B


def test_2xx_waits_for_the_prack_of_a_reliable_183_with_sdp() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    device_18x(ctx, 183, 1, SDP_B)
    ctx.respond(200, to_tag="dev-tag", body=SDP_B)
    assert [r.status for r in stx.responses] == [183]  # §3: no 2xx before the PRACK
    env.clock.advance(T1)
    assert [r.status for r in stx.responses] == [183, 183]  # still resent meanwhile
    early = stx.responses[-1]
    prack = caller_prack(env, early.to.tag, rseq_of(early))
    assert prack.statuses == [200]
    assert [r.status for r in stx.responses] == [183, 183, 200]
    assert stx.final is not None and stx.final.body == SDP_B


def test_held_2xx_never_prackd_gives_the_caller_500_and_the_device_a_bye() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    device_18x(ctx, 183, 1, SDP_B)
    ctx.respond(200, to_tag="dev-tag", body=SDP_B)
    env.clock.advance(64 * T1)
    assert [s for s in stx.statuses if s >= 200] == [500]
    byes = [c for c in env.port.sent if c.request.method == "BYE"]
    assert len(byes) == 1 and byes[0].request.call_id == ctx.request.call_id
    assert env.mgr.calls == {}


def test_cancel_while_the_2xx_waits_for_a_prack_gets_487_and_byes_the_device() -> None:
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    device_18x(ctx, 183, 1, SDP_B)
    ctx.respond(200, to_tag="dev-tag", body=SDP_B)
    cancel = parse_message(
        b"CANCEL sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bKcallercall-1;rport\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a-tag\r\nTo: <sip:bob@example.com>\r\n"
        b"Call-ID: call-1@10.0.0.1\r\nCSeq: 10 CANCEL\r\nContent-Length: 0\r\n\r\n")
    cstx = FakeStx(cancel)
    env.mgr.handle_cancel(cancel, stx, env.caller_flow, cstx)
    assert cstx.statuses == [200]
    assert [r.status for r in stx.responses] == [183, 487]
    byes = [c for c in env.port.sent if c.request.method == "BYE"]
    assert len(byes) == 1 and byes[0].request.call_id == ctx.request.call_id
    assert env.mgr.calls == {}


def test_18x_queue_overflow_is_counted_as_a_limit_and_logged_throttled(logged) -> None:
    """Review finding 12: a device sending reliable 18x faster than the caller PRACKs overflows the
    queue; each drop is counted in limit_hits (/metrics), and the warning is not one line per drop."""
    env = Env()
    env.location.add(binding(1))
    stx = invite(env, REQUIRE)
    ctx = env.port.invites()[0]
    for rseq in range(1, 1 + 1 + 8 + 5):  # one outstanding, 8 queued, then 5 dropped
        device_18x(ctx, 180, rseq)
    assert [r.status for r in stx.responses] == [180]  # only the first went out: no PRACK yet
    assert env.mgr.limit_hits()["reliable_18x_dropped"] == 5
    warned = [e for e in logged if "caller slow to PRACK" in e.get("log_format", "")]
    assert len(warned) == 1 and warned[0]["limit"] == "reliable_18x_dropped"
