#!/usr/bin/env python3
"""The Redis location backend's CPU cost, in instructions: per REGISTER written, per change of
another node applied, per late-fork call on one node and across two (issue 14).

    .venv/bin/python bench/redis_cost.py --icount [--n 300] [--stages all] [--redis-port 29000]
    .venv/bin/python bench/redis_cost.py [--n 2000]            # wall clock, microseconds (noisy)
    .venv/bin/python bench/redis_cost.py --icount --keep DIR   # keep callgrind's files per stage

bench/cluster.py measures whole processes under SIPp, whose CPU per call moves by 10-20 % with the
load of a shared box. This script counts the same work deterministically: the real service tree
(``make_service``, auth off, log level warn) of one node, with datagrams fed straight into the
transport and its answers caught in memory (as bench/inproc.py), against a real ``redis-server``
this script starts on ``--redis-port`` (29000-29499 is this bench's range). With ``--icount`` each
stage runs under ``valgrind --tool=callgrind`` once with N and once with none; the difference / N
is the cost per item, reproducible to a fraction of a percent. Only the measured node is counted:
the other node of a cross-node stage is a second process, not under valgrind.

Stages (the node under test is "A"; "W" plays node B, a real node too, in its own process):

- ``register-memory``: N REGISTERs, each for its own AOR, memory store (a single node's REGISTER).
- ``register-redis``: the same on the Redis store, each REGISTER alone (its own batch, as at a few
  hundred/s): fed, then the node runs until its 200 OK is sent (Redis answered the write) and,
  with code whose node reads its own changes back, its own change message came back on the feed.
  What node B of bench/cluster.py case (e) does per call.
- ``apply-redis``: W registers N devices; A applies each change from the feed (no call parked: the
  feed's own cost). A asks W for each change through a pipe and waits for its ``binding_added``.
- ``call-memory``: N late-fork calls on one node, memory store, as ``bench/inproc.py --scenario
  call``: INVITE parked, the device's REGISTER, the fork, 180, 200, ACK, BYE both ways. Case (a).
- ``call-redis``: the same on the Redis store (one node): case (b).
- ``call-remote``: A parks the INVITE, the device registers on W, A forks when the change arrives
  through Redis and sends the INVITE straight to the device (no Path), 180, 200, ACK, BYE: node A of
  case (e). (e) per call = ``call-remote`` + ``register-redis``.

``--reactor auto`` runs the memory stages on epoll and the Redis stages on uvloop, as ``[ops]
reactor = "auto"`` does; ``asyncio``, ``uvloop`` or ``epoll`` (memory only) force one; the asyncio
ones are the server's (ops/lean_asyncio.py), ``asyncio-twisted`` and ``uvloop-twisted`` Twisted's
own. Kernel time is not in the counts (callgrind sees user space), nor is redis-server's work.

The bench goes on from a datagram the node sent (or a change it applied) on the reactor's next
turn (``Node.soon``): the loop's ``call_soon`` on an asyncio reactor, a zero-delay ``callLater`` on
epoll, each reactor's cheapest. Until round 7 it was ``callLater(0)`` on both, which on an asyncio
reactor re-arms the loop's timer twice per wait (~15k instructions that are the bench's, not the
server's: several per call in ``call-remote``), ``--harness timer`` keeps that way for comparisons.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.inproc import IN_DIALOG, INVITE, REGISTER, SDP, answer, header_value, take  # noqa: E402
from bench import callgrind  # noqa: E402

HARNESS = os.environ.get("REDIS_COST_HARNESS", "soon")  # "timer": the bench's wake-ups before round 7
STAGES = ("register-memory", "register-redis", "apply-redis", "call-memory", "call-redis", "call-remote")
CALLER = ("127.0.0.1", 16000)
DEVICE = ("127.0.0.1", 17000)


# -- one node: the service tree with a fake UDP socket -------------------------------------------


def install_reactor(name: str) -> None:
    if name == "epoll":
        from twisted.internet import epollreactor

        epollreactor.install()
        return
    if name.startswith("uvloop"):
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if name.endswith("-twisted"):  # Twisted's own asyncio reactor, to compare with the server's
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
        return
    from libon_tsilo.ops import lean_asyncio  # what ops/reactor.py installs

    lean_asyncio.install()


class Node:
    """One node's service tree; ``feed`` hands it a datagram, ``expect`` a Deferred that fires when
    it sends a datagram starting with ``start`` to ``addr`` (at once if it already did)."""

    def __init__(self, node_id: str, backend: str, redis_url: str) -> None:
        from twisted.internet import reactor
        from twisted.logger import globalLogBeginner

        from libon_tsilo.ops.config import config_from_dict
        from libon_tsilo.ops.gctune import tune_gc
        from libon_tsilo.ops.logging import make_observer
        from libon_tsilo.ops.service import make_service

        globalLogBeginner.beginLoggingTo([make_observer("warn", "text")], redirectStandardIO=False)
        path = os.path.join(tempfile.mkdtemp(), "loc.sqlite")
        location: dict[str, Any] = {"backend": backend, "path": path}
        sections: dict[str, Any] = {
            "sip": {"listen": ["udp:127.0.0.1:5060"], "domains": ["localhost", "127.0.0.1"]},
            "auth": {"enabled": False},
            "location": location,
            "log": {"level": "warn", "format": "text"},
            "calls": {"ring_timeout": 30, "invite_cancel_grace": 0},
        }
        if backend == "redis":
            location["url"] = redis_url
            sections["cluster"] = {"node_id": node_id}
        self.reactor = reactor
        loop = getattr(reactor, "_asyncioEventloop", None)
        # the bench's own wake-up on the next turn (module doc)
        self.soon = reactor.callLater if loop is None or HARNESS == "timer" else (
            lambda _delay, f, *args: loop.call_soon(f, *args))
        self.root = make_service(config_from_dict(sections), clock=reactor)
        self.parts = self.root.parts
        self.outbox: list[tuple[bytes, tuple[str, int]]] = []
        self._want: tuple[tuple[str, int], bytes, Any] | None = None
        node = self

        class FakeSocket:
            local = ("127.0.0.1", 5060)
            v6 = False

            def send_to(self, data: bytes, addr: tuple[str, int]) -> None:
                node.outbox.append((data, addr))
                want = node._want
                if want is not None and want[0] == addr and data.startswith(want[1]):
                    node._want = None
                    # on the next turn, not inside send_to: the sender (a transaction arming its
                    # timer A after the first send) must finish before the bench answers
                    node.soon(0, want[2].callback, None)

        self._sock = FakeSocket()
        self.parts.transport.add_udp_endpoint(self._sock)
        self.location = self.parts.location
        self.store = self.location.persistence  # RedisBindingStore or None
        self._own_waiter: Any = None
        self._hooked = False
        tune_gc()  # as the twistd entry point does (libon_tsilo/ops/tap.py)

    def start(self) -> Any:
        from twisted.internet import task

        self.location.start()  # only the store: the transport's sockets are never bound here

        async def up() -> None:
            while self.store is not None and not self.store.up:
                await task.deferLater(self.reactor, 0.01, lambda: None)
        from twisted.internet import defer

        return defer.ensureDeferred(up())

    def feed(self, data: bytes, addr: tuple[str, int]) -> None:
        self.parts.transport.datagram_received(self._sock, data, addr)

    def expect(self, addr: tuple[str, int], start: bytes) -> Any:
        from twisted.internet import defer

        d: defer.Deferred[None] = defer.Deferred()
        for data, to in self.outbox:
            if to == addr and data.startswith(start):
                d.callback(None)
                return d
        self._want = (addr, start, d)
        return d

    def next_feed_message(self) -> Any:
        from twisted.internet import defer

        d: defer.Deferred[None] = defer.Deferred()
        # a store on a change channel of its own never reads its own changes back: nothing to wait
        # for after the 200 (the change is published in the turn that sends it)
        if self.store is None or getattr(self.store, "slot", None) is not None:
            d.callback(None)
        else:
            self._hook_feed()
            self._own_waiter = d
        return d

    def _hook_feed(self) -> None:
        """Code of an earlier round, whose node reads its own changes back: fire ``_own_waiter``
        when the feed handed the store a message. Hooked only then, so that the bench adds no call
        of its own to the feed's path of the code that does not need it."""
        if self._hooked:
            return
        self._hooked = True
        on_message = self.store._on_message

        def hooked(data: bytes) -> None:
            on_message(data)
            waiter, self._own_waiter = self._own_waiter, None
            if waiter is not None:
                self.soon(0, waiter.callback, None)

        self.store._on_message = hooked


def register_bytes(i: int, user: str, port: int) -> bytes:
    return REGISTER.format(n=i, user=user, port=port).encode()


# -- the other node (W): registers device i when asked on its stdin --------------------------------


def writer(redis_url: str) -> None:
    install_reactor("uvloop")
    from twisted.internet import reactor

    node = Node("w", "redis", redis_url)

    def ask() -> None:
        line = sys.stdin.buffer.readline()
        if not line:
            reactor.stop()
            return
        i = int(line)
        node.feed(register_bytes(i, f"lf{i}", DEVICE[1]), DEVICE)
        node.outbox.clear()

    def ready(_: object) -> None:
        reactor.addReader(_StdinReader(ask))
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    reactor.callWhenRunning(lambda: node.start().addCallback(ready))
    reactor.run()


class _StdinReader:
    """An IReadDescriptor on stdin: one line per wake-up (the measured node asks for one change
    at a time)."""

    def __init__(self, on_line: Any) -> None:
        self.on_line = on_line

    def fileno(self) -> int:
        return sys.stdin.fileno()

    def doRead(self) -> None:
        self.on_line()

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "stdin"


# -- the measured node (A) -------------------------------------------------------------------------


def child(stage: str, n: int, reactor_name: str, redis_url: str) -> None:
    backend = "memory" if stage.endswith("memory") else "redis"
    if reactor_name == "auto":
        reactor_name = "epoll" if backend == "memory" else "uvloop"
    install_reactor(reactor_name)
    from twisted.internet import defer, reactor

    w = None
    if stage in ("apply-redis", "call-remote"):
        # started in both runs (N and 0), so its start-up costs cancel out of the difference
        w = subprocess.Popen([sys.executable, __file__, "--writer", redis_url], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        assert w.stdout is not None and w.stdin is not None
        if w.stdout.readline() != b"ready\n":
            raise SystemExit("the writer node did not start")
    node = Node("a", backend, redis_url)

    def ask_writer(i: int) -> None:
        assert w is not None and w.stdin is not None
        os.write(w.stdin.fileno(), b"%d\n" % i)

    async def register(i: int) -> None:
        sent = node.expect(DEVICE, b"SIP/2.0 200")
        echoed = node.next_feed_message()
        node.feed(register_bytes(i, f"u{i}", DEVICE[1]), DEVICE)
        await sent
        await echoed
        node.outbox.clear()

    applied: dict[str, Any] = {}

    class Arrivals:
        def binding_added(self, binding: Any, flow: Any) -> None:
            d = applied.pop(binding.aor, None)
            if d is not None:
                d.callback(None)

        binding_refreshed = binding_added

        def binding_removed(self, binding: Any, reason: str) -> None:
            pass

    async def apply(i: int) -> None:
        d = applied[f"sip:lf{i}@127.0.0.1"] = defer.Deferred()
        ask_writer(i)
        await d

    device_sdp = SDP.format(who="device")

    async def call(i: int) -> None:
        sdp = SDP.format(who="caller")
        node.feed(INVITE.format(n=i, user=f"lf{i}", sdp=sdp, length=len(sdp)).encode(), CALLER)
        forked = node.expect(DEVICE, b"INVITE ")
        if stage == "call-remote":
            ask_writer(i)
        else:
            echoed = node.next_feed_message()
            node.feed(register_bytes(i, f"lf{i}", DEVICE[1]), DEVICE)
            await echoed  # one node on Redis: its own change comes back on the feed
        await forked
        b_invite = take(node.outbox, DEVICE, b"INVITE ")
        ok = node.expect(CALLER, b"SIP/2.0 200")
        node.feed(answer(b_invite, "180 Ringing", f"d{i}"), DEVICE)
        node.feed(answer(b_invite, "200 OK", f"d{i}", device_sdp), DEVICE)
        await ok
        take(node.outbox, DEVICE, b"ACK ")
        to = header_value(take(node.outbox, CALLER, b"SIP/2.0 200"), b"to").decode()
        bye = node.expect(DEVICE, b"BYE ")
        for method, kind, cseq in (("ACK", "a", 1), ("BYE", "b", 2)):
            msg = IN_DIALOG.format(method=method, kind=kind, n=i, user=f"lf{i}", to=to, cseq=cseq)
            node.feed(msg.encode(), CALLER)
        await bye
        done = node.expect(CALLER, b"SIP/2.0 200")
        node.feed(answer(take(node.outbox, DEVICE, b"BYE "), "200 OK", f"d{i}"), DEVICE)
        await done
        node.outbox.clear()

    async def run() -> None:
        await node.start()
        node.location.subscribe(Arrivals())
        one = {"register-memory": register, "register-redis": register, "apply-redis": apply}.get(stage, call)
        started = time.perf_counter()
        for i in range(n):
            await one(i)
        elapsed = time.perf_counter() - started
        if stage.startswith("call"):
            stats = node.parts.b2bua.stats()
            if stats["calls"] or stats["total_answered"] != n:
                raise RuntimeError(f"{stats['total_answered']} of {n} calls answered, {stats['calls']} left")
        print(f"elapsed {elapsed}")

    failed: list[Any] = []

    def done(result: Any) -> None:
        if isinstance(result, Exception) or hasattr(result, "getTraceback"):
            failed.append(result)
            print(result.getTraceback() if hasattr(result, "getTraceback") else result, file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addBoth(done))
    reactor.run()
    if w is not None:
        w.kill()
        w.wait()
    if failed:
        raise SystemExit(1)


# -- the driver ------------------------------------------------------------------------------------


def run_child(stage: str, n: int, args: argparse.Namespace, redis_url: str, icount: bool) -> float:
    cmd = [sys.executable, __file__, "--child", stage, str(n), "--reactor", args.reactor]
    if icount:
        out_file = "/dev/null" if args.keep is None else str(args.keep / f"callgrind.{stage}.{n}")
        cmd = ["nice", "-n", "5", *callgrind.command(cmd, out_file=out_file)]
    env = callgrind.environment({"REDIS_COST_URL": redis_url, "REDIS_COST_HARNESS": args.harness})
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    if icount:
        return float(callgrind.total(out.stderr, " ".join(cmd)))
    return float(re.search(r"elapsed (\S+)", out.stdout).group(1))  # type: ignore[union-attr]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="all", help=f"comma-separated, from {', '.join(STAGES)}")
    ap.add_argument("--n", type=int, default=None, help="items per stage: 2000, 300 with --icount")
    ap.add_argument("--icount", action="store_true", help="instructions per item under callgrind")
    ap.add_argument("--reactor", default="auto",
                    choices=("auto", "asyncio", "uvloop", "epoll", "asyncio-twisted", "uvloop-twisted"),
                    help="-twisted: Twisted's asyncio reactor instead of the server's (ops/lean_asyncio.py)")
    ap.add_argument("--redis-port", type=int, default=29000, help="redis-server's port (29000-29499)")
    ap.add_argument("--keep", type=Path, help="with --icount: keep callgrind's output files here")
    ap.add_argument("--harness", choices=("soon", "timer"), default="soon",
                    help="timer: the bench wakes itself with callLater(0) on any reactor, as before round 7")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--writer", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.writer:
        writer(args.writer)
        return 0
    if args.child:
        child(args.child[0], int(args.child[1]), args.reactor, os.environ["REDIS_COST_URL"])
        return 0
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    if any(s not in STAGES for s in stages):
        ap.error(f"--stages: pick from {', '.join(STAGES)}")
    if args.reactor == "epoll" and any(not s.endswith("memory") for s in stages):
        ap.error("--reactor epoll: the Redis stages need an asyncio reactor")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    n = args.n or (300 if args.icount else 2000)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    from tests.redis_server import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="redis-cost-")), port=args.redis_port)
    server.start()
    unit = {"register": "REGISTER", "apply": "change applied", "call": "call"}
    try:
        for stage in stages:
            server.cli("FLUSHALL")
            what = unit[stage.split("-")[0]]
            if args.icount:
                full = run_child(stage, n, args, server.url, True)
                server.cli("FLUSHALL")
                base = run_child(stage, 0, args, server.url, True)
                print(f"{stage:16} {(full - base) / n:>12,.0f} instructions per {what}", flush=True)
            else:
                seconds = run_child(stage, n, args, server.url, False)
                print(f"{stage:16} {seconds / n * 1e6:>9.1f} us per {what} (wall clock, {n})", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
