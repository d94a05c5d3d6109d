"""Small building blocks for abuse limits, shared by every layer (no imports from sip/ or above).

- :class:`SlidingWindow`: at most ``limit`` events per ``window`` seconds per key (a push token, a
  manhole client's address), in a table whose size is bounded: keys are kept in least-recently-used
  order, so the ones whose last event left the window are dropped from the front when a new key
  comes, and when the table is still full the least recently used key is evicted (and counted).
- :class:`ThrottledLog`: a log line for a limit that bites, at most once per interval, saying how
  many similar events it did not log: a flood must not turn into a flood of log lines.
- :class:`LoginGuard`: failed logins per source address over a sliding window; a source at the
  limit is refused until its oldest failure leaves the window (manhole passwords, admin tokens).

Time is always ``clock.seconds()`` of an injected ``IReactorTime`` (tests drive a ``Clock``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["SlidingWindow", "ThrottledLog", "LoginGuard"]

log = Logger()


class SlidingWindow:
    """Events per key over the last ``window`` seconds, capped at ``limit`` per key."""

    def __init__(self, clock: IReactorTime, limit: int, window: float, max_keys: int = 100_000) -> None:
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("SlidingWindow: limit, window and max_keys must be positive")
        self.clock = clock
        self.limit = limit
        self.window = float(window)
        self.max_keys = max_keys
        self.evictions = 0
        # key -> times of its last `limit` events, oldest first; the dict in least-recent-use order
        self._events: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def full(self, key: Hashable) -> bool:
        """True when ``key`` had ``limit`` events within the last ``window`` seconds."""
        times = self._events.get(key)
        if times is None or len(times) < self.limit:
            return False
        return self.clock.seconds() - times[0] < self.window

    def add(self, key: Hashable) -> None:
        """Record one event of ``key`` now (whether or not the window is full)."""
        now = self.clock.seconds()
        times = self._events.get(key)
        if times is None:
            self._make_room(now)
            times = self._events[key] = deque(maxlen=self.limit)
        else:
            self._events.move_to_end(key)
        times.append(now)

    def try_add(self, key: Hashable) -> bool:
        """Record an event unless the window is full; True when it was recorded (allowed)."""
        if self.full(key):
            return False
        self.add(key)
        return True

    def clear(self) -> None:
        self._events.clear()

    def _make_room(self, now: float) -> None:
        events = self._events
        horizon = now - self.window
        # least recently used first: stop at the first key with an event inside the window
        while events:
            first = next(iter(events))
            if events[first][-1] > horizon:
                break
            del events[first]
        if len(events) >= self.max_keys:
            events.popitem(last=False)
            self.evictions += 1


class ThrottledLog:
    """Emit one log event per ``interval`` seconds at most; the next one reports how many were held back.

    ``emit(log.warn, "format {x}", x=1)``: the format gets `` ({suppressed} more since)`` appended
    when events were held back since the last line.
    """

    def __init__(self, clock: IReactorTime, interval: float = 10.0) -> None:
        self.clock = clock
        self.interval = interval
        self.suppressed = 0
        self._next = float("-inf")

    def emit(self, method: Any, fmt: str, **kwargs: Any) -> bool:
        """Log through ``method`` (a bound Logger method) unless throttled; True when logged."""
        now = self.clock.seconds()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        if self.suppressed:
            fmt += " ({suppressed} more since the last such line)"
            kwargs["suppressed"] = self.suppressed
            self.suppressed = 0
        method(fmt, **kwargs)
        return True


class LoginGuard:
    """Failed logins per source address; a source with ``max_failures`` of them within ``window``
    seconds is refused (``blocked``) until the oldest is ``window`` seconds old. ``name`` labels its
    log line and its ``limit_hits`` counter (e.g. "manhole_login")."""

    def __init__(self, clock: IReactorTime, name: str, max_failures: int = 5, window: float = 300.0) -> None:
        self.name = name
        self.failures = SlidingWindow(clock, max_failures, window, max_keys=10_000)
        self.refused = 0
        self._log = ThrottledLog(clock)

    def blocked(self, host: str) -> bool:
        return self.failures.full(host)

    def failed(self, host: str) -> None:
        self.failures.add(host)

    def refuse(self, host: str) -> None:
        """Count (and log, throttled) one attempt refused because ``host`` is blocked."""
        self.refused += 1
        self._log.emit(
            log.warn, "{name}: {host} refused: {n} failed logins within {window:g}s",
            name=self.name, host=host, n=self.failures.limit, window=self.failures.window,
        )

    def limit_hits(self) -> dict[str, int]:
        return {self.name: self.refused}
