"""Who may call out, to where, and how many calls at once (toll-fraud guard).

Only a caller whose identity digest proved (one of our users) may reach a trunk. An
unauthenticated caller from the internet is refused, and so is a trusted source ([auth]
trusted_sources, a gateway): what a gateway sends is a call *in*, and letting it out again would
make us an open relay between two carriers. Per user: `allowed_prefixes` (E.164 prefixes; empty =
any) and `max_calls_out` (concurrent; None = `[calls_out] max_calls_per_user`, where 0 means no limit;
a user's own 0 bars calls out); per trunk: `max_calls` (0 = no limit).

Every refusal has a reason, is counted (`limit_hits`, /metrics `libon_tsilo_limit_hits{limit=
"call_out_<reason>"}`) and logged. Refusals of authenticated users are logged each time (there are
few, and each is a user's question); those of unauthenticated sources are logged at most once per
10 s per reason with the count of the others, so a scanner cannot flood the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.ratelimit import ThrottledLog
from libon_tsilo.routing.trunks import Trunk

__all__ = ["CallOutPolicy", "Refusal", "REFUSALS"]

log = Logger(namespace=__name__)  # compiled (mypyc): Logger() would name the importer


@dataclass(frozen=True)
class Refusal:
    reason: str  # the key counted in limit_hits (after "call_out_")
    status: int
    phrase: str


REFUSALS = {r.reason: r for r in (
    Refusal("unauthenticated", 403, "Calls Out Need Authentication"),
    Refusal("from_gateway", 403, "Forbidden"),
    Refusal("unknown_user", 403, "Forbidden"),
    Refusal("no_route", 404, "No Route To Destination"),
    Refusal("prefix_not_allowed", 403, "Destination Not Allowed"),
    Refusal("user_limit", 403, "Too Many Calls Out"),
    Refusal("trunk_limit", 503, "Trunk Busy"),
)}


class CallOutPolicy:
    def __init__(self, clock: IReactorTime, max_calls_per_user: int = 0) -> None:
        """`max_calls_per_user`: the per-user limit of users without their own (0 = no limit)."""
        self.clock = clock
        self.max_calls_per_user = max_calls_per_user
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.placed = 0
        self._by_user: dict[str, int] = {}
        self._by_trunk: dict[str, int] = {}
        self._held: dict[str, tuple[str, str]] = {}  # call id -> (user, trunk name)
        self._throttled = {reason: ThrottledLog(clock) for reason in REFUSALS}

    # -- decisions ------------------------------------------------------------------------------

    def check_caller(self, trusted: bool, user: str | None) -> Refusal | None:
        """Before anything else is looked up: is this caller one of ours, proved by digest?"""
        if trusted:
            return REFUSALS["from_gateway"]
        if user is None:
            return REFUSALS["unauthenticated"]
        return None

    def check_call(self, record: Any, number: str | None, trunk: Trunk | None) -> Refusal | None:
        """An authenticated user's call out to `number` (None for a domain route) via `trunk`."""
        if record is None:
            return REFUSALS["unknown_user"]
        if trunk is None:
            return REFUSALS["no_route"]
        if record.allowed_prefixes and (number is None or not record.may_call(number)):
            return REFUSALS["prefix_not_allowed"]  # a domain route has no number to allow
        limit = record.max_calls_out  # a user's 0 bars calls out; the default's 0 is no limit
        if limit is None:
            limit = self.max_calls_per_user or None
        if limit is not None and self._by_user.get(record.username, 0) >= limit:
            return REFUSALS["user_limit"]
        if trunk.max_calls and self._by_trunk.get(trunk.name, 0) >= trunk.max_calls:
            return REFUSALS["trunk_limit"]
        return None

    def refuse(self, refusal: Refusal, call_id: str | None, authenticated: bool, **fields: Any) -> None:
        """Count and log one refused attempt."""
        self.refused[refusal.reason] += 1
        fmt = "call out refused {status} ({reason}): {caller} -> {callee}"
        fields.setdefault("caller", "-")
        fields.setdefault("callee", "-")
        if authenticated:
            log.warn(fmt, status=refusal.status, reason=refusal.reason, call_id=call_id, **fields)
        else:
            self._throttled[refusal.reason].emit(log.warn, fmt, status=refusal.status, reason=refusal.reason,
                                                 call_id=call_id, **fields)

    # -- concurrency ----------------------------------------------------------------------------

    def admit(self, call_id: str, user: str, trunk: Trunk) -> None:
        """The call is placed: it counts against its user and its trunk until `release`."""
        if call_id in self._held:
            return
        self._held[call_id] = (user, trunk.name)
        self._by_user[user] = self._by_user.get(user, 0) + 1
        self._by_trunk[trunk.name] = self._by_trunk.get(trunk.name, 0) + 1
        self.placed += 1

    def release(self, call_id: str) -> None:
        """The call ended (idempotent)."""
        held = self._held.pop(call_id, None)
        if held is None:
            return
        user, trunk = held
        for table, key in ((self._by_user, user), (self._by_trunk, trunk)):
            left = table[key] - 1
            if left:
                table[key] = left
            else:
                del table[key]

    def active(self) -> dict[str, int]:
        """Calls up per trunk."""
        return dict(self._by_trunk)

    def active_calls(self) -> int:
        return len(self._held)

    def limit_hits(self) -> dict[str, int]:
        return {f"call_out_{reason}": n for reason, n in self.refused.items()}
