"""Side by side: the same SIPp late-fork and REGISTER runs against this server and against Kamailio.

    .venv/bin/python bench/sidebyside.py [--call-rate 200] [--register-rate 1000] [--duration 10]
        [--delay-ms 150] [--repeat 3] [--only calls|register] [--kamailio-children 2]
        [--set ops.reactor=epoll] [--servers ours,kamailio] [--ports 27000-27999] [--baseline DIR]
        [--baseline-set ops.reactor=uvloop]

Kamailio is Debian's 5.6 with bench/kamailio/kamailio.cfg: usrloc in memory, registrar, tm, tmx,
tsilo and htable, as in the TSILO talk (an INVITE to a user with no contact is t_suspend()ed, the
user's REGISTER does save() and t_continue()s it into lookup + t_relay + ts_store; later REGISTERs
ts_append()). Ours is the real `twistd -n libon-tsilo` process (bench/common.py `serve`, memory
location store, auth off, no push), as in bench/latefork.py.

Each server in turn gets, on a fresh process pinned to CPU 0 (taskset -c 0; Kamailio's children
inherit it), with SIPp on CPU 1:

- the late-fork run of bench/latefork.py (`run_pair`: tests/e2e/scenarios/bench_caller.xml INVITEs
  an AOR nobody has registered, the server parks the call; bench_device_register.xml REGISTERs it
  --delay-ms later; the server forks the INVITE there, the device answers 200, then ACK and BYE,
  all of them through the server: Kamailio record-routes);
- the REGISTER run of bench/register.py (register_bench.xml, one REGISTER per new AOR).

It prints, per server: the calls (REGISTERs) that succeeded, the rate achieved, and the server's CPU
per call from /proc/<pid>/stat (utime + stime before and after the run, summed over every
Kamailio process: it forks workers, a timer and the ctl process); then the ratio ours/Kamailio.
A call counts as late-forked when the server says so: our silo's REGISTER->INVITE latency samples,
Kamailio's `bench_resumed` counter (one per t_continue()d INVITE, read with kamcmd). With
--repeat N the servers alternate N times and the min and median of each figure are printed, and the
median of the per-round ratios (each round runs the servers back to back)
(the machine is shared: CPU per call is the figure to compare, not the rate).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    bench_port,
    use_ports,
    HOST,
    ROOT,
    cpu_seconds,
    pin,
    sipp_run_seconds,
    sipp_stats,
    start_bench_server,
    steady_rate,
    udp_socket_drops,
)
from bench.latefork import PASS_RATIO, SERVER_CPU, run_pair, sipp_command, spawn  # noqa: E402
from tests.e2e.proc import udp_options  # noqa: E402

KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
KAMCMD = shutil.which("kamcmd") or "/usr/sbin/kamcmd"
KAMAILIO_CFG = ROOT / "bench" / "kamailio" / "kamailio.cfg"


class Server(Protocol):
    name: str
    command: str

    @property
    def sip_port(self) -> int: ...

    def cpu(self) -> float: ...

    def late_forked(self) -> int: ...

    def stop(self) -> None: ...


class Ours:
    name = "libon-tsilo"

    def __init__(self, workdir: Path, overrides: dict[str, dict[str, Any]], code: Path | None = None) -> None:
        if code is not None:
            self.name = "baseline"
        sections: dict[str, dict[str, Any]] = {"calls": {"ring_timeout": 30, "invite_cancel_grace": 0},
                                               "registrar": {"max_expires": 3600}}
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        self.server = start_bench_server(workdir, sections, cpu=SERVER_CPU, code=code)
        self.command = self.server.command

    @property
    def sip_port(self) -> int:
        return self.server.sip_port

    def cpu(self) -> float:
        return cpu_seconds(self.server.pid)  # one process; its threads' time is in its stat line

    def late_forked(self) -> int:
        silo = self.server.stats().get("silo") or {}
        return int((silo.get("register_to_invite") or {}).get("samples") or 0)

    def stop(self) -> None:
        self.server.stop()


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


class Kamailio:
    name = "kamailio"

    def __init__(self, workdir: Path, children: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = bench_port()
        self.ctl = workdir / "ctl.sock"
        args = [
            *pin(SERVER_CPU), KAMAILIO, "-DD", "-E", "-f", str(KAMAILIO_CFG),
            "-l", f"udp:{HOST}:{self.port}", "-n", str(children), "-m", "256", "-M", "32",
            "-w", str(workdir), "-A", f'CTL_SOCKET="unix:{self.ctl}"',
        ]
        self.command = " ".join(args)
        self.log_path = workdir / "kamailio.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kamailio exited with {self.proc.returncode}\n{self.output()}")
            answer = udp_options(HOST, self.port, timeout=0.3)
            if answer is not None and answer.startswith(b"SIP/2.0 ") and self.ctl.exists():
                # the process set is fixed once it answers: main, UDP workers, timers, ctl
                self.pids = descendants(self.proc.pid)
                return
        self.stop()
        raise RuntimeError(f"kamailio not ready\n{self.output()}")

    @property
    def sip_port(self) -> int:
        return self.port

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def stat(self, name: str) -> int:
        out = subprocess.run([KAMCMD, "-s", f"unix:{self.ctl}", "stats.get_statistics", "all"],
                             capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(" = ")
            if key.strip().endswith(f":{name}"):  # group:name
                return int(value)
        raise RuntimeError(f"kamcmd: no statistic {name}: {out!r}")

    def late_forked(self) -> int:
        return self.stat("bench_resumed")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Result:
    server: str
    scenario: str
    offered: float
    calls: int
    ok: int
    elapsed: float
    cpu: float
    late_forked: int | None = None
    steady: float | None = None
    drops: dict[str, int] = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def cpu_per_call_ms(self) -> float:
        return self.cpu / max(self.ok, 1) * 1000

    @property
    def passed(self) -> bool:
        ok = self.ok >= PASS_RATIO * self.calls
        if self.late_forked is not None:  # the late-fork run: every call forked on its REGISTER
            ok = ok and self.late_forked >= PASS_RATIO * self.calls
        return ok and self.elapsed <= self.calls / self.offered * 1.1 + 1.0


def start(kind: str, workdir: Path, args: argparse.Namespace) -> Server:
    if kind == "kamailio":
        return Kamailio(workdir, args.kamailio_children)
    if kind == "baseline":
        merged = {section: dict(values) for section, values in args.overrides.items()}
        for section, values in args.baseline_overrides.items():
            merged.setdefault(section, {}).update(values)
        return Ours(workdir, merged, code=args.baseline)
    return Ours(workdir, args.overrides)


def late_fork_run(kind: str, args: argparse.Namespace, workdir: Path, run: int) -> Result:
    rate = args.call_rate
    calls = max(1, int(rate * args.duration))
    server = start(kind, workdir / "server", args)
    print(f"  {kind}: {server.command}")
    try:
        pair = run_pair(server, rate, calls, workdir, f"sbs{run}-", delay_ms=args.delay_ms, early=False,
                        duration=args.duration, server_cpu=server.cpu)
        late = server.late_forked()
    finally:
        server.stop()
    cs = sipp_stats(pair.caller_stats)
    steady = steady_rate(pair.caller_stats, skip=args.delay_ms / 1000.0 + 1.0)
    return Result(server.name, "late fork", rate, calls, int(cs.get("SuccessfulCall(C)", 0)),
                  sipp_run_seconds(cs) or pair.wall, pair.server_cpu, late_forked=late,
                  steady=steady[0] if steady else None, drops=pair.drops)


def register_run(kind: str, args: argparse.Namespace, workdir: Path, run: int) -> Result:
    rate = args.register_rate
    calls = max(1, int(rate * args.duration))
    server = start(kind, workdir / "server", args)
    print(f"  {kind}: {server.command}")
    try:
        cmd, stat_file, port = sipp_command(server, "register_bench.xml", workdir, "register", calls=calls,
                                            rate=rate, prefix=f"r{run}-", limit=max(1000, int(rate * 5)))
        print(f"  sipp: {' '.join(cmd)}")
        cpu0 = server.cpu()
        started = time.monotonic()
        proc = spawn(cmd, workdir, "register")
        drops = 0
        while proc.poll() is None:
            drops = udp_socket_drops(server.sip_port)
            if time.monotonic() - started > args.duration * 4 + 120:
                proc.kill()
                raise RuntimeError("SIPp did not finish")
            time.sleep(0.2)
        cpu = server.cpu() - cpu0
        wall = time.monotonic() - started
    finally:
        server.stop()
    cs = sipp_stats(stat_file)
    return Result(server.name, "REGISTER", rate, calls, int(cs.get("SuccessfulCall(C)", 0)),
                  sipp_run_seconds(cs) or wall, cpu, drops={"server": drops})


def show(r: Result) -> None:
    late = "" if r.late_forked is None else f", {r.late_forked} late-forked"
    steady = "" if r.steady is None else f" ({r.steady:,.0f}/s steady)"
    unit = "calls" if r.scenario == "late fork" else "REGISTERs"
    print(f"  {r.server:<11} {r.ok}/{r.calls} {unit} ok{late}, {r.achieved:,.0f}/s over {r.elapsed:.1f} s"
          f"{steady}; CPU {r.cpu:.2f} s = {r.cpu_per_call_ms:.3f} ms per {unit[:-1]}; "
          f"server drops {r.drops.get('server', 0)}; {'PASS' if r.passed else 'FAIL'}", flush=True)


def summary(scenario: str, results: list[Result], kinds: list[str]) -> None:
    """min and median over the runs that passed: a run that fell behind also pays for SIPp's
    retransmissions, so its CPU per call is not the server's cost of a call."""
    runs = {k: [r for r in results if r.server == k and r.scenario == scenario] for k in kinds}
    if not all(runs.values()):
        return
    print(f"\n{scenario}: CPU per call in ms, min / median of the runs that passed; calls/s (median)")
    figures = {}
    for kind in kinds:
        passed = [r for r in runs[kind] if r.passed]
        failed = len(runs[kind]) - len(passed)
        note = f" ({failed} of {len(runs[kind])} runs FAILED, left out)" if failed else ""
        if not passed:
            print(f"  {kind:<11} no run passed{note}")
            continue
        cpu = [r.cpu_per_call_ms for r in passed]
        figures[kind] = (min(cpu), statistics.median(cpu))
        print(f"  {kind:<11} {min(cpu):.3f} / {statistics.median(cpu):.3f} ms over {len(passed)} run(s), "
              f"{statistics.median(r.achieved for r in passed):,.0f}/s{note}")
    for mine, other in (("libon-tsilo", "kamailio"), ("baseline", "kamailio"), ("libon-tsilo", "baseline")):
        if mine in figures and other in figures:
            a, b = figures[mine], figures[other]
            label = {"libon-tsilo": "ours"}.get(mine, mine) + "/" + other
            print(f"RESULT {scenario}: {label} CPU per call {a[0] / b[0]:.2f}x (min), "
                  f"{a[1] / b[1]:.2f}x (median)")
            paired = paired_ratios(runs[mine], runs[other])
            if len(paired) > 1:
                print(f"RESULT {scenario}: {label} per round (the two ran back to back): "
                      f"{', '.join(f'{x:.2f}x' for x in paired)}; median {statistics.median(paired):.2f}x")


def paired_ratios(mine: list[Result], other: list[Result]) -> list[float]:
    """The ratio within each round, where both runs passed: the box's speed drifts by 20-40 % over
    minutes, and two runs back to back share most of that drift, so the median of these ratios moves
    less between invocations than the ratio of two medians."""
    return [a.cpu_per_call_ms / b.cpu_per_call_ms for a, b in zip(mine, other)
            if a.passed and b.passed and b.cpu_per_call_ms > 0]


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """--set section.key=value (an int, a float, true/false or a string) for our server's config."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, raw = item.partition("=")
        section, _, key = name.partition(".")
        if not key or not raw:
            raise SystemExit(f"--set wants section.key=value, got {item!r}")
        value: Any = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        out.setdefault(section, {})[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--call-rate", type=float, default=200, help="late-fork calls/s offered")
    ap.add_argument("--register-rate", type=float, default=1000, help="REGISTER/s offered")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of traffic per run")
    ap.add_argument("--delay-ms", type=int, default=150, help="REGISTER this long after the INVITE")
    ap.add_argument("--repeat", type=int, default=1, help="runs per server and scenario (alternating)")
    ap.add_argument("--only", choices=("calls", "register"), help="one scenario only")
    ap.add_argument("--servers", default="ours,kamailio", help="servers, in the first round's order")
    ap.add_argument("--kamailio-children", type=int, default=2, help="Kamailio's UDP worker processes (-n)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config key for our server, e.g. --set ops.reactor=epoll (repeatable)")
    ap.add_argument("--keep", type=Path, help="keep the logs in this directory (default: a temp dir)")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="also run our server from the libon_tsilo of this checkout (e.g. `git worktree add "
                         "DIR main`), alternating with the others: the code before a change, in the same run")
    ap.add_argument("--baseline-set", dest="baseline_overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="a config key for the baseline only (e.g. --baseline . "
                    "--baseline-set ops.reactor=uvloop: the same code on another reactor)")
    ap.add_argument("--ports", metavar="LOW-HIGH",
                    help="every port (servers, SIPp) from this range, e.g. 27000-27999 (default: OS-picked)")
    args = ap.parse_args(argv)
    if args.ports:
        try:
            use_ports(args.ports)
        except ValueError as e:
            ap.error(f"--ports: {e}")
    args.overrides = parse_overrides(args.overrides)
    args.baseline_overrides = parse_overrides(args.baseline_overrides)
    kinds = [k.strip() for k in args.servers.split(",")]
    if set(kinds) - {"ours", "kamailio"}:
        ap.error("--servers: ours and/or kamailio")
    if args.baseline is not None:
        if not (args.baseline / "libon_tsilo").is_dir():
            ap.error(f"--baseline: no libon_tsilo/ in {args.baseline}")
        kinds.insert(kinds.index("ours") + 1 if "ours" in kinds else 0, "baseline")
    if "kamailio" in kinds and not os.access(KAMAILIO, os.X_OK):
        print(f"{KAMAILIO} not found (Debian: apt-get install kamailio)", file=sys.stderr)
        return 2
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    base = args.keep or Path(tempfile.mkdtemp(prefix="sidebyside-"))
    base.mkdir(parents=True, exist_ok=True)
    scenarios = [("late fork", late_fork_run), ("REGISTER", register_run)]
    if args.only:
        scenarios = [s for s in scenarios if (s[0] == "REGISTER") == (args.only == "register")]
    results: list[Result] = []
    try:
        for name, run in scenarios:
            what = (f"{args.call_rate:g} calls/s, REGISTER {args.delay_ms} ms after the INVITE"
                    if name == "late fork" else f"{args.register_rate:g} REGISTER/s, a new AOR each")
            print(f"\n== {name}: {what}, {args.duration:g} s per run")
            for i in range(args.repeat):
                for kind in kinds if i % 2 == 0 else kinds[::-1]:
                    n = len(results) + 1
                    r = run(kind, args, base / f"{n:02d}-{kind}-{name[0]}", n)
                    results.append(r)
                    show(r)
        names = [{"ours": Ours.name, "kamailio": Kamailio.name}.get(k, k) for k in kinds]
        for name, _ in scenarios:
            summary(name, results, names)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"logs kept in {base}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
