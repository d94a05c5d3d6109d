"""The client side of digest: answering a trunk's 401/407 (sip/digest_client.py)."""

from __future__ import annotations

import pytest

from libon_tsilo.sip import digest
from libon_tsilo.sip.digest_client import authorization, parse_challenge, pick_challenge

RFC2617 = ('Digest realm="testrealm@host.com", qop="auth,auth-int", '
           'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"')


def test_rfc2617_example_answered() -> None:
    challenge = parse_challenge(RFC2617)
    value = authorization(challenge, "GET", "/dir/index.html", "Mufasa", "Circle Of Life", cnonce="0a4f113b")
    creds = digest.parse_authorization(value)
    assert creds["response"] == "6629fae49393a05397450978507c4ef1"
    assert creds["nc"] == "00000001" and creds["qop"] == "auth"
    assert creds["opaque"] == "5ccc069c403ebaf9f0171e9517f40e41"


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_answer_checks_with_the_server_side(algorithm: str) -> None:
    nonce = digest.make_nonce("s3cret", 1000.0)
    challenge = parse_challenge(digest.challenge_header("trunk.example", nonce, algorithm))
    creds = digest.parse_authorization(
        authorization(challenge, "INVITE", "sip:+33123456789@trunk.example", "acct", "pw", nc=2))
    key = digest.ha1("acct", "trunk.example", "pw", algorithm)
    assert creds["response"] == digest.expected_response(
        key, "INVITE", "sip:+33123456789@trunk.example", nonce, "00000002", creds["cnonce"], "auth", algorithm)


def test_rfc2069_form_without_qop() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n"')
    creds = digest.parse_authorization(authorization(challenge, "INVITE", "sip:x@h", "u", "p"))
    assert "qop" not in creds and "cnonce" not in creds
    assert creds["response"] == digest.expected_response(digest.ha1("u", "r", "p"), "INVITE", "sip:x@h", "n",
                                                         None, None, None)


def test_pick_challenge_by_realm_and_algorithm() -> None:
    values = ['Basic realm="x"', 'Digest realm="other", nonce="1"', 'Digest realm="trunk", nonce="2"',
              'Digest realm="trunk", nonce="3", algorithm=SHA-256, qop="auth"']
    assert pick_challenge(values, "trunk").nonce == "3"  # SHA-256 preferred
    assert pick_challenge(values[:3], "trunk").nonce == "2"
    assert pick_challenge(values[:2], "trunk") is None
    assert pick_challenge(values[:2]).realm == "other"
    assert pick_challenge(['Digest realm="r", nonce="n", qop="auth-int"']) is None
    assert pick_challenge(['Digest realm="r", nonce="n", algorithm=MD5-sess']) is None
    assert parse_challenge('Digest realm="r", nonce="n", stale=TRUE').stale
