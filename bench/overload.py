"""Overload benchmark: late-fork calls offered at about twice the server's capacity, with OPTIONS probes.

    .venv/bin/python bench/overload.py [--rate 2000] [--duration 20] [--no-control]

The load is bench/latefork.py's (its helpers are reused): a caller SIPp makes ``--rate`` calls/s
for ``--duration`` s to per-call AORs, each parked until a device SIPp, started ``--delay-ms``
later at the same rate, REGISTERs that AOR; the forked INVITE is answered, the caller ACKs and
hangs up. The caller scenario (bench_overload_caller.xml) also takes a 503: it ACKs it and counts
the call as failed, so SIPp's successful calls are the calls the server completed.

Meanwhile a probe sends an OPTIONS over UDP every 100 ms (no retransmission: a lost one counts as
unanswered) from the start until the figures are taken. The script prints:

- calls completed per second during the overload (SIPp's 1 s rows, as bench/latefork.py's steady
  state) and in all; 503s sent by the server; SIPp's retransmissions; datagrams the server's
  socket dropped;
- the OPTIONS latency during the overload: median, worst, and how many got no answer;
- time to normal after the load stopped (when the caller made its last call): the first probe
  from which every OPTIONS is answered within 100 ms, and when the server's overload state read
  "normal" again (admin RPC ``stats``, polled every 100 ms);
- what was left 64*T1 (32 s) after the last SIPp exited: calls, silo entries, transactions.

``--no-control`` runs the same load with ``[overload] enabled = false``, for comparison. The server
is pinned to CPU 0 and SIPp to CPU 1 as in bench/latefork.py (``--no-pin`` to let the OS choose).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.latefork as latefork  # noqa: E402
from bench.common import (  # noqa: E402
    HOST,
    BenchServer,
    cpu_seconds,
    sipp_rows,
    sipp_run_seconds,
    sipp_stats,
    start_bench_server,
    steady_rate,
    udp_socket_drops,
)
from tests.e2e.proc import free_port  # noqa: E402

T1 = 0.5
NORMAL_LATENCY = 0.1  # an OPTIONS answered within this is "normal"
_CALL_ID = re.compile(rb"\r\n(?:Call-ID|i)\s*:\s*([^\r\n]+)", re.I)


class OptionsProbe(threading.Thread):
    """One OPTIONS every ``interval`` s from its own UDP socket; records (sent, answered or None)."""

    def __init__(self, sip_port: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.sip_port = sip_port
        self.interval = interval
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.sent: dict[bytes, float] = {}
        self.answered: dict[bytes, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        port = self.sock.getsockname()[1]
        next_at = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_at:
                call_id = uuid.uuid4().hex
                self.sent[call_id.encode()] = now
                self.sock.sendto(self._options(port, call_id), (HOST, self.sip_port))
                next_at += self.interval
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            got = time.monotonic()
            m = _CALL_ID.search(data)
            if m and data.startswith(b"SIP/2.0 200"):
                self.answered.setdefault(m.group(1).strip(), got)

    def _options(self, port: int, call_id: str) -> bytes:
        return (
            f"OPTIONS sip:{HOST}:{self.sip_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@{HOST}>;tag={call_id[:8]}\r\n"
            f"To: <sip:{HOST}:{self.sip_port}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.sock.close()

    def samples(self) -> list[tuple[float, float | None]]:
        """(sent, latency or None when unanswered), in sending order."""
        answered = self.answered
        return sorted((t, (answered[c] - t) if c in answered else None) for c, t in self.sent.items())


def admin_rpc(port: int, name: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/rpc/{name}", timeout=10) as resp:
        return json.loads(resp.read())["result"]


def last_call_made(stat_file: Path) -> float | None:
    """Wall-clock time of the caller's last 1 s row that made calls (the load's end, to 1 s)."""
    times = [float(r["CurrentTime"].split("\t")[-1]) for r in sipp_rows(stat_file)
             if int(r.get("OutgoingCall(P)", 0) or 0) > 0]
    return times[-1] if times else None


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    calls = int(args.rate * args.duration)
    admin_port = free_port(udp_too=False)
    server: BenchServer = start_bench_server(workdir / "server", {
        # a call the device has not answered 10 s after its INVITE will never be (it REGISTERs 0.5 s
        # after): ended by then, it is not counted as left behind 64*T1 after the load
        "calls": {"ring_timeout": 10, "invite_cancel_grace": 0},
        "admin": {"listen": f"tcp:{admin_port}:interface={HOST}"},
        "overload": {"enabled": not args.no_control},
        "log": {"level": "warn", "format": "text"},
    }, cpu=latefork.SERVER_CPU if latefork.PIN else None)
    print(f"  server: {server.command}")
    probe = OptionsProbe(server.sip_port)
    try:
        limit = max(1000, int(args.rate * 5))
        caller_args, caller_stats, caller_port = latefork.sipp_command(
            server, "bench_overload_caller.xml", workdir, "caller", calls=calls, rate=args.rate,
            prefix="ov-", limit=limit)
        caller_args += ["-default_behaviors", "-bye"]  # a call that got a 503 sends no BYE on its abort
        device_args, device_stats, device_port = latefork.sipp_command(
            server, "bench_device_register.xml", workdir, "device", calls=calls, rate=args.rate,
            prefix="ov-", limit=limit * 4, ooc="bench_device_answer.xml", pause_ms=2000)
        print(f"  caller: {' '.join(caller_args)}")
        print(f"  device (started {args.delay_ms} ms later): {' '.join(device_args)}")
        probe.start()
        time.sleep(1.0)  # a calm second of probes first
        cpu0 = cpu_seconds(server.pid)
        started = time.monotonic()
        wall_offset = time.time() - started
        caller = latefork.spawn(caller_args, workdir, "caller")
        time.sleep(args.delay_ms / 1000.0)
        device = latefork.spawn(device_args, workdir, "device")
        drops = 0
        states: list[tuple[float, str]] = []  # (monotonic time, overload state) from /rpc/health

        def poll_state() -> None:
            try:
                states.append((time.monotonic(), admin_rpc(admin_port, "health").get("overload", "?")))
            except Exception:
                pass

        while caller.poll() is None or device.poll() is None:
            if caller.poll() is None and device.poll() is None:
                drops = udp_socket_drops(server.sip_port)
            if time.monotonic() - started > args.duration * 4 + 150:  # SIPp's -timeout is 120 s
                print("  SIPp did not finish: killed")
                caller.kill()
                device.kill()
                caller.wait(10)
                device.wait(10)
            poll_state()
            time.sleep(0.1)
        sipp_done = time.monotonic()
        cpu = cpu_seconds(server.pid) - cpu0
        while time.monotonic() < sipp_done + 3.0:  # probes and states a while after the load
            poll_state()
            time.sleep(0.1)
        probe.stop()
        probe_done = time.monotonic()
        print(f"  waiting 64*T1 after the last SIP message ({64 * T1 + 1:.0f} s) ...")
        time.sleep(64 * T1 + 1.0)
        after = admin_rpc(admin_port, "stats")
        after["transaction_states"] = server.stats().get("transactions")
        drained = None  # if something was left: how long until it was gone
        while time.monotonic() < probe_done + 64 * T1 + 60:
            now = admin_rpc(admin_port, "stats")
            if args.trace:
                print(f"    +{time.monotonic() - probe_done:.0f} s: {now['transactions']}, "
                      f"{now['calls']['calls']} calls")
            if now["calls"]["calls"] == 0 and now["transactions"]["live"] == 0:
                drained = time.monotonic() - probe_done
                break
            time.sleep(2.0)
    finally:
        if probe.is_alive():
            probe.stop()
        server.stop()
    last_call = last_call_made(caller_stats)
    load_end = last_call - wall_offset if last_call is not None else started + calls / args.rate
    cs, ds = sipp_stats(caller_stats), sipp_stats(device_stats)
    steady = steady_rate(caller_stats, skip=args.delay_ms / 1000.0 + 1.0)
    return {
        "calls": calls, "ok": int(cs.get("SuccessfulCall(C)", 0)), "failed": int(cs.get("FailedCall(C)", 0)),
        "elapsed": sipp_run_seconds(cs), "steady": steady,
        "retrans": int(cs.get("Retransmissions(C)", 0)) + int(ds.get("Retransmissions(C)", 0)),
        "drops": drops, "cpu": cpu, "started": started, "load_end": load_end, "probe_done": probe_done,
        "probes": probe.samples(), "states": states, "after": after, "drained": drained,
        "refused_calls": int(cs.get("FailedTimeoutOnRecv(C)", 0)),
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    after = r["after"]
    overload = after.get("overload") or {}
    # every 503 of overload control, the early path's too (the message counters see the normal path only)
    sent_503 = overload.get("shed", 0)
    load = r["load_end"] - r["started"]
    print(f"  caller: {r['ok']} of {r['calls']} calls completed, {r['failed']} failed ({r['refused_calls']} "
          f"on a 503); SIPp made its last "
          f"call {load:.0f} s after its start (1 s rows) and ran {r['elapsed'] or 0:.1f} s; server CPU "
          f"{r['cpu']:.1f} s")
    steady = r["steady"][0] if r["steady"] else 0.0
    if r["steady"] is not None:
        _, since, until = r["steady"]
        print(f"  during the overload: {steady:.0f} calls/s completed (SIPp's 1 s rows, {since:.1f} s "
              f"to {until:.1f} s)")
    print(f"  503 sent by overload control: {sent_503} (retransmitted INVITEs included), "
          f"{overload.get('episodes', 0)} episode(s), worst lag {overload.get('max_lag_ms', 0):.0f} ms")
    print(f"  SIPp retransmissions (caller + device): {r['retrans']}; datagrams dropped by the server's "
          f"socket: {r['drops']}")
    during_at = [(t - r["started"], lat) for t, lat in r["probes"] if r["started"] <= t < r["load_end"]]
    during = [lat for _, lat in during_at]
    answered = [lat for lat in during if lat is not None]
    worst_at = max((lat, t) for t, lat in during_at if lat is not None)[1] if answered else float("nan")
    lost = len(during) - len(answered)
    worst = max(answered) * 1000 if answered else float("nan")
    median = statistics.median(answered) * 1000 if answered else float("nan")
    print(f"  OPTIONS during the overload: {len(during)} sent, median {median:.0f} ms, worst {worst:.0f} ms "
          f"(sent {worst_at:.1f} s into the load), {lost} unanswered")
    if args.trace:
        print("  OPTIONS latency per second of load (ms, worst; x = unanswered): " + " ".join(
            "x" if any(lat is None for t, lat in during_at if int(t) == sec) else
            f"{max((lat for t, lat in during_at if int(t) == sec), default=0) * 1000:.0f}"
            for sec in range(int(max((t for t, _ in during_at), default=0)) + 1)))
    later = [(t - r["load_end"], lat) for t, lat in r["probes"] if t >= r["load_end"]]
    bad = [t for t, lat in later if lat is None or lat > NORMAL_LATENCY]
    normal_at = max(bad) + 0.1 if bad else 0.0
    if later and bad and max(bad) >= later[-1][0]:
        print("  OPTIONS not back to normal before the probe stopped")
    else:
        print(f"  OPTIONS under {NORMAL_LATENCY * 1000:.0f} ms for good {normal_at:.1f} s after the load "
              "stopped")
    if not args.no_control:
        hot = [t - r["load_end"] for t, state in r["states"] if state != "normal" and t >= r["load_end"]]
        state_normal = max(hot) + 0.1 if hot else 0.0
        print(f"  server's overload state normal for good {state_normal:.1f} s after the load stopped")
    calls = (after.get("calls") or {}).get("calls")
    by_state = (after.get("calls") or {}).get("by_state") or {}
    silo = (after.get("tsilo") or {}).get("stored_transactions")
    txns = (after.get("transactions") or {}).get("live")
    split = {k: v for k, v in (after.get("transactions") or {}).items() if k != "live"}
    gone = f"; all gone {r['drained']:.0f} s after" if r["drained"] else ""
    print(f"  left 64*T1 after the last SIP message: {calls} calls {by_state}, {silo} silo entries, "
          f"{txns} transactions {split} {after.get('transaction_states')}{gone}")
    print(f"RESULT overload control {'off' if args.no_control else 'on'}, {args.rate:g} calls/s offered for "
          f"{args.duration:g} s: {steady:.0f} calls/s completed, {sent_503} x 503, OPTIONS worst "
          f"{worst:.0f} ms ({lost} lost), normal {normal_at:.1f} s after, left {calls}/{silo}/{txns} "
          "calls/silo/transactions")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=2000.0, help="late-fork calls/s offered (2x capacity)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    ap.add_argument("--delay-ms", type=int, default=500, help="REGISTER this long after the INVITE")
    ap.add_argument("--no-control", action="store_true", help="run with [overload] enabled = false")
    ap.add_argument("--trace", action="store_true", help="print what is left every 2 s after the load")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and SIPp to CPU 1")
    ap.add_argument("--keep", type=Path, help="keep the logs in this directory (default: a temp dir)")
    args = ap.parse_args(argv)
    latefork.PIN = not args.no_pin
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"load average before the run: {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
          f"({os.cpu_count()} CPUs)")
    base = args.keep or Path(tempfile.mkdtemp(prefix="overload-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        print(f"\n== late fork at {args.rate:g} calls/s for {args.duration:g} s, overload control "
              f"{'off' if args.no_control else 'on'}")
        report(run(args, base), args)
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"logs kept in {base}")


if __name__ == "__main__":
    raise SystemExit(main())
