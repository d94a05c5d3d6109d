"""A trunk: where calls out to the phone network go, and how we present ourselves to it.

Targets are tried in order: the next one when a target answers 503 or 408, cannot be reached,
or times out, as long as the caller has not heard a ringing tone from the failed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.uri import URI

__all__ = ["Trunk", "TrunkTarget", "parse_target"]

_DEFAULT_PORT = {"udp": 5060, "tcp": 5060, "tls": 5061}


@dataclass(frozen=True)
class TrunkTarget:
    transport: str  # udp | tcp | tls
    host: str  # as a socket call takes it (no IPv6 brackets)
    port: int
    uri_host: str  # as a URI writes it (host[:port], brackets kept)

    def request_uri(self, e164: str, tel: bool = False) -> str:
        """`sip:+33123456789@host:port;user=phone` (RFC 3261 §19.1.6: the user part is a number), or
        `tel:+33123456789` for a trunk that asks for tel: URIs (the target is then only the next hop)."""
        return f"tel:{e164}" if tel else f"sip:{e164}@{self.uri_host};user=phone"


def parse_target(text: str) -> TrunkTarget:
    """ "sip:host[:port][;transport=udp|tcp|tls]" (sips: means TLS); ValueError names the problem."""
    try:
        uri = URI.parse(text)
    except ParseError as exc:
        raise ValueError(f"not a SIP URI ({exc})") from None
    if uri.scheme not in ("sip", "sips") or uri.user or not uri.host:
        raise ValueError('expected "sip:host[:port];transport=udp|tcp|tls"')
    transport = uri.transport or ("tls" if uri.scheme == "sips" else "udp")
    if transport not in _DEFAULT_PORT:
        raise ValueError(f'unknown transport "{transport}"')
    port = uri.port or _DEFAULT_PORT[transport]
    return TrunkTarget(transport, uri.host_bare, port, f"{uri.host}:{port}")


@dataclass(frozen=True)
class Trunk:
    name: str
    targets: tuple[TrunkTarget, ...]
    username: str = ""
    password: str = ""
    realm: str = ""  # "" = answer a challenge from any realm
    from_domain: str = ""  # "" = the target's host
    headers: tuple[tuple[str, str], ...] = ()
    pai: bool = False
    max_calls: int = 0  # concurrent calls; 0 = no limit
    failover_timeout: float = 4.0  # seconds a target may stay silent before the next is tried; 0 = Timer B
    tel_uri: bool = False  # the R-URI and To are tel:+E164 rather than sip:+E164@target;user=phone

    @classmethod
    def from_config(cls, t: Any) -> Trunk:
        """From ops' TrunkConfig (a [[trunks]] table, already checked)."""
        split = (h.partition(":") for h in t.headers)
        headers = tuple((name.strip(), value.strip()) for name, _, value in split)
        return cls(t.name, tuple(parse_target(x) for x in t.targets), t.username, t.password, t.realm,
                   t.from_domain, headers, t.pai, t.max_calls, float(t.failover_timeout), t.tel_uri)

    @property
    def has_credentials(self) -> bool:
        return bool(self.username)
