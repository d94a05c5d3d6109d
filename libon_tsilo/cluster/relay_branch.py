"""Via branches of the stateless relay (RFC 3261 §16.11): the same for every retransmission, and
proof that a response's next hop is one we relayed a request from.

A stateless proxy cannot draw its branch at random: a retransmitted request must leave with the
branch its first copy had, and a CANCEL or the ACK of a non-2xx with the branch its INVITE had, so
that the next hop matches them to the INVITE's transaction. §16.11 recommends a hash of the received
branch (the previous hop's, unique when it has the magic cookie). Ours is a keyed hash (BLAKE2,
the cluster secret and this node's internal address) of that branch and of every Via field a
response is routed by (transport, sent-by, received, rport, maddr). When a response comes back, its
second Via must give the same hash as our branch on top of it: nobody can make this node send a
"response" to an address of their choosing by writing it under a branch of ours, which a
stateless proxy, with no transaction to match the response to, would otherwise do.
"""

from __future__ import annotations

import hashlib
import hmac

from libon_tsilo.sip.headers import Via

__all__ = ["PREFIX", "RelayBranches"]

# the magic cookie, then two letters new_branch() (hex only) never writes: our responses are told
# apart from the transaction layer's by their first nine characters
PREFIX = "z9hG4bKsl"
_MAC_BYTES = 12
_COOKIE = "z9hG4bK"


class RelayBranches:
    """Branches for requests this node relays statelessly (see the module doc)."""

    def __init__(self, secret: bytes, node: str) -> None:
        key = hashlib.blake2b(secret + b"\0" + node.encode(), digest_size=32).digest()
        # the keyed state, its key block compressed once: a copy per MAC is the same hash as
        # blake2b(data, key=key) without that block nor the keyword arguments (~1/3 of its cost)
        self._keyed = hashlib.blake2b(key=key, digest_size=_MAC_BYTES)

    def _mac(self, via: Via, branch: str) -> str:
        params = via.params
        data = "\0".join((branch, via.transport, via.host, str(via.port), params.get("received") or "",
                          params.get("rport") or "", params.get("maddr") or ""))
        mac = self._keyed.copy()
        mac.update(data.encode("utf-8", "surrogateescape"))
        return str(mac.hexdigest())

    def for_request(self, via: Via) -> str | None:
        """Our branch for a request whose top Via (the previous hop's, as received) is ``via``; None
        when its branch has no magic cookie (RFC 2543: nothing unique to hash, the stateful relay
        takes it)."""
        branch = via.params.get("branch")
        if branch is None or len(branch) <= len(_COOKIE) or not branch.startswith(_COOKIE):
            return None
        return PREFIX + self._mac(via, branch)

    def verify(self, ours: str, next_via: Via) -> bool:
        """Is ``ours`` (a response's top branch) the one we gave a request whose top Via was
        ``next_via`` (the response's second Via)?"""
        branch = next_via.params.get("branch")
        if branch is None:
            return False
        return hmac.compare_digest(ours, PREFIX + self._mac(next_via, branch))
