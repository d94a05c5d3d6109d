"""A task.Clock that tells a test when something schedules a call (retry back-off, deadlines),
so tests wait for the schedule instead of sleeping."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock


class StepClock(Clock):
    """A Clock that lets a test wait until something schedules a call matching a predicate."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[Callable[[float], bool], Deferred[float]]] = []
        self.scheduled: list[float] = []  # every delay ever scheduled, in order

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> Any:  # noqa: N802
        call = super().callLater(delay, f, *args, **kw)
        self.scheduled.append(delay)
        for item in [w for w in self._waiters if w[0](delay)]:
            self._waiters.remove(item)
            item[1].callback(delay)
        return call

    def wait_for_call(self, predicate: Callable[[float], bool]) -> Deferred[float]:
        d: Deferred[float] = Deferred()
        self._waiters.append((predicate, d))
        return d
