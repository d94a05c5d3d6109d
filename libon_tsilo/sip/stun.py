"""STUN keep-alives on the SIP UDP port (RFC 5626 §4.4.2, §8.4; RFC 5389 wire format).

An outbound device behind a NAT keeps its UDP flow open by sending a STUN Binding Request to our
SIP port every 25-29 s, and learns from the answer whether its public address changed (then it
re-registers). SIP and STUN share the port: a SIP message starts with a letter, a STUN message with
a byte whose two top bits are zero (0x00 or 0x01 for every Binding message, RFC 7983), so the
transport's datagram handler looks at the first byte only.

We answer a Binding Request with a Binding Success Response carrying XOR-MAPPED-ADDRESS and nothing
else (no authentication: the answer only tells the sender its own address, and at 32 bytes for a
20-byte request it amplifies a spoofed source less than a SIP 400 would). Anything else that starts
like STUN (indications, responses, a bad length or cookie) is dropped without an answer.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.logger import Logger

if TYPE_CHECKING:
    from libon_tsilo.sip.flow import Flow

__all__ = ["answer", "binding_response", "xor_mapped_address", "MAGIC_COOKIE"]

log = Logger()

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
_HEADER = 20
_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101
_XOR_MAPPED_ADDRESS = 0x0020
_MAX_REQUEST = 548  # RFC 5389 §7.1: what a request over UDP may be without path MTU knowledge


def answer(data: bytes, remote: tuple[str, int], flow_for: Callable[[], Flow]) -> bool:
    """Answer a Binding Request from ``remote`` on the flow ``flow_for()`` finds or makes (which
    refreshes its idle timer); True when an answer went out. Only a well-formed request gets a
    flow: anything a spoofer sends that merely starts like STUN must not fill the flow table."""
    reply = binding_response(data, remote)
    if reply is None:
        return False
    flow = flow_for()
    try:
        flow.send(reply)
    except Exception as e:  # the socket's own errors (TransportError...): one keep-alive lost
        log.warn("cannot answer a STUN request on {flow_id}: {err}", flow_id=flow.id, err=e)
        return False
    return True


def binding_response(data: bytes, source: tuple[str, int]) -> bytes | None:
    """The Binding Success Response to ``data`` received from ``source`` (host, port), or None when
    ``data`` is not a well-formed Binding Request (RFC 5389 §6, §7.3)."""
    if not _HEADER <= len(data) <= _MAX_REQUEST:
        return None
    msg_type, length = struct.unpack_from("!HH", data)
    if msg_type != _BINDING_REQUEST or data[4:8] != _COOKIE_BYTES:
        return None
    if length != len(data) - _HEADER or length % 4:
        return None
    transaction_id = data[8:20]
    try:
        attribute = xor_mapped_address(source, transaction_id)
    except ValueError:
        return None
    return struct.pack("!HH", _BINDING_SUCCESS, len(attribute)) + _COOKIE_BYTES + transaction_id + attribute


def xor_mapped_address(source: tuple[str, int], transaction_id: bytes) -> bytes:
    """The XOR-MAPPED-ADDRESS attribute (RFC 5389 §15.2) for ``source``, header included."""
    host, port = source
    address = ipaddress.ip_address(host.strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    xport = port ^ (MAGIC_COOKIE >> 16)
    raw = address.packed
    if address.version == 4:
        family, key = 0x01, _COOKIE_BYTES
    else:
        family, key = 0x02, _COOKIE_BYTES + transaction_id
    xaddr = bytes(a ^ k for a, k in zip(raw, key))
    value = struct.pack("!BBH", 0, family, xport) + xaddr
    return struct.pack("!HH", _XOR_MAPPED_ADDRESS, len(value)) + value
