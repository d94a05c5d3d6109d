#!/usr/bin/env python3
"""Redis location store: how long a binding change on node B takes to reach node A's replica.

Run: .venv/bin/python bench/redis_feed.py [--n 2000] [--redis-port 24381]

Two LocationStore replicas in one process (the asyncio reactor), each with its own redis-py client,
as two nodes have, on a redis-server this script starts on 127.0.0.1:--redis-port. Node B stores
one binding at a time (a new AOR each, as a REGISTER would) and waits for Redis's answer (its
REGISTER's 200); the figure is the time from B's change to A's ``binding_added`` (what makes A's
silo fork a parked call), and B's durable wait, p50/p99/max, plus the CPU time of this process per
change (both nodes' work: B's write and A's apply).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="changes to time")
    parser.add_argument("--redis-port", type=int, default=24381)
    args = parser.parse_args()

    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import defer, reactor, task

    from libon_tsilo.registrar.binding import Binding
    from libon_tsilo.registrar.location import LocationStore
    from libon_tsilo.registrar.redis_store import RedisBindingStore, make_redis_client
    from tests.redis_server import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="redis-feed-")), port=args.redis_port)
    server.start()
    nodes = {}
    for name in ("a", "b"):
        client = make_redis_client(server.url)
        nodes[name] = LocationStore(reactor, RedisBindingStore(client, reactor, node_id=name), node_id=name)
    seen: dict[str, float] = {}

    class Arrivals:
        def binding_added(self, binding: Binding, flow: Any) -> None:
            seen[binding.aor] = time.perf_counter()

        binding_refreshed = binding_added

        def binding_removed(self, binding: Binding, reason: str) -> None:
            pass

    nodes["a"].subscribe(Arrivals())
    feed: list[float] = []
    durable: list[float] = []

    async def run() -> None:
        for store in nodes.values():
            store.start()
        while not all(s.redis_stats()["up"] for s in nodes.values()):  # type: ignore[index]
            await task.deferLater(reactor, 0.01, lambda: None)
        cpu0 = time.process_time()
        for i in range(args.n):
            aor = f"sip:feed{i}@bench"
            now = reactor.seconds()
            t0 = time.perf_counter()
            nodes["b"].add_or_update(Binding(aor, f"sip:feed{i}@192.0.2.1", f"<sip:feed{i}@192.0.2.1>",
                                             now + 600, now, f"c{i}", 1, node="b"))
            d = nodes["b"].when_durable(aor)
            assert d is not None
            await d
            durable.append(time.perf_counter() - t0)
            while aor not in seen:
                await task.deferLater(reactor, 0, lambda: None)
            feed.append(seen[aor] - t0)
        cpu = time.process_time() - cpu0
        print(f"{args.n} changes on node B, one at a time, redis-server 127.0.0.1:{args.redis_port}")
        for label, values in (("B's change -> A's binding_added", feed),
                              ("B's durable wait (its 200 OK)", durable)):
            p50, p99 = percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000
            print(f"  {label}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {max(values) * 1000:.3f} ms")
        print(f"  CPU of this process (both nodes) per change: {cpu / args.n * 1e6:.0f} us")
        for store in nodes.values():
            await store.stop()

    def done(result: object) -> object:
        reactor.stop()
        return result

    defer.ensureDeferred(run()).addBoth(done)
    reactor.run()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
