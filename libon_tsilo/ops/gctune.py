"""Garbage-collector settings for the server process (twistd entry point only, never in tests).

Every SIP message allocates a few hundred container objects (header entries, parsed Via/From/To,
transaction state). With CPython's default thresholds (700, 10, 10) the collector runs a young
collection every few messages and regularly walks the whole heap, start-up objects (Twisted, the
config, every module) included: measured with bench/inproc.py, about a third of the CPU time per
REGISTER went to it.

- ``gc.freeze()`` once the service tree is built moves the start-up objects out of the collector's
  sight.
- a young-generation threshold of 20,000 allocations lets most per-message objects die (reference
  counting frees them: the message layer makes no cycles on the hot path) before a collection looks
  at them.
- what survives a young collection is frozen too (``_freeze_survivors``). At 1,000 calls/s the
  completed transactions waiting out 64*T1, the registrations and the calls in progress are several
  hundred thousand live objects. Left to age through the generations, each was walked again by the
  middle generation (100-250 ms stalls) and then by every full collection: bench/latefork.py
  --duration 45 at 1,000 calls/s saw 0.6 s, 1.3 s and 1.7 s stalls, and SIPp's retransmissions
  after each stall turned into a collapse. Frozen, an object is walked once. It is still freed by
  reference counting as soon as it dies; only garbage *cycles* among frozen objects wait, for the
  periodic full sweep (``full_sweep``, every ``FULL_SWEEP_INTERVAL`` seconds), which unfreezes,
  collects everything once and freezes again. The server makes no cycles on its call path
  (measured: 0 cyclic objects per late-fork call), so the sweep finds little.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["FULL_SWEEP_INTERVAL", "GC_THRESHOLDS", "FullSweepService", "full_sweep", "tune_gc"]

log = Logger()

GC_THRESHOLDS = (20_000, 10, 10)
FULL_SWEEP_INTERVAL = 600.0


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    # after a young collection, what is still alive outlived ~20,000 allocations: long-lived
    if phase == "stop" and info.get("generation") in (0, 1):
        gc.freeze()


def tune_gc() -> None:
    """Freeze what exists now, raise the young-generation threshold and freeze the survivors of
    every young collection from now on (call once at start-up)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)


def full_sweep() -> tuple[int, int, float]:
    """Collect everything once, frozen objects included; returns (frozen objects it had to walk,
    garbage collected, seconds). What is still alive is frozen again."""
    started = time.perf_counter()
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    return frozen, collected, time.perf_counter() - started


class FullSweepService(Service):
    """Runs :func:`full_sweep` every ``interval`` seconds (the first one ``interval`` after start)."""

    def __init__(self, interval: float = FULL_SWEEP_INTERVAL, clock: Any = None) -> None:
        self.interval = interval
        self._loop = LoopingCall(self._sweep)
        if clock is not None:
            self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _sweep(self) -> None:
        frozen, collected, took = full_sweep()
        log.info("full garbage collection: {frozen} frozen objects, {collected} garbage, {ms:.0f} ms",
                 frozen=frozen, collected=collected, ms=took * 1000)
