"""What the fuzzer found (tests/sip/fuzzing.py), each pinned by a plain test."""

from __future__ import annotations

from libon_tsilo.sip import digest
from libon_tsilo.sip.message import Response, extract_for_error_response, make_response, parse_message
from libon_tsilo.sip.transaction import build_ack
from tests.sip.fakes import Env, FakeTarget
from tests.sip.test_transaction_client import PEER, Collector, _request


def test_ack_for_a_response_whose_to_is_not_utf8() -> None:
    # a device's 486 with a To display name in Latin-1: the ACK copies it byte for byte
    req = _request("INVITE")
    resp = make_response(req, 486, to_tag="r1").to_bytes()
    resp = resp.replace(b"To: <sip:bob@example.com>", b"To: Jos\xe9 <sip:bob@example.com>")
    parsed = parse_message(resp)
    assert isinstance(parsed, Response)
    ack = build_ack(req, parsed)
    assert b"To: Jos\xe9 <sip:bob@example.com>;tag=r1" in ack.to_bytes()


def test_invite_client_transaction_acks_such_a_response_without_a_traceback() -> None:
    env = Env()
    ctx = env.layer.send_request(_request("INVITE"), FakeTarget("udp"), None, Collector())
    resp = make_response(ctx.request, 486, to_tag="r1").to_bytes().replace(b"To: <", b"To: Jos\xe9 <")
    env.feed(resp, PEER)
    assert env.transport.methods() == ["INVITE", "ACK"]


def test_a_400_never_copies_a_line_whose_header_name_is_not_a_token() -> None:
    data = (b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nT\x1e: <sip:u@example.com>\r\n"
            b"From: <sip:u@example.com>;tag=1\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n")
    req = extract_for_error_response(data)
    assert req is not None and not req.has_header("To")
    parse_message(make_response(req, 400).to_bytes())  # our 400 is well-formed


def test_a_nonce_that_is_not_ascii_is_foreign_not_a_crash() -> None:
    # found with [auth] on: the nonce's MAC encoded its text as ASCII and raised UnicodeEncodeError
    good = digest.make_nonce("s", 1000.0, salt="00ff00ff00ff")
    assert digest.check_nonce("s", good, 1000.0, 300) == "ok"
    for bad in (good.replace("00ff", "00\u00e9", 1), good.replace("00ff", "00\uff15", 1), "\uff11.a.b"):
        assert digest.check_nonce("s", bad, 1000.0, 300) == "bad"
