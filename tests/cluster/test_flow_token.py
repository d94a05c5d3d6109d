"""cluster/flow_token.py: a node reads back only the tokens it minted, unaltered."""

from __future__ import annotations

import base64

from libon_tsilo.cluster.flow_token import FlowRef, FlowTokens

REF = FlowRef("tcp:10.0.0.1:5060-192.0.2.7:40000#12", "tcp", "192.0.2.7", 40000)


def test_a_token_names_its_flow_and_is_uri_safe():
    tokens = FlowTokens(b"k", "udp:10.0.0.1:5070")
    token = tokens.mint(REF)
    assert tokens.read(token) == REF
    assert all(c.isalnum() or c in "-_" for c in token)


def test_an_altered_forged_or_foreign_token_reads_as_none():
    tokens = FlowTokens(b"k", "udp:10.0.0.1:5070")
    token = tokens.mint(REF)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-1] ^= 1  # another port
    altered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert tokens.read(altered) is None
    assert tokens.read(FlowTokens(b"other key", "udp:10.0.0.1:5070").mint(REF)) is None  # forged
    assert tokens.read(FlowTokens(b"k", "udp:10.0.0.2:5070").mint(REF)) is None  # another node's
    for junk in ("", "x", "!!!!", "A" * 600, None):
        assert tokens.read(junk) is None
