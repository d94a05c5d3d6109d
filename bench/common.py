"""Shared pieces of the SIPp benchmarks: the real server with a stats hook, SIPp runs, RSS.

The server is the real `twistd -n libon-tsilo` process, started through this file's ``serve``
mode, which is twistd itself (ARGS are twistd's) plus a tiny debug hook (nothing in the server
changes, but with ``--overload-always-ticks``: the overload timer never parks, for live_icount):

    python bench/common.py serve --stats-file F [--latency-window N] [--overload-always-ticks] -- ARGS

The hook wraps ``libon_tsilo.ops.service.make_service`` to keep the service tree, widens the silo's
REGISTER->INVITE latency window (default 1,000,000 samples instead of the last 1024, so the
percentiles cover the whole run) and writes a JSON snapshot of ``silo.stats()`` and the call
manager's ``stats()`` to F on SIGUSR2 and once more just before shutdown. `BenchServer.stats()`
asks for a fresh snapshot. With ``PYTHONTRACEMALLOC=1`` in the server's environment the snapshot
also lists the 40 biggest allocation sites (what parked calls are made of). The admin API's
/rpc/stats gives the same silo and call figures, but with the silo's default 1024-sample window.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# bench/sidebyside.py --baseline: the server process runs another checkout's libon_tsilo (the code
# before a change), found first on sys.path; everything else (bench/, the venv) stays this one
if os.environ.get("BENCH_CODE") and sys.argv[1:2] == ["serve"]:
    sys.path.insert(0, os.environ["BENCH_CODE"])

SCENARIOS = ROOT / "tests" / "e2e" / "scenarios"
HOST = "127.0.0.1"
PYTHON = Path(sys.executable)


# --- ports ----------------------------------------------------------------------------------------

# Benchmarks on a shared box stay inside the port range their operator was given (`use_ports`);
# without one the OS picks, as in the tests.
_port_range: list[int] = []


def use_ports(spec: str) -> None:
    """Take every port from now on in ``LOW-HIGH`` (inclusive), e.g. "27000-27999"."""
    low, _, high = spec.partition("-")
    first, last = int(low), int(high or low)
    if not 1024 <= first <= last <= 65535:
        raise ValueError(f"bad port range {spec!r}")
    _port_range[:] = range(first, last + 1)


def bench_port(udp_too: bool = True) -> int:
    """A free port: the next one of the `use_ports` range that binds, else one the OS picks."""
    from tests.e2e.proc import free_port

    if not _port_range:
        return free_port(udp_too=udp_too)
    import socket

    for _ in range(len(_port_range)):
        port = _port_range.pop(0)
        _port_range.append(port)  # round robin: a port just used may sit in TIME_WAIT
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.bind((HOST, port))
                if udp_too:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                        udp.bind((HOST, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port left in the --ports range")


# --- the server -----------------------------------------------------------------------------------


def _install_stats_hook(stats_file: Path, latency_window: int) -> None:
    """Runs inside the server process, before twistd builds the service."""
    import libon_tsilo.ops.service as service_mod

    original = service_mod.make_service

    import gc

    gc_time = [0.0, 0.0, 0.0]
    gc_runs = [0, 0, 0]
    gc_max = [0.0, 0.0, 0.0]
    gc_started = [0.0]
    gc_stalls: list[tuple[float, int, float]] = []

    def gc_timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
            return
        took = time.perf_counter() - gc_started[0]
        gen = info["generation"]
        gc_time[gen] += took
        gc_runs[gen] += 1
        gc_max[gen] = max(gc_max[gen], took)
        if took > 0.05:  # the stalls: when, which generation, how long
            gc_stalls.append((round(time.time(), 3), gen, round(took, 3)))

    gc.callbacks.append(gc_timer)

    def make_service(config: Any, clock: Any = None, log_observer: Any = None) -> Any:
        root = original(config, clock, log_observer)
        parts = root.parts
        if parts.silo is not None and latency_window > 0:
            from libon_tsilo.silo.stats import LatencyWindow

            parts.silo.counters.latency = LatencyWindow(latency_window)

        def dump() -> None:
            snapshot = {
                "time": time.time(),
                "pid": os.getpid(),
                "silo": parts.silo.stats() if parts.silo is not None else None,
                "calls": parts.b2bua.stats() if parts.b2bua is not None else None,
                "transactions": _transaction_states(parts.transactions),
                # the collector's share: runs, seconds and the longest pause per generation
                "gc": {"runs": gc_runs, "seconds": gc_time, "max": gc_max, "objects": len(gc.get_objects()),
                       "stalls": gc_stalls},
            }
            if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=N in the server's environment
                top = tracemalloc.take_snapshot().statistics("lineno")[:40]
                snapshot["tracemalloc"] = [f"{s.size / 1024:.0f} KiB {s.count} blocks {s.traceback}"
                                           for s in top]
            tmp = stats_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot, default=str))
            tmp.replace(stats_file)

        from twisted.internet import reactor

        signal.signal(signal.SIGUSR2, lambda signum, frame: reactor.callFromThread(dump))
        reactor.addSystemEventTrigger("before", "shutdown", dump)
        return root

    service_mod.make_service = make_service


def _transaction_states(layer: Any) -> dict[str, int] | None:
    """Live transactions by class and state (what is left behind after a run, and why)."""
    if layer is None:
        return None
    from collections import Counter

    txns = [*layer._servers.values(), *layer._clients.values()]
    return dict(Counter(f"{type(t).__name__} {getattr(t.state, 'name', t.state)}" for t in txns))


def _overload_always_ticks() -> None:
    """The overload timer ticks whether messages come or not, as before round 10 (it parks on an
    idle server now): for bench/live_icount.py, whose idle run is subtracted from its run with calls
    to take out the work that goes with time; the timer never parks in the run with calls (a call
    every 200 ms), so it must not park in the idle one either. Code without the park is left as is."""
    from libon_tsilo.sip import overload

    if hasattr(overload.OverloadDetector, "watch_reads"):
        overload.OverloadDetector.watch_reads = lambda self, watch: None  # type: ignore[method-assign]


def _serve(argv: list[str]) -> None:
    stats_file = Path(argv[argv.index("--stats-file") + 1])
    window = int(argv[argv.index("--latency-window") + 1]) if "--latency-window" in argv else 1_000_000
    twistd_args = argv[argv.index("--") + 1:]
    _install_stats_hook(stats_file, window)
    if "--overload-always-ticks" in argv[:argv.index("--")]:
        _overload_always_ticks()
    import libon_tsilo.sip.message
    from twisted.scripts.twistd import run

    # which code runs (--baseline, compiled or not): the first line of server.log
    print(f"bench serve: {libon_tsilo.sip.message.__file__}", flush=True)

    sys.argv = ["twistd", *twistd_args]
    run()


class SipTarget(Protocol):
    """A server under test as the SIPp helpers see it: where it listens."""

    @property
    def sip_port(self) -> int: ...


@dataclass
class BenchServer:
    proc: subprocess.Popen[bytes]
    sip_port: int
    config_path: Path
    log_path: Path
    stats_path: Path
    command: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        return read_rss_kib(self.pid)

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """A fresh snapshot (SIGUSR2, then wait for the file to change)."""
        before = self.stats_path.stat().st_mtime_ns if self.stats_path.exists() else 0
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats_path.exists() and self.stats_path.stat().st_mtime_ns != before:
                try:
                    return json.loads(self.stats_path.read_text())
                except json.JSONDecodeError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"no stats snapshot from the server in {timeout}s")

    def stop(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """SIGTERM; returns the snapshot written just before shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_bench_server(
    workdir: Path, extra: dict[str, dict[str, Any]] | None = None, twistd_options: list[str] | None = None,
    cpu: int | None = None, port: int | None = None, code: Path | None = None,
) -> BenchServer:
    """The real server on a free loopback UDP port, log level warn, auth off, memory store.

    ``twistd_options`` go before the subcommand, e.g. ``["--profile=F", "--profiler=cprofile",
    "--savestats"]`` for twistd's own profiler. ``cpu``: pin the server to that CPU (taskset).
    ``code``: run the libon_tsilo of that checkout instead of this one's."""
    from tests.e2e.proc import merge_sections, to_toml, udp_options

    workdir.mkdir(parents=True, exist_ok=True)
    port = port or bench_port()  # a caller that listens on more than UDP picks the port itself
    sections = merge_sections(
        {
            "sip": {"listen": [f"udp:{HOST}:{port}"], "domains": ["localhost", HOST]},
            "auth": {"enabled": False},
            "location": {"backend": "memory"},
            "log": {"level": "warn", "format": "text"},
            "ops": {"drain_timeout": 2},
        },
        extra,
    )
    config_path = workdir / "libon-tsilo.toml"
    config_path.write_text(to_toml(sections))
    log_path = workdir / "server.log"
    stats_path = workdir / "server-stats.json"
    args = [
        *pin(cpu),
        str(PYTHON), str(Path(__file__).resolve()), "serve", "--stats-file", str(stats_path), "--",
        "-n", "--pidfile=", *(twistd_options or []), "libon-tsilo", "--config", str(config_path),
    ]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(args, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                               **({"BENCH_CODE": str(code)} if code else {})})
    server = BenchServer(proc, port, config_path, log_path, stats_path, " ".join(args))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"server exited with {proc.returncode}\n{server.output()}")
        answer = udp_options(HOST, port, timeout=0.3)
        if answer is not None and answer.startswith(b"SIP/2.0 "):
            return server
    server.stop()
    raise RuntimeError(f"server not ready\n{server.output()}")


def pin(cpu: int | None) -> list[str]:
    """A taskset prefix running a command on one CPU ([] when cpu is None or taskset is missing)."""
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


# --- SIPp -------------------------------------------------------------------------------------


def sipp_stats(stat_file: Path) -> dict[str, str]:
    """The last row of a SIPp -trace_stat CSV, by column name."""
    rows = [line for line in stat_file.read_text(errors="replace").splitlines() if line.strip()] \
        if stat_file.exists() else []
    if len(rows) < 2:
        return {}
    head = rows[0].rstrip(";").split(";")
    return dict(zip(head, rows[-1].rstrip(";").split(";")))


def sipp_rows(stat_file: Path) -> list[dict[str, str]]:
    """Every row of a SIPp -trace_stat CSV (one per -fd period, then the final one), by column name."""
    rows = [line for line in stat_file.read_text(errors="replace").splitlines() if line.strip()] \
        if stat_file.exists() else []
    if len(rows) < 2:
        return []
    head = rows[0].rstrip(";").split(";")
    return [dict(zip(head, row.rstrip(";").split(";"))) for row in rows[1:]]


def steady_rate(stat_file: Path, skip: float) -> tuple[float, float, float] | None:
    """Calls that ended successfully per second while SIPp was still creating calls, from ``skip``
    seconds after its start (the first calls need that long to complete): (rate, from, to) in
    seconds since the start. Unlike calls / whole run, it leaves out the start and the tail, when
    fewer calls are in flight; a server that falls behind shows a rate under the offered one."""
    rows = sipp_rows(stat_file)
    try:
        times = [float(r["CurrentTime"].split("\t")[-1]) for r in rows]
        made = [int(r["OutgoingCall(P)"]) for r in rows]
        ok = [int(r["SuccessfulCall(P)"]) for r in rows]
    except (KeyError, ValueError, IndexError):
        return None
    if len(rows) < 3:
        return None
    start = times[0]
    last = max((i for i, n in enumerate(made) if n > 0), default=0)
    first = next((i for i in range(1, last + 1) if times[i - 1] - start >= skip), None)
    if first is None or times[last] <= times[first - 1]:
        return None
    rate = sum(ok[first:last + 1]) / (times[last] - times[first - 1])
    return rate, times[first - 1] - start, times[last] - start


def sipp_run_seconds(stats: dict[str, str]) -> float | None:
    """Seconds from SIPp's start to its last statistics row (CurrentTime - StartTime; each is
    "date<TAB>time<TAB>epoch")."""
    try:
        start = float(stats["StartTime"].split("\t")[-1])
        now = float(stats["CurrentTime"].split("\t")[-1])
    except (KeyError, ValueError, IndexError):
        return None
    return now - start


def read_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def udp_rcvbuf_errors() -> int:
    """The system-wide count of UDP datagrams dropped because a receive buffer was full."""
    snmp = Path("/proc/net/snmp").read_text().splitlines()
    lines = [line.split() for line in snmp if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def udp_socket_drops(port: int) -> int:
    """Datagrams dropped by the UDP socket(s) bound to this local port (the `drops` column of
    /proc/net/udp); sockets that are closed already count 0."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port:
                total += int(cols[-1])
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ns(pid: int) -> int:
    """Nanoseconds the process's threads ran (/proc/PID/task/*/schedstat): exact, where
    /proc/PID/stat counts 10 ms ticks (a thread that ends while being read counts 0)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _serve(sys.argv[2:])
    else:
        print(__doc__)
        raise SystemExit(2)
