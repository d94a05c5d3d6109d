"""parse_message, the Message accessors, header editing, serialization and make_response."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import COMPACT, NameAddr, Via
from libon_tsilo.sip.message import (
    Request,
    Response,
    extract_for_error_response,
    log_call_id,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
)
from libon_tsilo.sip.uri import URI

SDP = (b"v=0\r\no=alice 2890844526 2890844526 IN IP4 192.0.2.101\r\ns=-\r\nc=IN IP4 192.0.2.101\r\n"
       b"t=0 0\r\nm=audio 49172 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport\r\n"
    b"Via: SIP/2.0/TCP [2001:db8::7]:5070;branch=z9hG4bKv6;received=2001:db8::99, SIP/2.0/TLS third.example.com;branch=z9hG4bK3\r\n"
    b"Max-Forwards: 70\r\n"
    b'To: "Bob" <sip:bob@biloxi.example.com>\r\n'
    b'From: "Alice, A." <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com;transport=tcp>;+sip.instance=\"<urn:uuid:0001>\"\r\n"
    b"Subject: lunch,\r\n  today?\r\n"
    b"Record-Route: <sip:p1.example.com;lr>\r\n"
    b"Content-Type: application/SDP; charset=x\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n"
    b"\r\n" + SDP
)

RESPONSE = (
    b"SIP/2.0 180 Ringing now\r\n"
    b"v: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n"
    b"t: <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
    b"f: <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"i: a84b4c76e66710\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"m: <sip:bob@192.0.2.4>\r\n"
    b"l: 0\r\n"
    b"\r\n"
)


def msg_with(*headers: str, body: bytes = b"", start: str = "OPTIONS sip:u@example.com SIP/2.0") -> bytes:
    lines = [start, *headers]
    if not any(h.lower().startswith(("content-length:", "l:")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


BASIC = (
    "Via: SIP/2.0/UDP h.example.com;branch=z9hG4bKb1",
    "To: <sip:u@example.com>",
    "From: <sip:c@example.com>;tag=f1",
    "Call-ID: cid1",
    "CSeq: 7 OPTIONS",
    "Max-Forwards: 70",
)


def test_invite_request_fields() -> None:
    msg = parse_message(INVITE)
    assert isinstance(msg, Request)
    assert msg.method == "INVITE"
    assert msg.raw_uri == "sip:bob@biloxi.example.com"
    assert msg.uri == URI.parse("sip:bob@biloxi.example.com")
    assert msg.version == "SIP/2.0"
    assert msg.body == SDP
    msg.validate()


def test_vias_in_order_and_top_via() -> None:
    msg = parse_message(INVITE)
    vias = msg.vias
    assert [v.branch for v in vias] == ["z9hG4bK776asdhds", "z9hG4bKv6", "z9hG4bK3"]
    assert [v.transport for v in vias] == ["UDP", "TCP", "TLS"]
    assert vias[1].host == "[2001:db8::7]" and vias[1].port == 5070 and vias[1].received == "2001:db8::99"
    assert msg.top_via.host == "pc33.atlanta.example.com"
    assert "rport" in msg.top_via.params and msg.top_via.rport is None
    assert msg.branch == "z9hG4bK776asdhds"
    assert msg.header_values("Via")[2] == "SIP/2.0/TLS third.example.com;branch=z9hG4bK3"
    assert msg.header("Via") == "SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport"


def test_from_to_call_id_cseq() -> None:
    msg = parse_message(INVITE)
    assert msg.from_.display == "Alice, A."
    assert msg.from_.tag == "1928301774"
    assert str(msg.from_.uri) == "sip:alice@atlanta.example.com"
    assert msg.to.display == "Bob"
    assert msg.to.tag is None
    assert msg.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert (msg.cseq.seq, msg.cseq.method) == (314159, "INVITE")
    assert msg.max_forwards == 70
    assert msg.content_length == len(SDP)
    assert msg.content_type == "application/sdp"
    assert msg.expires is None


def test_contacts() -> None:
    msg = parse_message(INVITE)
    [contact] = msg.contacts
    assert contact.uri.host == "pc33.atlanta.example.com"
    assert contact.uri.transport == "tcp"
    assert contact.params["+sip.instance"] == '"<urn:uuid:0001>"'
    assert msg.contact_star is False


def test_multiple_contacts_across_lines_and_commas() -> None:
    msg = parse_message(msg_with(*BASIC, 'Contact: "A, B" <sip:a@h1>;q=0.5, <sip:b@h2>', "m: sip:c@h3;expires=10"))
    assert [c.uri.host for c in msg.contacts] == ["h1", "h2", "h3"]
    assert msg.contacts[0].display == "A, B"
    assert msg.contacts[2].params == {"expires": "10"}


def test_contact_star() -> None:
    msg = parse_message(msg_with(*BASIC, "Contact: *", "Expires: 0", start="REGISTER sip:example.com SIP/2.0"))
    assert msg.contacts == []
    assert msg.contact_star is True
    assert msg.expires == 0
    msg.validate()


def test_contact_star_mixed_is_an_error() -> None:
    msg = parse_message(msg_with(*BASIC, "Contact: *, <sip:a@b>"))
    with pytest.raises(ParseError):
        msg.contacts


def test_no_contact() -> None:
    msg = parse_message(msg_with(*BASIC))
    assert msg.contacts == []
    assert msg.contact_star is False
    assert msg.has_header("contact") is False


def test_response_fields() -> None:
    msg = parse_message(RESPONSE)
    assert isinstance(msg, Response)
    assert msg.status == 180
    assert msg.reason == "Ringing now"
    assert msg.to.tag == "a6c85cf"
    assert msg.from_.tag == "1928301774"
    assert msg.call_id == "a84b4c76e66710"
    assert msg.contacts[0].uri.host == "192.0.2.4"
    assert msg.content_length == 0
    assert msg.body == b""
    msg.validate()
    assert msg.to_bytes() == RESPONSE


@pytest.mark.parametrize("short,long", sorted(COMPACT.items()))
def test_every_compact_form_in_a_message(short: str, long: str) -> None:
    value = "0" if short == "l" else f"value-{short}"
    data = msg_with(*BASIC, f"{short}: {value}") if short == "l" else msg_with(*BASIC, f"{short}: {value}", "Content-Length: 0")
    msg = parse_message(data)
    values = msg.header_values(long)
    assert value in values
    assert msg.header_values(long.upper()) == values == msg.header_values(short)
    assert values[-1] == value  # after BASIC's own Via/To/From/Call-ID
    assert msg.has_header(long) and msg.has_header(short) and msg.has_header(short.upper())
    assert msg.to_bytes() == data


def test_compact_forms_read_by_accessors() -> None:
    data = (b"OPTIONS sip:u@example.com SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bKc\r\nt: <sip:u@example.com>\r\n"
            b"f: <sip:c@example.com>;tag=9\r\ni: compact-cid\r\nCSeq: 1 OPTIONS\r\nm: <sip:c@h>\r\n"
            b"c: text/plain\r\nl: 2\r\n\r\nhi")
    msg = parse_message(data)
    msg.validate()
    assert msg.branch == "z9hG4bKc"
    assert msg.to.uri.user == "u"
    assert msg.from_.tag == "9"
    assert msg.call_id == "compact-cid"
    assert msg.contacts[0].uri.host == "h"
    assert msg.content_type == "text/plain"
    assert msg.content_length == 2 and msg.body == b"hi"


@pytest.mark.parametrize("name", ["call-id", "CALL-ID", "Call-Id", "i", "I"])
def test_header_names_case_insensitive(name: str) -> None:
    msg = parse_message(msg_with(*BASIC).replace(b"Call-ID:", b"cAlL-iD:"))
    assert msg.header(name) == "cid1"
    assert msg.has_header(name)
    assert msg.call_id == "cid1"


def test_header_absent() -> None:
    msg = parse_message(msg_with(*BASIC))
    assert msg.header("Subject") is None
    assert msg.header_values("Subject") == []
    assert msg.max_forwards == 70
    assert msg.content_type is None
    assert msg.expires is None


def test_line_folding() -> None:
    msg = parse_message(INVITE)
    assert msg.header("Subject") == "lunch, today?"
    # Subject is not a list header: no comma split
    assert msg.header_values("Subject") == ["lunch, today?"]
    assert b"Subject: lunch,\r\n  today?\r\n" in msg.to_bytes()


def test_folded_via_list() -> None:
    data = msg_with("Via: SIP/2.0/UDP a.example.com;branch=z9hG4bK1,\r\n\tSIP/2.0/UDP b.example.com;branch=z9hG4bK2",
                    *BASIC[1:])
    msg = parse_message(data)
    assert [v.host for v in msg.vias] == ["a.example.com", "b.example.com"]
    assert msg.top_via.branch == "z9hG4bK1"
    msg.add_header("X-A", "1")
    again = parse_message(msg.to_bytes())
    assert [v.branch for v in again.vias] == ["z9hG4bK1", "z9hG4bK2"]


def test_folded_line_before_first_header() -> None:
    with pytest.raises(ParseError):
        parse_message(b"OPTIONS sip:u@example.com SIP/2.0\r\n folded: x\r\n\r\n")


def test_whitespace_around_colon_and_values() -> None:
    msg = parse_message(msg_with(*BASIC[:3], "Call-ID   :   spaced-cid   ", *BASIC[4:]))
    assert msg.call_id == "spaced-cid"
    assert msg.header("call-id") == "spaced-cid"


def test_untouched_message_is_byte_exact() -> None:
    msg = parse_message(INVITE)
    # reading everything must not change the output
    msg.validate()
    msg.vias, msg.top_via, msg.contacts, msg.uri
    assert msg.to_bytes() == INVITE
    assert bytes(msg) == INVITE


def test_leading_crlf_ignored() -> None:
    msg = parse_message(b"\r\n\r\n" + INVITE)
    assert msg.method == "INVITE"  # type: ignore[union-attr]
    assert msg.to_bytes() == INVITE


def test_set_header_replaces_all_values_in_place() -> None:
    msg = parse_message(INVITE)
    msg.set_header("Via", "SIP/2.0/UDP only.example.com;branch=z9hG4bKonly")
    assert msg.header_values("via") == ["SIP/2.0/UDP only.example.com;branch=z9hG4bKonly"]
    assert msg.branch == "z9hG4bKonly"
    assert len(msg.vias) == 1
    out = msg.to_bytes()
    assert out.startswith(b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/UDP only.example.com;branch=z9hG4bKonly\r\n"
                          b"Max-Forwards: 70\r\n")
    assert out.endswith(SDP)
    # the untouched headers are copied verbatim, including the folded Subject
    assert b'From: "Alice, A." <sip:alice@atlanta.example.com>;tag=1928301774\r\n' in out
    assert b"Subject: lunch,\r\n  today?\r\n" in out


def test_set_header_appends_when_absent_and_names() -> None:
    msg = parse_message(msg_with(*BASIC))
    msg.set_header("x-new-header", "1")
    msg.set_header("i", "newcid")
    msg.set_header("Expires", 60)
    out = msg.to_bytes()
    assert b"\r\nX-New-Header: 1\r\n" in out
    assert b"\r\nCall-ID: newcid\r\n" in out
    assert b"\r\nExpires: 60\r\n" in out
    again = parse_message(out)
    assert again.call_id == "newcid" and again.expires == 60 and again.header("X-New-Header") == "1"
    assert msg.call_id == "newcid"


def test_add_and_remove_header() -> None:
    msg = parse_message(msg_with(*BASIC, "Route: <sip:r1@example.com;lr>"))
    msg.add_header("Route", "<sip:r0@example.com;lr>", first=True)
    msg.add_header("Route", "<sip:r2@example.com;lr>")
    msg.add_header("record-route", "<sip:rr@example.com;lr>")
    assert msg.header_values("Route") == ["<sip:r0@example.com;lr>", "<sip:r1@example.com;lr>", "<sip:r2@example.com;lr>"]
    out = msg.to_bytes()
    assert b"\r\nRecord-Route: <sip:rr@example.com;lr>\r\n" in out
    assert out.index(b"sip:r0@") < out.index(b"sip:r1@") < out.index(b"sip:r2@")
    msg.remove_header("route")
    assert not msg.has_header("Route")
    assert b"Route: <sip:r" not in msg.to_bytes().replace(b"Record-Route", b"")
    msg.remove_header("Not-There")


def test_values_takes_a_canonical_key_and_splits_list_headers() -> None:
    msg = parse_message(INVITE)
    assert msg.values("via") == [
        "SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport",
        "SIP/2.0/TCP [2001:db8::7]:5070;branch=z9hG4bKv6;received=2001:db8::99",
        "SIP/2.0/TLS third.example.com;branch=z9hG4bK3",
    ]
    assert msg.values("record-route") == ["<sip:p1.example.com;lr>"]
    assert msg.values("p-asserted-identity") == []
    msg.set_top_via(Via.parse("SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKnew"))
    assert msg.values("via")[0] == "SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKnew"  # after a change too
    assert msg.values("supported") == []


def test_headers_lists_every_line_in_order_with_key_and_written_name() -> None:
    req = Request("INVITE", "sip:bob@example.com")
    via = Via.parse("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1")
    req.add_header("Via", via)
    req.add_header("v", "SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK2")
    req.add_header("call-id", "c1")
    assert req.headers() == [
        ("via", "Via", via),
        ("via", "Via", "SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK2"),  # compact and lower case written long
        ("call-id", "Call-ID", "c1"),
    ]
    parsed = parse_message(INVITE)
    assert [key for key, _, _ in parsed.headers()][:3] == ["via", "via", "max-forwards"]
    assert parsed.headers()[-1] == ("content-length", "Content-Length", str(len(SDP)))


def test_copied_entries_never_link_the_copy_to_its_source() -> None:
    """Entries with the same key are chained from the index: a response built from a request, or lines
    copied between messages, must read and change their own lines only."""
    req = parse_message(INVITE)
    assert len(req.values("via")) == 3
    resp = make_response(req, 200, to_tag="t")
    resp.add_header("Via", "SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKtop", first=True)
    out = Request("INVITE", "sip:bob@example.com")
    out.copy_headers_from(req, "Record-Route")
    out.add_header("Record-Route", "<sip:mine.example.com;lr>")
    assert resp.values("via")[0] == "SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKtop" and len(resp.values("via")) == 4
    assert out.values("record-route") == ["<sip:p1.example.com;lr>", "<sip:mine.example.com;lr>"]
    assert len(req.values("via")) == 3 and req.values("record-route") == ["<sip:p1.example.com;lr>"]
    resp.remove_top_via()
    assert len(resp.values("via")) == 3 and resp.to_bytes().count(b"Via:") == 2


def test_add_header_first_when_absent_goes_to_top() -> None:
    msg = parse_message(msg_with(*BASIC[1:]))  # no Via
    msg.add_header("Via", Via("UDP", "192.0.2.1", 5060, {"branch": "z9hG4bKnew"}), first=True)
    assert msg.branch == "z9hG4bKnew"
    assert msg.to_bytes().split(b"\r\n")[1] == b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKnew"


def test_add_via_on_top_of_existing() -> None:
    msg = parse_message(INVITE)
    msg.top_via  # cached before the change
    msg.add_header("Via", Via("TLS", "proxy.example.com", 5061, {"branch": "z9hG4bKtop"}), first=True)
    assert msg.branch == "z9hG4bKtop"
    assert [v.branch for v in msg.vias] == ["z9hG4bKtop", "z9hG4bK776asdhds", "z9hG4bKv6", "z9hG4bK3"]
    again = parse_message(msg.to_bytes())
    assert [v.branch for v in again.vias] == ["z9hG4bKtop", "z9hG4bK776asdhds", "z9hG4bKv6", "z9hG4bK3"]


def test_set_top_via_received_rport() -> None:
    msg = parse_message(INVITE)
    via = msg.top_via
    via.set_param("received", "198.51.100.7")
    via.set_param("rport", "40312")
    msg.set_top_via(via)
    assert msg.top_via.received == "198.51.100.7"
    assert [v.branch for v in msg.vias] == ["z9hG4bK776asdhds", "z9hG4bKv6", "z9hG4bK3"]
    assert msg.vias[0].rport == 40312
    again = parse_message(msg.to_bytes())
    assert again.top_via.received == "198.51.100.7" and again.top_via.rport == 40312
    assert [v.branch for v in again.vias] == ["z9hG4bK776asdhds", "z9hG4bKv6", "z9hG4bK3"]
    assert again.body == SDP


def test_set_top_via_in_a_comma_list() -> None:
    data = msg_with("Via: SIP/2.0/UDP a.example.com;branch=z9hG4bK1, SIP/2.0/UDP b.example.com;branch=z9hG4bK2",
                    *BASIC[1:])
    msg = parse_message(data)
    via = msg.top_via
    via.set_param("received", "192.0.2.33")
    msg.set_top_via(via)
    again = parse_message(msg.to_bytes())
    assert [(v.host, v.received) for v in again.vias] == [("a.example.com", "192.0.2.33"), ("b.example.com", None)]


def test_remove_top_via() -> None:
    msg = parse_message(INVITE)
    msg.top_via, msg.vias
    msg.remove_top_via()
    assert msg.branch == "z9hG4bKv6"
    assert [v.branch for v in msg.vias] == ["z9hG4bKv6", "z9hG4bK3"]
    msg.remove_top_via()
    assert [v.branch for v in msg.vias] == ["z9hG4bK3"]
    again = parse_message(msg.to_bytes())
    assert [v.branch for v in again.vias] == ["z9hG4bK3"]
    msg.remove_top_via()
    with pytest.raises(ParseError):
        msg.top_via


def test_changed_to_tag_via_set_header() -> None:
    msg = parse_message(INVITE)
    to = msg.to
    to.tag = "totag1"
    msg.set_header("To", to)
    assert msg.to.tag == "totag1"
    out = msg.to_bytes()
    assert b'\r\nTo: "Bob" <sip:bob@biloxi.example.com>;tag=totag1\r\n' in out
    again = parse_message(out)
    assert again.to.tag == "totag1" and again.to.display == "Bob"


def test_set_header_with_name_addr_object() -> None:
    msg = parse_message(msg_with(*BASIC))
    msg.set_header("From", NameAddr(URI.parse("sip:x@example.com"), "X", {"tag": "ft"}))
    assert msg.from_.tag == "ft"
    assert parse_message(msg.to_bytes()).from_.display == "X"


def test_content_length_recomputed_when_body_changes() -> None:
    msg = parse_message(INVITE)
    msg.body = b"v=0\r\n"
    out = msg.to_bytes()
    assert b"\r\nContent-Length: 5\r\n\r\nv=0\r\n" in out
    assert out.count(b"Content-Length") == 1
    again = parse_message(out)
    assert again.body == b"v=0\r\n" and again.content_length == 5


def test_content_length_compact_recomputed() -> None:
    msg = parse_message(RESPONSE)
    msg.body = b"abc"
    out = msg.to_bytes()
    assert out.endswith(b"\r\nl: 3\r\n\r\nabc")
    assert parse_message(out).body == b"abc"


def test_content_length_added_when_missing() -> None:
    data = msg_with(*BASIC).replace(b"Content-Length: 0\r\n", b"")
    msg = parse_message(data)
    assert msg.content_length is None
    assert msg.to_bytes() == data  # untouched: kept as it came
    msg.body = b"xyz"
    out = msg.to_bytes()
    assert out.endswith(b"\r\nContent-Length: 3\r\n\r\nxyz")


def test_content_length_empty_body() -> None:
    msg = parse_message(INVITE)
    msg.body = b""
    out = msg.to_bytes()
    assert out.endswith(b"\r\nContent-Length: 0\r\n\r\n")


def test_datagram_without_content_length_takes_the_rest() -> None:
    data = msg_with(*BASIC).replace(b"Content-Length: 0\r\n", b"") + b"body!"
    msg = parse_message(data)
    assert msg.body == b"body!"
    with pytest.raises(ParseError):
        parse_message(data, stream=True)


def test_extra_octets_after_body_ignored() -> None:
    data = msg_with(*BASIC, body=b"abc")
    msg = parse_message(data + b"garbage")
    assert msg.body == b"abc"
    assert msg.to_bytes() == data


def test_content_length_larger_than_datagram() -> None:
    data = msg_with(*BASIC, "Content-Length: 10", body=b"abc")
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert info.value.status == 400


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "99999999999"])
def test_bad_content_length(value: str) -> None:
    with pytest.raises(ParseError):
        parse_message(msg_with(*BASIC, f"Content-Length: {value}"))


def test_non_utf8_header_bytes_survive_a_rebuild() -> None:
    data = msg_with(*BASIC, "Subject: x").replace(b"Subject: x", b"Subject: \xff\xfe caf\xc3\xa9")
    msg = parse_message(data)
    assert msg.to_bytes() == data
    msg.add_header("X-B", "1")
    assert b"Subject: \xff\xfe caf\xc3\xa9\r\n" in msg.to_bytes()


def test_request_uri_setter() -> None:
    msg = parse_message(INVITE)
    assert isinstance(msg, Request)
    msg.uri = URI.parse("sip:bob@192.0.2.4:5060;transport=tcp")
    out = msg.to_bytes()
    assert out.startswith(b"INVITE sip:bob@192.0.2.4:5060;transport=tcp SIP/2.0\r\n")
    assert out.endswith(SDP)


def test_request_uri_with_headers_rejected() -> None:
    msg = parse_message(msg_with(*BASIC, start="OPTIONS sip:u@example.com?Route=%3Csip:x%3E SIP/2.0"))
    with pytest.raises(ParseError):
        msg.validate()


def test_tel_request_uri() -> None:
    msg = parse_message(msg_with(*BASIC, start="INVITE tel:+15551234567 SIP/2.0"))
    msg.validate()
    assert msg.uri.scheme == "tel"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "start",
    [
        "OPTIONS sip:u@example.com",
        "OPTIONS  sip:u@example.com SIP/2.0",
        "OPTIONS sip:u@example.com SIP/2.0 ",
        "OPT IONS sip:u@example.com SIP/2.0",
        "OPT<IONS sip:u@example.com SIP/2.0",
        "OPTIONS <sip:u@example.com> SIP/2.0",
        "OPTIONS sip:u@example.com HTTP/1.1",
        "SIP/2.0 20 OK",
        "SIP/2.0 2000 OK",
        "SIP/2.0 099 Low",
        "SIP/2.0 700 High",
        "SIP/2.0 abc OK",
        "SIP/2.0",
    ],
)
def test_bad_start_lines(start: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(msg_with(*BASIC, start=start))
    assert info.value.status == 400


@pytest.mark.parametrize("start", ["OPTIONS sip:u@example.com SIP/3.0", "SIP/3.0 200 OK"])
def test_unsupported_version_505(start: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(msg_with(*BASIC, start=start))
    assert info.value.status == 505


def test_lowercase_sip_version_accepted() -> None:
    msg = parse_message(msg_with(*BASIC, start="OPTIONS sip:u@example.com sip/2.0"))
    assert isinstance(msg, Request)


def test_status_line_without_reason() -> None:
    msg = parse_message(msg_with(*BASIC, start="SIP/2.0 200"))
    assert isinstance(msg, Response) and msg.status == 200 and msg.reason == ""


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"OPTIONS sip:u@example.com SIP/2.0\r\nVia: x\r\n",                    # no empty line
        b"OPTIONS sip:u@example.com SIP/2.0\r\nNoColonHere\r\n\r\n",
        b"OPTIONS sip:u@example.com SIP/2.0\r\n: empty-name\r\n\r\n",
        b"OPTIONS sip:u@example.com SIP/2.0\r\nBad Name: x\r\n\r\n",
        b"OPTIONS sip:u@example.com SIP/2.0\r\nBad(Name): x\r\n\r\n",
    ],
)
def test_malformed_messages(data: bytes) -> None:
    with pytest.raises(ParseError):
        parse_message(data)


@pytest.mark.parametrize(
    "drop,reason_word",
    [("Via:", "Via"), ("To:", "To"), ("From:", "From"), ("Call-ID:", "Call-ID"), ("CSeq:", "CSeq")],
)
def test_validate_requires_headers(drop: str, reason_word: str) -> None:
    headers = [h for h in BASIC if not h.startswith(drop)]
    msg = parse_message(msg_with(*headers))
    with pytest.raises(ParseError) as info:
        msg.validate()
    assert reason_word in info.value.reason


@pytest.mark.parametrize(
    "header",
    [
        "Max-Forwards: 256",
        "Max-Forwards: -1",
        "Max-Forwards: x",
        "Expires: x",
        "CSeq: 1",
        "Call-ID: has space",
        "Date: Fri, 01 Jan 2010 16:00:00 EST",
        "Content-Type: notamediatype",
        "Contact: <sip:a@b",
        "Contact: <sip:a@256.0.0.1>",
    ],
)
def test_validate_rejects_malformed_values(header: str) -> None:
    name = header.split(":", 1)[0]
    headers = [h for h in BASIC if not h.startswith(name + ":")] + [header]
    msg = parse_message(msg_with(*headers))
    with pytest.raises(ParseError):
        msg.validate()
        msg.expires


def test_validate_accepts_good_optional_headers() -> None:
    msg = parse_message(msg_with(*BASIC, "Date: Sat, 13 Nov 2010 23:29:00 GMT", "Content-Type: text/plain;charset=utf-8",
                                 "Contact: <sip:a@b>;expires=60", "Expires: 3600", body=b"x"))
    msg.validate()
    assert msg.content_type == "text/plain"
    assert msg.expires == 3600


def test_accessor_errors_are_parse_errors() -> None:
    msg = parse_message(msg_with(*BASIC[:1], "To: <sip:u@example.com", *BASIC[2:]))
    with pytest.raises(ParseError):
        msg.to
    msg = parse_message(msg_with("Via: SIP/2.0/UDP", *BASIC[1:]))
    with pytest.raises(ParseError):
        msg.top_via
    with pytest.raises(ParseError):
        msg.branch


def test_built_request_serializes_and_parses() -> None:
    req = Request("OPTIONS", URI.parse("sip:bob@biloxi.example.com"))
    req.add_header("Via", Via("UDP", "192.0.2.1", 5060, {"branch": new_branch()}))
    req.add_header("Max-Forwards", "70")
    req.add_header("From", NameAddr(URI.parse("sip:alice@example.com"), None, {"tag": new_tag()}))
    req.add_header("To", NameAddr(URI.parse("sip:bob@biloxi.example.com")))
    req.add_header("Call-ID", new_call_id("192.0.2.1"))
    req.add_header("CSeq", "1 OPTIONS")
    out = req.to_bytes()
    assert out.startswith(b"OPTIONS sip:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK")
    assert out.endswith(b"\r\nContent-Length: 0\r\n\r\n")
    again = parse_message(out)
    again.validate()
    assert again.branch == req.branch
    assert again.from_.tag == req.from_.tag
    assert again.call_id == req.call_id


def test_new_identifiers() -> None:
    branches = {new_branch() for _ in range(200)}
    assert len(branches) == 200
    assert all(b.startswith("z9hG4bK") and len(b) > 7 + 8 for b in branches)
    tags = {new_tag() for _ in range(200)}
    assert len(tags) == 200 and all(t and t.isalnum() for t in tags)
    cid = new_call_id("host.example.com")
    assert cid.endswith("@host.example.com") and len(cid) > 20
    assert "@" not in new_call_id()
    assert new_call_id() != new_call_id()


# make_response


def test_make_response_copies_dialog_headers() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    resp = make_response(req, 180, to_tag="tt1")
    assert resp.status == 180 and resp.reason == "Ringing"
    assert [v.branch for v in resp.vias] == ["z9hG4bK776asdhds", "z9hG4bKv6", "z9hG4bK3"]
    assert resp.header_values("Via") == req.header_values("Via")
    assert str(resp.from_) == str(req.from_)
    assert resp.from_.tag == "1928301774"
    assert resp.to.tag == "tt1"
    assert resp.to.uri == req.to.uri and resp.to.display == "Bob"
    assert resp.call_id == req.call_id
    assert (resp.cseq.seq, resp.cseq.method) == (314159, "INVITE")
    for absent in ("Contact", "Record-Route", "Max-Forwards", "Subject", "Content-Type"):
        assert not resp.has_header(absent)
    out = resp.to_bytes()
    assert out.startswith(b"SIP/2.0 180 Ringing\r\n")
    assert out.endswith(b"\r\nContent-Length: 0\r\n\r\n")
    again = parse_message(out)
    again.validate()
    assert isinstance(again, Response) and again.status == 180
    assert [v.branch for v in again.vias] == ["z9hG4bK776asdhds", "z9hG4bKv6", "z9hG4bK3"]
    assert again.to.tag == "tt1" and again.from_.tag == "1928301774"
    assert again.call_id == req.call_id and again.cseq.seq == 314159
    # the request is unchanged
    assert req.to.tag is None
    assert req.to_bytes() == INVITE


def test_make_response_reuses_the_requests_parsed_cseq() -> None:
    # the message counters read every response's CSeq: a response to a request whose CSeq was
    # read (the transaction layer always reads it) must not parse the same text again
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    cseq = req.cseq
    resp = make_response(req, 200, to_tag="t")
    assert resp.cseq is cseq
    resp.set_header("CSeq", "7 INVITE")  # a changed header is read anew
    assert resp.cseq.seq == 7 and req.cseq is cseq and req.cseq.seq == 314159


def test_make_response_keeps_existing_to_tag() -> None:
    req = parse_message(msg_with(*BASIC[:1], "To: <sip:u@example.com>;tag=existing", *BASIC[2:]))
    resp = make_response(req, 200, to_tag="other")  # type: ignore[arg-type]
    assert resp.to.tag == "existing"


def test_make_response_no_tag_on_100_or_without_to_tag() -> None:
    req = parse_message(INVITE)
    assert make_response(req, 100, to_tag="t").to.tag is None  # type: ignore[arg-type]
    assert make_response(req, 486).to.tag is None  # type: ignore[arg-type]


def test_make_response_reason() -> None:
    req = parse_message(INVITE)
    assert make_response(req, 400, "Bad Via").reason == "Bad Via"  # type: ignore[arg-type]
    assert make_response(req, 503).reason == "Service Unavailable"  # type: ignore[arg-type]
    assert make_response(req, 555).reason == "Push Notification Service Not Supported"  # type: ignore[arg-type]
    assert b"SIP/2.0 400 Bad Via\r\n" in make_response(req, 400, "Bad Via").to_bytes()  # type: ignore[arg-type]


def test_make_response_from_compact_request() -> None:
    data = (b"OPTIONS sip:u@example.com SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bKc\r\nv: SIP/2.0/UDP g;branch=z9hG4bKd\r\n"
            b"t: <sip:u@example.com>\r\nf: <sip:c@example.com>;tag=9\r\ni: compact-cid\r\nCSeq: 1 OPTIONS\r\nl: 0\r\n\r\n")
    req = parse_message(data)
    resp = make_response(req, 200, to_tag="x")  # type: ignore[arg-type]
    again = parse_message(resp.to_bytes())
    assert [v.branch for v in again.vias] == ["z9hG4bKc", "z9hG4bKd"]
    assert again.to.tag == "x" and again.from_.tag == "9" and again.call_id == "compact-cid"


# extract_for_error_response


def test_extract_for_error_response_from_a_broken_request() -> None:
    data = (b"INVITE sip:u@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h.example.com;branch=z9hG4bKe\r\n"
            b"To: <sip:u@example.com>\r\nFrom: <sip:c@example.com>;tag=ft\r\nCall-ID: broken-1\r\n"
            b"CSeq: 5 INVITE\r\nMax-Forwards: banana\r\nContact: <sip:bad@@>\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(ParseError) as info:
        parse_message(data).validate()
    req = extract_for_error_response(data)
    assert req is not None
    assert req.method == "INVITE"
    assert not req.has_header("Max-Forwards") and not req.has_header("Contact")
    resp = make_response(req, 400, info.value.reason)
    again = parse_message(resp.to_bytes())
    assert isinstance(again, Response) and again.status == 400
    assert again.branch == "z9hG4bKe"
    assert again.from_.tag == "ft"
    assert again.call_id == "broken-1"
    assert (again.cseq.seq, again.cseq.method) == (5, "INVITE")


def test_extract_for_error_response_unparseable_start_line_and_compact() -> None:
    data = (b"INVITE  sip:u@example.com  SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bKf\r\n"
            b"t: <sip:u@example.com>\r\nf: <sip:c@example.com>;tag=ft\r\ni: broken-2\r\nCSeq: 5 INVITE\r\n\r\n")
    with pytest.raises(ParseError):
        parse_message(data)
    req = extract_for_error_response(data)
    assert req is not None
    assert req.call_id == "broken-2"
    assert req.branch == "z9hG4bKf"


def test_extract_for_error_response_keeps_folded_via() -> None:
    data = (b"INVITE sip:u@example.com SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1,\r\n SIP/2.0/UDP b;branch=z9hG4bK2\r\n"
            b"To: <sip:u@example.com>\r\nFrom: <sip:c@example.com>;tag=ft\r\nCall-ID: c\r\nCSeq: 5 INVITE\r\n\r\n")
    req = extract_for_error_response(data)
    assert req is not None
    assert [v.branch for v in make_response(req, 400).vias] == ["z9hG4bK1", "z9hG4bK2"]


@pytest.mark.parametrize(
    "data",
    [
        RESPONSE,                                                           # a response: never answered
        b"",
        b"\xff\xfe\x00garbage",
        msg_with(*[h for h in BASIC if not h.startswith("CSeq")]),         # a needed header is missing
        msg_with(*[h for h in BASIC if not h.startswith("Via")]),
    ],
)
def test_extract_for_error_response_none(data: bytes) -> None:
    assert extract_for_error_response(data) is None


def test_extract_for_error_response_without_call_id_still_answers() -> None:
    # RFC 4475 insuf: From, To and Call-ID missing; Via and CSeq are what the client matches on
    req = extract_for_error_response(msg_with(*[h for h in BASIC if not h.startswith(("Call-ID", "From"))]))
    assert req is not None
    resp = parse_message(make_response(req, 400).to_bytes())
    assert resp.status == 400 and not resp.has_header("call-id") and resp.cseq.method


def test_extract_for_error_response_leaves_out_a_header_with_a_bare_cr() -> None:
    data = msg_with(*[h if not h.startswith("From") else 'From: "Eve\rX-Injected: cr" <sip:e@example.com>;tag=1'
                      for h in BASIC])
    with pytest.raises(ParseError):
        parse_message(data)
    req = extract_for_error_response(data)
    assert req is not None and not req.has_header("from")
    assert b"X-Injected" not in make_response(req, 400).to_bytes()


@pytest.mark.parametrize(
    "extra",
    ["From: <sip:x@example.com>;tag=2", "t: <sip:y@example.com>", "i: other-cid", "CSeq: 8 OPTIONS",
     "Max-Forwards: 69", "l: 0", "Content-Type: text/plain", "Expires: 5"],
)
def test_validate_rejects_second_single_valued_header(extra: str) -> None:
    headers = [*BASIC, "Content-Type: text/plain", "Expires: 60", "Content-Length: 0"]
    parse_message(msg_with(*headers)).validate()
    msg = parse_message(msg_with(*headers, extra))
    with pytest.raises(ParseError) as info:
        msg.validate()
    assert info.value.status == 400


def test_validate_accepts_repeated_list_headers() -> None:
    msg = parse_message(msg_with(*BASIC, "Via: SIP/2.0/UDP second.example.com;branch=z9hG4bK2", "Contact: <sip:a@b>",
                                 "m: <sip:c@d>", "Route: <sip:r1@e;lr>", "Route: <sip:r2@e;lr>", "Supported: path",
                                 "k: outbound", "Allow: INVITE", "Allow: BYE"))
    msg.validate()
    assert len(msg.vias) == 2 and len(msg.contacts) == 2
    assert msg.header_values("Supported") == ["path", "outbound"]


def test_validate_finds_a_second_single_valued_header_among_repeated_list_headers() -> None:
    """validate() only searches for a duplicate when some key repeats: a repeated list header must not
    hide one, and a header added after parsing (index rebuilt) counts too."""
    repeated = [*BASIC, "Via: SIP/2.0/UDP second.example.com;branch=z9hG4bK2", "Route: <sip:r1@e;lr>",
                "Route: <sip:r2@e;lr>"]
    with pytest.raises(ParseError, match="Call-ID"):
        parse_message(msg_with(*repeated, "i: other-cid")).validate()
    msg = parse_message(msg_with(*BASIC))
    msg.add_header("CSeq", "9 OPTIONS")
    with pytest.raises(ParseError, match="CSeq"):
        msg.validate()


def test_log_call_id_never_raises() -> None:
    """The one helper every layer logs Call-IDs with (it replaced seven private copies)."""
    ok = parse_message(b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCall-ID: c1@h\r\n"
                       b"CSeq: 1 OPTIONS\r\nFrom: <sip:x@h>;tag=1\r\nTo: <sip:a@b>\r\n\r\n")
    no_id = parse_message(b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
                          b"CSeq: 1 OPTIONS\r\nFrom: <sip:x@h>;tag=1\r\nTo: <sip:a@b>\r\n\r\n")
    assert log_call_id(ok) == "c1@h"
    assert log_call_id(no_id) is None
    assert log_call_id(None) is None


# -- Request.copy (a proxy's copy to forward, issue 14's relay) -----------------------------------


def test_request_copy_serializes_as_the_original() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    req.vias  # parsed state in the original's cache must not matter
    out = req.copy()
    assert out.to_bytes() == INVITE
    assert (out.method, out.raw_uri, out.body) == ("INVITE", "sip:bob@biloxi.example.com", SDP)
    assert [str(v) for v in out.vias] == [str(v) for v in req.vias]
    assert out.header_values("record-route") == ["<sip:p1.example.com;lr>"]


def test_request_copy_edits_leave_the_original_alone() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    req.to  # indexed and cached before the copy, as a relayed request is
    out = req.copy()
    out.add_header("Via", "SIP/2.0/UDP relay.example.com;branch=z9hG4bKr", first=True)
    out.set_header("Max-Forwards", "69")
    out.remove_header("record-route")
    out.add_header("Record-Route", "<sip:relay.example.com;lr>", first=True)
    out.remove_top_via()
    out.remove_top_via()
    assert req.to_bytes() == INVITE
    assert req.max_forwards == 70 and len(req.vias) == 3 and req.top_via.host == "pc33.atlanta.example.com"
    assert out.max_forwards == 69 and [v.host for v in out.vias] == ["[2001:db8::7]", "third.example.com"]
    reparsed = parse_message(out.to_bytes())
    assert reparsed.header_values("record-route") == ["<sip:relay.example.com;lr>"]
    assert reparsed.body == SDP


def test_request_copy_of_a_compacted_request() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    req.compact()
    out = req.copy()
    out.set_header("Max-Forwards", "1")
    assert parse_message(out.to_bytes()).max_forwards == 1
    assert req.to_bytes() == INVITE


def test_message_with_non_ascii_head_and_body_splits_at_the_right_byte() -> None:
    # _split_head finds the head's end in the decoded text when every character is one byte, and in
    # the bytes otherwise: the body must start at the same byte either way
    for display, body in (("Alice", b"v=0\r\n"), ("Al\u00efce \u2603", "caf\u00e9\r\n".encode()),
                          ("Al\udcffce", b"\xff\xfe\r\n")):
        head = (f"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n"
                f'From: "{display}" <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n'
                f"Call-ID: u1\r\nCSeq: 1 MESSAGE\r\nContent-Length: {len(body)}\r\n\r\n")
        data = head.encode("utf-8", "surrogateescape") + body + b"trailing"
        msg = parse_message(b"\r\n\r\n" + data)
        assert msg.body == body and msg.header("From").startswith(f'"{display}"')


@pytest.mark.parametrize("line", ["SIP/2.0 099 Low", "SIP/2.0 700 High", "SIP/2.0 20 Short", "SIP/2.0 2000 Long",
                                  "SIP/2.0 2\u0660\u0660 Arabic-Indic", "SIP/2.0 +20 Sign", "SIP/2.0  200 Gap"])
def test_status_codes_outside_100_to_699_or_not_three_ascii_digits_are_refused(line: str) -> None:
    data = f"{line}\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n".encode()
    with pytest.raises(ParseError):
        parse_message(data)


@pytest.mark.parametrize("line,status", [("SIP/2.0 100 Trying", 100), ("sip/2.0 699 X", 699), ("SIP/2.0 200", 200)])
def test_status_lines_in_range_parse(line: str, status: int) -> None:
    data = f"{line}\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n".encode()
    msg = parse_message(data)
    assert isinstance(msg, Response) and msg.status == status


def test_set_top_via_keeps_the_index_and_the_parsed_vias() -> None:
    """The transport's Via fix changes one line in place: the next header read must not index the
    whole message again (it did for every request, ~4,500 instructions each), and what was read
    stays right."""
    msg = parse_message(INVITE)
    msg.validate()
    index, vias = msg._index, msg.vias
    via = msg.top_via
    via.set_param("received", "198.51.100.7")
    msg.set_top_via(via)
    assert msg._index is index and msg.vias is vias
    assert msg.max_forwards == 70 and msg.header("Record-Route") == "<sip:p1.example.com;lr>"
    assert msg.values("via")[0].endswith(";received=198.51.100.7")
    assert [v.branch for v in msg.vias] == ["z9hG4bK776asdhds", "z9hG4bKv6", "z9hG4bK3"]
    other = Via.parse("SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKnew")
    msg.set_top_via(other)  # another object on top: the cached list goes, the index stays
    assert msg._index is index and [v.branch for v in msg.vias] == ["z9hG4bKnew", "z9hG4bKv6", "z9hG4bK3"]
    again = parse_message(msg.to_bytes())
    assert again.top_via.branch == "z9hG4bKnew" and len(again.vias) == 3


def test_validate_builds_no_request_uri_whose_text_parsed_before() -> None:
    """Only an INVITE's Request-URI is read after validate() (by the call layer): a text known to
    parse is not built again (~2,700 instructions a request), and the UAS core reads its scheme from
    what the first parse found. A text never seen is still parsed, and refused when bad."""
    start = "OPTIONS sips:validate-once@example.com SIP/2.0"
    first = parse_message(msg_with(*BASIC, start=start))
    first.validate()
    assert first._uri is not None and first.uri_scheme == "sips"  # parsed: the text is known now
    again = parse_message(msg_with(*BASIC, start=start))
    again.validate()
    assert again._uri is None and again.uri_scheme == "sips" and again._uri is None
    assert str(again.uri) == again.raw_uri and again.uri.user == "validate-once"  # built when read
    for bad in ("sip:bob@exa%2", "sip:bob@example.com?Subject=x", "sip:bob@[::1", "sip:@example.com"):
        req = parse_message(msg_with(*BASIC, start=f"OPTIONS {bad} SIP/2.0"))
        with pytest.raises(ParseError):
            req.validate()
        with pytest.raises(ParseError):  # and again: a refused text is never taken as known
            parse_message(msg_with(*BASIC, start=f"OPTIONS {bad} SIP/2.0")).validate()
