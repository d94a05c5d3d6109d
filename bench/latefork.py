"""Late-fork benchmark: INVITE first, the device's REGISTER shortly after, the call completes.

    .venv/bin/python bench/latefork.py [--rates 250,500,750,1000] [--duration 10] [--delay-ms 500]
    .venv/bin/python bench/latefork.py --parked 10000
    .venv/bin/python bench/latefork.py --early [--rates ...]    # device registered before the INVITE
    .venv/bin/python bench/latefork.py --backend redis [--rates ...]  # the location store on Redis

The real server runs on one process over UDP (bench/common.py `serve`: twistd plus a stats
hook), with the memory location store, or ``--backend redis`` (a redis-server started here on
``--redis-port``; the server then runs the asyncio reactor). Two SIPp processes drive it, at the same rate:

- the caller side (tests/e2e/scenarios/bench_caller.xml): call N INVITEs the per-call AOR
  ``lf<run>-N``; nobody is registered there yet, so the server parks the call;
- the device side, started ``--delay-ms`` later (bench_device_register.xml): call N REGISTERs
  ``lf<run>-N`` with a Contact on this SIPp's port and holds; the INVITE the server forks there
  on that REGISTER is answered by the out-of-call scenario (bench_device_answer.xml: 200, ACK,
  then the caller's BYE).

A rate passes when >= 99.9 % of the calls succeed on the caller side, >= 99.9 % of them were
late-forked (the silo's REGISTER->INVITE latency has one sample per late fork: a REGISTER that
came before its INVITE would have produced a plain fork without a sample), and SIPp kept the
offered rate (its run lasted at most 110 % of --duration + 1 s). The script prints, per
rate, the caller's success ratio, the achieved calls/s, the server's CPU use and the
REGISTER-arrival -> forked-INVITE-sent latency p50/p99/max measured inside the server (the silo's
``stats()['register_to_invite']``), then the best passing rate. Every command line is printed.

Two calls/s figures: calls answered / the whole SIPp run, which counts the last call's half second
of parking and so stays under the offered rate even for a perfect server (-r 1000 for 10 s gives
at most ~950/s); and the steady state, calls answered per second in SIPp's 1 s rows from 1.5 s
after the start until the last call was made, which a server that keeps up holds at the offered
rate and one that falls behind does not. The server's garbage-collector runs, times and stalls
over 50 ms are printed too (the stats hook records them).

``--parked N``: N INVITEs to N AORs without a device (ring timeout 1 h), then the server's RSS
growth (/proc/<pid>/status VmRSS before and after) once the server reports N parked calls.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    bench_port,
    use_ports,
    HOST,
    SCENARIOS,
    SipTarget,
    cpu_seconds,
    pin,
    sipp_run_seconds,
    sipp_stats,
    start_bench_server,
    steady_rate,
    udp_rcvbuf_errors,
    udp_socket_drops,
)
from tests.redis_server import RedisServer  # noqa: E402

SIPP = shutil.which("sipp") or "/usr/bin/sipp"
PASS_RATIO = 0.999
# like bench/register.py: the server on CPU 0, SIPp on CPU 1 (--no-pin to let the OS choose)
SERVER_CPU, SIPP_CPU = 0, 1
PIN = True
REDIS: RedisServer | None = None  # --backend redis
# SIPp's -timer_resol in ms (None: SIPp's default, 10 ms). SIPp runs its new calls and ends its
# pauses on ticks of this length, so at its default every call due within 10 ms leaves in one burst
SIPP_TIMER_MS: int | None = None


def sipp_command(server: SipTarget, scenario: str, workdir: Path, name: str, *, calls: int,
                 rate: float, prefix: str, limit: int, ooc: str | None = None,
                 pause_ms: int | None = None, timeout_s: int = 120) -> tuple[list[str], Path, int]:
    """A SIPp command line over UDP; returns it with its statistics file and its local port."""
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    stat_file = d / "stats.csv"
    port = bench_port()
    control = bench_port()  # SIPp's control socket is UDP too
    while control == port:  # the OS may hand the port just checked and closed out again
        control = bench_port()
    args = [
        *pin(SIPP_CPU if PIN else None),
        SIPP, f"{HOST}:{server.sip_port}",
        "-sf", str(SCENARIOS / scenario),
        "-t", "u1", "-i", HOST, "-p", str(port), "-cp", str(control),
        "-r", f"{rate:g}", "-m", str(calls), "-l", str(limit),
        "-key", "prefix", prefix,
        "-nostdin", "-timeout", f"{timeout_s}s",
        "-trace_err", "-error_file", str(d / "errors.log"),
        "-trace_stat", "-stf", str(stat_file), "-fd", "1",
        "-max_recv_loops", "10000", "-max_sched_loops", "10000",
    ]
    if ooc:
        args += ["-oocsf", str(SCENARIOS / ooc)]
    if pause_ms is not None:
        args += ["-d", str(pause_ms)]
    if SIPP_TIMER_MS is not None:
        args += ["-timer_resol", str(SIPP_TIMER_MS)]
    return args, stat_file, port


def spawn(args: list[str], workdir: Path, name: str) -> subprocess.Popen[bytes]:
    out = (workdir / name / "stdout.txt").open("wb")
    return subprocess.Popen(args, cwd=workdir / name, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT)


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.3f} ms"


@dataclass
class PairRun:
    """What one late-fork SIPp run (caller + device) left: its processes, the caller's statistics
    file, the UDP drops per socket, the wall time and the server's CPU seconds over the run."""
    caller: subprocess.Popen[bytes]
    device: subprocess.Popen[bytes]
    caller_stats: Path
    drops: dict[str, int]
    wall: float
    server_cpu: float
    host_drops: int


def run_pair(target: SipTarget, rate: float, calls: int, workdir: Path, prefix: str, *, delay_ms: int,
             early: bool, duration: float, server_cpu: Callable[[], float]) -> PairRun:
    """The caller and device SIPp processes against ``target`` at ``rate``, the second one
    ``delay_ms`` after the first (the device first when ``early``); ``server_cpu`` reads the
    server's CPU seconds before and after."""
    cpu0 = server_cpu()
    host_drops0 = udp_rcvbuf_errors()
    limit = max(1000, int(rate * 5))
    caller_args, caller_stats, caller_port = sipp_command(
        target, "bench_caller.xml", workdir, "caller", calls=calls, rate=rate, prefix=prefix, limit=limit)
    device_args, _, device_port = sipp_command(
        target, "bench_device_register.xml", workdir, "device", calls=calls, rate=rate, prefix=prefix,
        limit=limit * 4, ooc="bench_device_answer.xml", pause_ms=2000)
    if early:  # the device registers first: a plain fork to a registered device
        print(f"  device: {' '.join(device_args)}")
        print(f"  caller (started {delay_ms} ms later): {' '.join(caller_args)}")
    else:
        print(f"  caller: {' '.join(caller_args)}")
        print(f"  device (started {delay_ms} ms later): {' '.join(device_args)}")
    started = time.monotonic()
    drops: dict[str, int] = {}
    if early:
        device = spawn(device_args, workdir, "device")
        time.sleep(delay_ms / 1000.0)
        caller = spawn(caller_args, workdir, "caller")
    else:
        caller = spawn(caller_args, workdir, "caller")
        time.sleep(delay_ms / 1000.0)
        device = spawn(device_args, workdir, "device")
    while caller.poll() is None or device.poll() is None:
        # per-socket drop counters vanish with the socket: sample them while SIPp runs
        if caller.poll() is None and device.poll() is None:
            drops = {"server": udp_socket_drops(target.sip_port), "caller": udp_socket_drops(caller_port),
                     "device": udp_socket_drops(device_port)}
        if time.monotonic() - started > duration * 4 + 120:
            caller.kill()
            device.kill()
            raise RuntimeError("SIPp did not finish")
        time.sleep(0.2)
    drops["server"] = udp_socket_drops(target.sip_port)
    wall = time.monotonic() - started
    return PairRun(caller, device, caller_stats, drops, wall, server_cpu() - cpu0,
                   udp_rcvbuf_errors() - host_drops0)


def run_rate(rate: float, args: argparse.Namespace, workdir: Path, run: int) -> dict[str, Any]:
    calls = max(1, int(rate * args.duration))
    prefix = f"lf{run}-"
    twistd_options = []
    if args.profile:
        twistd_options = [f"--profile={workdir / 'server.prof'}", "--profiler=cprofile", "--savestats"]
    extra: dict[str, dict[str, Any]] = {
        "calls": {"ring_timeout": 30, "invite_cancel_grace": 0},
        "log": {"level": args.log_level, "format": args.log_format},
    }
    if args.reactor:
        extra["ops"] = {"reactor": args.reactor}
    if REDIS is not None:  # --backend redis: the location store on Redis, emptied for each run
        REDIS.cli("FLUSHALL")
        extra["location"] = {"backend": "redis", "url": REDIS.url}
    server = start_bench_server(workdir / "server", extra, twistd_options, cpu=SERVER_CPU if PIN else None)
    print(f"  server: {server.command}")
    try:
        pair = run_pair(server, rate, calls, workdir, prefix, delay_ms=args.delay_ms, early=args.early,
                        duration=args.duration, server_cpu=lambda: cpu_seconds(server.pid))
        stats = server.stats()
    finally:
        final = server.stop()
    caller, device, wall, cpu = pair.caller, pair.device, pair.wall, pair.server_cpu
    cs = sipp_stats(pair.caller_stats)
    steady = steady_rate(pair.caller_stats, skip=args.delay_ms / 1000.0 + 1.0)
    ok = int(cs.get("SuccessfulCall(C)", 0))
    created = int(cs.get("OutgoingCall(C)", 0))
    elapsed = sipp_run_seconds(cs) or wall
    snapshot = stats or final or {}
    silo = snapshot.get("silo") or {}
    mgr = snapshot.get("calls") or {}
    latency = silo.get("register_to_invite") or {}
    late = int(latency.get("samples") or 0)
    ratio = ok / calls
    return {
        "rate": rate, "calls": calls, "created": created, "ok": ok,
        "failed": int(cs.get("FailedCall(C)", 0)), "ratio": ratio, "elapsed": elapsed,
        "achieved": ok / elapsed if elapsed else 0.0, "late_forked": late,
        "p50": latency.get("p50"), "p99": latency.get("p99"), "max": latency.get("max"),
        "server_cpu": cpu, "wall": wall, "host_drops": pair.host_drops, "drops": pair.drops,
        "caller_rc": caller.returncode, "device_rc": device.returncode,
        "total_calls": mgr.get("total_calls"), "answered": mgr.get("total_answered"),
        "left_calls": mgr.get("calls"), "left_silo": silo.get("stored_transactions"),
        # the rate was really sustained (SIPp slows down when calls pile up), >= 99.9 % of the
        # calls succeeded, and >= 99.9 % of them were late-forked (REGISTER after the parked INVITE)
        "early": args.early, "gc": snapshot.get("gc") or {}, "steady": steady,
        "kept_pace": elapsed <= args.duration * 1.1 + 1.0,
        "passed": ratio >= PASS_RATIO and (args.early or late >= PASS_RATIO * calls) and created == calls
        and elapsed <= args.duration * 1.1 + 1.0,
    }


def report(r: dict[str, Any]) -> None:
    print(f"  caller: {r['ok']}/{r['calls']} ok ({r['ratio'] * 100:.2f} %), {r['failed']} failed, "
          f"{r['achieved']:.0f} calls/s over {r['elapsed']:.1f} s "
          f"(sipp exit {r['caller_rc']}, device exit {r['device_rc']})")
    if r["steady"] is not None:
        rate, since, until = r["steady"]
        print(f"  steady state: {rate:.0f} calls/s answered from {since:.1f} s to {until:.1f} s "
              f"(SIPp's 1 s rows while it was still making calls)")
    print(f"  server: {r['total_calls']} calls, {r['answered']} answered, {r['late_forked']} late-forked; "
          f"left: {r['left_calls']} calls, {r['left_silo']} silo entries; CPU {r['server_cpu']:.1f} s "
          f"over {r['wall']:.1f} s ({r['server_cpu'] / r['wall'] * 100:.0f} % of a core, "
          f"{r['server_cpu'] / max(r['ok'], 1) * 1000:.2f} ms per call)")
    gc_stats = r["gc"]
    if gc_stats:
        print("  server's garbage collector: " + ", ".join(
            f"gen{g} {gc_stats['runs'][g]} runs {gc_stats['seconds'][g]:.2f} s "
            f"(longest {gc_stats['max'][g] * 1000:.0f} ms)"
            for g in range(3)) + f"; {gc_stats['objects']} tracked objects at the end")
    print(f"  UDP datagrams dropped on full receive buffers: {r['drops']} (whole host: {r['host_drops']})")
    print(f"  REGISTER -> forked INVITE inside the server: p50 {fmt_ms(r['p50'])}, "
          f"p99 {fmt_ms(r['p99'])}, max {fmt_ms(r['max'])}")
    verdict = "PASS" if r["passed"] else "FAIL"
    what = "succeeded" if r["early"] else "succeeded and were late-forked"
    print(f"  {verdict} (>= {PASS_RATIO * 100:.1f} % of the calls {what}, "
          f"at the offered rate: {'yes' if r['kept_pace'] else 'no, SIPp fell behind'})")


def latefork(args: argparse.Namespace, base: Path) -> int:
    results = []
    for i, rate in enumerate(float(r) for r in args.rates.split(",")):
        order = "INVITE {} ms after REGISTER" if args.early else "REGISTER {} ms after INVITE"
        print(f"\n== {'early' if args.early else 'late'} fork at {rate:g} calls/s for {args.duration:g} s "
              f"({order.format(args.delay_ms)})")
        r = run_rate(rate, args, base / f"rate-{rate:g}", i + 1)
        results.append(r)
        report(r)
    passed = [r for r in results if r["passed"]]
    print()
    if passed:
        best = max(passed, key=lambda r: r["achieved"])
        what = "INVITE to a registered device" if args.early else "late fork"
        steady = f", {best['steady'][0]:.0f}/s in steady state" if best["steady"] is not None else ""
        print(f"RESULT {what}, UDP, one server process: {best['achieved']:.0f} calls/s over the whole "
              f"run{steady}, at {best['ratio'] * 100:.2f} % success (offered {best['rate']:g}/s); "
              f"REGISTER->INVITE p50 {fmt_ms(best['p50'])}, p99 {fmt_ms(best['p99'])}")
        return 0
    print("RESULT late fork: no rate passed")
    return 1


def parked(args: argparse.Namespace, base: Path) -> int:
    n = args.parked
    server = start_bench_server(base / "server", {
        "calls": {"ring_timeout": 3600, "invite_cancel_grace": 0},
    }, cpu=SERVER_CPU if PIN else None)
    print(f"  server: {server.command}")
    caller = None
    try:
        time.sleep(1.0)
        before = server.rss_kib()
        caller_args, _, _ = sipp_command(server, "bench_park.xml", base, "caller", calls=n,
                                         rate=args.park_rate, prefix="park-", limit=n + 10, timeout_s=3600)
        print(f"  caller: {' '.join(caller_args)}")
        caller = spawn(caller_args, base, "caller")
        deadline = time.monotonic() + n / args.park_rate + 120
        parked_now = 0
        while time.monotonic() < deadline:
            time.sleep(1.0)
            stats = server.stats()
            parked_now = (stats.get("calls") or {}).get("by_state", {}).get("parked", 0)
            if parked_now >= n:
                break
        time.sleep(2.0)  # the last calls parked reach their compaction (1 s: b2bua/call.py)
        stats = server.stats()
        after = server.rss_kib()
        silo = stats.get("silo") or {}
        growth = (after - before) / 1024
        print(f"  parked calls: {stats['calls']['by_state']}; "
              f"silo stored_transactions {silo.get('stored_transactions')}")
        print(f"  server RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB "
              f"with {parked_now} parked calls")
        print(f"RESULT parked: {parked_now} parked calls, RSS growth {growth:.1f} MiB "
              f"({(after - before) / max(parked_now, 1):.1f} KiB per parked call)")
        return 0 if parked_now >= n else 1
    finally:
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.wait(10)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="250,500,750,1000", help="calls/s to try, comma-separated")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of traffic per rate")
    ap.add_argument("--delay-ms", type=int, default=500, help="REGISTER this long after the INVITE")
    ap.add_argument("--early", action="store_true",
                    help="the device registers --delay-ms before the INVITE (no late fork: a plain fork)")
    ap.add_argument("--parked", type=int, default=0, metavar="N", help="park N calls, report the RSS growth")
    ap.add_argument("--park-rate", type=float, default=1000.0, help="INVITEs/s in --parked mode")
    ap.add_argument("--log-level", default="warn", choices=("debug", "info", "warn", "error"),
                    help="the server's [log] level")
    ap.add_argument("--log-format", default="text", choices=("text", "json"), help="server log format")
    ap.add_argument("--profile", action="store_true", help="run the server under twistd's cProfile")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and SIPp to CPU 1")
    ap.add_argument("--keep", type=Path, help="keep the logs in this directory (default: a temp dir)")
    ap.add_argument("--backend", choices=("memory", "redis"), default="memory",
                    help="location backend (redis: a redis-server on 127.0.0.1:--redis-port)")
    ap.add_argument("--redis-port", type=int, default=24380)
    ap.add_argument("--reactor", choices=("epoll", "asyncio", "uvloop"), help="[ops] reactor (default: auto)")
    ap.add_argument("--ports", metavar="LOW-HIGH", help="every port (server, SIPp) from this range")
    args = ap.parse_args(argv)
    if args.ports:
        use_ports(args.ports)
    global PIN
    PIN = not args.no_pin
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    base = args.keep or Path(tempfile.mkdtemp(prefix="latefork-"))
    base.mkdir(parents=True, exist_ok=True)
    global REDIS
    if args.backend == "redis":
        REDIS = RedisServer(base, port=args.redis_port)
        REDIS.start()
    try:
        return parked(args, base) if args.parked else latefork(args, base)
    finally:
        if REDIS is not None:
            REDIS.stop()
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"logs kept in {base}")


if __name__ == "__main__":
    raise SystemExit(main())
