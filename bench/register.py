#!/usr/bin/env python3
"""REGISTER throughput of the real server: the highest rate SIPp can sustain at 100 % success.

Run: .venv/bin/python bench/register.py [--backend memory|sqlite|redis] [--auth on|off|both] [--seconds 5]
                                         [--set section.key=value ...]
     .venv/bin/python bench/register.py --options      # OPTIONS (tests/e2e/scenarios/options.xml)

For every rate tried, a fresh `twistd -n libon-tsilo` process (UDP on a free loopback port, log
level warn, location backend --backend: sqlite by default; redis starts a redis-server on
127.0.0.1:--redis-port, emptied before each run) gets `-m rate*seconds` registrations from SIPp
at `-r rate -rp 1000`:

- auth off: tests/e2e/scenarios/register_bench.xml, one REGISTER per call, a distinct AOR per call
  (u[call_number]), expects 200;
- auth on: tests/e2e/scenarios/register_bench_auth.xml, REGISTER / 401 / REGISTER with
  `[authentication]` (MD5: SIPp 3.6 has no SHA-256, so the server offers MD5 only) / 200. The
  user is created beforehand with `libon-tsilo-admin user add`; all calls register that one AOR
  (-s/-au/-ap: SIPp 3.6.1 does not expand injection fields inside [authentication ...]), each call
  with a new Call-ID and a new nonce, so every call costs a challenge and a digest check.

A rate passes when SIPp exits 0, its final -trace_stat row shows every call successful and none
failed (a lost or late answer is a failed call: -recv_timeout), and the run ended within 10 %
(+0.5 s) of its nominal length (an overloaded server answers everything late and the run drags
on). Rates double from --start until one fails (or --max; they halve when --start already fails),
then a binary search narrows the gap to --resolution. The figure printed is the achieved rate of
the best passing run: successful registrations / SIPp's run time (StartTime to the final
CurrentTime of its stat file), with the server's CPU time per registration (utime + stime over
the run, /proc) and, for redis, redis-server's.

With two or more CPUs the server is pinned to CPU 0 and SIPp to CPU 1 (taskset), so "one process on
one core" is what is measured. Target with auth off: >= 4,000 REGISTER/s.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds  # noqa: E402
from tests.e2e.proc import HOST, ServerProcess, free_port, start_server  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

SCENARIOS = ROOT / "tests" / "e2e" / "scenarios"
TARGET_NOAUTH = 4000
BENCH_USER, BENCH_PASSWORD = "bench", "bench-secret"


@dataclass
class Run:
    rate: int
    calls: int
    successful: int
    failed: int
    elapsed: float
    exit_code: int
    command: str

    nominal: float = 0.0  # calls / rate: how long the run lasts when the server keeps up
    server_cpu: float = 0.0  # seconds of CPU the server used over the run
    redis_cpu: float = 0.0  # and redis-server (backend redis)

    @property
    def all_ok(self) -> bool:
        return self.exit_code == 0 and self.failed == 0 and self.successful == self.calls

    @property
    def kept_up(self) -> bool:
        # an overloaded server can still answer everything late (the backlog drains inside the
        # timeouts): that rate is not sustained, so the run must end near its nominal length
        return self.elapsed <= self.nominal * 1.1 + 0.5

    @property
    def passed(self) -> bool:
        return self.all_ok and self.kept_up

    @property
    def achieved(self) -> float:
        return self.successful / self.elapsed if self.elapsed > 0 else 0.0


def epoch(stamp: str) -> float:
    """A SIPp stat-file time ("date<TAB>time<TAB>epoch") as epoch seconds."""
    return float(stamp.split("\t")[-1])


def final_stats(stat_file: Path) -> dict[str, str]:
    lines = [line for line in stat_file.read_text(errors="replace").splitlines() if line.strip()]
    if len(lines) < 2:
        return {}
    names = lines[0].split(";")
    return dict(zip(names, lines[-1].split(";")))


def pinning(enabled: bool) -> tuple[list[str], list[str]] | None:
    """taskset prefixes (server, sipp) when pinning is possible."""
    if not enabled or shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return (["taskset", "-a", "-pc", str(cpus[0])], ["taskset", "-c", str(cpus[1])])


def make_user(directory: Path, name: str, password: str) -> Path:
    """The users db, written by `libon-tsilo-admin user add` (realm: the config default)."""
    config = directory / "admin.toml"
    config.write_text('[auth]\nusers_db = "users.sqlite"\n')
    subprocess.run(
        [str(Path(sys.executable).parent / "libon-tsilo-admin"), "--config", str(config), "user", "add", name,
         "--password", password],
        check=True, capture_output=True, text=True,
    )
    return directory / "users.sqlite"


REDIS: RedisServer | None = None  # --backend redis: one redis-server for every run
SETTINGS: list[str] = []  # --set


def start(
    directory: Path, auth: bool, backend: str, users_db: Path | None, pin: list[str] | None
) -> ServerProcess:
    extra: dict[str, dict[str, Any]] = {
        "log": {"level": "warn"},
        "auth": {"enabled": auth, "algorithms": ["MD5"]},
        "location": {"backend": backend},
        "registrar": {"max_expires": 3600, "default_expires": 3600},
    }
    if REDIS is not None:
        REDIS.cli("FLUSHALL")
        extra["location"]["url"] = REDIS.url
    for setting in SETTINGS:  # --set section.key=value (a TOML value, or a bare string)
        name, _, raw = setting.partition("=")
        section, _, key = name.partition(".")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        extra.setdefault(section, {})[key] = value
    if users_db is not None:
        shutil.copy(users_db, directory / "libon-tsilo-users.sqlite")  # the config default, relative
    server = start_server(directory, extra)
    if pin is not None:
        subprocess.run([*pin, str(server.pid)], check=True, capture_output=True)
    return server


OPTIONS = False  # --options: OPTIONS to the server (answered statelessly by the UAS core), no REGISTER


def run_rate(rate: int, seconds: float, auth: bool, backend: str, base: Path, users: Path | None,
             pins: tuple[list[str], list[str]] | None) -> Run:
    directory = Path(tempfile.mkdtemp(prefix=f"rate{rate}-", dir=base))
    server = start(directory, auth, backend, users, pins[0] if pins else None)
    cpu0 = cpu_seconds(server.pid)
    redis_cpu0 = cpu_seconds(REDIS.proc.pid) if REDIS is not None and REDIS.proc else 0.0
    calls = max(1, int(rate * seconds))
    scenario = SCENARIOS / ("register_bench_auth.xml" if auth else "register_bench.xml")
    if OPTIONS:
        scenario = SCENARIOS / "options.xml"
    stat_file = directory / "sipp-stat.csv"
    cmd = [
        *(pins[1] if pins else []),
        "sipp", f"{HOST}:{server.sip_port}", "-sf", str(scenario), "-t", "u1", "-i", HOST,
        "-p", str(free_port()), "-r", str(rate), "-rp", "1000", "-m", str(calls),
        "-l", str(max(rate * 5, 1000)),  # calls in flight (SIPp's default would cap the rate)
        "-recv_timeout", "5000", "-timeout", f"{int(seconds * 4 + 60)}s", "-timeout_error",
        "-buff_size", "8388608", "-trace_stat", "-stf", str(stat_file), "-fd", "1", "-nostdin",
    ]
    if users is not None:
        cmd += ["-s", BENCH_USER, "-au", BENCH_USER, "-ap", BENCH_PASSWORD]
    try:
        # exit status 0: every call succeeded; 1: some failed (SIPp's own verdict, checked too)
        proc = subprocess.run(cmd, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=seconds * 4 + 120)
        code = proc.returncode
        server_cpu = cpu_seconds(server.pid) - cpu0
        redis_cpu = cpu_seconds(REDIS.proc.pid) - redis_cpu0 if REDIS is not None and REDIS.proc else 0.0
    finally:
        server.stop()
    stats = final_stats(stat_file) if stat_file.exists() else {}
    run = Run(
        rate=rate,
        calls=calls,
        successful=int(stats.get("SuccessfulCall(C)", 0) or 0),
        failed=int(stats.get("FailedCall(C)", 0) or 0),
        elapsed=epoch(stats["CurrentTime"]) - epoch(stats["StartTime"]) if "StartTime" in stats else 0.0,
        exit_code=code,
        command=shlex.join(cmd),
        nominal=calls / rate,
        server_cpu=server_cpu,
        redis_cpu=redis_cpu,
    )
    if server.tracebacks():
        print(f"  server logged errors, see {server.log_path}", file=sys.stderr)
        run.exit_code = run.exit_code or 99
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return run


def cpu_per(run: Run) -> str:
    n = max(run.successful, 1)
    text = f"server CPU {run.server_cpu / n * 1e6:.0f} us/REGISTER"
    if REDIS is not None:
        text += f" + redis-server {run.redis_cpu / n * 1e6:.0f} us"
    return text


def search(args: argparse.Namespace, auth: bool, base: Path, users: Path | None) -> Run | None:
    pins = pinning(not args.no_pin)
    runs: dict[int, Run] = {}

    def attempt(rate: int) -> Run:
        run = run_rate(rate, args.seconds, auth, args.backend, base, users, pins)
        runs[rate] = run
        verdict = "ok" if run.passed else ("FAIL (fell behind)" if run.all_ok else "FAIL")
        print(
            f"  -r {rate:>6}: {run.successful}/{run.calls} ok, {run.failed} failed, "
            f"{run.elapsed:.2f}s, {run.achieved:,.0f}/s, {cpu_per(run)}  {verdict}",
            flush=True,
        )
        return run

    good, bad = 0, None
    rate = args.start
    while rate <= args.max:
        if attempt(rate).passed:
            good = rate
            rate *= 2
        else:
            bad = rate
            break
    if bad is None:
        bad = args.max + 1
    rate = args.start // 2
    while not good and rate >= 50:  # even --start failed: halve until a rate passes
        if attempt(rate).passed:
            good = rate
        else:
            bad = rate
            rate //= 2
    while good and bad - good > max(args.resolution * good, 50):
        mid = (good + bad) // 2
        if attempt(mid).passed:
            good = mid
        else:
            bad = mid
    return runs.get(good)


def measure(
    args: argparse.Namespace, backend: str, base: Path, results: list[tuple[str, Run | None]]
) -> None:
    for auth in {"off": [False], "on": [True], "both": [False, True]}[args.auth]:
        mode = "on (MD5 digest, 401 + 200)" if auth else "off"
        label = f"REGISTER, auth {mode}, UDP, location {backend}"
        if OPTIONS:
            label = "OPTIONS, UDP"
        print(f"{label}:", flush=True)
        users = None
        if auth:
            users = make_user(base, BENCH_USER, BENCH_PASSWORD)
            print(f"  user {BENCH_USER} added with libon-tsilo-admin", flush=True)
        results.append((label, search(args, auth, base, users)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("memory", "sqlite", "redis"), default="sqlite",
                        help="location backend (redis: a redis-server on --redis-port)")
    parser.add_argument("--memory", action="store_true", help="the same as --backend memory")
    parser.add_argument("--redis-port", type=int, default=24379, help="redis-server port (--backend redis)")
    parser.add_argument("--auth", choices=("off", "on", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run at its rate")
    parser.add_argument("--start", type=int, default=1000, help="first rate (REGISTER/s or registrations/s)")
    parser.add_argument("--max", type=int, default=32000)
    parser.add_argument("--resolution", type=float, default=0.05, help="stop when the gap is this fraction")
    parser.add_argument("--options", action="store_true",
                        help="OPTIONS instead of REGISTER (tests/e2e/scenarios/options.xml, auth off)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and SIPp to CPUs")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help='a config key for the server, e.g. --set ops.reactor=\'"asyncio"\' (repeatable)')
    args = parser.parse_args()
    SETTINGS[:] = args.set
    if shutil.which("sipp") is None:
        print("sipp not found (Debian: apt-get install sip-tester)", file=sys.stderr)
        return 2
    if args.memory:
        args.backend = "memory"
    backend = args.backend
    global OPTIONS, REDIS
    OPTIONS = args.options
    if OPTIONS:
        args.auth = "off"
    results: list[tuple[str, Run | None]] = []
    with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
        base = Path(tmp)
        if backend == "redis":
            REDIS = RedisServer(base, port=args.redis_port)
            REDIS.start()
        try:
            measure(args, backend, base, results)
        finally:
            if REDIS is not None:
                REDIS.stop()
    print()
    ok = True
    for label, best in results:
        if best is None:
            print(f"{label}: no rate passed (from {args.start}/s)")
            ok = False
            continue
        unit = "registrations/s (2 REGISTERs each)" if "auth on" in label else "REGISTER/s"
        if OPTIONS:
            unit = "OPTIONS/s"
        print(f"{label}: {best.achieved:,.0f} {unit} at 100 % success (-r {best.rate}, {best.calls} calls), "
              f"{cpu_per(best)}")
        print(f"  command: {best.command.replace(str(base), '$TMP')}")
        if "auth off" in label and best.achieved < TARGET_NOAUTH:
            print(f"  below the target of {TARGET_NOAUTH:,}/s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
