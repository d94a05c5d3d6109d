"""What the B2BUA says about itself on each leg: Allow (RFC 3261 §20.5) and Supported (§20.37).

A B2BUA is the user agent on both sides, so the methods and extensions it advertises are the ones
it implements, never the other leg's: a caller's ``100rel``, ``replaces`` or ``REFER`` copied to a
device would promise features nobody on our side honours.
"""

from __future__ import annotations

__all__ = ["DIALOG_METHODS", "SUPPORTED_OPTION_TAGS", "ALLOW", "OWN_HEADERS", "supported"]

# methods accepted inside a call's dialogs: relay.py relays INFO, MESSAGE and OPTIONS, handles BYE,
# re-INVITE/UPDATE; out of dialog the UAS core's own Allow applies (sip/uas_core.py)
DIALOG_METHODS = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "INFO", "MESSAGE", "UPDATE")
# option tags implemented on both legs whatever the config
SUPPORTED_OPTION_TAGS: tuple[str, ...] = ()

ALLOW = ", ".join(DIALOG_METHODS)
_SUPPORTED = {False: ", ".join(SUPPORTED_OPTION_TAGS), True: ", ".join(SUPPORTED_OPTION_TAGS + ("timer",))}


def supported(session_timers: bool) -> str:
    """The Supported value of both legs ("" = no header): RFC 4028 "timer" only when it is on."""
    return _SUPPORTED[session_timers]
# never copied from the caller to a branch, whatever [calls] header_allowlist lists: we state our own
OWN_HEADERS = frozenset({"allow", "supported"})
