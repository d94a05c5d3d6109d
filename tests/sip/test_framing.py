"""StreamFramer: cutting a TCP/TLS byte stream into messages and RFC 5626 keep-alives."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.framing import StreamFramer
from libon_tsilo.sip.message import parse_message


def make(call_id: str, body: bytes = b"", length_header: str = "Content-Length", extra: str = "") -> bytes:
    head = (
        "OPTIONS sip:u@example.com SIP/2.0\r\n"
        "Via: SIP/2.0/TCP h.example.com;branch=z9hG4bK" + call_id + "\r\n"
        "To: <sip:u@example.com>\r\nFrom: <sip:c@example.com>;tag=1\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n{extra}"
        f"{length_header}: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\n\r\nc=IN IP4 192.0.2.1\r\n"  # a CRLFCRLF inside the body
M1 = make("one", SDP)
M2 = make("two")
M3 = make("three", b"x" * 100, "l")


def test_single_message() -> None:
    framer = StreamFramer()
    assert framer.feed(M1) == [("msg", M1)]
    assert len(framer) == 0
    msg = parse_message(M1, stream=True)
    assert msg.body == SDP and msg.call_id == "one"


def test_coalesced_messages() -> None:
    framer = StreamFramer()
    assert framer.feed(M1 + M2 + M3) == [("msg", M1), ("msg", M2), ("msg", M3)]
    assert len(framer) == 0


@pytest.mark.parametrize("cut", [1, 5, 30, M1.index(b"\r\n\r\n"), M1.index(b"\r\n\r\n") + 2,
                                 M1.index(b"\r\n\r\n") + 4, len(M1) - 1])
def test_split_message(cut: int) -> None:
    framer = StreamFramer()
    assert framer.feed(M1[:cut]) == []
    assert len(framer) == cut
    assert framer.feed(M1[cut:]) == [("msg", M1)]
    assert len(framer) == 0


def test_byte_by_byte_with_coalesced_tail() -> None:
    stream = M1 + M2 + b"\r\n\r\n" + M3
    framer = StreamFramer()
    events: list[tuple[str, bytes]] = []
    for i in range(len(stream)):
        events += framer.feed(stream[i:i + 1])
    assert events == [("msg", M1), ("msg", M2), ("ping", b""), ("msg", M3)]


def test_split_across_messages() -> None:
    stream = M1 + M2
    cut = len(M1) + 10
    framer = StreamFramer()
    assert framer.feed(stream[:cut]) == [("msg", M1)]
    assert len(framer) == 10
    assert framer.feed(stream[cut:]) == [("msg", M2)]


def test_ping() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == [("ping", b"")]
    assert framer.feed(b"\r\n\r\n\r\n\r\n") == [("ping", b""), ("ping", b"")]
    assert len(framer) == 0


def test_ping_split() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r") == []
    assert framer.feed(b"\n") == [("ping", b"")]


def test_ping_between_messages() -> None:
    framer = StreamFramer()
    assert framer.feed(M1 + b"\r\n\r\n" + M2) == [("msg", M1), ("ping", b""), ("msg", M2)]


def test_pong_before_message() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n" + M2) == [("pong", b""), ("msg", M2)]


def test_pong_then_ping() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n\r\n") == [("ping", b"")]
    assert framer.feed(M2) == [("pong", b""), ("msg", M2)]


def test_compact_and_case_insensitive_length() -> None:
    for name in ("l", "L", "content-length", "CONTENT-LENGTH", "Content-Length "):
        msg = make("c", b"abc", name)
        assert StreamFramer().feed(msg + M2) == [("msg", msg), ("msg", M2)], name


def test_length_header_not_first_match_on_lookalike() -> None:
    # A header whose name merely ends in "l" or "content-length" must not be taken for the length.
    extra = "X-Content-Length: 999\r\nUrl: 77\r\n"
    msg = make("d", b"hello", extra=extra)
    assert StreamFramer().feed(msg + M2) == [("msg", msg), ("msg", M2)]


def test_missing_content_length() -> None:
    data = M2.replace(b"Content-Length: 0\r\n", b"")
    framer = StreamFramer()
    with pytest.raises(ParseError) as info:
        framer.feed(data)
    assert info.value.status == 400
    assert "Content-Length" in info.value.reason
    assert info.value.data == data  # type: ignore[attr-defined]
    assert len(framer) == 0


def test_missing_content_length_after_good_message() -> None:
    framer = StreamFramer()
    assert framer.feed(M1) == [("msg", M1)]
    with pytest.raises(ParseError):
        framer.feed(M2.replace(b"Content-Length: 0\r\n", b""))


@pytest.mark.parametrize("value", [b"-1", b"abc", b"", b"1.5"])
def test_bad_content_length(value: bytes) -> None:
    data = M2.replace(b"Content-Length: 0", b"Content-Length: " + value)
    with pytest.raises(ParseError) as info:
        StreamFramer().feed(data)
    assert info.value.status == 400


def test_message_at_the_size_limit() -> None:
    framer = StreamFramer(max_message_size=len(M3))
    assert framer.feed(M3) == [("msg", M3)]


def test_oversize_message() -> None:
    framer = StreamFramer(max_message_size=len(M3) - 1)
    with pytest.raises(ParseError) as info:
        framer.feed(M3[: M3.index(b"\r\n\r\n") + 4])  # the headers alone announce the size
    assert info.value.status == 513
    assert len(framer) == 0


def test_huge_content_length() -> None:
    data = M2.replace(b"Content-Length: 0", b"Content-Length: 99999999999999")
    with pytest.raises(ParseError) as info:
        StreamFramer().feed(data)
    assert info.value.status == 513


def test_header_section_too_long() -> None:
    framer = StreamFramer(max_message_size=1000)
    head = b"OPTIONS sip:u@example.com SIP/2.0\r\n" + b"X-Filler: " + b"a" * 500 + b"\r\n"
    assert framer.feed(head) == []
    with pytest.raises(ParseError) as info:
        framer.feed(b"X-More: " + b"b" * 600 + b"\r\n")
    assert info.value.status == 513
    assert len(framer) == 0
    # the framer is usable again (the caller closes the connection, but it must not be wedged)
    assert framer.feed(M2) == [("msg", M2)]


def test_default_limit() -> None:
    assert StreamFramer().max_message_size == 65535
