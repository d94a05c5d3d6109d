"""The server's garbage-collector policy (ops/gctune.py). It changes process-wide state, so the
policy itself is exercised in a child interpreter; the sweep service runs on a Clock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from twisted.internet.task import Clock

from libon_tsilo.ops import gctune

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import gc
    from libon_tsilo.ops.gctune import GC_THRESHOLDS, full_sweep, tune_gc

    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    base = gc.get_freeze_count()

    class Node:
        pass

    keep = [[i] for i in range(1000)]  # long-lived state, like completed transactions
    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle, alive for now
    gc.collect(0)  # a young collection: its survivors are frozen
    assert gc.get_freeze_count() >= base + 1000, (base, gc.get_freeze_count())
    del a, b  # garbage now, but frozen: young collections do not walk it
    assert gc.collect(0) == 0 and gc.collect(1) == 0
    frozen, collected, took = full_sweep()
    assert collected >= 2 and frozen >= 1000, (frozen, collected)
    assert gc.get_freeze_count() >= base + 1000  # what lives is frozen again
    assert len(keep) == 1000
    print("ok")
""")


def test_middle_generation_survivors_are_frozen_and_the_full_sweep_collects_frozen_cycles():
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_sweep_service_runs_every_interval_and_stops(monkeypatch):
    runs: list[int] = []
    monkeypatch.setattr(gctune, "full_sweep", lambda: (runs.append(1) or (10, 0, 0.001)))
    clock = Clock()
    service = gctune.FullSweepService(interval=600, clock=clock)
    service.startService()
    clock.advance(599)
    assert runs == []
    clock.advance(1)
    clock.advance(600)
    assert len(runs) == 2
    service.stopService()
    clock.advance(6000)
    assert len(runs) == 2 and clock.getDelayedCalls() == []
