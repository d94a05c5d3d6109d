"""Phone numbers: what a dialled string means, normalised to E.164 ("+33123456789").

An app dials what its user typed: "+33 1 23 45 67 89", "0033123456789", "01 23 45 67 89". A gateway
sends what the phone network gave it. Routing to a trunk and mapping a number to a local user both
need one spelling, so every number is compared in E.164 form, built here from the operator's dial
plan (``[dialplan]``: the country code national numbers belong to, the national trunk prefix and the
international access prefixes).

Only digits count: RFC 3966 visual separators ("-", ".", "(", ")") and spaces are dropped. Anything
else (letters, "*", "#", a user name) is not a phone number, and E.164 caps a number at 15 digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from libon_tsilo.sip.uri import URI, TelURI

__all__ = ["DialPlan", "number_of", "MAX_E164_DIGITS"]

MAX_E164_DIGITS = 15
# shortest number we accept as one: below that it is an extension or a service code, not a route
MIN_NUMBER_DIGITS = 3

_SEPARATORS = str.maketrans("", "", "-.() ")
_NUMBER = re.compile(r"^\+?[0-9]+$")


@dataclass(frozen=True)
class DialPlan:
    """How national and international numbers are written where the operator's users live."""

    country_code: str = ""  # e.g. "33"; "" = a national number cannot be normalised
    national_prefix: str = "0"
    international_prefixes: tuple[str, ...] = ("00",)

    def to_e164(self, text: str) -> str | None:
        """``text`` as "+<country><number>", or None when it is not a phone number we can place."""
        digits = text.translate(_SEPARATORS)
        if not _NUMBER.match(digits):
            return None
        if digits.startswith("+"):
            national = None
            international = digits[1:]
        else:
            national, international = digits, None
            # longest prefix first: "011" must win over a "0" national prefix
            for prefix in sorted(self.international_prefixes, key=len, reverse=True):
                if prefix and digits.startswith(prefix):
                    national, international = None, digits[len(prefix) :]
                    break
        if international is None:
            assert national is not None
            if not self.country_code:
                return None
            if self.national_prefix:
                if not national.startswith(self.national_prefix):
                    return None
                national = national[len(self.national_prefix) :]
            international = self.country_code + national
        if international.startswith("0") or not (
            MIN_NUMBER_DIGITS <= len(international) <= MAX_E164_DIGITS
        ):
            return None  # country codes never start with 0
        return "+" + international


def number_of(uri: URI) -> str | None:
    """The dialled number in a request URI: a tel: URI's number, or a SIP URI's user part when it is
    marked ``user=phone`` or is made of digits (with "+" and visual separators) only. None otherwise.

    A ``user=phone`` URI may carry ";isub=" or ";phone-context=" parameters inside the user part
    (RFC 3261 §19.1.6): only the number before them counts.
    """
    if isinstance(uri, TelURI):
        return uri.number
    if uri.scheme not in ("sip", "sips") or not uri.user:
        return None
    user = uri.user
    if uri.params.get("user") == "phone":
        user = user.split(";", 1)[0]
    if _NUMBER.match(user.translate(_SEPARATORS)):
        return user
    return None
