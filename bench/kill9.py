#!/usr/bin/env python3
"""kill -9 during a REGISTER flood: how many acknowledged bindings the restarted server still has.

Run: .venv/bin/python bench/kill9.py [--rounds 3] [--rate 1000] [--kill-after 3] [--backend sqlite]
     .venv/bin/python bench/kill9.py --no-kill --rate 2000 --seconds 10    # REGISTER latency only

Each round starts a fresh `twistd -n libon-tsilo` (location store --backend, auth off, log level
warn, admin API on loopback). tests/e2e/regload.py sends REGISTERs over UDP at --rate per second, a
distinct AOR each, no retransmissions, and records which got a 200 OK. After --kill-after seconds
the server gets SIGKILL while the flood goes on; the same config and database are started again,
and its ul.dump (admin API) is compared with the REGISTERs that got a 200: "lost" counts those
acknowledged but absent (the target: 0 with sqlite; memory is the control, it loses all).

Also printed per round: the REGISTER latency as the client saw it (send to 200, p50 / p99 / max)
over the acknowledged REGISTERs. With --no-kill the flood runs --seconds and the server is stopped
with SIGTERM: latency, answers, and the server's CPU time (user + system, all threads, from /proc)
per acknowledged REGISTER, a figure that other jobs on a shared box disturb far less than a rate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.proc import HOST, TWISTD, ServerProcess, admin_rpc, free_port, start_server, wait_until_ready  # noqa: E402
from tests.e2e.regload import RegisterLoad, contact_users  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (the SQLite writer too), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def restart(old: ServerProcess) -> ServerProcess:
    """twistd again on the old process's config file: same ports, same database."""
    log_path = old.config_path.parent / "server-restart.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "libon-tsilo", "--config", str(old.config_path)],
            cwd=old.config_path.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(old.config_path, log_path, old.sip_port, old.tls_port, proc, old.sections)
    wait_until_ready(server, timeout=60)
    return server


def one_round(args: argparse.Namespace, directory: Path) -> dict[str, float]:
    extra = {
        "auth": {"enabled": False},
        "location": {"backend": args.backend},
        "log": {"level": "warn"},
        "registrar": {"max_expires": 3600, "default_expires": 3600},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
    }
    server = start_server(directory, extra)
    seconds = args.seconds if args.no_kill else args.kill_after
    cpu_before = cpu_seconds(server.pid)
    load = RegisterLoad(server.sip_port, count=int(args.rate * (seconds + 5)), rate=args.rate).start()
    cpu = 0.0
    try:
        time.sleep(seconds)
        if args.no_kill:
            load.stop_sending()
            time.sleep(1.0)  # the last answers
            cpu = cpu_seconds(server.pid) - cpu_before
        else:
            server.proc.kill()
            server.proc.wait(10)
    finally:
        acked = load.finish()
        if server.alive():
            server.stop()
    result = {"sent": load.sent, "acked": len(acked), "other": sum(load.other.values()),
              "p50": percentile(load.latency, 50), "p99": percentile(load.latency, 99),
              "max": max(load.latency, default=float("nan")), "cpu": cpu}
    if not args.no_kill:
        again = restart(server)
        try:
            stored = contact_users(admin_rpc(again, "ul.dump"))
        finally:
            again.stop()
        result["lost"] = len(acked - stored)
        result["restored"] = len(stored)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="REGISTERs per second")
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds of flood before SIGKILL")
    parser.add_argument("--seconds", type=float, default=10.0, help="flood length with --no-kill")
    parser.add_argument("--backend", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--no-kill", action="store_true", help="measure latency only, SIGTERM at the end")
    args = parser.parse_args()
    total_acked = total_lost = 0
    with tempfile.TemporaryDirectory(prefix="bench-kill9-") as tmp:
        for n in range(1, args.rounds + 1):
            directory = Path(tmp) / f"round{n}"
            directory.mkdir()
            r = one_round(args, directory)
            line = (f"round {n}: {r['sent']:,} REGISTERs sent at {args.rate:,.0f}/s, {r['acked']:,} got 200, "
                    f"{r['other']:,} other answers; latency p50 {r['p50'] * 1e3:.1f} ms, "
                    f"p99 {r['p99'] * 1e3:.1f} ms, max {r['max'] * 1e3:.1f} ms")
            if args.no_kill:
                line += f"; server CPU {r['cpu'] / max(r['acked'], 1) * 1e6:.0f} us per REGISTER"
            if "lost" in r:
                total_acked += r["acked"]
                total_lost += r["lost"]
                line += f"; kill -9, restart: {r['restored']:,} restored, {r['lost']:,} acknowledged lost"
            print(line, flush=True)
    if not args.no_kill:
        print(f"\n{args.backend}: {total_acked:,} acknowledged REGISTERs over {args.rounds} kill -9 rounds, "
              f"{total_lost:,} lost")
        return 0 if total_lost == 0 or args.backend == "memory" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
