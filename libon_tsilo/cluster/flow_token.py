"""RFC 5626 §5.2 flow tokens: the user part of our Path and Record-Route URIs, naming a device's flow.

The node that accepts a REGISTER puts itself first in the binding's Path with a token naming the
flow (the connection, or for UDP the source address) the REGISTER came over; the node that forks a
call sends the INVITE to that Path entry, and the token tells this node which flow to relay it on.

A token is ``base64url(MAC | payload)``: the payload is the flow id and the device's address (so a
UDP flow that idled out of the table is still reachable at its address), the MAC an HMAC-SHA256
(truncated to 96 bits) over the payload and this node's internal address, keyed with the cluster
secret. Only this node can mint a token that it accepts: a forged or altered token, or one minted by
another node, reads as None. Tokens are opaque to every other node, which only copies them.
base64url uses only URI "unreserved" characters, so the token needs no escaping in a user part.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

__all__ = ["FlowRef", "FlowTokens"]

_MAC_BYTES = 12
_SEP = "\x1f"  # cannot occur in a flow id, a transport name, an address or a port
_MAX_TOKEN = 512  # a flow id with two IPv6 addresses is ~110 bytes; anything much longer is not ours


@dataclass(frozen=True, slots=True)
class FlowRef:
    """What a token names: the flow, and the address to reach the device at over UDP."""

    flow_id: str
    transport: str  # "udp" | "tcp" | "tls"
    host: str
    port: int


class FlowTokens:
    """Mints and reads the flow tokens of one node (``node``: its internal address, as text)."""

    def __init__(self, secret: bytes, node: str) -> None:
        if not secret:
            raise ValueError("FlowTokens: the secret must not be empty")
        self._key = secret
        self._node = node.encode()

    def _mac(self, payload: bytes) -> bytes:
        # hmac.digest: one call into OpenSSL, a few times cheaper than an hmac.new() object per token
        return hmac.digest(self._key, self._node + b"\0" + payload, "sha256")[:_MAC_BYTES]

    def mint(self, ref: FlowRef) -> str:
        payload = _SEP.join((ref.flow_id, ref.transport, ref.host, str(ref.port))).encode()
        return base64.urlsafe_b64encode(self._mac(payload) + payload).rstrip(b"=").decode("ascii")

    def read(self, token: str | None) -> FlowRef | None:
        """The flow a token of ours names; None for anything else (never raises)."""
        raw = _raw(token)
        if raw is None:
            return None
        mac, payload = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        return _ref(payload)  # None when a MAC checks over a payload we did not write: a bug, not input

    @staticmethod
    def peek(token: str | None) -> FlowRef | None:
        """What a token says it names, without checking who minted it (its MAC): a hint, never a
        route (cluster/node.py pins the UDP address a sibling's entry names); None when malformed."""
        raw = _raw(token)
        return None if raw is None else _ref(raw[_MAC_BYTES:])


def _raw(token: str | None) -> bytes | None:
    """A token's bytes (MAC, then payload); None when empty, too long or not base64url."""
    if not token or len(token) > _MAX_TOKEN:
        return None
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None


def _ref(payload: bytes) -> FlowRef | None:
    try:
        flow_id, transport, host, port = payload.decode().split(_SEP)
        return FlowRef(flow_id, transport, host, int(port))
    except ValueError:  # UnicodeDecodeError is one
        return None
