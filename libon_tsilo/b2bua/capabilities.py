"""What the B2BUA says about itself on each leg: Allow (RFC 3261 §20.5) and Supported (§20.37).

A B2BUA is the user agent on both sides, so the methods and extensions it advertises are the ones
it implements, never the other leg's: a caller's ``100rel``, ``replaces`` or ``REFER`` copied to a
device would promise features nobody on our side honours.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_ALLOWLIST", "DIALOG_METHODS", "SUPPORTED_OPTION_TAGS", "ALLOW", "OWN_HEADERS", "supported",
]

# methods accepted inside a call's dialogs: relay.py relays INFO, MESSAGE and OPTIONS, handles BYE,
# re-INVITE/UPDATE; out of dialog the UAS core's own Allow applies (sip/uas_core.py)
DIALOG_METHODS = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "INFO", "MESSAGE", "UPDATE", "PRACK", "REFER")
# option tags implemented on both legs whatever the config: RFC 4488 (a REFER with Refer-Sub: false)
SUPPORTED_OPTION_TAGS: tuple[str, ...] = ("norefersub",)

ALLOW = ", ".join(DIALOG_METHODS)


def _tags(timers: bool, reliable: bool) -> str:
    extra = (("100rel",) if reliable else ()) + (("timer",) if timers else ())
    return ", ".join(SUPPORTED_OPTION_TAGS + extra)


_SUPPORTED = {(t, r): _tags(t, r) for t in (False, True) for r in (False, True)}


def supported(session_timers: bool, reliable: bool = True) -> str:
    """The Supported value of a leg ("" = no header): RFC 4028 "timer" only when session timers are
    on; RFC 3262 "100rel" unless that leg cannot use it (b2bua/reliable.py: a branch INVITE without
    an offer)."""
    return _SUPPORTED[(session_timers, reliable)]
# never copied from the caller to a branch, whatever [calls] header_allowlist lists: we state our own
OWN_HEADERS = frozenset({"allow", "supported"})
# the caller's headers a branch INVITE carries ([calls] header_allowlist's default; ops/config.py
# takes it from here so the config and CallSettings cannot disagree)
DEFAULT_ALLOWLIST = (
    "Subject", "Priority", "Accept", "Accept-Language", "User-Agent", "Alert-Info", "Call-Info",
    "P-Asserted-Identity",
)
