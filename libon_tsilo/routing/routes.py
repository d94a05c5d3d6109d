"""`[[routes]]`: an ordered table, first match wins. A route matches an E.164 number by prefix
("" matches any number) or a SIP domain that is not ours, and names the trunk calls go to."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from libon_tsilo.routing.trunks import Trunk
from libon_tsilo.sip.hostnames import canonical_host

__all__ = ["Route", "RouteTable"]


@dataclass(frozen=True)
class Route:
    trunk: str
    prefix: str = ""  # E.164 prefix ("+33"), "" = any number; unused when `domain` is set
    domain: str = ""  # a foreign SIP domain; "" = a number route


class RouteTable:
    def __init__(self, routes: Iterable[Route], trunks: Iterable[Trunk]) -> None:
        self.trunks = {t.name: t for t in trunks}
        self.routes = tuple(routes)
        for route in self.routes:  # the config checked this; a bug otherwise
            if route.trunk not in self.trunks:
                raise ValueError(f"route to unknown trunk {route.trunk!r}")
        self._domains = tuple((canonical_host(r.domain), r) for r in self.routes if r.domain)

    def for_number(self, e164: str) -> Trunk | None:
        for route in self.routes:
            if not route.domain and e164.startswith(route.prefix):
                return self.trunks[route.trunk]
        return None

    def for_domain(self, host: str) -> Trunk | None:
        wanted = canonical_host(host)
        for domain, route in self._domains:
            if domain == wanted:
                return self.trunks[route.trunk]
        return None

    def __bool__(self) -> bool:
        return bool(self.routes)
