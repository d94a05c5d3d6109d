"""Failed digest attempts, limited per source and per user (password guessing, issue 11 item 7).

A failure is a request whose credentials we checked and refused: wrong password, unknown user,
replayed nonce-count, credentials of another user, malformed credentials. A request without
credentials, a stale nonce answered correctly, or a nonce we cannot read (e.g. from before a
restart with a random secret) is not one: those are what honest phones send.

- Per source: ``per_source`` failures within ``window`` seconds from one address (an IPv6 source
  counts as its /64, which one attacker holds whole) block it for ``block`` seconds: every request
  from it that needs digest gets 403 and is not checked, so a blocked guesser learns nothing.
- Per user: ``per_user`` failures within ``window`` against one user name, from anywhere (a
  botnet guessing one password), throttle that user for ``block`` seconds. The trade-off: a user
  lock that anyone can trigger would be a free denial of service against that user, so the
  throttle only refuses sources that have not authenticated as that user within
  ``known_source_ttl`` seconds. A user's phones that registered before the attack (they refresh
  well within that time) keep working; a new address of that user (a phone that moved network
  during the attack) is refused until the attack stops for ``block`` seconds. Guessing from new
  addresses is slowed to ``per_user`` tries per ``window`` + ``block``.

Every table is bounded (``max_tracked`` keys each) and swept by one timer: spoofed UDP sources
cannot grow memory without limit; when a table is full a new key is not tracked (fail open) and
that is logged once per sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from libon_tsilo.sip.limits import source_key  # the key the SIP edge limits count by too

__all__ = ["FailureLimiter", "FailureLimits", "source_key"]

log = Logger()

_MAX_NAME = 128  # user names are keys; longer ones are cut (real ones are at most 64)


@dataclass(frozen=True)
class FailureLimits:
    per_source: int = 20  # 0 = no per-source limit
    per_user: int = 10  # 0 = no per-user limit
    window: float = 60.0
    block: float = 300.0
    known_source_ttl: float = 7200.0
    max_tracked: int = 100_000


class _Count:
    __slots__ = ("start", "n", "until")

    def __init__(self, start: float) -> None:
        self.start = start  # the window's start
        self.n = 0
        self.until = 0.0  # blocked until (clock time); 0 = not blocked


class FailureLimiter:
    def __init__(self, clock: IReactorTime, limits: FailureLimits) -> None:
        self.clock = clock
        self.limits = limits
        self._sources: dict[str, _Count] = {}
        self._users: dict[str, _Count] = {}
        self._known: dict[tuple[str, str], float] = {}  # (user, source) -> known until
        self._sweeper: IDelayedCall | None = None
        self._full_logged = False
        self.counters = {"failures": 0, "refused_source": 0, "refused_user": 0,
                         "blocked_sources": 0, "throttled_users": 0}

    # -- questions asked before checking credentials ---------------------------------------------

    def source_blocked(self, source: str | None) -> bool:
        """True (and counted) when requests from ``source`` are refused unchecked."""
        if source is None or not self.limits.per_source:
            return False
        entry = self._sources.get(source)
        if entry is None or entry.until <= self.clock.seconds():
            return False
        self.counters["refused_source"] += 1
        return True

    def user_blocked(self, user: str, source: str | None) -> bool:
        """True (and counted) when attempts for ``user`` from ``source`` are refused unchecked."""
        if not self.limits.per_user:
            return False
        user = user[:_MAX_NAME]
        entry = self._users.get(user)
        now = self.clock.seconds()
        if entry is None or entry.until <= now:
            return False
        if source is not None and self._known.get((user, source), 0.0) > now:
            return False
        self.counters["refused_user"] += 1
        return True

    # -- outcomes ----------------------------------------------------------------------------------

    def failed(self, user: str | None, source: str | None, call_id: Any = None) -> None:
        self.counters["failures"] += 1
        now = self.clock.seconds()
        lim = self.limits
        if source is not None and lim.per_source and self._hit(self._sources, source, lim.per_source, now):
            self.counters["blocked_sources"] += 1
            log.warn("auth: {source} blocked for {block:.0f} s after {n} failed digest attempts in "
                     "{window:.0f} s", source=source, block=lim.block, n=lim.per_source,
                     window=lim.window, call_id=call_id)
        if user is not None and lim.per_user and self._hit(self._users, user[:_MAX_NAME], lim.per_user, now):
            self.counters["throttled_users"] += 1
            log.warn("auth: user {user} throttled for {block:.0f} s after {n} failed digest attempts "
                     "in {window:.0f} s (its known addresses still pass)", user=user[:_MAX_NAME],
                     block=lim.block, n=lim.per_user, window=lim.window, call_id=call_id)

    def succeeded(self, user: str, source: str | None) -> None:
        if source is None or not self.limits.per_user:
            return
        key = (user[:_MAX_NAME], source)
        if key not in self._known and not self._room(self._known):
            return
        self._known[key] = self.clock.seconds() + self.limits.known_source_ttl
        self._arm()

    # -- inspection --------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        now = self.clock.seconds()
        return {
            **self.counters,
            "blocked_sources_now": sum(1 for e in self._sources.values() if e.until > now),
            "throttled_users_now": sum(1 for e in self._users.values() if e.until > now),
            "tracked": len(self._sources) + len(self._users) + len(self._known),
        }

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self._sources.clear()
        self._users.clear()
        self._known.clear()

    # -- tables ------------------------------------------------------------------------------------

    def _hit(self, table: dict[str, _Count], key: str, limit: int, now: float) -> bool:
        """Count one failure for ``key``; True when it starts a block."""
        entry = table.get(key)
        if entry is None:
            if not self._room(table):
                return False
            entry = table[key] = _Count(now)
            self._arm()
        if entry.until > now:
            return False  # already blocked: refused requests are not checked, so not counted
        if now - entry.start >= self.limits.window:
            entry.start, entry.n = now, 0
        entry.n += 1
        if entry.n < limit:
            return False
        entry.until = now + self.limits.block
        entry.start, entry.n = entry.until, 0  # a fresh window once the block ends
        return True

    def _room(self, table: dict[Any, Any]) -> bool:
        if len(table) < self.limits.max_tracked:
            return True
        if not self._full_logged:
            self._full_logged = True
            log.warn("auth: failure table full ({n} keys): new sources/users are not limited until "
                     "the next sweep", n=len(table))
        return False

    def _arm(self) -> None:
        if self._sweeper is None or not self._sweeper.active():
            self._sweeper = self.clock.callLater(self.limits.window, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        self._full_logged = False
        now = self.clock.seconds()
        window = self.limits.window
        for table in (self._sources, self._users):
            for key in [k for k, e in table.items() if e.until <= now and now - e.start >= window]:
                del table[key]
        for pair in [k for k, until in self._known.items() if until <= now]:
            del self._known[pair]
        if self._sources or self._users or self._known:
            self._sweeper = self.clock.callLater(window, self._sweep)
