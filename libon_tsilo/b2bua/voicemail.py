"""Voicemail on no answer (issue 13): which unanswered calls are forwarded, and the headers that say
whose mailbox to open and why.

Instead of ending with 480/486, a call whose user has voicemail on (UsersDB ``voicemail``) gets one
more B-leg, to ``[voicemail] target`` (no push, no silo): the Call does the forwarding
(``Call.divert``), this module only decides and formats.

Why a call is forwarded, as RFC 5806 (Diversion) and RFC 4458 (the ``cause`` URI parameter, whose
values map ISUP redirecting reasons, RFC 7544 §4) name it:

- ring timeout: ``no-answer``, cause 408 ("No Reply");
- every device declined with a code of ``on_busy`` (486/600/603 by default): ``user-busy``, 486;
- nothing can ring: no device at all, every push failed, or the devices' failures add up to
  480/404/408/410/5xx: ``unavailable``, cause 503 ("Mobile subscriber not reachable": the sleeping
  phone that could not be woken; RFC 4458's 480 means "deflection immediate response", a user's
  choice, not this).

The voicemail server reads the mailbox from any of: the Request-URI (RFC 4458 §3:
``sip:vm@host;target=sip:alice%40example.com;cause=408``), ``Diversion: <sip:alice@example.com>;
reason=no-answer;counter=1`` (RFC 5806), and ``History-Info`` (RFC 7044 §10): entry 1 is the user we
tried, with the failure as an escaped Reason (§10.1.1), entry 1.1 the voicemail URI, mapped from 1
(``mp=1``, the target user changed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

from libon_tsilo.sip.uri import URI

__all__ = [
    "NO_ANSWER", "USER_BUSY", "UNAVAILABLE", "CAUSES", "VoicemailPolicy", "diversion", "history_info",
    "voicemail_uri",
]

NO_ANSWER = "no-answer"
USER_BUSY = "user-busy"
UNAVAILABLE = "unavailable"
REASONS = (NO_ANSWER, USER_BUSY, UNAVAILABLE)

# RFC 4458 §3.2 cause values, and the SIP reason phrase the History-Info Reason carries
CAUSES = {NO_ANSWER: 408, USER_BUSY: 486, UNAVAILABLE: 503}
_PHRASES = {408: "Request Timeout", 486: "Busy Here", 503: "Service Unavailable"}

# what the devices' best failure (forking.exhausted_status) means "unreachable", not "refused"
UNAVAILABLE_STATUSES = frozenset({404, 408, 410, 480, 500, 503})


def _always(user: str) -> bool:
    return True


@dataclass(frozen=True)
class VoicemailPolicy:
    target: str  # the voicemail server's SIP URI (validated by the config)
    on_busy: frozenset[int] = frozenset({486, 600, 603})
    on_no_answer: bool = True
    on_unavailable: bool = True
    # per user (the users database's voicemail column); read only when a call is about to fail
    user_wants: Callable[[str], bool] = field(default=_always)

    @classmethod
    def build(cls, target: str, on_busy: Iterable[int], on_no_answer: bool, on_unavailable: bool,
              user_wants: Callable[[str], bool] = _always) -> VoicemailPolicy:
        return cls(target, frozenset(on_busy), on_no_answer, on_unavailable, user_wants)

    def reason_for(self, status: int, ring_timeout: bool) -> str | None:
        """The Diversion reason a call failing with ``status`` is forwarded for, or None."""
        if ring_timeout:
            return NO_ANSWER if self.on_no_answer else None
        if status in self.on_busy:
            return USER_BUSY
        if self.on_unavailable and status in UNAVAILABLE_STATUSES:
            return UNAVAILABLE
        return None


def voicemail_uri(target: str, user_uri: str, reason: str) -> str:
    """The voicemail leg's Request-URI: ``target`` with RFC 4458's ``target`` and ``cause``."""
    uri = URI.parse(target)
    params = {k: v for k, v in uri.params.items() if k.lower() not in ("target", "cause")}
    params["target"] = quote(user_uri, safe=":+;=/[]$&")  # "@" escaped: a URI parameter value
    params["cause"] = str(CAUSES[reason])
    return str(uri.replace(params=params))


def diversion(user_uri: str, reason: str) -> str:
    """RFC 5806 Diversion: the user the call was for, why it left, first diversion."""
    return f"<{user_uri}>;reason={reason};counter=1"


def history_info(user_uri: str, vm_uri: str, reason: str) -> str:
    """RFC 7044 History-Info: the user we tried (index 1, with why it failed), then voicemail (1.1)."""
    cause = CAUSES[reason]
    why = quote(f'SIP;cause={cause};text="{_PHRASES[cause]}"', safe="")
    return f"<{user_uri}?Reason={why}>;index=1, <{vm_uri}>;index=1.1;mp=1"
