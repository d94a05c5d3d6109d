"""STUN Binding on the SIP UDP port (RFC 5389), checked against the RFC 5769 test vectors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from libon_tsilo.sip.stun import answer, binding_response

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")  # RFC 5769 §2's transaction ID

# RFC 5769 §2.1 sample request: SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY and
# FINGERPRINT attributes, which a keep-alive server reads past
SAMPLE_REQUEST = bytes.fromhex(
    "00010058" "2112a442" "b7e7a701bc34d686fa87dfae"
    "80220010" "5354554e207465737420636c69656e74"
    "00240004" "6e0001ff"
    "80290008" "932ff9b151263b36"
    "00060009" "6576746a3a68367659202020"
    "00080014" "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004" "e57a3bcf"
)
# RFC 5769 §2.2 and §2.3: the XOR-MAPPED-ADDRESS attributes of the sample responses
XOR_V4 = bytes.fromhex("00200008" "0001a147" "e112a643")  # 192.0.2.1 port 32853
XOR_V6 = bytes.fromhex("00200014" "0002a147" "0113a9faa5d3f179bc25f4b5bed2b9d9")  # 2001:db8:1234:5678:11:2233:4455:6677


def test_sample_request_gets_a_binding_success_with_xor_mapped_ipv4() -> None:
    reply = binding_response(SAMPLE_REQUEST, ("192.0.2.1", 32853))
    assert reply == bytes.fromhex("0101000c" "2112a442") + TID + XOR_V4


def test_xor_mapped_ipv6_and_ipv4_mapped_peer() -> None:
    reply = binding_response(SAMPLE_REQUEST, ("2001:db8:1234:5678:11:2233:4455:6677", 32853))
    assert reply == bytes.fromhex("01010018" "2112a442") + TID + XOR_V6
    # a dual-stack socket sees an IPv4 peer as ::ffff:a.b.c.d: its NAT mapping is the IPv4 address
    assert binding_response(SAMPLE_REQUEST, ("::ffff:192.0.2.1", 32853)) == bytes.fromhex("0101000c2112a442") + TID + XOR_V4


def test_minimal_keepalive_request() -> None:
    request = bytes.fromhex("00010000" "2112a442") + TID
    assert binding_response(request, ("192.0.2.1", 32853)) == bytes.fromhex("0101000c2112a442") + TID + XOR_V4


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes.fromhex("00010000" "2112a442") + TID[:11],  # short header
        bytes.fromhex("00010000" "2112a443") + TID,  # wrong magic cookie (RFC 3489 style)
        bytes.fromhex("00110000" "2112a442") + TID,  # a Binding Indication: no answer (RFC 5389 §7.3.2)
        bytes.fromhex("01010000" "2112a442") + TID,  # a response
        bytes.fromhex("00010004" "2112a442") + TID,  # length beyond the datagram
        bytes.fromhex("00010002" "2112a442") + TID + b"\x00\x00",  # length not a multiple of 4
        bytes.fromhex("00010000" "2112a442") + TID + b"\x00" * 4,  # trailing bytes
        bytes.fromhex("0001" "0230" "2112a442") + TID + b"\x00" * 0x230,  # larger than a UDP request may be
    ],
)
def test_anything_else_is_dropped(data: bytes) -> None:
    assert binding_response(data, ("192.0.2.1", 32853)) is None


def test_answer_sends_on_the_flow_and_survives_a_send_error() -> None:
    sent: list[bytes] = []
    flow = SimpleNamespace(id="udp:1", key=SimpleNamespace(remote=("192.0.2.1", 32853)), send=sent.append)
    remote = flow.key.remote
    assert answer(SAMPLE_REQUEST, remote, lambda: flow)
    assert sent == [bytes.fromhex("0101000c2112a442") + TID + XOR_V4]

    def broken(data: bytes) -> None:
        raise OSError("network unreachable")

    flow.send = broken
    assert not answer(SAMPLE_REQUEST, remote, lambda: flow)


def test_no_flow_is_made_for_what_only_starts_like_stun() -> None:
    def no_flow() -> None:
        raise AssertionError("a flow was asked for")

    assert not answer(b"\x00\x01junk", ("192.0.2.1", 32853), no_flow)
