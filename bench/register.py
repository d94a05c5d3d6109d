#!/usr/bin/env python3
"""REGISTER throughput of the real server: the highest rate SIPp can sustain at 100 % success.

Run: .venv/bin/python bench/register.py [--memory] [--auth on|off|both] [--seconds 5]

For every rate tried, a fresh `twistd -n libon-tsilo` process (UDP on a free loopback port, log
level warn, location backend sqlite unless --memory) gets `-m rate*seconds` registrations from SIPp
at `-r rate -rp 1000`:

- auth off: tests/e2e/scenarios/register_bench.xml, one REGISTER per call, a distinct AOR per call
  (u[call_number]), expects 200;
- auth on: tests/e2e/scenarios/register_bench_auth.xml, REGISTER / 401 / REGISTER with
  `[authentication]` (MD5: SIPp 3.6 has no SHA-256, so the server offers MD5 only) / 200, users
  from an injection CSV; the same users are written beforehand into the server's users database
  through UsersDB (what `libon-tsilo-admin user add` does, without a process per user).

A rate passes when SIPp exits 0, its final -trace_stat row shows every call successful and none
failed (a lost or late answer is a failed call: -recv_timeout), and the run ended within 10 % (+0.5 s)
of its nominal length (an overloaded server answers everything late and the run drags on). Rates
double from --start until one fails (or --max), then a binary search narrows the gap to
--resolution. The figure printed is the
achieved rate of the best passing run: successful registrations / SIPp's run time (StartTime to
the final CurrentTime of its stat file).

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
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from libon_tsilo.registrar.users import UsersDB  # noqa: E402
from tests.e2e.proc import HOST, ServerProcess, free_port, start_server  # noqa: E402

SCENARIOS = ROOT / "tests" / "e2e" / "scenarios"
TARGET_NOAUTH = 4000


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


def make_users(directory: Path, count: int) -> tuple[Path, Path]:
    """The users db (realm "libon-tsilo", the config default) and SIPp's injection CSV."""
    db_path = directory / "users.sqlite"
    csv_path = directory / "users.csv"
    db = UsersDB(str(db_path))
    lines = ["SEQUENTIAL"]
    try:
        for i in range(count):
            name, password = f"bench{i}", f"pw{i:06d}"
            db.add(name, password, "libon-tsilo")
            lines.append(f"{name};{password}")
    finally:
        db.close()
    csv_path.write_text("\n".join(lines) + "\n")
    return db_path, csv_path


def start(
    directory: Path, auth: bool, memory: bool, users_db: Path | None, pin: list[str] | None
) -> ServerProcess:
    extra = {
        "log": {"level": "warn"},
        "auth": {"enabled": auth, "algorithms": ["MD5"]},
        "location": {"backend": "memory" if memory else "sqlite"},
        "registrar": {"max_expires": 3600, "default_expires": 3600},
    }
    if users_db is not None:
        shutil.copy(users_db, directory / "libon-tsilo-users.sqlite")  # the config default, relative
    server = start_server(directory, extra)
    if pin is not None:
        subprocess.run([*pin, str(server.pid)], check=True, capture_output=True)
    return server


def run_rate(rate: int, seconds: float, auth: bool, memory: bool, base: Path, users: tuple[Path, Path] | None,
             pins: tuple[list[str], list[str]] | None) -> Run:
    directory = Path(tempfile.mkdtemp(prefix=f"rate{rate}-", dir=base))
    server = start(directory, auth, memory, users[0] if users else None, pins[0] if pins else None)
    calls = max(1, int(rate * seconds))
    scenario = SCENARIOS / ("register_bench_auth.xml" if auth else "register_bench.xml")
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
        cmd += ["-inf", str(users[1])]
    try:
        # exit status 0: every call succeeded; 1: some failed (SIPp's own verdict, checked too)
        proc = subprocess.run(cmd, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=seconds * 4 + 120)
        code = proc.returncode
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
    )
    if server.tracebacks():
        print(f"  server logged errors, see {server.log_path}", file=sys.stderr)
        run.exit_code = run.exit_code or 99
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return run


def search(args: argparse.Namespace, auth: bool, base: Path, users: tuple[Path, Path] | None) -> Run | None:
    pins = pinning(not args.no_pin)
    runs: dict[int, Run] = {}

    def attempt(rate: int) -> Run:
        run = run_rate(rate, args.seconds, auth, args.memory, base, users, pins)
        runs[rate] = run
        verdict = "ok" if run.passed else ("FAIL (fell behind)" if run.all_ok else "FAIL")
        print(
            f"  -r {rate:>6}: {run.successful}/{run.calls} ok, {run.failed} failed, "
            f"{run.elapsed:.2f}s, {run.achieved:,.0f}/s  {verdict}",
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
    while good and bad - good > max(args.resolution * good, 50):
        mid = (good + bad) // 2
        if attempt(mid).passed:
            good = mid
        else:
            bad = mid
    return runs.get(good)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="location backend memory (default: sqlite)")
    parser.add_argument("--auth", choices=("off", "on", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run at its rate")
    parser.add_argument("--start", type=int, default=1000, help="first rate (REGISTER/s or registrations/s)")
    parser.add_argument("--max", type=int, default=32000)
    parser.add_argument("--resolution", type=float, default=0.05, help="stop when the gap is this fraction")
    parser.add_argument("--users", type=int, default=2000, help="users created for the auth runs")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and SIPp to CPUs")
    args = parser.parse_args()
    if shutil.which("sipp") is None:
        print("sipp not found (Debian: apt-get install sip-tester)", file=sys.stderr)
        return 2
    backend = "memory" if args.memory else "sqlite"
    results: list[tuple[str, Run | None]] = []
    with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
        base = Path(tmp)
        for auth in {"off": [False], "on": [True], "both": [False, True]}[args.auth]:
            mode = "on (MD5 digest, 401 + 200)" if auth else "off"
            label = f"REGISTER, auth {mode}, UDP, location {backend}"
            print(f"{label}:", flush=True)
            users = None
            if auth:
                t0 = time.monotonic()
                users = make_users(base, args.users)
                took = time.monotonic() - t0
                print(f"  {args.users} users written to the users db in {took:.1f}s", flush=True)
            results.append((label, search(args, auth, base, users)))
    print()
    ok = True
    for label, best in results:
        if best is None:
            print(f"{label}: no rate passed (from {args.start}/s)")
            ok = False
            continue
        unit = "registrations/s (2 REGISTERs each)" if "auth on" in label else "REGISTER/s"
        print(f"{label}: {best.achieved:,.0f} {unit} at 100 % success (-r {best.rate}, {best.calls} calls)")
        print(f"  command: {best.command.replace(str(base), '$TMP')}")
        if "auth off" in label and best.achieved < TARGET_NOAUTH:
            print(f"  below the target of {TARGET_NOAUTH:,}/s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
