"""Header names, comma splitting, parameters, NameAddr, Via, CSeq, numbers and dates."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import (
    COMPACT,
    CSeq,
    NameAddr,
    Via,
    canonical_key,
    check_date,
    format_params,
    parse_params,
    parse_uint,
    pretty_name,
    quote,
    split_commas,
    unquote,
)
from libon_tsilo.sip.uri import URI

# RFC 3261 §7.3.3 / §20 and the IANA registry of compact forms
COMPACT_FORMS = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length", "c": "content-type",
    "f": "from", "s": "subject", "t": "to", "v": "via", "k": "supported", "o": "event",
    "u": "allow-events", "r": "refer-to", "b": "referred-by", "x": "session-expires", "y": "identity",
    "a": "accept-contact", "j": "reject-contact", "d": "request-disposition",
}


@pytest.mark.parametrize("short,long", sorted(COMPACT_FORMS.items()))
def test_compact_forms(short: str, long: str) -> None:
    assert COMPACT[short] == long
    assert canonical_key(short) == long
    assert canonical_key(short.upper()) == long
    assert canonical_key(long) == long


def test_compact_table_has_nothing_else() -> None:
    assert COMPACT == COMPACT_FORMS


@pytest.mark.parametrize("name", ["Call-ID", "CALL-ID", "call-id", "cAlL-iD", "i", "I"])
def test_canonical_key_case_insensitive(name: str) -> None:
    assert canonical_key(name) == "call-id"


def test_unknown_single_letters_are_not_expanded() -> None:
    assert canonical_key("g") == "g"
    assert canonical_key("X-Custom") == "x-custom"


@pytest.mark.parametrize(
    "key,pretty",
    [("call-id", "Call-ID"), ("cseq", "CSeq"), ("www-authenticate", "WWW-Authenticate"),
     ("max-forwards", "Max-Forwards"), ("via", "Via"), ("content-length", "Content-Length"),
     ("x-custom-thing", "X-Custom-Thing")],
)
def test_pretty_name(key: str, pretty: str) -> None:
    assert pretty_name(key) == pretty


# split_commas


@pytest.mark.parametrize(
    "value,parts",
    [
        ("a", ["a"]),
        ("  a  ", ["a"]),
        ("a, b,c", ["a", "b", "c"]),
        ("<sip:a@b;x=1,2>, <sip:c@d>", ["<sip:a@b;x=1,2>", "<sip:c@d>"]),
        ('"Doe, John" <sip:j@d>, <sip:k@d>', ['"Doe, John" <sip:j@d>', "<sip:k@d>"]),
        ('"a \\" , b" <sip:x>, <sip:y>', ['"a \\" , b" <sip:x>', "<sip:y>"]),
        ('"a \\\\", <sip:y>', ['"a \\\\"', "<sip:y>"]),  # escaped backslash ends before the quote
        ('<sip:a@b>;p="x,y", <sip:c@d>', ['<sip:a@b>;p="x,y"', "<sip:c@d>"]),
        ("SIP/2.0/UDP a;branch=1 , SIP/2.0/TCP b;branch=2", ["SIP/2.0/UDP a;branch=1", "SIP/2.0/TCP b;branch=2"]),
        ("a,,b", ["a", "", "b"]),
    ],
)
def test_split_commas(value: str, parts: list[str]) -> None:
    assert split_commas(value) == parts


def _split_commas_by_scan(value: str) -> list[str]:
    """The character scan split_commas was (and still runs when a quote or a bracketed comma is
    present): its fast path must give the same pieces for every value."""
    parts, depth, quoted, start, i = [], 0, False, 0, 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in "<>":
            depth += 1 if ch == "<" else -1
        elif ch == "," and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    return [*parts, value[start:].strip()]


def test_split_commas_fast_path_splits_as_the_scan() -> None:
    import random

    rng = random.Random(14)  # seeded: the same 20,000 values every run
    for _ in range(20000):
        value = "".join(rng.choice("ab <>,; ") for _ in range(rng.randrange(1, 14)))
        assert split_commas(value) == _split_commas_by_scan(value), value
    route = "<sip:tok@10.0.0.2:5071;transport=udp;lr>, <sip:tok@192.0.2.1:5060;lr>, <sip:p;lr>"
    assert split_commas(route) == _split_commas_by_scan(route) == [r.strip() for r in route.split(",")]
    assert split_commas(">a<, b") == [">a<", "b"] and split_commas("x>, <y") == ["x>, <y"]


@pytest.mark.parametrize("value", ['"unterminated, x', '"a \\", b'])
def test_split_commas_unbalanced_quotes(value: str) -> None:
    with pytest.raises(ParseError):
        split_commas(value)


# parameters


def test_parse_params_simple() -> None:
    assert parse_params("tag=abc;lr;Expires=60", "x") == {"tag": "abc", "lr": None, "expires": "60"}
    # parse_params is only called after a ';': nothing after it is an empty parameter
    with pytest.raises(ParseError):
        parse_params("", "x")


def test_parse_params_whitespace_and_quotes() -> None:
    params = parse_params(' a = 1 ; b ; c="x y;z" ; d="q\\"r"', "x")
    assert params == {"a": "1", "b": None, "c": '"x y;z"', "d": '"q\\"r"'}
    assert unquote(params["c"]) == "x y;z"  # type: ignore[arg-type]
    assert unquote(params["d"]) == 'q"r'  # type: ignore[arg-type]


def test_parse_params_ipv6_value() -> None:
    assert parse_params("received=[2001:db8::9];rport=5060", "Via") == {"received": "[2001:db8::9]", "rport": "5060"}
    assert parse_params("received=2001:db8::9", "Via") == {"received": "2001:db8::9"}


@pytest.mark.parametrize("text", [";", "a;;b", "a=", "a=;b", "a=b c", "a=b,c", "a=\"open", "=b", "a=<x>"])
def test_parse_params_bad(text: str) -> None:
    with pytest.raises(ParseError):
        parse_params(text, "x")


def test_format_params_round_trip() -> None:
    params = {"tag": "1", "lr": None, "x": '"a b"'}
    assert format_params(params) == ';tag=1;lr;x="a b"'
    assert parse_params(format_params(params)[1:], "x") == params


def test_quote_unquote() -> None:
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert unquote(quote('a"b\\c')) == 'a"b\\c'
    assert unquote("plain") == "plain"


# NameAddr


def test_name_addr_quoted_display() -> None:
    na = NameAddr.parse('"Alice Smith" <sip:alice@atlanta.com>;tag=1928301774')
    assert na.display == "Alice Smith"
    assert str(na.uri) == "sip:alice@atlanta.com"
    assert na.tag == "1928301774"
    assert na.params == {"tag": "1928301774"}
    assert str(na) == '"Alice Smith" <sip:alice@atlanta.com>;tag=1928301774'


def test_name_addr_token_display_and_uri_params() -> None:
    na = NameAddr.parse("Alice   Smith <sip:alice@atlanta.com;transport=tcp>;tag=x")
    assert na.display == "Alice Smith"
    assert na.uri.params == {"transport": "tcp"}
    assert na.params == {"tag": "x"}


def test_name_addr_escaped_display() -> None:
    na = NameAddr.parse('"Al \\"The Pal\\" ice" <sip:a@b>')
    assert na.display == 'Al "The Pal" ice'
    na.touch()
    assert NameAddr.parse(str(na)).display == 'Al "The Pal" ice'


def test_name_addr_without_display() -> None:
    na = NameAddr.parse("<sip:alice@atlanta.com;tag=inuri>")
    assert na.display is None
    assert na.tag is None
    assert na.uri.params == {"tag": "inuri"}


def test_addr_spec_params_belong_to_header() -> None:
    na = NameAddr.parse("sip:alice@atlanta.com;tag=88sja8x;transport=tcp")
    assert na.display is None
    assert na.tag == "88sja8x"
    assert na.params == {"tag": "88sja8x", "transport": "tcp"}
    assert na.uri.params == {}
    assert str(na.uri) == "sip:alice@atlanta.com"
    assert str(na) == "sip:alice@atlanta.com;tag=88sja8x;transport=tcp"


def test_addr_spec_rebuilt_in_angle_brackets() -> None:
    na = NameAddr.parse("sip:alice@atlanta.com;tag=1")
    na.tag = "2"
    assert str(na) == "<sip:alice@atlanta.com>;tag=2"
    again = NameAddr.parse(str(na))
    assert again.tag == "2" and again.uri == na.uri


def test_contact_params_and_quoted_instance() -> None:
    text = ('<sip:alice@192.0.2.1:5061;transport=tls;ob;pn-provider=apns.voip;pn-prid=00fc13adff78;'
            'pn-param=ABCD1234.org.example.voip>;expires=3600;q=0.7;'
            '+sip.instance="<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>";reg-id=1')
    na = NameAddr.parse(text)
    assert na.uri.params == {"transport": "tls", "ob": None, "pn-provider": "apns.voip",
                             "pn-prid": "00fc13adff78", "pn-param": "ABCD1234.org.example.voip"}
    assert na.params["expires"] == "3600"
    assert na.params["q"] == "0.7"
    assert na.params["+sip.instance"] == '"<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"'
    assert unquote(na.params["+sip.instance"]) == "<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"  # type: ignore[arg-type]
    assert na.params["reg-id"] == "1"
    assert str(na) == text
    na.touch()
    assert NameAddr.parse(str(na)).params == na.params


def test_tag_setter_and_removal() -> None:
    na = NameAddr.parse('"A" <sip:a@b>')
    na.tag = "t1"
    assert str(na) == '"A" <sip:a@b>;tag=t1'
    na.tag = None
    assert str(na) == '"A" <sip:a@b>'
    na.tag = None  # removing a missing tag is fine
    assert na.tag is None


def test_uri_setter_rebuilds() -> None:
    na = NameAddr.parse("Bob <sip:bob@biloxi.com>;tag=9")
    na.uri = URI.parse("sip:bob@192.0.2.4:5070")
    assert str(na) == '"Bob" <sip:bob@192.0.2.4:5070>;tag=9'


def test_uri_changed_in_place_then_touched() -> None:
    na = NameAddr.parse("<sip:a@b>;tag=1")
    na.uri.port = 5
    na.uri.touch()
    assert str(na) == "<sip:a@b:5>;tag=1"


def test_uri_changed_in_place_touched_and_read_first() -> None:
    na = NameAddr.parse("<sip:a@b>;tag=1")
    na.uri.port = 5
    na.uri.touch()
    assert str(na.uri) == "sip:a@b:5"
    assert str(na) == "<sip:a@b:5>;tag=1"


def test_name_addr_copy_independent() -> None:
    na = NameAddr.parse("<sip:a@b;lr>;tag=1")
    dup = na.copy()
    dup.tag = "2"
    dup.uri.params["x"] = "y"
    assert na.tag == "1"
    assert "x" not in na.uri.params
    assert str(na) == "<sip:a@b;lr>;tag=1"


def test_name_addr_constructor() -> None:
    na = NameAddr(URI.parse("sip:a@b"), "Al", {"tag": "z"})
    assert str(na) == '"Al" <sip:a@b>;tag=z'


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '"unterminated <sip:a@b>',
        '"Quoted" sip:a@b',                # quoted display needs <>
        "<sip:a@b",                         # unterminated
        "< sip:a@b>",                       # whitespace inside <>
        "<sip:a@b >",
        "<sip:a@b> junk",
        "<sip:a@b>;tag=",
        "sip:a@b?subject=x",                # addr-spec with ? must be in <>
        "sip:a@b, sip:c@d",                 # addr-spec with , must be in <>
        "Bell, Alexander <sip:a@b>",        # non-token display (RFC 4475 baddn)
        "sip:a@b>",
    ],
)
def test_bad_name_addr(text: str) -> None:
    with pytest.raises(ParseError):
        NameAddr.parse(text).uri


# Via


def test_via_basic() -> None:
    via = Via.parse("SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds")
    assert via.transport == "UDP"
    assert via.host == "pc33.atlanta.com"
    assert via.port is None
    assert via.branch == "z9hG4bK776asdhds"
    assert via.received is None and via.rport is None and via.maddr is None and via.ttl is None
    assert via.sent_by == ("pc33.atlanta.com", None)
    assert str(via) == "SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds"


def test_via_all_params() -> None:
    via = Via.parse("SIP/2.0/tcp 192.0.2.1:5070;branch=z9hG4bKx;received=192.0.2.99;rport=61234;"
                    "maddr=224.2.0.1;ttl=16;alias")
    assert via.transport == "TCP"
    assert via.host == "192.0.2.1" and via.port == 5070
    assert via.received == "192.0.2.99"
    assert via.rport == 61234
    assert via.maddr == "224.2.0.1"
    assert via.ttl == 16
    assert via.params["alias"] is None


def test_via_empty_rport() -> None:
    via = Via.parse("SIP/2.0/UDP host;rport;branch=z9hG4bKa")
    assert "rport" in via.params and via.params["rport"] is None
    assert via.rport is None


def test_via_ipv6() -> None:
    via = Via.parse("SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKv6;received=2001:db8::99")
    assert via.host == "[2001:db8::1]"
    assert via.port == 5061
    assert via.received == "2001:db8::99"
    via2 = Via.parse("SIP/2.0/UDP [::1];branch=z9hG4bKb;received=[::2]")
    assert via2.host == "[::1]" and via2.port is None and via2.received == "[::2]"


def test_via_with_whitespace() -> None:
    # RFC 4475 wsinv style: LWS around '/', ':' and ';'
    via = Via.parse("SIP  /   2.0  / UDP first.example.com: 4000;ttl=16;maddr=224.2.0.1 ;branch=z9hG4bKa7c6a8dlze.1")
    assert via.transport == "UDP"
    assert (via.host, via.port) == ("first.example.com", 4000)
    assert via.ttl == 16
    assert via.branch == "z9hG4bKa7c6a8dlze.1"


def test_via_set_param_rebuilds() -> None:
    via = Via.parse("SIP/2.0/UDP  host.example.com:5060 ;branch=z9hG4bK1;rport")
    via.set_param("received", "192.0.2.7")
    via.set_param("rport", "5999")
    assert str(via) == "SIP/2.0/UDP host.example.com:5060;branch=z9hG4bK1;rport=5999;received=192.0.2.7"
    again = Via.parse(str(via))
    assert again.received == "192.0.2.7" and again.rport == 5999


def test_via_constructor_and_copy() -> None:
    via = Via("tls", "[::1]", 5061, {"branch": "z9hG4bKc"})
    assert str(via) == "SIP/2.0/TLS [::1]:5061;branch=z9hG4bKc"
    dup = via.copy()
    dup.set_param("received", "x")
    assert "received" not in via.params


def test_via_bad_version_is_505() -> None:
    with pytest.raises(ParseError) as info:
        Via.parse("SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw")
    assert info.value.status == 505


@pytest.mark.parametrize(
    "text",
    [
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ;branch=1",
        "SIP/2.0 UDP host",
        "XIP/2.0/UDP host",
        "SIP/2.0/U(P host",
        "SIP/2.0/UDP host:99999",
        "SIP/2.0/UDP host;ttl=256",
        "SIP/2.0/UDP host;ttl=abc",
        "SIP/2.0/UDP host;rport=65536",
        "SIP/2.0/UDP host;rport=x",
        "SIP/2.0/UDP host;;branch=1",
        "SIP/2.0/UDP host;branch=",
        "SIP/2.0/UDP [::1;branch=1",
    ],
)
def test_bad_via(text: str) -> None:
    with pytest.raises(ParseError):
        Via.parse(text)


# CSeq


@pytest.mark.parametrize("text,seq,method", [("4711 INVITE", 4711, "INVITE"), ("  1   ACK ", 1, "ACK"),
                                             ("0 NEWMETHOD", 0, "NEWMETHOD"), ("2147483647 BYE", 2**31 - 1, "BYE")])
def test_cseq(text: str, seq: int, method: str) -> None:
    cseq = CSeq.parse(text)
    assert (cseq.seq, cseq.method) == (seq, method)
    assert str(cseq) == f"{seq} {method}"


@pytest.mark.parametrize("text", ["", "INVITE", "1", "INVITE 1", "-1 INVITE", "2147483648 INVITE",
                                  "36893488147419103232 REGISTER", "1 INV ITE", "1 INV<ITE", "1.0 INVITE"])
def test_bad_cseq(text: str) -> None:
    with pytest.raises(ParseError):
        CSeq.parse(text)


@pytest.mark.parametrize("text", ["\u0661\u0662 INVITE", "\uff11 INVITE", "1\u00b2 INVITE", "\u0661  INVITE"])
def test_cseq_number_is_ascii_digits(text: str) -> None:
    # str.isdigit() is true for Arabic-Indic, full-width and superscript digits: RFC 3261's DIGIT is ASCII
    with pytest.raises(ParseError):
        CSeq.parse(text)


# numbers and dates


def test_parse_uint() -> None:
    assert parse_uint(" 70 ", "Max-Forwards", 255) == 70
    assert parse_uint("0", "Expires") == 0
    assert parse_uint("4294967295", "Expires") == 2**32 - 1
    for bad in ("", "-1", "1.5", "abc", "\u0663", "4294967296"):
        with pytest.raises(ParseError):
            parse_uint(bad, "Expires")
    with pytest.raises(ParseError):
        parse_uint("256", "Max-Forwards", 255)


def test_check_date() -> None:
    check_date("Sat, 13 Nov 2010 23:29:00 GMT")
    check_date(" Thu, 21 Feb 2002 13:02:03 GMT ")
    for bad in ("Fri, 01 Jan 2010 16:00:00 EST", "Thu, 21 Feb 2002 13:02:03", "21 Feb 2002 13:02:03 GMT",
                "Thu, 21 Feb 02 13:02:03 GMT"):
        with pytest.raises(ParseError):
            check_date(bad)


def test_via_set_param_edits_the_received_text_for_rport_and_received() -> None:
    """What the transport does to every request (RFC 3581) edits the line as the client spelt it: the
    bare ``rport`` gets its value, ``received`` goes last, and the rest keeps its bytes (a
    parameter name in capitals here, which a rebuild from the fields would lower)."""
    via = Via.parse("SIP/2.0/UDP 192.0.2.5:5070;Branch=z9hG4bK-AbC.1;rport")
    via.set_param("rport", "40000")
    via.set_param("received", "198.51.100.1")
    assert str(via) == "SIP/2.0/UDP 192.0.2.5:5070;Branch=z9hG4bK-AbC.1;rport=40000;received=198.51.100.1"
    again = Via.parse(str(via))
    assert (again.branch, again.rport, again.received) == ("z9hG4bK-AbC.1", 40000, "198.51.100.1")
    assert via.params == again.params


def test_via_set_param_rebuilds_what_it_cannot_edit() -> None:
    # a value replaced (a received the client wrote), a flag not written last or in capitals, a
    # quoted value: rebuilt from the fields, as before
    for text, name, value, expected in [
        ("SIP/2.0/UDP h.example.com;branch=z9hG4bK1;received=10.0.0.1", "received", "192.0.2.9",
         "SIP/2.0/UDP h.example.com;branch=z9hG4bK1;received=192.0.2.9"),
        ("SIP/2.0/UDP h.example.com;rport;branch=z9hG4bK1", "rport", "5060",
         "SIP/2.0/UDP h.example.com;rport=5060;branch=z9hG4bK1"),
        ('SIP/2.0/UDP h.example.com;branch=z9hG4bK1;x="a;b"', "received", "192.0.2.9",
         'SIP/2.0/UDP h.example.com;branch=z9hG4bK1;x="a;b";received=192.0.2.9'),
        ("SIP/2.0/UDP h.example.com;branch=z9hG4bK1;RPORT", "rport", "5060",
         "SIP/2.0/UDP h.example.com;branch=z9hG4bK1;rport=5060"),
    ]:
        via = Via.parse(text)
        via.set_param(name, value)
        assert str(via) == expected, text
        assert Via.parse(str(via)).params == via.params
