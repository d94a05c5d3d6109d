"""The phone number a request URI names, and the local user who owns it.

One function for every path that maps a number to a user: calls out (an app dials a colleague's
number: the call stays local, parked and pushed as any other) and calls in from gateways.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from libon_tsilo.dialplan import DialPlan, number_of
from libon_tsilo.sip.uri import TelURI, URI

__all__ = ["NumberOwners", "e164_of", "owner_of"]


class NumberOwners(Protocol):
    """The users database seen from here (registrar/users.py: UsersDB)."""

    def by_number(self, e164: str) -> Any: ...


def e164_of(uri: URI, plan: DialPlan, rewrite: Callable[[str], str] | None = None) -> str | None:
    """The E.164 number `uri` is for ("+33123456789"), or None when it names no phone number.

    A tel: local number (RFC 3966 §5.1.5) is read in its phone-context: a "+33" context dials as
    if from country 33; a domain context as our own dial plan would. `rewrite` (a gateway's
    strip/add prefix rules, registrar/peers.py) changes the number before the dial plan reads it.
    """
    if isinstance(uri, TelURI) and not uri.is_global:
        context = uri.phone_context or ""
        if context.startswith("+"):
            digits = context[1:].translate(str.maketrans("", "", "-.()"))
            plan = replace(plan, country_code=digits)
        return plan.to_e164(rewrite(uri.digits) if rewrite is not None else uri.digits)
    text = number_of(uri)
    if text is None:
        return None
    return plan.to_e164(rewrite(text) if rewrite is not None else text)


def owner_of(e164: str | None, users: NumberOwners | None) -> Any:
    """The user record whose number is `e164`, or None (no number, no users database, no owner)."""
    if e164 is None or users is None:
        return None
    return users.by_number(e164)
