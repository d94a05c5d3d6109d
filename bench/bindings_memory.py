#!/usr/bin/env python3
"""Server RSS growth per registered binding, in process (memory location store).

    .venv/bin/python bench/bindings_memory.py [--n 100000]

Builds the real service tree as bench/inproc.py does (asyncio reactor, memory location store, auth
off, gc tuned as in the server), feeds N REGISTERs for N distinct AORs (Expires 3600, one Contact
each) straight into the transport's inbound path and reports VmRSS (/proc/self/status) before and
after, once every REGISTER was answered 200: the growth divided by N is the memory per binding.
The completed server transactions are dropped after every batch of 5,000 (the transaction layer's
stop(): what timer J does 32 s later on a live server), so they are not counted as bindings.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inproc  # noqa: E402


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="bindings (distinct AORs)")
    args = ap.parse_args()
    env = inproc.build("full")
    feed, outbox = env["feed"], env["outbox"]
    location = env["parts"].location
    transactions = env["parts"].transactions
    batch = 5000
    gc.collect()
    before = rss_kib()
    for start in range(0, args.n, batch):
        for i in range(start, min(start + batch, args.n)):
            # the message text is built per REGISTER and dropped: only what the server keeps remains
            msg = inproc.REGISTER.format(n=i, user=f"m{i}", port=16000).encode()
            feed(msg, ("127.0.0.1", 16000))
        ok = sum(1 for data, _ in outbox if data.startswith(b"SIP/2.0 200"))
        if ok != len(outbox):
            raise RuntimeError(f"{len(outbox) - ok} REGISTERs not answered 200")
        outbox.clear()
        # every REGISTER was answered: end the completed server transactions now instead of 32 s
        # later (timer J), so that only the bindings remain
        transactions.stop()
    env["reactor"].runUntilCurrent()
    gc.collect()
    after = rss_kib()
    count = location.all_count()
    if count != args.n:
        raise RuntimeError(f"{count} bindings stored, {args.n} expected")
    growth = after - before
    print(f"{count:,} bindings: RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
          f"+{growth / 1024:.1f} MiB ({growth * 1024 / count:,.0f} bytes per binding)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
