"""The pause of the server's periodic full garbage collection (ops/gctune.py ``full_sweep``).

    .venv/bin/python bench/gc_sweep.py [--calls 32000]

Builds the real service tree in process (bench/inproc.py: asyncio reactor, memory store, the
server's collector policy), runs N late-fork calls through it without letting time pass, so every
call's transactions are still in their final 64*T1 wait and every device is still registered: the
steady state of a server at N/32 calls/s. Then it times ``full_sweep()`` twice and prints the
frozen objects walked, the garbage found and the pause.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import inproc  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=32_000, help="late-fork calls (32,000: 1,000/s for 64*T1)")
    args = p.parse_args()
    from libon_tsilo.ops.gctune import full_sweep

    env = inproc.build("full")  # applies tune_gc(), as the twistd entry point does
    inproc.call_run(env, inproc.call_messages(args.calls))()
    print(f"{args.calls} calls ended, {len(env['parts'].transactions)} transactions in their final wait")
    for _ in range(2):
        frozen, collected, took = full_sweep()
        print(f"full sweep: {frozen} frozen objects walked, {collected} garbage, {took * 1000:.0f} ms")


if __name__ == "__main__":
    main()
