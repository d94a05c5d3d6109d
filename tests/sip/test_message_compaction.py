"""Message.compact(): a long-waiting message kept as bytes only, re-parsed on first use."""

from __future__ import annotations

import tracemalloc

from libon_tsilo.sip.headers import Via
from libon_tsilo.sip.message import Request, make_response, parse_message

INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via:  SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-1;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: \"Alice\" <sip:alice@example.com>;tag=a1\r\n"
    b"To: <sip:bob@example.com>\r\n"
    b"Call-ID: c1@x\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:alice@10.0.0.1:5060>\r\n"
    b"Supported: replaces, 100rel\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\n"
)


def parsed() -> Request:
    msg = parse_message(INVITE)
    assert isinstance(msg, Request)
    msg.validate()
    return msg


def test_compact_keeps_bytes_and_every_accessor() -> None:
    msg = parsed()
    before = msg.to_bytes()
    msg.compact()
    msg.compact()  # idempotent
    assert msg.to_bytes() == before
    assert msg.method == "INVITE" and msg.uri.user == "bob" and msg.validated
    assert msg.from_.display == "Alice" and msg.from_.tag == "a1" and msg.to.tag is None
    assert msg.call_id == "c1@x" and msg.cseq.seq == 1 and msg.max_forwards == 70
    assert msg.header_values("supported") == ["replaces", "100rel"]
    assert msg.body == b"v=0\n" and msg.content_type == "application/sdp"
    assert str(msg.contacts[0].uri) == "sip:alice@10.0.0.1:5060"


def test_compact_after_changes_keeps_them() -> None:
    msg = parsed()
    via = msg.top_via
    via.set_param("received", "192.0.2.1")
    via.set_param("rport", "5070")
    msg.set_top_via(via)
    msg.add_header("X-Note", "kept")
    msg.body = b"v=1\n"
    expected = msg.to_bytes()
    msg.compact()
    assert msg.to_bytes() == expected
    assert msg.top_via.received == "192.0.2.1" and msg.header("x-note") == "kept" and msg.body == b"v=1\n"
    msg.set_header("Max-Forwards", "69")  # writable again once thawed
    assert b"Max-Forwards: 69\r\n" in msg.to_bytes()


def test_compact_response_for_retransmission() -> None:
    msg = parsed()
    trying = make_response(msg, 100, "Trying")
    expected = trying.to_bytes()
    trying.compact()
    assert trying.to_bytes() == expected
    assert trying.status == 100 and isinstance(trying.top_via, Via) and trying.call_id == "c1@x"


def test_compact_message_is_much_smaller() -> None:
    tracemalloc.start()
    try:
        fat = []
        for _ in range(200):
            msg = parsed()
            msg.to.uri, msg.contacts  # what a call set-up reads
            fat.append(msg)
        full = tracemalloc.get_traced_memory()[0]
        for msg in fat:
            msg.compact()
        small = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert small < full / 2


def test_serialized_bytes_are_reused_until_the_next_change() -> None:
    """to_bytes() keeps what it wrote: a resend (and compact()) costs no second serialization, and
    every kind of change still shows in the next to_bytes()."""
    resp = make_response(parsed(), 200, to_tag="b1")
    first = resp.to_bytes()
    assert resp.to_bytes() is first  # the same object: nothing serialized again
    resp.add_header("Contact", "<sip:b2bua@10.0.0.9>")
    second = resp.to_bytes()
    assert second != first and b"Contact: <sip:b2bua@10.0.0.9>\r\n" in second
    resp.set_header("Contact", "<sip:b2bua@10.0.0.10>")
    assert b"10.0.0.10" in resp.to_bytes() and b"10.0.0.9>" not in resp.to_bytes()
    resp.body = b"v=0\r\n"
    assert resp.to_bytes().endswith(b"\r\n\r\nv=0\r\n") and b"Content-Length: 5\r\n" in resp.to_bytes()
    req = Request("BYE", "sip:bob@10.0.0.2")
    req.add_header("Call-ID", "c9@x")
    sent = req.to_bytes()
    req.uri = "sip:carol@10.0.0.3"
    assert req.to_bytes() != sent and req.to_bytes().startswith(b"BYE sip:carol@10.0.0.3 SIP/2.0\r\n")
    via = Via.parse("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-7")
    req.set_top_via(via)
    assert b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-7\r\n" in req.to_bytes()
    kept = req.to_bytes()
    req.compact()  # reuses the kept bytes
    assert req.to_bytes() == kept and req.call_id == "c9@x"


def test_compacted_says_whether_only_bytes_are_held() -> None:
    msg = parsed()
    assert not msg.compacted
    msg.compact()
    assert msg.compacted
    assert msg.call_id == "c1@x"  # the first read parses the bytes again
    assert not msg.compacted


def test_compact_assigns_shared_empty_state_instead_of_deleting_slots() -> None:
    # issue 15: a del of a compiled slot goes through PyObject_SetAttr (~1,000 instructions each,
    # five per message); compact() now stores shared empty values, so no slot is ever unset and two
    # packed messages hold the same (empty) objects, nothing of their own
    one, two = parsed(), parsed()
    one.compact()
    two.compact()
    assert one._headers == [] and one._cache == {} and one._index is None
    assert one._headers is two._headers and one._cache is two._cache
    assert one.from_.tag == "a1" and one._headers is not two._headers  # read: parsed again, its own
    assert two._headers == [] and two.to_bytes() == INVITE
