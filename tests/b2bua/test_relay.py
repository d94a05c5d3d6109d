"""After the answer: ACKs, BYE both ways, re-INVITE/UPDATE with glare, INFO/MESSAGE/OPTIONS,
and the ways a call ends on its own (flow closed, transaction timeout, no ACK)."""

from __future__ import annotations

from tests.fakes.sip import FakeStx
from tests.b2bua.helpers import SDP_A, SDP_B, SDP_C, Env, binding, flow, in_dialog

CALLER = "<sip:alice@example.com>;tag=a-tag"


class Connected:
    """A call answered by device 1, with handy senders for both sides."""

    def __init__(self, ack: bool = True) -> None:
        self.env = env = Env()
        env.location.add(binding(1))
        _, self.stx = env.invite()
        self.b = env.port.invites()[0]
        self.b.respond(200, body=SDP_B)
        self.a_tag = self.stx.responses[-1].to.tag
        self.b_req = self.b.request
        self.a_seq = 10
        self.b_seq = 100
        if ack:
            self.from_a("ACK", seq=10)

    # requests from the caller on the A dialog
    def from_a(self, method: str, body: bytes = b"", seq: int | None = None, extra: str = "") -> FakeStx | None:
        if seq is None:
            self.a_seq += 1
            seq = self.a_seq
        req = in_dialog(method, "call-1@10.0.0.1", CALLER, f"<sip:bob@example.com>;tag={self.a_tag}", seq,
                        body, extra=extra)
        if method == "ACK":
            self.env.mgr.handle_ack(req, self.env.caller_flow)
            return None
        stx = FakeStx(req)
        self.env.mgr.request_received(req, stx, self.env.caller_flow)
        return stx

    # requests from the device on the B dialog (its From is the device's To)
    def from_b(self, method: str, body: bytes = b"", seq: int | None = None) -> FakeStx | None:
        if seq is None:
            self.b_seq += 1
            seq = self.b_seq
        req = in_dialog(method, self.b_req.call_id, "<sip:bob@example.com>;tag=dev-tag",
                        str(self.b_req.from_), seq, body)
        if method == "ACK":
            self.env.mgr.handle_ack(req, flow("tcp:dev1#1"))
            return None
        stx = FakeStx(req)
        self.env.mgr.request_received(req, stx, flow("tcp:dev1#1"))
        return stx


def test_bye_from_the_device() -> None:
    c = Connected()
    stx = c.from_b("BYE")
    assert stx is not None and stx.statuses == [200]
    bye = c.env.port.last("BYE")
    assert bye.request.call_id == "call-1@10.0.0.1"
    assert bye.request.from_.tag == c.a_tag and bye.request.to.tag == "a-tag"
    assert bye.request.raw_uri == "sip:alice@10.0.0.1:5070;transport=tcp"
    assert bye.hop.flow_id == "tcp:caller#1"
    c.env.assert_clean()
    # the answered branch's transaction lives on for timer M: it must stop calling the ended call
    assert c.b.detached
    # the dialog is gone: a retransmitted BYE from a new transaction gets 481
    again = c.from_b("BYE")
    assert again is not None and again.statuses == [481]


def test_reinvite_relayed_both_ways_and_acked() -> None:
    c = Connected()
    stx = c.from_b("INVITE", body=SDP_C)
    out = c.env.port.last("INVITE")
    assert out.request.call_id == "call-1@10.0.0.1" and out.request.body == SDP_C
    # our own CSeq space on the caller's dialog, our tag as From
    assert out.request.from_.tag == c.a_tag and out.request.to.tag == "a-tag"
    assert stx is not None and stx.statuses == []
    # glare: the caller's re-INVITE while one is in flight
    glare = c.from_a("INVITE", body=SDP_A)
    assert glare is not None and glare.statuses == [491]
    out.respond(200, body=SDP_A, to_tag="a-tag", contact="<sip:alice@10.0.0.1:5070;transport=tcp>")
    assert stx.statuses == [200] and stx.responses[0].body == SDP_A
    a_ack, _ = c.env.port.acks[-1]
    assert a_ack.call_id == "call-1@10.0.0.1" and a_ack.cseq.seq == out.request.cseq.seq
    retrans = c.env.port.retransmits[-1]
    assert not retrans.stopped
    c.from_b("ACK", seq=c.b_seq)
    assert retrans.stopped
    # the offer/answer is over: a new re-INVITE goes through
    c.from_a("INVITE", body=SDP_A)
    assert c.env.port.last("INVITE").request.call_id == c.b_req.call_id


def test_reinvite_failure_is_relayed_and_481_ends_the_call() -> None:
    c = Connected()
    stx = c.from_a("INVITE", body=SDP_A)
    out = c.env.port.last("INVITE")
    out.respond(488)
    assert stx is not None and stx.statuses == [488]
    assert c.env.call().state.name == "connected"
    stx = c.from_a("UPDATE", body=SDP_A)
    c.env.port.last("UPDATE").respond(481)
    assert stx is not None and stx.statuses == [481]
    byes = {x.request.call_id for x in c.env.port.sent if x.request.method == "BYE"}
    assert byes == {"call-1@10.0.0.1", c.b_req.call_id}
    c.env.assert_clean()


def test_update_relayed() -> None:
    c = Connected()
    stx = c.from_a("UPDATE", body=SDP_A)
    out = c.env.port.last("UPDATE")
    assert out.request.body == SDP_A and out.request.call_id == c.b_req.call_id
    out.respond(200, body=SDP_B)
    assert stx is not None and stx.statuses == [200] and stx.responses[0].body == SDP_B


def test_info_message_options_relayed() -> None:
    c = Connected()
    for method in ("INFO", "MESSAGE", "OPTIONS"):
        stx = c.from_a(method, extra="Info-Package: dtmf\n" if method == "INFO" else "")
        out = c.env.port.last(method)
        assert out.request.call_id == c.b_req.call_id
        if method == "INFO":
            assert out.request.header("Info-Package") == "dtmf"
        out.respond(200)
        assert stx is not None and stx.statuses == [200]


def test_unsupported_in_dialog_method_and_cseq_order() -> None:
    c = Connected()
    stx = c.from_a("SUBSCRIBE")
    assert stx is not None and stx.statuses == [501]
    old = c.from_a("INFO", seq=5)
    assert old is not None and old.statuses == [500]


def test_unknown_dialog_gets_481() -> None:
    env = Env()
    req = in_dialog("BYE", "nope", CALLER, "<sip:bob@example.com>;tag=zz", 3)
    stx = FakeStx(req)
    env.mgr.handle_in_dialog(req, stx, env.caller_flow)
    assert stx.statuses == [481]
    env.mgr.handle_ack(in_dialog("ACK", "nope", CALLER, "<sip:bob@example.com>;tag=zz", 3), env.caller_flow)
    env.assert_clean()


def test_call_ending_before_the_answer_leaves_branches_attached() -> None:
    """Only an answered branch is detached at the end: a cancelled one still has its 487 (or a
    racing 2xx, which gets ACK and BYE) to come, and must hear it."""
    env = Env()
    env.location.add(binding(1))
    _, stx = env.invite()
    b = env.port.invites()[0]
    b.respond(180)
    env.mgr.calls["call-1@10.0.0.1"].caller_cancel(None)
    assert b.cancelled and not b.detached
    b.respond(200, body=SDP_B)  # the race: answered as the CANCEL flew
    assert env.port.last("BYE").hop == b.hop
    env.assert_clean()


def test_in_dialog_transaction_timeout_ends_the_call() -> None:
    c = Connected()
    stx = c.from_a("INFO")
    c.env.port.last("INFO").respond(408)
    assert stx is not None and stx.statuses == [408]
    assert c.env.port.last("BYE").request.call_id in ("call-1@10.0.0.1", c.b_req.call_id)
    c.env.assert_clean()


def test_flow_closing_mid_dialog() -> None:
    c = Connected()
    c.env.mgr.flow_closed(flow("tcp:dev1#1"))
    bye = c.env.port.last("BYE").request
    assert bye.call_id == "call-1@10.0.0.1"
    c.env.assert_clean()


def test_caller_flow_closing_while_ringing() -> None:
    env = Env()
    env.location.add(binding(1))
    env.invite()
    ctx = env.port.invites()[0]
    ctx.respond(180)
    env.mgr.flow_closed(env.caller_flow)
    assert ctx.cancelled
    env.assert_clean()


def test_no_ack_from_the_caller_hangs_up() -> None:
    c = Connected(ack=False)
    retrans = c.env.port.retransmits[0]
    retrans.stopped = True  # what the real helper does when it gives up
    retrans.give_up()
    byes = [x.request for x in c.env.port.sent if x.request.method == "BYE"]
    assert {b.call_id for b in byes} == {"call-1@10.0.0.1", c.b_req.call_id}
    c.env.assert_clean()


def test_bye_before_ack_stops_retransmission() -> None:
    c = Connected(ack=False)
    stx = c.from_a("BYE")
    assert stx is not None and stx.statuses == [200]
    c.env.assert_clean()


def test_stray_2xx_for_an_unknown_dialog_is_acked_and_byed() -> None:
    c = Connected()
    c.from_a("BYE")
    c.env.assert_clean()
    from tests.b2bua.helpers import reply

    resp = reply(c.b_req, 200, to_tag="x-tag", body=SDP_B)
    c.env.mgr.stray_response(resp, flow("tcp:dev1#1"))
    ack, hop = c.env.port.acks[-1]
    assert ack.to.tag == "x-tag" and hop.flow_id == "tcp:dev1#1"
    bye = c.env.port.last("BYE").request
    assert bye.to.tag == "x-tag" and bye.cseq.seq == ack.cseq.seq + 1


def test_early_dialog_requests_are_refused() -> None:
    env = Env()
    env.location.add(binding(1))
    env.invite()
    ctx = env.port.invites()[0]
    ctx.respond(180)
    req = in_dialog("BYE", ctx.request.call_id, "<sip:bob@example.com>;tag=dev-tag", str(ctx.request.from_), 5)
    stx = FakeStx(req)
    env.mgr.handle_in_dialog(req, stx, flow("tcp:dev1#1"))
    assert stx.statuses == [481]
