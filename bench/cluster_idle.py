#!/usr/bin/env python3
"""What an idle cluster node costs per second (issue 14): CPU, wake-ups, syscalls, Redis commands.

    .venv/bin/python bench/cluster_idle.py [--cases a,b,e,c] [--seconds 10] [--strace] [--port-base 26300]

Starts the set-ups of bench/cluster.py (same config, same pinning: nodes on CPU 0, Redis on CPU 1)
and, with no traffic, counts for ``--seconds``: each node's CPU from /proc (schedstat: user and
kernel, in ns), its wake-ups (voluntary context switches) and, once more with ``--strace``, its
syscalls (``strace -c -f -p PID``; the CPU of that pass is not comparable), and the commands Redis ran (INFO
commandstats). The figures per second are what the cluster pays whatever its load: heartbeats,
the node-id claim's renewal, the connection's health check, the reactor's own timers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cluster  # noqa: E402
from bench.common import cpu_ns  # noqa: E402
from bench.cluster import (  # noqa: E402
    PortRange,
    redis_commands,
    start_setup,
    start_strace,
    strace_counts,
    wakeups,
)


def measure(case: str, seconds: float, strace: bool, base: Path, ports: PortRange) -> None:
    setup = start_setup(case, base / case, ports)
    try:
        time.sleep(2.0)  # the start-up's own work (first load, first beats) settles
        cpu0, sys0 = [cpu_ns(n.pid) for n in setup.nodes], setup.node_sys()
        wake0 = [wakeups(n.pid) for n in setup.nodes]
        cmds0 = redis_commands(setup.redis)
        time.sleep(seconds)
        cpu = [(cpu_ns(n.pid) - a) / seconds / 1e6 for n, a in zip(setup.nodes, cpu0, strict=True)]
        kernel = [(b - a) / seconds * 1000 for a, b in zip(sys0, setup.node_sys(), strict=True)]
        wake = [(wakeups(n.pid) - w) / seconds for n, w in zip(setup.nodes, wake0, strict=True)]
        cmds1 = redis_commands(setup.redis)
        ran = {k: (v - cmds0.get(k, 0)) / seconds for k, v in cmds1.items() if v - cmds0.get(k, 0) > 0}
        ran.pop("info", None)  # our own INFO
        print(f"({case}) {cluster.CASES[case]}, idle {seconds:g} s:")
        for name, c, k, w in zip("AB", cpu, kernel, wake, strict=False):
            print(f"  node {name}: {c:6.2f} ms CPU per second (kernel ~{k:.0f}, in 10 ms ticks), "
                  f"{w:5.1f} wake-ups per second")
        print(f"  all nodes: {sum(cpu):.2f} ms CPU per second")
        if ran:
            print("  redis commands per second (all nodes): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(ran.items())))
        if strace:
            outs = [base / case / f"strace-{i}.txt" for i in range(len(setup.nodes))]
            procs = [start_strace(n.pid, out) for n, out in zip(setup.nodes, outs, strict=True)]
            time.sleep(seconds)
            for name, proc, out in zip("AB", procs, outs, strict=False):
                counts = sorted(strace_counts(proc, out).items(), key=lambda kv: -kv[1])
                per = ", ".join(f"{k} {v / seconds:.1f}" for k, v in counts)
                print(f"  node {name} syscalls per second: {sum(v for _, v in counts) / seconds:.1f} ({per})")
    finally:
        setup.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="a,b,e,c")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--strace", action="store_true", help="then count each node's syscalls for as long")
    ap.add_argument("--port-base", type=int, default=26300)
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    if args.no_pin:
        cluster.PIN = False
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    base = Path(tempfile.mkdtemp(prefix="cluster-idle-"))
    ports = PortRange(args.port_base)
    for case in args.cases.split(","):
        measure(case.strip(), args.seconds, args.strace, base, ports)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
