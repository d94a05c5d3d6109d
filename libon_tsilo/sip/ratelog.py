"""A warning for an event that can repeat thousands of times a second (a flood): at most one line per
kind per interval, and the line says how many of the same kind were not logged since the last one."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    def __init__(self, logger: Logger, clock: IReactorTime, interval: float = 10.0) -> None:
        self.log = logger
        self.clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, fmt: str, **fields: Any) -> None:
        now = self.clock.seconds()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            fmt += " ({suppressed} more like this in the last {since:.0f} s, not logged)"
            fields.update(suppressed=suppressed, since=now - (last if last is not None else now))
        self.log.warn(fmt, **fields)
