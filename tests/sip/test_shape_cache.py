"""The fast-path regexes of the URI, name-addr and CSeq parsers run once per distinct text: a call
repeats its From, To, Contact and URIs in most of its messages (sip/uri.py, remember_shape)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from libon_tsilo.sip import headers, uri
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import CSeq, NameAddr
from libon_tsilo.sip.uri import URI


class CountingPattern:
    """Stands for a compiled regex and counts its fullmatch calls."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.runs = 0

    def fullmatch(self, text: str) -> Any:
        self.runs += 1
        return self.pattern.fullmatch(text)

    def match(self, text: str) -> Any:
        self.runs += 1
        return self.pattern.match(text)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, CountingPattern]]:
    found = {
        "uri": CountingPattern(uri._SIMPLE_SIP_URI),
        "name_addr": CountingPattern(headers._SIMPLE_NAME_ADDR),
        "cseq": CountingPattern(headers._SIMPLE_CSEQ),
    }
    monkeypatch.setattr(uri, "_SIMPLE_SIP_URI", found["uri"])
    monkeypatch.setattr(headers, "_SIMPLE_NAME_ADDR", found["name_addr"])
    monkeypatch.setattr(headers, "_SIMPLE_CSEQ", found["cseq"])
    caches = (uri._URI_SHAPES, headers._NAME_ADDR_SHAPES, headers._CSEQ_SHAPES)
    for cache in caches:
        cache.clear()  # a cache: emptying it changes no result, only which texts run the regex
    yield found
    for cache in caches:
        cache.clear()


def test_a_text_seen_again_skips_the_regex_and_gives_a_new_equal_object(counted) -> None:
    text = "sip:alice@192.0.2.1:5062;transport=tcp"
    first, second = URI.parse(text), URI.parse(text)
    assert counted["uri"].runs == 1
    assert first is not second and first.params is not second.params
    assert (second.scheme, second.user, second.host, second.port, second.params, str(second)) == \
        ("sip", "alice", "192.0.2.1", 5062, {"transport": "tcp"}, text)
    second.params["transport"] = "udp"  # objects stay the caller's own: the cache keeps no object
    assert URI.parse(text).params == {"transport": "tcp"}

    addr = '"Alice" <sip:alice@example.com>;tag=a1'
    a, b = NameAddr.parse(addr), NameAddr.parse(addr)
    assert counted["name_addr"].runs == 1
    assert a is not b and (b.display, str(b.uri), b.params, b.tag) == ("Alice", "sip:alice@example.com",
                                                                     {"tag": "a1"}, "a1")
    b.params["tag"] = "x"
    assert NameAddr.parse(addr).tag == "a1"

    CSeq.parse("7 INVITE")
    c2 = CSeq.parse("7 INVITE")
    assert counted["cseq"].runs == 1 and (c2.seq, c2.method) == (7, "INVITE")


def test_what_the_regex_refuses_is_not_remembered_and_still_fails(counted) -> None:
    for _ in range(2):
        with pytest.raises(ParseError):
            URI.parse("sip:alice@bad host")
        with pytest.raises(ParseError):
            URI.parse("sip:alice@999.1.1.1")  # the regex takes it, the host check refuses it
        with pytest.raises(ParseError):
            CSeq.parse("99999999999 INVITE")  # too large, after the regex took it
    assert counted["uri"].runs == 4
    assert "sip:alice@999.1.1.1" not in uri._URI_SHAPES


def test_the_caches_are_bounded(counted) -> None:
    for i in range(uri.SHAPE_CACHE_SIZE + 10):
        URI.parse(f"sip:u{i}@192.0.2.1")
        NameAddr.parse(f"<sip:u{i}@192.0.2.1>;tag={i}")
    assert 0 < len(uri._URI_SHAPES) <= uri.SHAPE_CACHE_SIZE
    assert 0 < len(headers._NAME_ADDR_SHAPES) <= uri.SHAPE_CACHE_SIZE
    # a full cache is emptied, not frozen: the newest texts are in it
    assert f"sip:u{uri.SHAPE_CACHE_SIZE + 9}@192.0.2.1" in uri._URI_SHAPES
    long_uri = "sip:" + "a" * uri.SHAPE_MAX_TEXT + "@192.0.2.1"
    assert URI.parse(long_uri).user == "a" * uri.SHAPE_MAX_TEXT
    assert long_uri not in uri._URI_SHAPES  # long texts are parsed, never kept


VIAS = [
    "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a1;rport",
    "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a2;rport=5070;received=192.0.2.9",
    "SIP/2.0/UDP 192.0.2.1:5060",
    "SIP/2.0/TCP [2001:db8::1]:5061;branch=z9hG4bK-b1",
    "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a3;ttl=16",
]
BAD_AFTER_A_GOOD_HEAD = [
    "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a4;rport=99999",  # rport out of range
    "SIP/2.0/UDP 192.0.2.1:5060;ttl=300",
    "SIP/2.0/UDP 192.0.2.1:5060;;branch=x",  # not _SIMPLE_VIA's: the general parser decides
    "SIP/2.0/UDP 192.0.2.1:5060;branch=a b",
]


def _outcome(text: str) -> Any:
    try:
        via = headers.Via.parse(text)
    except ParseError as e:
        return ("error", e.reason)
    return (via.transport, via.host, via.port, via.params, str(via))


def test_a_via_whose_head_was_seen_parses_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = VIAS + BAD_AFTER_A_GOOD_HEAD
    fresh = {}
    for text in texts:  # each parsed with nothing remembered: the full regex, as before the cache
        headers._VIA_HEADS.clear()
        fresh[text] = _outcome(text)
    headers._VIA_HEADS.clear()
    for text in VIAS:
        headers.Via.parse(text)  # the heads are known now
    assert "SIP/2.0/UDP 192.0.2.1:5060" in headers._VIA_HEADS
    counting = CountingPattern(headers._SIMPLE_VIA)
    monkeypatch.setattr(headers, "_SIMPLE_VIA", counting)
    for text in texts:
        assert _outcome(text) == fresh[text], text
    # the full regex ran only for the two whose parameters its own regex refuses
    assert counting.runs == 2
    headers._VIA_HEADS.clear()
