"""RFC 8599 push parameters of a REGISTER Contact: parsing, the Feature-Caps we answer, §5.3 matching.

``pn-provider``, ``pn-prid`` and ``pn-param`` are Contact *URI* parameters (they travel in the
Request-URI of a later INVITE); ``+sip.pnsreg`` is a Contact *header* parameter (a media feature
tag). Some UAs put the pn-* ones on the header instead; we accept both, the URI winning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from libon_tsilo.sip.headers import NameAddr
from libon_tsilo.sip.uri import unescape

__all__ = ["PushParams", "parse_push_params", "feature_caps", "pn_triple_match", "PN_URI_PARAMS"]

PN_URI_PARAMS = ("pn-provider", "pn-prid", "pn-param")


@dataclass(frozen=True)
class PushParams:
    provider: str | None  # None: absent; "": present without a value (query for every PNS)
    prid: str | None
    param: str | None
    pnsreg: bool = False

    @property
    def present(self) -> bool:
        return self.provider is not None or self.prid is not None or self.param is not None

    @property
    def is_query(self) -> bool:
        """RFC 8599 §4.1.1 capability query: pn-provider without pn-prid."""
        return self.provider is not None and not self.prid

    @property
    def complete(self) -> bool:
        return bool(self.provider) and bool(self.prid)


NO_PUSH = PushParams(None, None, None)


def _value(contact: NameAddr, name: str) -> str | None:
    if name in contact.uri.params:
        raw = contact.uri.params[name]
    elif name in contact.params:
        raw = contact.params[name]
        if raw is not None and len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
    else:
        return None
    return "" if raw is None else unescape(raw)


def parse_push_params(contact: NameAddr) -> PushParams:
    """The push parameters of one Contact (every field None when it has none)."""
    provider = _value(contact, "pn-provider")
    prid = _value(contact, "pn-prid")
    param = _value(contact, "pn-param")
    pnsreg = "+sip.pnsreg" in contact.params
    if provider is None and prid is None and param is None and not pnsreg:
        return NO_PUSH  # most Contacts: one shared (frozen) value instead of a new one each
    return PushParams(
        provider=provider.lower() if provider is not None else None, prid=prid, param=param, pnsreg=pnsreg
    )


def feature_caps(provider: str, pnsreg_interval: int | None = None) -> str:
    """A Feature-Caps value (RFC 6809 / RFC 8599 §12): one header per PNS."""
    value = f'*;+sip.pns="{provider}"'
    if pnsreg_interval is not None:
        value += f';+sip.pnsreg="{pnsreg_interval}"'
    return value


class _HasPn(Protocol):
    pn_provider: str | None
    pn_prid: str | None
    pn_param: str | None


def pn_triple_match(a: _HasPn, b: _HasPn) -> bool:
    """RFC 8599 §5.3: provider, prid and param must all match; a pn param present on one side only
    means no match. Two sides without push parameters do not "match" by this rule."""
    if not (a.pn_provider and a.pn_prid and b.pn_provider and b.pn_prid):
        return False
    return (
        a.pn_provider.lower() == b.pn_provider.lower()
        and a.pn_prid == b.pn_prid
        and (a.pn_param or None) == (b.pn_param or None)
    )
