"""sip:, sips:, tel: and other URIs: parsing, re-serialization, RFC 3261 §19.1.4 comparison."""

from __future__ import annotations

import re
import sys

import pytest

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.uri import UNICODE_SPACES, URI, AbsoluteURI, TelURI, char_class_without, split_hostport, unescape


def test_full_sip_uri_fields() -> None:
    text = "sip:alice:secret@atlanta.com:5061;transport=TLS;lr;maddr=10.0.0.1;ob;Foo=Bar?subject=hi%20there&priority=urgent"
    uri = URI.parse(text)
    assert uri.scheme == "sip"
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "atlanta.com"
    assert uri.port == 5061
    assert uri.params == {"transport": "TLS", "lr": None, "maddr": "10.0.0.1", "ob": None, "foo": "Bar"}
    assert uri.transport == "tls"
    assert uri.headers == {"subject": "hi%20there", "priority": "urgent"}
    assert str(uri) == text


def test_minimal_uri() -> None:
    uri = URI.parse("sip:example.com")
    assert uri.user is None and uri.password is None
    assert uri.host == "example.com" and uri.port is None
    assert uri.params == {} and uri.headers == {}
    assert uri.transport is None


def test_sips_and_scheme_case() -> None:
    uri = URI.parse("SIPS:bob@Biloxi.COM")
    assert uri.scheme == "sips"
    assert uri.host == "Biloxi.COM"
    assert str(uri) == "SIPS:bob@Biloxi.COM"  # original text kept


@pytest.mark.parametrize(
    "text,host,bare,port",
    [
        ("sip:alice@192.0.2.4", "192.0.2.4", "192.0.2.4", None),
        ("sip:alice@192.0.2.4:5070", "192.0.2.4", "192.0.2.4", 5070),
        ("sip:alice@[2001:db8::10]", "[2001:db8::10]", "2001:db8::10", None),
        ("sip:alice@[2001:db8::10]:5061", "[2001:db8::10]", "2001:db8::10", 5061),
        ("sip:[::1]:5060;transport=tcp", "[::1]", "::1", 5060),
        ("sip:[::ffff:192.0.2.1]", "[::ffff:192.0.2.1]", "::ffff:192.0.2.1", None),
        ("sip:alice@host-1.example.co.uk", "host-1.example.co.uk", "host-1.example.co.uk", None),
        ("sip:alice@example.com.", "example.com.", "example.com.", None),
        ("sip:a@h", "h", "h", None),
        ("sip:a@h:0", "h", "h", 0),
        ("sip:a@h:65535", "h", "h", 65535),
    ],
)
def test_hosts_and_ports(text: str, host: str, bare: str, port: int | None) -> None:
    uri = URI.parse(text)
    assert uri.host == host
    assert uri.host_bare == bare
    assert uri.port == port


@pytest.mark.parametrize(
    "text",
    [
        "sip:",                       # no host
        "sip:alice@",                 # no host
        "sip:@example.com",           # empty user
        "sip:alice@example.com:",     # empty port
        "sip:alice@example.com:99999",
        "sip:alice@example.com:65536",
        "sip:alice@example.com:50a",
        "sip:alice@[2001:db8::1",     # unterminated IPv6 reference
        "sip:alice@[2001:db8::g]",
        "sip:alice@[::1]x",
        "sip:alice@256.1.1.1",
        "sip:alice@-example.com",
        "sip:alice@exa_mple.com",
        "sip:al ice@example.com",     # whitespace
        "sip:alice@example.com\t",
        "sip:<alice@example.com>",
        'sip:"alice"@example.com',
        "alice@example.com",          # no scheme
        ":alice@example.com",
        "sip:al%2@example.com",       # bad escape in user
        "sip:al%zzice@example.com",
        "sip:alice@example.com;foo=%4",
        "sip:alice@example.com;;lr",  # empty parameter
        "sip:alice@example.com;lr;",
        "sip:alice@example.com;=x",
        "sip:alice@example.com?=x",
        "sip:alice@example.com?a=%g0",
        "1sip:alice@example.com",     # bad scheme
    ],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(ParseError) as info:
        URI.parse(text)
    assert info.value.status == 400


def test_escapes_kept_in_text_and_decoded_by_unescape() -> None:
    uri = URI.parse("sip:%61lice%20b@example.com;p=a%3Bb")
    assert uri.user == "%61lice%20b"
    assert unescape(uri.user) == "alice b"
    assert uri.params["p"] == "a%3Bb"
    assert str(uri) == "sip:%61lice%20b@example.com;p=a%3Bb"


def test_unescape_non_utf8_stays_distinct() -> None:
    assert unescape("a%FFb") != unescape("a%FEb")
    assert unescape("plain") == "plain"


def test_user_with_reserved_user_characters() -> None:
    # user-unreserved: & = + $ , ; ? /  (RFC 3261 §25.1)
    uri = URI.parse("sip:+1;isub=5?x&y=z,w/v@example.com;user=phone")
    assert uri.user == "+1;isub=5?x&y=z,w/v"
    assert uri.host == "example.com"
    assert uri.params == {"user": "phone"}
    assert uri.headers == {}


def test_param_names_are_lowercased_values_kept() -> None:
    uri = URI.parse("sip:a@b;Transport=TCP;LR;MAddr=X.example.com")
    assert uri.params == {"transport": "TCP", "lr": None, "maddr": "X.example.com"}
    assert uri.transport == "tcp"


def test_replace_rebuilds_text_and_leaves_original() -> None:
    uri = URI.parse("sip:alice@atlanta.com;transport=tcp")
    other = uri.replace(host="[2001:db8::2]", port=5070)
    assert str(other) == "sip:alice@[2001:db8::2]:5070;transport=tcp"
    assert other.host_bare == "2001:db8::2"
    assert str(uri) == "sip:alice@atlanta.com;transport=tcp"
    assert uri.host == "atlanta.com" and uri.port is None
    assert URI.parse(str(other)) == other


def test_replace_user_and_params() -> None:
    uri = URI.parse("sips:alice:pw@atlanta.com?subject=x")
    new = uri.replace(user="bob", params={"ob": None, "transport": "tls"})
    assert str(new) == "sips:bob:pw@atlanta.com;ob;transport=tls?subject=x"
    assert uri.user == "alice"


def test_touch_after_in_place_change() -> None:
    uri = URI.parse("sip:alice@atlanta.com;transport=udp")
    uri.params["transport"] = "tcp"
    assert str(uri) == "sip:alice@atlanta.com;transport=udp"  # documented: text kept until touch()
    uri.touch()
    assert str(uri) == "sip:alice@atlanta.com;transport=tcp"


def test_copy_is_independent() -> None:
    uri = URI.parse("sip:alice@atlanta.com;lr")
    dup = uri.copy()
    assert dup == uri and str(dup) == str(uri)
    dup.params["maddr"] = "x.example.com"
    dup.touch()
    assert "maddr" not in uri.params
    assert str(uri) == "sip:alice@atlanta.com;lr"


def test_constructed_uri() -> None:
    uri = URI("sip", "bob", "biloxi.com", 5060, {"transport": "tcp"}, {"subject": "a"})
    assert str(uri) == "sip:bob@biloxi.com:5060;transport=tcp?subject=a"
    assert URI.parse(str(uri)) == uri


def test_split_hostport() -> None:
    assert split_hostport("example.com:5060") == ("example.com", 5060)
    assert split_hostport("[::1]") == ("[::1]", None)
    assert split_hostport("[::1]:5") == ("[::1]", 5)
    with pytest.raises(ParseError):
        split_hostport("")
    with pytest.raises(ParseError):
        split_hostport("[::1]:x")


# RFC 3261 §19.1.4: the examples of equal URIs
EQUAL = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    ("sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
     "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"),
    ("sip:alice@atlanta.com?subject=project%20x&priority=urgent",
     "sip:alice@atlanta.com?priority=urgent&subject=project%20x"),
]

# ... and of unequal ones
UNEQUAL = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),  # different usernames
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),  # can resolve to different ports
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),  # can resolve to different transports
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),  # different port and transports
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),  # different header component
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),  # even if that is what the name resolves to
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off"),  # intransitive
]

# further cases from the §19.1.4 rules
EQUAL_MORE = [
    ("sip:alice@atlanta.com;maddr=239.255.255.1;ttl=15", "sip:alice@atlanta.com;ttl=15;maddr=239.255.255.1"),
    ("sip:alice@atlanta.com;user=phone", "sip:alice@atlanta.com;USER=Phone"),
    ("sip:alice:pw@atlanta.com", "sip:alice:p%77@atlanta.com"),
    ("sip:alice@atlanta.com;lr", "sip:alice@atlanta.com"),
    ("sip:alice@[2001:db8::1]:5060", "sip:alice@[2001:DB8::1]:5060"),
    ("sip:alice@atlanta.com;x=%41", "sip:alice@atlanta.com;x=a"),
]
UNEQUAL_MORE = [
    ("sip:alice@atlanta.com", "sips:alice@atlanta.com"),
    ("sip:alice@atlanta.com", "sip:Alice@atlanta.com"),
    ("sip:alice:pw@atlanta.com", "sip:alice:PW@atlanta.com"),
    ("sip:alice:pw@atlanta.com", "sip:alice@atlanta.com"),
    ("sip:alice@atlanta.com", "sip:atlanta.com"),
    ("sip:alice@atlanta.com;user=phone", "sip:alice@atlanta.com"),
    ("sip:alice@atlanta.com;maddr=10.0.0.1", "sip:alice@atlanta.com"),
    ("sip:alice@atlanta.com;ttl=1", "sip:alice@atlanta.com"),
    ("sip:alice@atlanta.com;method=INVITE", "sip:alice@atlanta.com"),
    ("sip:alice@atlanta.com;lr", "sip:alice@atlanta.com;lr=on"),
    ("sip:alice@atlanta.com?a=b", "sip:alice@atlanta.com?a=c"),
    ("sip:alice@atlanta.com:5060", "sip:alice@atlanta.com:5061"),
]


@pytest.mark.parametrize("a,b", EQUAL + EQUAL_MORE)
def test_equal_uris(a: str, b: str) -> None:
    ua, ub = URI.parse(a), URI.parse(b)
    assert ua == ub and ub == ua
    assert not (ua != ub)
    assert hash(ua) == hash(ub)


@pytest.mark.parametrize("a,b", UNEQUAL + UNEQUAL_MORE)
def test_unequal_uris(a: str, b: str) -> None:
    ua, ub = URI.parse(a), URI.parse(b)
    assert ua != ub and ub != ua
    assert not (ua == ub)


def test_uri_not_equal_to_string() -> None:
    assert URI.parse("sip:a@b") != "sip:a@b"


def test_uris_usable_as_dict_keys() -> None:
    seen = {URI.parse("sip:%61lice@AtLanTa.com"): 1}
    assert seen[URI.parse("sip:alice@atlanta.com")] == 1


# tel URIs (RFC 3966)


def test_tel_uri() -> None:
    uri = URI.parse("tel:+1-201-555-0123;phone-context=example.com")
    assert isinstance(uri, TelURI)
    assert uri.scheme == "tel"
    assert uri.number == "+1-201-555-0123"
    assert uri.params == {"phone-context": "example.com"}
    assert str(uri) == "tel:+1-201-555-0123;phone-context=example.com"


def test_tel_uri_equality_ignores_visual_separators() -> None:
    a = URI.parse("tel:+1-201-555-0123")
    b = URI.parse("tel:+1.201.(555)0123")
    c = URI.parse("tel:+12015550124")
    assert a == b
    assert a != c
    assert a != URI.parse("tel:+1-201-555-0123;ext=1")
    assert a != URI.parse("sip:+1-201-555-0123@example.com")


def test_equal_tel_uris_hash_equal() -> None:
    a = URI.parse("tel:+1-201-555-0123")
    b = URI.parse("tel:+12015550123")
    assert a == b
    assert hash(a) == hash(b)


@pytest.mark.parametrize("text", ["tel:", "tel:;x=1", "tel:+1 201", "tel:abc!"])
def test_bad_tel_uris(text: str) -> None:
    with pytest.raises(ParseError):
        URI.parse(text)


def test_other_scheme_is_absolute_uri() -> None:
    uri = URI.parse("mailto:alice@example.com")
    assert isinstance(uri, AbsoluteURI)
    assert uri.scheme == "mailto"
    assert uri.opaque == "alice@example.com"
    assert uri.host == "" and uri.user is None
    assert uri == URI.parse("mailto:alice@example.com")
    assert uri != URI.parse("mailto:bob@example.com")
    assert uri != URI.parse("sip:alice@example.com")


def test_absolute_uri_text_kept() -> None:
    assert str(URI.parse("nobodyKnowsThisScheme:totallyopaquecontent")) == "nobodyKnowsThisScheme:totallyopaquecontent"


def test_char_class_without_is_the_negated_class_with_whitespace() -> None:
    # the hot regexes spell `[^...\s]` as ranges (faster in SRE): the sets must be the same
    assert set(UNICODE_SPACES) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    for excluded, negated in (('<>"', r'[^<>"\s]'), ('?%<>"', r'[^?%<>"\s]')):
        ranges = re.compile(f"[{char_class_without(excluded)}]+")
        every = "".join(map(chr, range(sys.maxunicode + 1)))
        assert re.sub(negated, "", every) == ranges.sub("", every)


def test_a_significant_parameter_without_a_value_compares_without_crashing() -> None:
    """RFC 3261 §19.1.4 compares transport/user/ttl/method/maddr; a peer may send one as a bare flag."""
    assert URI.parse("sip:a@example.com;transport") == URI.parse("sip:a@example.com;TRANSPORT")
    assert URI.parse("sip:a@example.com;transport") != URI.parse("sip:a@example.com;transport=udp")
    assert URI.parse("sip:a@example.com;maddr=x;foo") != URI.parse("sip:a@example.com;maddr=x;foo=1")
    assert URI.parse("sip:a@example.com;user=phone") != URI.parse("sip:a@example.com")


def test_tel_global_number_digits() -> None:
    uri = URI.parse("tel:+33-1-23-45-67-89")
    assert isinstance(uri, TelURI)
    assert uri.is_global and uri.digits == "+33123456789" and uri.phone_context is None


def test_tel_local_number_needs_phone_context() -> None:
    uri = URI.parse("tel:01-23-45-67-89;phone-context=+33")
    assert isinstance(uri, TelURI)
    assert not uri.is_global and uri.digits == "0123456789" and uri.phone_context == "+33"
    assert URI.parse("tel:*21#;phone-context=example.com").digits == "*21#"
    with pytest.raises(ParseError, match="phone-context"):
        URI.parse("tel:0123456789")


@pytest.mark.parametrize("text", ["tel:+", "tel:+--", "tel:+33x1", "tel:+3%31", "tel:--;phone-context=+33"])
def test_bad_tel_numbers(text: str) -> None:
    with pytest.raises(ParseError):
        URI.parse(text)
