"""Who the callee is told is calling: the caller identity a B-leg carries (RFC 3325).

A phone shows P-Asserted-Identity (and Remote-Party-ID, on older phones) before From, so these
headers are believed only when someone we trust put them there:

- from a trusted peer (``[auth] trusted_sources``: a trunk, an SBC; or ``[[gateways]]``: our trust
  domain, as registrar/peers.py decides it): the trust-domain headers in ``[calls] header_allowlist``
  pass unchanged;
- from one of our users, authenticated by digest: none of the caller's headers pass; the B-leg
  carries ``P-Asserted-Identity: <sip:user@domain>`` that we build from the authenticated
  identity, and its From is that URI too, without the caller's display name: digest proves the
  user, not the free text a phone puts in front of it (``"Your Bank" <sip:alice@...>``). A
  display name the operator vouches for would come from the users database (not stored today);
- from anyone else (another domain, unauthenticated): no trust-domain header passes, and From is
  copied as it came (it names the caller's own domain).

Trust-domain headers: P-Asserted-Identity, P-Preferred-Identity (a UA's request to its proxy,
never forwarded: RFC 3325 §9.2), Remote-Party-ID, Identity / Identity-Info (RFC 8224 / 4474: a
signature over From that our B-leg rewrites), and P-Charging-Vector /
P-Charging-Function-Addresses (RFC 7315: not identity, but meaningful only inside a trust domain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# at run time, not only for the type checker: compiled (mypyc), the dataclass below reads its field
# types when the module loads (b2bua/relay.py crashed on a name imported under TYPE_CHECKING)
from libon_tsilo.registrar.peers import Gateway
from libon_tsilo.sip.headers import NameAddr, canonical_key
from libon_tsilo.sip.uri import URI

__all__ = ["TRUST_DOMAIN_KEYS", "UNTRUSTED", "CallerTrust", "b_leg_caller", "b_leg_identity_headers"]

TRUST_DOMAIN_KEYS = frozenset(canonical_key(name) for name in (
    "P-Asserted-Identity", "P-Preferred-Identity", "Remote-Party-ID", "Identity", "Identity-Info",
    "P-Charging-Vector", "P-Charging-Function-Addresses",
))
_NEVER_FORWARDED = canonical_key("P-Preferred-Identity")


@dataclass(frozen=True)
class CallerTrust:
    """What the authorize hook established about a caller (truthy: the call may go on)."""

    trusted: bool = False  # from a trusted peer (registrar/peers.py): its identity headers are believed
    identity: str | None = None  # the URI the caller authenticated as (sip:user@our domain)
    user: str | None = None  # the users-database name digest proved (set with `identity`)
    gateway: Gateway | None = None  # from one of [[gateways]]: it may call our users' numbers


UNTRUSTED = CallerTrust()


def b_leg_identity_headers(
    invite: Any, trust: CallerTrust, allowlist: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """The trust-domain headers every B-leg of this call carries, computed once per call."""
    if trust.identity is not None:
        return (("P-Asserted-Identity", f"<{trust.identity}>"),)
    if not trust.trusted:
        return ()
    out: list[tuple[str, str]] = []
    for name in allowlist:
        key = canonical_key(name)
        if key in TRUST_DOMAIN_KEYS and key != _NEVER_FORWARDED:
            out.extend((name, value) for value in invite.values(key))
    return tuple(out)


def b_leg_caller(caller: NameAddr, trust: CallerTrust) -> tuple[URI, str | None]:
    """The URI and display name of a B-leg's From."""
    if trust.identity is not None:
        return URI.parse(trust.identity), None
    return caller.uri.copy(), caller.display
