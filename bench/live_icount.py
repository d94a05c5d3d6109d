"""User-space instructions per late-fork call of the real server process, under callgrind.

    .venv/bin/python bench/live_icount.py [--code DIR] [--n 200] [--rate 10] [--port 27100] [--reactor uvloop]
    .venv/bin/python bench/live_icount.py --case e [--n 200] [--rate 5]     # two nodes on Redis

bench/inproc.py counts the call path without sockets, with the asyncio reactor and its own fake
peers; bench/sidebyside.py measures the whole process but moves by 10-20 % with the load of a shared
box. This one runs the real server (bench/common.py serve: twistd, epoll reactor, memory location
store; ``--reactor uvloop``: the asyncio reactor a node on the Redis store runs) under
``valgrind --tool=callgrind`` and drives it with the two SIPp scenarios of
bench/latefork.py (INVITE parked, the device REGISTERs 150 ms later, 200, ACK, BYE) at ``--rate``
(the server runs ~50x slower under valgrind), once with ``--n`` calls and once with none; the
difference / N is what one call costs in user space: parsing, the call path, the reactor and the
socket calls' user side (the kernel's share is not counted). Deterministic to ~0.2 %.
``--keep DIR`` keeps both profiles for callgrind_annotate. ``--code DIR``: another checkout's code
(e.g. a ``git archive`` of main with its mypyc modules built in place), run with this venv's Python.
Ports: ``--port`` to ``--port`` + 12.

``--case`` (bench/cluster.py's cases): ``a`` one node on the memory store (the default, as above);
``b`` one node on the Redis store (a ``redis-server`` started here, the reactor ``auto`` picks:
asyncio over uvloop); ``e`` two nodes on one Redis, both under callgrind, the INVITEs to node A and
the REGISTERs to node B, which A forks straight to the device: the figure is A's and B's
instructions added. ``f`` two workers sharing the public port (``reuse_port``, internal addresses,
``udp_via_path = "auto"``), SIPp's caller and device on source ports the kernel hands to A and to B
(asked with an OPTIONS each, counted by the worker's admin API; ports up to ``--port`` + 12): A
forks straight to the device; with ``--udp-pins 0`` B passes the device's answers on to A, else A
pins the device and gets them (and its later REGISTERs) itself. Each node is ready once a
throwaway REGISTER got its 200 (its Redis link is up; in f, once its admin API says so), in both
runs. Redis-server is not counted. The idle work that goes with time (the overload monitor's tick,
each node's heartbeat to Redis once a second) is taken out: the run with no calls idles as long as
the calls took in the other (at --rate 5 it was ~100k instructions per call of (e), ~20k of (a),
before it did). The overload timer ticks in both runs (``serve --overload-always-ticks``): it parks
on an idle server since round 10, never at a call every 200 ms, and the subtraction must take out
the ticks of the run with calls. ``c`` as ``e`` through the Path relay: each node has an internal address
(``[cluster] node_address``, ``--port`` + 7 and + 11): A forks to B's, and B relays the call's
messages over the device's flow.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import callgrind  # noqa: E402
from bench.cluster import _port_reaching, _wait_admin, start_redis, wait_store_ready, wakeups  # noqa: E402
SCENARIOS = ROOT / "tests" / "e2e" / "scenarios"
CONFIG = """[sip]
listen = ["udp:127.0.0.1:{port}"]
domains = ["localhost", "127.0.0.1"]
[auth]
enabled = false
[location]
{location}
[log]
level = "warn"
format = "text"
[ops]
drain_timeout = 2
reactor = "{reactor}"
{cluster}[calls]
ring_timeout = 30
invite_cancel_grace = 0
[overload]
# on, as in production (its per-message hooks are counted), but never entered: under valgrind the
# server runs ~50x slower, and on a loaded box its reactor lags past the default 200 ms, which
# would refuse INVITEs with 503 and fail the run
enter_lag_ms = 60000
leave_lag_ms = 50
"""


def wait_answering(port: int, timeout: float = 300.0) -> None:
    """OPTIONS until the server (slow to start under valgrind) answers."""
    probe = (f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
             f"Via: SIP/2.0/UDP 127.0.0.1:{port + 9};branch=z9hG4bK-p\r\nMax-Forwards: 70\r\n"
             f"From: <sip:p@127.0.0.1>;tag=p\r\nTo: <sip:127.0.0.1>\r\nCall-ID: probe\r\n"
             f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port + 9))
        s.settimeout(1.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.sendto(probe, ("127.0.0.1", port))
            try:
                s.recvfrom(4096)
                return
            except socket.timeout:
                pass
    raise SystemExit(f"the server on port {port} did not answer OPTIONS in {timeout:.0f} s")


def _node(code: Path, n: int, name: str, port: int, workdir: Path, keep: Path | None, reactor: str,
          redis_url: str | None, shared: str = "") -> tuple[subprocess.Popen[bytes], Path]:
    """One server under callgrind; returns it and the file its stderr (callgrind's total) goes to.
    ``shared``: more [cluster] keys and sections (case f)."""
    location = 'backend = "memory"' if redis_url is None else f'backend = "redis"\nurl = "{redis_url}"'
    cluster = "" if redis_url is None else f'[cluster]\nnode_id = "{name}"\n{shared}'
    conf = workdir / f"server-{name}-{n}.toml"
    conf.write_text(CONFIG.format(port=port, reactor=reactor, location=location, cluster=cluster))
    errors = workdir / f"callgrind-{name}-{n}.err"
    env = callgrind.environment({"PYTHONPATH": str(code)})
    out = "/dev/null" if keep is None else str(keep / f"callgrind-{name}-{n}.out")
    # with --keep, the server's own log too (a warning or a traceback in the run shows there)
    log = workdir / f"server-{name}-{n}.log" if keep is None else keep / f"server-{name}-{n}.log"
    cmd = callgrind.command([sys.executable, str(code / "bench" / "common.py"), "serve", "--stats-file",
                             str(workdir / f"stats-{name}-{n}.json"), "--overload-always-ticks", "--",
                             "-n", "--pidfile=", "libon-tsilo",
                             "--config", str(conf)], out_file=out)
    print(f"  server {name}: {' '.join(cmd)}", flush=True)
    with open(errors, "w") as err, open(log, "w") as out_log:
        return subprocess.Popen(cmd, stdout=out_log, stderr=err, env=env, cwd=str(code)), errors


def refresh_plugin_cache(code: Path) -> None:
    """Have Twisted write its plugin caches (twisted/plugins/dropin.cache) before counting: twistd
    writes a missing or stale one at start, which the first run after a checkout or an install
    would count (~130M instructions once, 0.6M per call of a 200-call run)."""
    script = ("from twisted.application.service import IServiceMaker\n"
              "from twisted.plugin import getPlugins\n"
              "list(getPlugins(IServiceMaker))\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(code),
                   env=callgrind.environment({"PYTHONPATH": str(code)}))


def _shared(port: int, name: str, pins: int | None) -> str:
    """Case f's [cluster] keys and [admin] of worker ``name`` (a or b) on the public ``port``."""
    internal, peer, admin = (port + 5, port + 7, port + 8) if name == "a" else (port + 7, port + 5, port + 10)
    return (f'reuse_port = true\nnode_address = "udp:127.0.0.1:{internal}"\n'
            f'peers = ["udp:127.0.0.1:{peer}"]\nsecret = "live-icount"\n'
            + (f"max_udp_pins = {pins}\n" if pins is not None else "")
            + f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n')


def _relay(port: int, name: str) -> str:
    """Case c's [cluster] keys of node ``name``: its internal address, the shared flow-token key."""
    internal = port + 7 if name == "a" else port + 11
    return f'node_address = "udp:127.0.0.1:{internal}"\nsecret = "live-icount"\n'


def instructions(code: Path, n: int, rate: float, port: int, workdir: Path, keep: Path | None = None,
                 reactor: str = "epoll", case: str = "a", idle: float = 0.0, pins: int | None = None
                 ) -> tuple[list[int], list[int], float]:
    """User-space instructions of each of the case's server processes (A, then B) over a run of
    ``n`` calls (0: none, the servers then idle for ``idle`` s, as long as the calls took in the
    other run), their wake-ups (how the same datagrams fell into reactor turns moves the count by a
    few per cent between runs: print it beside), and the seconds the calls took."""
    redis = start_redis(port + 6, workdir / f"redis-{n}", None) if case != "a" else None
    nodes: list[tuple[subprocess.Popen[bytes], Path]] = []
    caller_port, device_source = port + 1, port + 3
    try:
        url = redis.url if redis is not None else None
        first = _shared(port, "a", pins) if case == "f" else _relay(port, "a") if case == "c" else ""
        nodes.append(_node(code, n, "a", port, workdir, keep, reactor, url, first))
        if case in ("c", "e"):
            nodes.append(_node(code, n, "b", port + 5, workdir, keep, reactor, url,
                               _relay(port, "b") if case == "c" else ""))
        if case == "f":
            nodes.append(_node(code, n, "b", port, workdir, keep, reactor, url, _shared(port, "b", pins)))
        device_port = port + 5 if case in ("c", "e") else port
        wait_answering(port)
        if case in ("c", "e"):
            wait_answering(port + 5)
        if case == "f":  # a REGISTER to the shared port could land on either worker: ask each
            admins = [port + 8, port + 10]
            for admin in admins:
                _wait_admin(admin, lambda st: st["usrloc"]["redis"]["up"], "a worker's Redis store", 300.0)
            caller_port = _port_reaching(port, admins[0], admins)
            device_source = _port_reaching(port, admins[1], admins, not_=caller_port)
            print(f"  source ports: caller {caller_port} -> a, device {device_source} -> b", flush=True)
        elif redis is not None:
            for node_port in {port, device_port}:
                wait_store_ready(node_port, timeout=300.0)
        started = time.monotonic()
        if not n:
            time.sleep(idle)  # the idle work that goes with time (timers, heartbeats), as in the other run
        else:
            common = ["-t", "u1", "-i", "127.0.0.1", "-r", str(rate), "-m", str(n),
                      "-key", "prefix", "icount-", "-nostdin", "-timeout", "300s",
                      "-max_recv_loops", "10000", "-max_sched_loops", "10000"]
            caller = ["sipp", f"127.0.0.1:{port}", "-sf", str(SCENARIOS / "bench_caller.xml"),
                      "-p", str(caller_port), "-cp", str(port + 2), "-l", "1000", *common]
            device = ["sipp", f"127.0.0.1:{device_port}", "-sf", str(SCENARIOS / "bench_device_register.xml"),
                      "-p", str(device_source), "-cp", str(port + 4), "-l", "4000",
                      "-oocsf", str(SCENARIOS / "bench_device_answer.xml"), "-d", "2000", *common]
            print(f"  caller: {' '.join(caller)}", flush=True)
            print(f"  device (150 ms later): {' '.join(device)}", flush=True)
            a = subprocess.Popen(caller, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.15)
            b = subprocess.Popen(device, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if a.wait() != 0 or b.wait() != 0:
                raise SystemExit(f"SIPp failed calls (exit {a.returncode}/{b.returncode}): "
                                 f"the count is not one of {n} good calls")
        took = time.monotonic() - started
        woken = [wakeups(server.pid) for server, _ in nodes]
    finally:
        for server, _ in nodes:
            server.send_signal(signal.SIGTERM)
        for server, _ in nodes:
            server.wait()
        if redis is not None:
            redis.stop()
    return [callgrind.total(errors.read_text(), str(errors)) for _, errors in nodes], woken, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", type=Path, default=ROOT,
                    help="the checkout whose libon_tsilo runs (default: this one)")
    ap.add_argument("--n", type=int, default=200, help="late-fork calls")
    ap.add_argument("--rate", type=float, default=10.0,
                    help="calls/s (the server is ~50x slower under valgrind)")
    ap.add_argument("--port", type=int, default=27100, help="server port; the next ones (up to +12) too")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep callgrind's profiles there (callgrind-0.out, callgrind-N.out), e.g. for "
                         "callgrind_annotate: the difference per function is what a call costs in it")
    ap.add_argument("--reactor", default=None, choices=("epoll", "uvloop", "asyncio", "auto"),
                    help="[ops] reactor (default: epoll for case a, auto for the others: uvloop)")
    ap.add_argument("--case", default="a", choices=("a", "b", "c", "e", "f"),
                    help="a: one node, memory store; b: one node on Redis; e: two nodes on Redis, "
                         "INVITEs to A, REGISTERs to B; c: e through the Path relay; f: two workers "
                         "sharing the public port "
                         "(bench/cluster.py's cases)")
    ap.add_argument("--udp-pins", type=int, default=None,
                    help="case f: [cluster] max_udp_pins (0: no pins, B passes the answers on)")
    args = ap.parse_args()
    print(f"command: {' '.join([sys.executable, *sys.argv])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="live-icount-") as tmp:
        keep = args.keep.resolve() if args.keep is not None else None
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
        reactor = args.reactor or ("epoll" if args.case == "a" else "auto")
        code = args.code.resolve()
        refresh_plugin_cache(code)
        run = (args.rate, args.port, Path(tmp), keep, reactor, args.case)
        full, woken, took = instructions(code, args.n, *run, pins=args.udp_pins)
        base, woken_idle, _ = instructions(code, 0, *run, idle=took, pins=args.udp_pins)
    per_node = [(f - b) / args.n for f, b in zip(full, base, strict=True)]
    nodes = "" if len(per_node) < 2 else " (" + ", ".join(
        f"node {name} {x:,.0f}" for name, x in zip("AB", per_node, strict=False)) + ")"
    print(f"RESULT ({args.case}) {sum(per_node):,.0f} user-space instructions per late-fork call{nodes} "
          f"({args.n} calls at {args.rate:g}/s; reactor {reactor}; code: {args.code})")
    # the runs apart: the idle run's timers are what the subtraction takes out
    print(f"runs ({took:.1f} s each): with calls " + ", ".join(f"{f:,}" for f in full)
          + ", idle " + ", ".join(f"{b:,}" for b in base) + " instructions")
    print("wake-ups per call: " + ", ".join(f"node {name} {(w - i) / args.n:.2f}" for name, w, i
                                             in zip("AB", woken, woken_idle, strict=False)))


if __name__ == "__main__":
    main()
