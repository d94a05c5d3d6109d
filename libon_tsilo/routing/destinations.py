"""What a request URI is for: a local user (as today), a local user's phone number, or a number or
foreign domain that a trunk serves.

A request URI is "for a phone number" when it is tel:, or a SIP URI with user=phone or whose
user part is a number, whatever domain it names: an app dials sip:+33123456789@<our domain> as
well as tel:+33123456789. A number is first looked up in the users database: a user's own number
is a local call (parked and pushed as any other), never a call out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libon_tsilo.dialplan import DialPlan, number_of
from libon_tsilo.routing.numbers import NumberOwners, e164_of, owner_of
from libon_tsilo.routing.routes import RouteTable
from libon_tsilo.routing.trunks import Trunk
from libon_tsilo.sip.uri import URI

__all__ = ["Destination", "Destinations"]

LOCAL_USER = "user"  # a local user's number: call that user
OUT = "out"  # through `trunk`
NO_ROUTE = "no_route"  # a number nobody owns and no route serves


@dataclass(frozen=True)
class Destination:
    kind: str
    number: str | None = None  # E.164, when the URI names a number
    user: str | None = None  # LOCAL_USER: the owner's user name
    trunk: Trunk | None = None  # OUT
    domain: str | None = None  # OUT by a domain route: the foreign domain

    @property
    def callee(self) -> str:
        return self.number or self.domain or "-"


class Destinations:
    def __init__(self, plan: DialPlan, routes: RouteTable, users: NumberOwners | None = None,
                 is_local: Callable[[URI], bool] | None = None,
                 user_exists: Callable[[str], bool] | None = None,
                 registered: Callable[[URI], bool] | None = None) -> None:
        """`user_exists(name)`: the users database; `registered(uri)`: the URI of one of our domains
        has a binding (without a users database, a device may register as sip:+33...@our domain)."""
        self.plan = plan
        self.routes = routes
        self.users = users
        self.is_local = is_local or (lambda uri: True)
        self.user_exists = user_exists
        self.registered = registered

    def classify(self, uri: URI) -> Destination | None:
        """None: the URI is not for a number nor a routed domain, and takes the local path as today."""
        local = False
        if uri.scheme != "tel":
            if uri.scheme not in ("sip", "sips"):
                return None
            local = self.is_local(uri)
            if local and number_of(uri) is None:
                return None  # a user name: the common case, decided without the users database
            if local and uri.user and (self._is_user(uri.user) or (self.registered and self.registered(uri))):
                return None  # a user name that happens to be digits is still that user
        number = e164_of(uri, self.plan)
        if number is None:
            if local or uri.scheme == "tel":
                return None  # tel: without a number we can read: 404/416 as today
            trunk = self.routes.for_domain(uri.host)
            return Destination(OUT, trunk=trunk, domain=uri.host) if trunk is not None else None
        owner: Any = owner_of(number, self.users)
        if owner is not None:
            return Destination(LOCAL_USER, number=number, user=owner.username)
        trunk = self.routes.for_number(number)
        if trunk is None and not local and uri.scheme != "tel":
            trunk = self.routes.for_domain(uri.host)
        if trunk is None:
            return Destination(NO_ROUTE, number=number)
        return Destination(OUT, number=number, trunk=trunk)

    def _is_user(self, name: str) -> bool:
        if self.user_exists is None:
            return False
        return bool(self.user_exists(name))
