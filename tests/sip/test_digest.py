"""Digest math against the published RFC 2617 / RFC 7616 examples, plus nonce handling."""

from __future__ import annotations

import pytest

from libon_tsilo.sip import digest


def test_rfc2617_md5_example() -> None:
    h1 = digest.ha1("Mufasa", "testrealm@host.com", "Circle Of Life", "MD5")
    resp = digest.expected_response(
        h1, "GET", "/dir/index.html", "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        "00000001", "0a4f113b", "auth", "MD5",
    )
    assert resp == "6629fae49393a05397450978507c4ef1"


@pytest.mark.parametrize(
    "algorithm,expected",
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_examples(algorithm: str, expected: str) -> None:
    h1 = digest.ha1("Mufasa", "http-auth@example.org", "Circle of Life", algorithm)
    resp = digest.expected_response(
        h1,
        "GET",
        "/dir/index.html",
        "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        "00000001",
        "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        "auth",
        algorithm,
    )
    assert resp == expected


def test_algorithm_names() -> None:
    assert digest.normalize_algorithm(None) == "MD5"
    assert digest.normalize_algorithm("sha-256") == "SHA-256"
    with pytest.raises(digest.DigestError):
        digest.normalize_algorithm("SHA-512-256")


def test_nonce_ok_stale_bad() -> None:
    n = digest.make_nonce("s3cret", 1000.0)
    assert digest.check_nonce("s3cret", n, 1000.0, 300) == "ok"
    assert digest.check_nonce("s3cret", n, 1300.0, 300) == "ok"
    assert digest.check_nonce("s3cret", n, 1301.0, 300) == "stale"
    assert digest.check_nonce("other", n, 1000.0, 300) == "bad"
    ts, epoch, salt, mac = n.split(".")
    forged = f"{int(ts, 16) + 100:x}.{epoch}.{salt}.{mac}"
    assert digest.check_nonce("s3cret", forged, 1100.0, 300) == "bad"
    assert digest.check_nonce("s3cret", "garbage", 1000.0, 300) == "bad"
    assert digest.check_nonce("s3cret", "zz.yy.xx", 1000.0, 300) == "bad"
    assert digest.check_nonce("s3cret", "zz.yy.xx.ww", 1000.0, 300) == "bad"
    # issued far in the future: forged or broken clock
    future = digest.make_nonce("s3cret", 5000.0)
    assert digest.check_nonce("s3cret", future, 1000.0, 300) == "bad"


def test_nonce_of_another_epoch_is_stale() -> None:
    """Issue 11 item 6: a nonce from before a restart (or from another node) is ours but stale."""
    n = digest.make_nonce("s3cret", 1000.0, epoch="boot1")
    assert digest.check_nonce("s3cret", n, 1000.0, 300, epoch="boot1") == "ok"
    assert digest.check_nonce("s3cret", n, 1000.0, 300, epoch="boot2") == "stale"
    # the epoch is under the MAC: rewriting it makes the nonce a forgery
    ts, _, salt, mac = n.split(".")
    assert digest.check_nonce("s3cret", f"{ts}.boot2.{salt}.{mac}", 1000.0, 300, epoch="boot2") == "bad"


@pytest.mark.parametrize("epoch", ["", "a.b", 'a"b', "x" * 33])
def test_bad_epoch_refused(epoch: str) -> None:
    with pytest.raises(ValueError):
        digest.make_nonce("s3cret", 1000.0, epoch=epoch)


def test_nonces_are_unique() -> None:
    assert digest.make_nonce("k", 1.0) != digest.make_nonce("k", 1.0)


def test_challenge_header() -> None:
    h = digest.challenge_header("example.com", "abc", "SHA-256", stale=True)
    assert h == 'Digest realm="example.com", nonce="abc", algorithm=SHA-256, qop="auth", stale=true'
    assert "stale" not in digest.challenge_header("r", "n")


def test_parse_authorization() -> None:
    v = (
        'Digest username="alice", realm="ex\\"ample", nonce="n1", uri="sip:example.com",'
        " response=\"abc\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"xyz, 1\""
    )
    p = digest.parse_authorization(v)
    assert p == {
        "username": "alice",
        "realm": 'ex"ample',
        "nonce": "n1",
        "uri": "sip:example.com",
        "response": "abc",
        "algorithm": "SHA-256",
        "qop": "auth",
        "nc": "00000001",
        "cnonce": "xyz, 1",
    }


@pytest.mark.parametrize(
    "value",
    [
        "NoOneKnowsThisScheme opaque-data=here",
        "Digest",
        'Digest username="unterminated',
        "Digest username=a username=b",
        'Digest username="a", username="b"',
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
    ],
)
def test_parse_authorization_rejects(value: str) -> None:
    with pytest.raises(digest.DigestError):
        digest.parse_authorization(value)
