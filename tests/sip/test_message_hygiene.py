"""Hostile input at the message layer (issue 11 items 5 and 9): a bare CR, LF or NUL inside a header
value, and numbers too long for int(), are ParseErrors (a 400), never another exception."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.framing import StreamFramer
from libon_tsilo.sip.headers import CSeq, Via
from libon_tsilo.sip.message import parse_message
from libon_tsilo.sip.uri import URI


def _msg(*lines: str, start: str = "INVITE sip:bob@example.com SIP/2.0") -> bytes:
    headers = {
        "Via": "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKh1;rport",
        "Max-Forwards": "70",
        "From": '"Eve" <sip:eve@example.net>;tag=f1',
        "To": "<sip:bob@example.com>",
        "Call-ID": "hygiene-1",
        "CSeq": "1 INVITE",
        "Content-Length": "0",
    }
    for line in lines:
        name, _, value = line.partition(": ")
        headers[name] = value
    text = "\r\n".join([start, *(f"{k}: {v}" for k, v in headers.items())]) + "\r\n\r\n"
    return text.encode("utf-8", "surrogateescape")


# -- item 5: bare CR / LF / NUL ------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    'From: "Eve\rX-Injected: cr" <sip:eve@example.net>;tag=f1',
    'From: "Eve\nX-Injected: lf" <sip:eve@example.net>;tag=f1',
    "Subject: hello\rX-Injected: cr",
    "Subject: hello\nX-Injected: lf",
    "Subject: hello\n X-Injected: lf-then-space",  # a fold needs CR LF, not a bare LF
    "User-Agent: phone\r\rX-Injected: cr",
    "User-Agent: phone\x00X-Injected: nul",
    "Subject: ends with a cr\r",
])
def test_bare_cr_lf_nul_in_a_header_value_is_a_parse_error(line: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(_msg(line))
    assert info.value.status == 400


def test_bare_cr_in_the_request_line_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_message(_msg(start="INVITE sip:bob@example.com\rX: y SIP/2.0"))


def test_folding_is_still_legal_and_unfolded() -> None:
    msg = parse_message(_msg("Subject: lunch,\r\n  today?", "User-Agent: a\r\n\tb"))
    msg.validate()
    assert msg.header("Subject") == "lunch, today?"
    assert msg.header("User-Agent") == "a b"


def test_escaped_nul_in_a_quoted_string_is_legal() -> None:
    # RFC 4475 intmeth: quoted-pair may escape %x00
    msg = parse_message(_msg('To: "NUL:\\\x00" <sip:bob@example.com>'))
    msg.validate()
    assert msg.to.display == "NUL:\x00"


def test_cr_in_the_body_is_not_the_header_sections_business() -> None:
    data = _msg("Content-Type: text/plain", "Content-Length: 5") + b"a\rb\nc"
    data = data.replace(b"Content-Length: 0\r\n", b"")
    assert parse_message(data).body == b"a\rb\nc"


# -- item 9: numbers of 4,300+ digits ------------------------------------------------------------

HUGE = "9" * 5000
ZEROS = "0" * 5000


@pytest.mark.parametrize("line", [
    f"CSeq: {HUGE} INVITE",
    f"CSeq:  {HUGE}  INVITE",  # the general (non-regex) CSeq path
    f"Content-Length: {HUGE}",
    f"Max-Forwards: {HUGE}",
    f"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKh1;rport={HUGE}",
    f"Via: SIP/2.0/UDP 192.0.2.1:5060 ;branch=z9hG4bKh1;rport={HUGE}",  # the general Via path
    f"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKh1;ttl={HUGE}",
    f"Via: SIP/2.0/UDP 192.0.2.1:{HUGE};branch=z9hG4bKh1",
    "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKh1;rport=\u00b2",  # isdigit() but not int()-able
    "Via: SIP/2.0/UDP 192.0.2.1:\u00b2;branch=z9hG4bKh1",
    f"Contact: <sip:eve@192.0.2.1:{HUGE}>",
])
def test_huge_or_odd_numbers_are_parse_errors(line: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(_msg(line)).validate()
    assert info.value.status == 400


@pytest.mark.parametrize("name", ["Expires", "Content-Length", "Max-Forwards"])
def test_huge_numbers_in_the_accessors(name: str) -> None:
    msg = parse_message(_msg())  # parses; then the value is made huge after the fact
    msg.set_header(name, HUGE)
    with pytest.raises(ParseError):
        getattr(msg, name.lower().replace("-", "_"))


def test_leading_zeros_are_still_a_small_number() -> None:
    msg = parse_message(_msg(f"CSeq: {ZEROS}7 INVITE", f"Max-Forwards: {ZEROS}70", f"Expires: {ZEROS}60"))
    msg.validate()
    assert (msg.cseq.seq, msg.max_forwards, msg.expires) == (7, 70, 60)


def test_status_code_of_unicode_digits_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_message(_msg(start="SIP/2.0 \u00b2\u00b2\u00b2 OK"))


def test_header_parsers_directly() -> None:
    for bad in (f"{HUGE} INVITE", f"{HUGE}  INVITE"):
        with pytest.raises(ParseError):
            CSeq.parse(bad)
    with pytest.raises(ParseError):
        Via.parse(f"SIP/2.0/UDP h;rport={HUGE}")
    with pytest.raises(ParseError):
        URI.parse(f"sip:a@h:{HUGE}")
    with pytest.raises(ParseError):
        URI.parse("sip:a@h:\u00b2")
    assert Via.parse(f"SIP/2.0/UDP h;rport={ZEROS}5060").rport == 5060


def test_framer_content_length_of_5000_digits_is_a_parse_error() -> None:
    data = _msg(f"Content-Length: {HUGE}")
    with pytest.raises(ParseError) as info:
        StreamFramer().feed(data)
    assert info.value.status == 513
    framed = StreamFramer().feed(_msg(f"Content-Length: {ZEROS}"))
    assert [kind for kind, _ in framed] == ["msg"]
