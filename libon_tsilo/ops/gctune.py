"""Garbage-collector settings for the server process (twistd entry point only, never in tests).

Every SIP message allocates a few hundred container objects (header entries, parsed Via/From/To,
transaction state), and most of them live on for 64*T1 in a completed transaction. With CPython's
default thresholds (700, 10, 10) the collector then runs a young collection every few messages and
regularly walks the whole heap, start-up objects (Twisted, the config, every module) included:
measured with bench/inproc.py, about a third of the CPU time per REGISTER went to it.

- ``gc.freeze()`` once the service tree is built moves the start-up objects out of the collector's
  sight: full collections only walk what the server allocated since.
- a young-generation threshold of 20,000 allocations lets most per-message objects die (reference
  counting frees them: the message layer makes no cycles on the hot path) before a collection looks
  at them. Cyclic garbage still goes, only a few thousand allocations later.
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLDS", "tune_gc"]

GC_THRESHOLDS = (20_000, 10, 10)


def tune_gc() -> None:
    """Freeze what exists now and raise the young-generation threshold (call once at start-up)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
