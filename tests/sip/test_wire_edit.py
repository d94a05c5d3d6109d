"""sip/wire_edit.py: a response's top Via cut out of its bytes, or None where the parser must judge."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.headers import Via
from libon_tsilo.sip.message import parse_message
from libon_tsilo.sip.wire_edit import pop_top_via

OURS = "SIP/2.0/UDP 10.0.0.2:5071;branch=z9hG4bKslabc123;rport=5071;received=10.0.0.9"
NEXT = "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-peer1;rport=5060"
REST = ("From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\nCall-ID: c1\r\n"
        "CSeq: 1 INVITE\r\nContent-Length: 4\r\n\r\nbody")


def response(vias: str, status: str = "180 Ringing") -> bytes:
    return f"SIP/2.0 {status}\r\n{vias}{REST}".encode()


def test_our_via_line_is_cut_and_the_next_one_handed_back() -> None:
    data = response(f"Via: {OURS}\r\nVia: {NEXT}\r\nVia: SIP/2.0/UDP 10.0.0.7;branch=z9hG4bKx\r\n")
    popped = pop_top_via(data, b"z9hG4bKsl")
    assert popped is not None
    assert popped.branch == "z9hG4bKslabc123" and popped.next_via == NEXT
    assert popped.data == response(f"Via: {NEXT}\r\nVia: SIP/2.0/UDP 10.0.0.7;branch=z9hG4bKx\r\n")
    # what the parser's path would have sent: the same message, one Via less
    assert parse_message(popped.data).vias[0].branch == "z9hG4bK-peer1"


def test_values_on_one_line_and_the_other_spellings() -> None:
    popped = pop_top_via(response(f"Via: {OURS} ,  {NEXT}, SIP/2.0/TCP h;branch=z9hG4bKy\r\n"), b"z9hG4bKsl")
    assert popped is not None and popped.next_via == NEXT
    assert popped.data == response(f"Via: {NEXT}, SIP/2.0/TCP h;branch=z9hG4bKy\r\n")
    # compact and lower-case names, blanks around the colon, a Via that is not the first header
    data = f"SIP/2.0 200 OK\r\nX-A: 1\r\nv : {OURS}\r\nvia:{NEXT}\r\n{REST}".encode()
    popped = pop_top_via(data, b"z9hG4bKsl")
    assert popped is not None and popped.next_via == NEXT
    assert popped.data == f"SIP/2.0 200 OK\r\nX-A: 1\r\nvia:{NEXT}\r\n{REST}".encode()
    assert Via.parse(popped.next_via).rport == 5060


@pytest.mark.parametrize("data", [
    response(f"Via: {NEXT}\r\nVia: {OURS}\r\n"),  # the top one is not ours
    response(f"Via: {OURS}\r\n"),  # nothing to pass it on to
    f"INVITE sip:b@example.com SIP/2.0\r\nVia: {OURS}\r\nVia: {NEXT}\r\n{REST}".encode(),  # a request
    response(f"Via: {OURS}\r\n {NEXT}\r\n"),  # folded
    response(f"Via: {OURS}\r\nVia: {NEXT}\nX: y\r\n"),  # a bare LF ends no line here
    response(f"Via: {OURS};x=\"a,b\"\r\nVia: {NEXT}\r\n"),  # a quoted comma
    response(f"Via: {OURS}\r\nVia: \r\n"),  # an empty next value
    b"SIP/2.0 18x Ringing\r\nVia: " + OURS.encode() + b"\r\n\r\n",
    response(f"Via: {OURS}\r\n") .replace(b"\r\n\r\nbody", b"\r\n\r\nVia: " + NEXT.encode()),  # a body's
    b"SIP/2.0 180 Ringing\r\nVia: " + OURS.encode(),  # no line end
])
def test_what_it_does_not_read_for_sure_is_left_to_the_parser(data: bytes) -> None:
    assert pop_top_via(data, b"z9hG4bKsl") is None


# -- requests: read_request_head and its edits (a stateless relay's, RFC 3261 §16.6) -------------

BYE = (b"BYE sip:bob@192.0.2.9:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5071;branch=z9hG4bKpeer;rport\r\n"
       b"Max-Forwards: 70\r\nRoute: <sip:T@10.0.0.1:5071;lr>, <sip:T@203.0.113.1;lr>\r\n"
       b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: c\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")


def test_a_requests_head_is_read_and_edited_on_the_wire() -> None:
    from libon_tsilo.sip.wire_edit import read_request_head

    head = read_request_head(BYE)
    assert head is not None and head.method == "BYE" and head.max_forwards == 70
    assert head.via == "SIP/2.0/UDP 10.0.0.2:5071;branch=z9hG4bKpeer;rport"
    assert head.routes == ["<sip:T@10.0.0.1:5071;lr>", "<sip:T@203.0.113.1;lr>"]
    out = head.edited(BYE, "SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKslX;rport",
                      "SIP/2.0/UDP 10.0.0.2:5071;branch=z9hG4bKpeer;rport=5071;received=10.0.0.2", 69)
    assert out == (b"BYE sip:bob@192.0.2.9:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKslX;rport"
                   b"\r\nVia: SIP/2.0/UDP 10.0.0.2:5071;branch=z9hG4bKpeer;rport=5071;received=10.0.0.2\r\n"
                   b"Max-Forwards: 69\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: c\r\n"
                   b"CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("old, new", [
    (b"Route: <sip:T@10", b"route: <sip:T@10"),  # another spelling of a line it edits
    (b"Route: <sip:T@10.0.0.1:5071;lr>, ", b"Route: <sip:T@10.0.0.1:5071;lr>,\r\n "),  # folded
    (b"Route: <sip:T@10", b'Route: "x" <sip:T@10'),  # a quote: a comma inside would not separate
    (b"Max-Forwards: 70\r\n", b""),  # none to decrement
    (b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\nMax-Forwards: 3\r\n"),  # two
    (b"Max-Forwards: 70", b"Max-Forwards: 7a"),
    (b";rport\r\n", b";rport, SIP/2.0/UDP 10.0.0.3;branch=z9hG4bKx\r\n"),  # two Via values on a line
    (b"BYE sip:", b"SIP/2.0 200 OK\r\nX: "),  # a response
    (b"\r\nVia: ", b"\r\nX-First: 1\r\nVia: "),  # Via not the first header line
    (b"\r\nVia: ", b"\r\nv: "),  # another spelling of it
])
def test_what_a_request_edit_does_not_read_for_sure_is_left_to_the_parser(old: bytes, new: bytes) -> None:
    from libon_tsilo.sip.wire_edit import read_request_head

    assert old in BYE
    assert read_request_head(BYE.replace(old, new, 1)) is None


# -- one read of the top Via for every question (read_top_via) -----------------------------------

def test_one_read_of_the_top_via_answers_pop_and_param() -> None:
    from libon_tsilo.sip.wire_edit import read_top_via

    data = response(f"Via: {OURS};nd=dWRwOjEyNy4wLjAuMTo1MDcx\r\nVia: {NEXT}\r\n")
    top = read_top_via(data)
    assert top is not None
    assert top.param("nd") == "dWRwOjEyNy4wLjAuMTo1MDcx" and top.param("maddr") is None
    popped = top.pop("z9hG4bKsl")
    assert popped is not None and popped.next_via == NEXT
    assert popped.data == response(f"Via: {NEXT}\r\n")
    assert top.pop("z9hG4bKzz") is None  # another prefix: not ours
    assert read_top_via(BYE) is None  # a request


def test_the_prefix_elsewhere_in_the_via_is_not_our_branch() -> None:
    from libon_tsilo.sip.wire_edit import read_top_via

    # the prefix text in another parameter, or in a second value, while the top branch is not ours
    for vias in (f"Via: {NEXT};x=z9hG4bKsl1\r\nVia: {OURS}\r\n", f"Via: {NEXT}, {OURS}\r\n"):
        top = read_top_via(response(vias))
        assert top is not None and top.pop("z9hG4bKsl") is None, vias


@pytest.mark.parametrize("start, method", [
    (b"BYE", "BYE"), (b"ABCDEFGHIJKLMNOP", "ABCDEFGHIJKLMNOP"),  # 16 capitals at most
    (b"ABCDEFGHIJKLMNOPQ", None), (b"A", None), (b"bye", None), (b"BY3", None), (b"B\xc9E", None),
])
def test_a_method_is_two_to_sixteen_capitals(start: bytes, method: str | None) -> None:
    from libon_tsilo.sip.wire_edit import read_request_head

    head = read_request_head(start + BYE[3:])
    assert (head.method if head is not None else None) == method


def test_an_empty_parameter_value_is_none() -> None:
    from libon_tsilo.sip.wire_edit import read_top_via

    for via in (f"{NEXT};nd=", f"{NEXT};nd=;x=1", f"{NEXT};nd"):
        top = read_top_via(response(f"Via: {via}\r\n"))
        assert top is not None and top.param("nd") is None, via
