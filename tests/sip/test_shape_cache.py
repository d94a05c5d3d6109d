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

    def match(self, text: str, *pos: int) -> Any:
        self.runs += 1
        return self.pattern.match(text, *pos)


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


def test_a_uri_is_remembered_only_once_it_parsed_whole(counted) -> None:
    # the regex takes ";;", the parameters' check refuses it: nothing kept, so that every kept text
    # is known to parse (uri.known_uri, which validate() trusts instead of building the URI)
    for _ in range(2):
        with pytest.raises(ParseError):
            URI.parse("sip:alice@192.0.2.1;;lr")
    assert "sip:alice@192.0.2.1;;lr" not in uri._URI_SHAPES
    assert not uri.known_uri("sip:alice@192.0.2.1;;lr")
    URI.parse("sip:alice@192.0.2.1;lr")
    assert uri.known_uri("sip:alice@192.0.2.1;lr")


def test_validate_builds_no_uri_it_saw_before_and_still_refuses_a_bad_one(counted) -> None:
    from libon_tsilo.sip.message import parse_message

    def message(from_uri: str) -> bytes:
        return (f"OPTIONS sip:bob@192.0.2.2 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-v1\r\n"
                f"From: <{from_uri}>;tag=1\r\nTo: <sip:bob@192.0.2.2>\r\nCall-ID: v1\r\nCSeq: 1 OPTIONS\r\n"
                f"Contact: <sip:alice@192.0.2.1:5062>\r\nContent-Length: 0\r\n\r\n").encode()

    first = parse_message(message("sip:alice@192.0.2.1"))
    first.validate()  # URIs not seen yet: parsed (and kept by their NameAddr)
    assert first.from_._uri is not None
    again = parse_message(message("sip:alice@192.0.2.1"))
    again.validate()
    assert again.from_._uri is None and again.to._uri is None and again.contacts[0]._uri is None
    assert str(again.from_.uri) == "sip:alice@192.0.2.1" and again.contacts[0].uri.port == 5062
    for bad in ("sip:alice@999.1.1.1", "sip:alice@192.0.2.1;;lr"):
        for _ in range(2):  # refused the first time and every time after (nothing kept)
            with pytest.raises(ParseError):
                parse_message(message(bad)).validate()


def test_a_cseq_text_seen_before_gives_the_same_value_object(counted) -> None:
    # a CSeq is a value (its fields are Final): the cache keeps the object, not just its groups
    first = CSeq.parse("12 INVITE")
    assert CSeq.parse("12 INVITE") is first and (first.seq, first.method) == (12, "INVITE")
    assert counted["cseq"].runs == 1
    assert CSeq.parse("12  INVITE") is not CSeq.parse("12  INVITE")  # the general path keeps nothing


def _backtracking(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """The same regex with its possessive repeats spelled as ordinary (backtracking) ones."""
    text = pattern.pattern.replace("++", "+").replace("*+", "*").replace("?+", "?")
    return re.compile(text, pattern.flags)


PROBES = [
    "branch=z9hG4bK-1;rport", "branch=z9hG4bK-1;rport=5060;received=192.0.2.1", "lr", "a=b;c",
    'x="quoted;no"', 'x="quoted"', 'x="open', "a=", "=b", "a==b", "a;;b", ";a", "a;", "a=b=c",
    "maddr=[2001:db8::1]", "a=b:c", "a b", "a=\"\"", "tag=1;x=\"y\";z",
]
ADDRS = ['"Alice" <sip:alice@example.com>;tag=a1', "<sip:a@h>", '"A"<sip:a@h>', '"A\\"" <sip:a@h>',
         "<sip:a@h>;tag=", "<sip:a@h>;;tag=1", "<sip:a@h;lr>", "<sip:a b@h>", "<sip:a@h>x", '"" <sip:a@h>']
URIS = ["sip:a@h", "sips:a@h:5061;transport=tcp", "sip:h", "sip:a@h:123456", "sip:a@[::1]:5060",
        "sip:a@h;lr;;x", "sip:@h", "sip:a@h;x=%41", "sip:a@h?x=y", "SIP:a@h", "sip:a:b@h"]


def test_the_possessive_regexes_decide_as_the_backtracking_ones_did() -> None:
    # issue 15: `++`/`*+`/`?+` only spare SRE the state it would backtrack into, where no class can
    # give back a character that makes a match; the same verdicts and groups on every probe
    checks = [
        (headers._SIMPLE_PARAMS, "match", PROBES),
        (headers._VIA_PARAMS, "match", PROBES),
        (headers._SIMPLE_VIA, "match", [f"SIP/2.0/UDP 192.0.2.1:5060;{p}" for p in PROBES]
         + ["SIP/2.0/UDP 192.0.2.1:5060", "SIP/2.0/UDP [::1]:5060;lr", "SIP/2.0/UDP h:99999"]),
        (headers._SIMPLE_NAME_ADDR, "fullmatch", ADDRS + [f"<sip:a@h>;{p}" for p in PROBES]),
        (uri._SIMPLE_SIP_URI, "fullmatch", URIS + [f"sip:a@h;{p}" for p in PROBES]),
    ]
    for pattern, how, texts in checks:
        slow = _backtracking(pattern)
        assert slow.pattern != pattern.pattern, pattern.pattern  # possessive repeats in use
        for text in texts:
            fast_m, slow_m = getattr(pattern, how)(text), getattr(slow, how)(text)
            assert (fast_m is None) == (slow_m is None), (pattern.pattern, text)
            if fast_m is not None:
                assert fast_m.groups() == slow_m.groups(), (pattern.pattern, text)


def test_a_name_addr_whose_head_was_seen_skips_the_regex_and_parses_as_before(counted) -> None:
    # a dialog's To without a tag, then with ours; a From known but for a new tag: the part before
    # ";" was a name-addr seen whole, so only the parameters are checked (a lone alphanumeric tag
    # by str methods, anything else by the parameters' regex)
    heads = ['<sip:bob@192.0.2.2:5060>', '"Bob" <sip:bob@192.0.2.2>']
    texts = [f"{h};{p}" for h in heads for p in (
        "tag=a1b2", "tag=a-1", "tag=1;x=y", "tag=", "tag=é", 'x="a;b"', "tag=a b", ";tag=1", "x=\"q\"")]
    texts += ['"a>;b" <sip:bob@192.0.2.2:5060>;tag=1', '<sip:bob@192.0.2.2:5060> ;tag=1']

    def outcome(text: str) -> Any:
        try:
            na = NameAddr.parse(text)
        except ParseError as e:
            return ("error", e.reason)
        return (na.display, str(na.uri), na.params, str(na))

    fresh = {}
    for text in texts:
        headers._NAME_ADDR_SHAPES.clear()
        fresh[text] = outcome(text)
    headers._NAME_ADDR_SHAPES.clear()
    for head in heads:
        NameAddr.parse(head)
    counted["name_addr"].runs = 0
    assert outcome('<sip:bob@192.0.2.2:5060>;tag=a1b2') == fresh['<sip:bob@192.0.2.2:5060>;tag=a1b2']
    assert outcome('"Bob" <sip:bob@192.0.2.2>;tag=1;x=y') == fresh['"Bob" <sip:bob@192.0.2.2>;tag=1;x=y']
    assert counted["name_addr"].runs == 0
    for text in texts:
        assert outcome(text) == fresh[text], text


def test_a_number_text_is_remembered_once_checked_and_each_limit_still_applies() -> None:
    headers._UINTS.clear()
    assert headers.parse_uint("300", "Expires") == 300
    assert headers._UINTS["300"] == 300  # the digit checks and int() are not run again for it
    with pytest.raises(ParseError, match="Max-Forwards too large"):
        headers.parse_uint("300", "Max-Forwards", 255)  # a remembered value, another header's limit
    for bad in ("\u00b2", "7 0", "", "-1", "1" * 11):
        with pytest.raises(ParseError):
            headers.parse_uint(bad, "Expires")
        assert bad not in headers._UINTS
    assert headers.parse_uint("0" * 20 + "7", "Expires") == 7  # leading zeros are still a small number


def test_a_name_addr_shape_keeps_its_parsed_params_and_hands_out_copies(counted) -> None:
    text = "<sip:alice@example.com>;tag=a1;x=y"
    first, second = NameAddr.parse(text), NameAddr.parse(text)
    kept = headers._NAME_ADDR_SHAPES[text][3]
    assert kept == {"tag": "a1", "x": "y"} and first.params == kept == second.params
    assert first.params is not kept and second.params is not kept and first.params is not second.params
    first.tag = "changed"
    assert kept["tag"] == "a1" and NameAddr.parse(text).tag == "a1"


PLAIN_PROBES = PROBES + ["branch=z9hG4bK.a-b.c", "received=192.0.2.1", "x=\u00e9", "\u00e9=1", "a=b-", "a=-",
                         "a=.", "x=[::1]", "a=b;", "a=b\n", "A=B", "a_b=c", "a=b_c", "tag=0;tag=1"]


def test_plain_params_are_what_the_regex_and_the_split_give() -> None:
    # _plain_params takes only what _PARAMS would take (letters and digits, values with - and .),
    # with the same dict; anything else is left to the regex (None)
    taken = 0
    for text in PLAIN_PROBES:
        plain = headers._plain_params(text)
        if plain is not None:
            taken += 1
            assert headers._PARAMS_ONLY.fullmatch(text) is not None, text
            assert plain == headers._split_params(text), text
    assert taken >= 8


def test_a_via_with_a_known_head_and_plain_params_runs_no_regex(monkeypatch: pytest.MonkeyPatch) -> None:
    headers._VIA_HEADS.clear()
    headers.Via.parse("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-0")
    counting = CountingPattern(headers._VIA_PARAMS)
    monkeypatch.setattr(headers, "_VIA_PARAMS", counting)
    via = headers.Via.parse("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a.1;rport=5062;received=192.0.2.9")
    assert counting.runs == 0
    assert (via.branch, via.rport, via.received) == ("z9hG4bK-a.1", 5062, "192.0.2.9")
    with pytest.raises(ParseError):
        headers.Via.parse("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a.2;rport=99999")
    headers.Via.parse('SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a.3;x="q"')  # not plain: the regex
    assert counting.runs == 1
    headers._VIA_HEADS.clear()
