"""A dialled phone number -> the local user who owns it (issue 13).

One function for every path that needs it: a gateway's call to ``sip:+33123456789@us;user=phone``
or ``tel:+33123456789`` (b2bua/manager.py), and an app-dialled number that turns out to be a local
user's, so the call stays on-net instead of going to a trunk. The number is read from the request
URI (``dialplan.number_of``), rewritten by the gateway it came from when it has prefix rules, put in
E.164 by the dial plan, and looked up in the users database (``UsersDB.by_number``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from libon_tsilo.dialplan import DialPlan, number_of

if TYPE_CHECKING:
    from libon_tsilo.registrar.peers import Gateway
    from libon_tsilo.registrar.users import UserRecord
    from libon_tsilo.sip.uri import URI

__all__ = ["dialled_e164", "user_for_number"]


def dialled_e164(uri: URI, plan: DialPlan, gateway: Gateway | None = None) -> str | None:
    """The E.164 number ``uri`` dials, or None when its user part is not a phone number."""
    number = number_of(uri)
    if number is None:
        return None
    if gateway is not None:
        number = gateway.rewrite(number)
    return plan.to_e164(number)


def user_for_number(
    uri: URI,
    plan: DialPlan,
    by_number: Callable[[str], UserRecord | None],
    gateway: Gateway | None = None,
) -> UserRecord | None:
    """The local user whose number ``uri`` dials, or None (not a number, or nobody's)."""
    e164 = dialled_e164(uri, plan, gateway)
    return by_number(e164) if e164 is not None else None
