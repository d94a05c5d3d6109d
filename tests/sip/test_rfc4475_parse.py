"""The RFC 4475 torture tests through parse_message() + validate() and back through to_bytes()."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.framing import StreamFramer
from libon_tsilo.sip.headers import canonical_key
from libon_tsilo.sip.message import (
    Message,
    Request,
    Response,
    extract_for_error_response,
    make_response,
    parse_message,
)
from libon_tsilo.sip.uri import URI
from tests.sip import rfc4475

pytestmark = pytest.mark.skipif(not rfc4475.available(), reason="RFC 4475 corpus not present")

# 3.3 messages that must parse but miss a header the message layer requires.
MISSING_REQUIRED = ("insuf",)
# 3.3 messages with two copies of a single-valued header (multi01 §3.3.8: To, From, Call-ID, CSeq,
# Max-Forwards; mcl01 §3.3.9: conflicting Content-Length): the element answers 400, so validate() raises.
DUPLICATE_SINGLE = ("multi01", "mcl01")
PARSE_OK = tuple(
    n for n in rfc4475.VALID + rfc4475.BACKWARD + rfc4475.APPLICATION + rfc4475.TRANSACTION
    if n not in MISSING_REQUIRED + DUPLICATE_SINGLE
)


def header_keys(msg: Message) -> list[str]:
    keys: list[str] = []
    for name in msg.header_names():
        key = canonical_key(name.strip())
        if key not in keys:
            keys.append(key)
    return keys


def snapshot(msg: Message) -> dict[str, object]:
    """Everything a server reads of a message, as plain values."""
    snap: dict[str, object] = {}
    if isinstance(msg, Request):
        snap["method"] = msg.method
        snap["raw_uri"] = msg.raw_uri
        snap["uri"] = str(msg.uri)
    else:
        assert isinstance(msg, Response)
        snap["status"] = msg.status
        snap["reason"] = msg.reason
    snap["headers"] = {key: msg.header_values(key) for key in header_keys(msg)}
    snap["vias"] = [(v.transport, v.host, v.port, dict(v.params)) for v in msg.vias]
    snap["branch"] = msg.branch
    snap["from"] = (str(msg.from_.uri), msg.from_.tag, msg.from_.display, dict(msg.from_.params))
    snap["to"] = (str(msg.to.uri), msg.to.tag, msg.to.display, dict(msg.to.params))
    snap["call_id"] = msg.call_id
    snap["cseq"] = (msg.cseq.seq, msg.cseq.method)
    snap["contacts"] = [(str(c.uri), dict(c.params)) for c in msg.contacts] if msg.has_header("contact") else None
    snap["body"] = msg.body
    return snap


def test_category_lists_cover_the_corpus() -> None:
    assert sorted(rfc4475.ALL) == rfc4475.corpus_names()
    assert len(rfc4475.ALL) == len(set(rfc4475.ALL)) == 49


@pytest.mark.parametrize("name", PARSE_OK)
def test_valid_message_parses_validates_and_round_trips(name: str) -> None:
    data = rfc4475.load(name)
    msg = parse_message(data)
    assert isinstance(msg, Response) == (name in rfc4475.RESPONSES)
    msg.validate()
    before = snapshot(msg)
    out = msg.to_bytes()
    again = parse_message(out)
    again.validate()
    assert snapshot(again) == before
    # untouched: written back as the bytes it came from (dblreq: without the trailing octets)
    assert data.startswith(out)
    if name != "dblreq":
        assert out == data


@pytest.mark.parametrize("name", PARSE_OK)
def test_valid_message_rebuilt_from_headers_round_trips(name: str) -> None:
    """Adding a header forces the rebuild path; the result must still carry the same values."""
    msg = parse_message(rfc4475.load(name))
    before = snapshot(msg)
    had_length = msg.has_header("content-length")
    msg.add_header("X-Rebuilt", "1")
    out = msg.to_bytes()
    assert out.count(b"\r\nX-Rebuilt: 1\r\n") == 1
    again = parse_message(out)
    again.validate()
    after = snapshot(again)
    headers = after["headers"]
    assert isinstance(headers, dict)
    assert headers.pop("x-rebuilt") == ["1"]
    if not had_length:
        # a message without Content-Length gets one on the way out, giving the body's length
        assert headers.pop("content-length") == [str(len(msg.body))]
    assert after == before


@pytest.mark.parametrize("name", PARSE_OK)
def test_valid_message_frames_on_a_stream(name: str) -> None:
    """Over TCP every valid message that carries a Content-Length comes out of the framer whole."""
    data = rfc4475.load(name)
    msg = parse_message(data)
    if msg.content_length is None:
        pytest.skip("no Content-Length: not framable on a stream")
    expected = msg.to_bytes()
    framer = StreamFramer()
    events = []
    for i in range(len(expected)):
        events += framer.feed(expected[i:i + 1])
    assert events == [("msg", expected)]
    assert snapshot(parse_message(events[0][1], stream=True)) == snapshot(msg)


INVALID_REJECTED = tuple(n for n in rfc4475.INVALID if n not in rfc4475.UAS_CORE_INVALID)


@pytest.mark.parametrize("name", INVALID_REJECTED)
def test_invalid_message_is_rejected(name: str) -> None:
    data = rfc4475.load(name)
    with pytest.raises(ParseError) as info:
        msg = parse_message(data)
        msg.validate()
    assert info.value.reason
    assert "\n" not in info.value.reason and "\r" not in info.value.reason
    assert info.value.status in (400, 505)


@pytest.mark.parametrize("name", rfc4475.UAS_CORE_INVALID)
def test_cseq_method_mismatch_parses_for_the_uas_core(name: str) -> None:
    msg = parse_message(rfc4475.load(name))
    msg.validate()
    assert isinstance(msg, Request)
    # Why the message layer lets it through: it is well-formed; only the request/CSeq pairing is wrong.
    assert msg.cseq.method == "INVITE"
    assert msg.cseq.method != msg.method


def test_badvers_gives_505() -> None:
    with pytest.raises(ParseError) as info:
        parse_message(rfc4475.load("badvers"))
    assert info.value.status == 505


def test_bigcode_raises() -> None:
    with pytest.raises(ParseError) as info:
        parse_message(rfc4475.load("bigcode"))
    assert info.value.status == 400


def test_dblreq_ignores_octets_after_content_length() -> None:
    data = rfc4475.load("dblreq")
    msg = parse_message(data)
    assert isinstance(msg, Request) and msg.method == "REGISTER"
    assert msg.body == b""
    assert msg.content_length == 0
    assert msg.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    out = msg.to_bytes()
    assert b"INVITE" not in out
    assert out == data[: data.index(b"\r\n\r\n") + 4]


def test_clerr_datagram_shorter_than_content_length_raises() -> None:
    data = rfc4475.load("clerr")
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert info.value.status == 400


def test_clerr_on_a_stream_waits_for_more() -> None:
    framer = StreamFramer()
    assert framer.feed(rfc4475.load("clerr")) == []
    assert len(framer) == len(rfc4475.load("clerr"))


def test_baddn_display_name_rejected() -> None:
    """The corpus file lacks the final CRLF; with it restored the bad display name must still fail."""
    data = rfc4475.load("baddn")
    if not data.endswith(b"\r\n\r\n"):
        data += b"\r\n"
    msg = parse_message(data)
    with pytest.raises(ParseError):
        msg.validate()


@pytest.mark.parametrize("name", MISSING_REQUIRED)
def test_insuf_lacks_required_headers(name: str) -> None:
    msg = parse_message(rfc4475.load(name))
    assert not msg.has_header("from") and not msg.has_header("to") and not msg.has_header("call-id")
    assert not msg.has_header("max-forwards")
    with pytest.raises(ParseError):
        msg.validate()
    # RFC 4475 §3.3.1: ideally a 400. A client matches it by Via and CSeq, which are there.
    req = extract_for_error_response(rfc4475.load(name))
    assert req is not None
    resp = parse_message(make_response(req, 400, "missing From header").to_bytes())
    assert resp.status == 400 and resp.branch == "z9hG4bKkdj.insuf"
    assert (resp.cseq.seq, resp.cseq.method) == (193942, "INVITE")
    assert not resp.has_header("from") and not resp.has_header("call-id")


def test_mcl01_parses_with_both_lengths_visible() -> None:
    msg = parse_message(rfc4475.load("mcl01"))
    assert msg.header_values("Content-Length") == ["13", "5"]


@pytest.mark.parametrize("name", DUPLICATE_SINGLE)
def test_duplicate_single_valued_header_is_rejected(name: str) -> None:
    # RFC 4475 §3.3.8/§3.3.9: parses, but the element must answer 400 (mcl01: a framing error).
    data = rfc4475.load(name)
    msg = parse_message(data)
    with pytest.raises(ParseError) as info:
        msg.validate()
    assert info.value.status == 400
    assert "more than one" in info.value.reason
    # a 400 can be formed: Via, From, To, Call-ID and CSeq are readable
    assert extract_for_error_response(data) is not None


def test_multi01_duplicates_visible() -> None:
    msg = parse_message(rfc4475.load("multi01"))
    assert len(msg.header_values("CSeq")) == 2
    assert len(msg.header_values("Call-ID")) == 2
    assert len(msg.header_values("To")) == 2
    assert len(msg.header_values("From")) == 2
    assert msg.header_values("Max-Forwards") == ["70", "5"]


def test_escnull_keeps_escaped_nul() -> None:
    msg = parse_message(rfc4475.load("escnull"))
    msg.validate()
    assert msg.to.uri.user == "null-%00-null"
    assert msg.from_.uri == msg.to.uri
    assert msg.to.uri != URI.parse("sip:null-%01-null@example.com")


def test_esc01_unescaped_ruri_equals_escaped_form() -> None:
    msg = parse_message(rfc4475.load("esc01"))
    assert isinstance(msg, Request)
    assert msg.uri.user == "sips%3Auser%40example.com"
    assert msg.uri.host == "example.net"


def test_unreason_keeps_utf8_reason() -> None:
    msg = parse_message(rfc4475.load("unreason"))
    assert isinstance(msg, Response) and msg.status == 200
    assert msg.reason.startswith("= 2**3 * 5**2 ")
    assert "\u043d\u043e" in msg.reason  # Cyrillic text survives decoding


def test_noreason_empty_reason() -> None:
    msg = parse_message(rfc4475.load("noreason"))
    assert isinstance(msg, Response) and msg.status == 100 and msg.reason == ""
    assert msg.to_bytes() == rfc4475.load("noreason")


def test_mpart01_binary_body_is_byte_exact() -> None:
    data = rfc4475.load("mpart01")
    msg = parse_message(data)
    assert msg.content_length == len(msg.body)
    assert data.endswith(msg.body)
    msg.set_header("Max-Forwards", "69")
    again = parse_message(msg.to_bytes())
    assert again.body == msg.body and again.max_forwards == 69


def test_longreq_long_values() -> None:
    msg = parse_message(rfc4475.load("longreq"))
    msg.validate()
    assert len(msg.vias) == 34
    assert len(msg.call_id) > 100
