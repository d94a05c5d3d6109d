"""A warning for an event that can repeat thousands of times a second (a flood): at most one line per
kind per interval, and the line says how many of the same kind were not logged since the last one.
Each kind is a ``libon_tsilo.ratelimit.ThrottledLog``; this only keys them by kind."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.ratelimit import ThrottledLog

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    def __init__(self, logger: Logger, clock: IReactorTime, interval: float = 10.0) -> None:
        self.log = logger
        self.clock = clock
        self.interval = interval
        self._kinds: dict[str, ThrottledLog] = {}

    def warn(self, kind: str, fmt: str, **fields: Any) -> None:
        throttle = self._kinds.get(kind)
        if throttle is None:
            throttle = self._kinds[kind] = ThrottledLog(self.clock, self.interval)
        throttle.emit(self.log.warn, fmt, **fields)
