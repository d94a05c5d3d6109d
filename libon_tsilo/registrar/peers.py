"""Who a request comes from, by its source address: a gateway, another trusted peer, or anyone.

This is the one trust decision of the server (issue 13, "calls in from gateways"):

- ``[auth] trusted_sources`` (an SBC, a trunk, a proxy in front of us): trusted peers. Their
  requests need no digest, and their From / P-Asserted-Identity are believed
  (b2bua/identity.py); they may call local users by name, as before gateways existed.
- ``[[gateways]]`` (the phone network's side): trusted peers too, with a name (metrics, logs), and
  the only sources besides our authenticated users whose calls may target a phone number
  (``sip:+33123456789@...;user=phone``, ``tel:+33...``): the number is mapped to the user who owns
  it (routing/numbers.py). A gateway's national numbers may be rewritten first (``strip_prefix``,
  ``add_prefix``) before the dial plan turns them into E.164.
- anyone else: not a peer; the digest policy decides (a 407 for our domains), and no identity
  header of theirs is believed.

A source in both lists is the gateway (the more specific answer). Addresses are compared as
``sip/limits.py: SourceFilter`` does (an IPv4 peer seen as ``::ffff:a.b.c.d`` matches IPv4 networks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from libon_tsilo.sip.limits import SourceFilter

__all__ = ["Gateway", "Peer", "TrustedPeers", "TRUSTED_SOURCE"]


@dataclass(frozen=True)
class Gateway:
    name: str
    sources: tuple[str, ...]
    strip_prefix: str = ""  # taken off a number that starts with it ("" = nothing)
    add_prefix: str = ""  # then put in front of it, e.g. a gateway's "0..." national numbers

    def rewrite(self, number: str) -> str:
        """The number as the dial plan should read it."""
        if self.strip_prefix and number.startswith(self.strip_prefix):
            number = number[len(self.strip_prefix):]
        return self.add_prefix + number


@dataclass(frozen=True)
class Peer:
    """A trusted source: ``gateway`` is set when it is one of ``[[gateways]]``."""

    name: str
    gateway: Gateway | None = None


TRUSTED_SOURCE = Peer("trusted_sources")


class TrustedPeers:
    def __init__(self, trusted_sources: Iterable[str] = (), gateways: Iterable[Gateway] = ()) -> None:
        self.gateways = tuple(gateways)
        self._gateway_filters = [(SourceFilter(g.sources), Peer(g.name, g)) for g in self.gateways]
        self._trusted = SourceFilter(trusted_sources)

    def peer_of(self, host: str | None) -> Peer | None:
        """The trusted peer at ``host`` (an IP address as the transport saw it), or None."""
        if not host:
            return None
        for sources, peer in self._gateway_filters:
            if host in sources:
                return peer
        return TRUSTED_SOURCE if host in self._trusted else None

    def networks(self) -> list[str]:
        """Every trusted network (for the limits that exempt trusted peers)."""
        return [str(n) for n in self._trusted.networks] + [s for g in self.gateways for s in g.sources]
