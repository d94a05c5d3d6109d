"""What a flooding source costs the server, in process (no sockets, no SIPp), and what the
per-source table costs in memory.

    .venv/bin/python bench/flood.py [--n 20000] [--sources 50000]

1. CPU per datagram, each stage in a fresh service tree (bench/inproc.py's, [limits] with loopback
   not exempt): OPTIONS answered 200 by a source within its rate; OPTIONS and INVITEs from a banned
   source (parsed, charged, dropped: no transaction, no answer). Wall clock: expect +-30 % on a
   shared VM; the ratio is the point.
2. Memory of the per-source table (sip/limits.py) holding ``--sources`` sources (tracemalloc).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import inproc  # noqa: E402 (bench/inproc.py, next to this file)

OPTIONS = (
    "OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.2:16000;branch=z9hG4bK-o{n};rport\r\n"
    "Max-Forwards: 70\r\nFrom: <sip:flood@example.org>;tag=f{n}\r\nTo: <sip:127.0.0.1>\r\n"
    "Call-ID: o{n}@flood\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


def per_datagram(stage: str, n: int) -> tuple[float, int]:
    """Seconds per datagram and the number of answers the server sent."""
    banned = stage != "served"
    # served: a rate nobody reaches; banned: one request empties the bucket, the ban outlasts the run
    limits = {"exempt_sources": [], "requests_per_second": 1e9 if not banned else 1.0,
              "burst": 10**9 if not banned else 1, "ban_time": 86400}
    env = inproc.build("full", limits=limits)
    feed, outbox = env["feed"], env["outbox"]
    source = ("127.0.0.2", 16000)
    if stage == "invite":
        sdp = inproc.SDP.format(who="flood")
        msgs = [inproc.INVITE.format(n=i, user=f"u{i}", sdp=sdp, length=len(sdp)).encode() for i in range(n)]
    else:
        msgs = [OPTIONS.format(n=i).encode() for i in range(n)]
    if banned:
        feed(OPTIONS.format(n="first").encode(), source)
        feed(OPTIONS.format(n="ban").encode(), source)  # the bucket is empty: 503, banned
        outbox.clear()
    started = time.perf_counter()
    for m in msgs:
        feed(m, source)
    elapsed = time.perf_counter() - started
    return elapsed / n, len(outbox)


def table_bytes(sources: int) -> float:
    from twisted.internet.task import Clock

    from libon_tsilo.sip.limits import SourceLimiter

    limiter = SourceLimiter(Clock(), 20.0, 100, 60.0, max_sources=sources)
    hosts = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(sources)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for host in hosts:
        limiter.check(host)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(limiter) == sources
    return (after - before) / sources


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="datagrams per stage")
    p.add_argument("--sources", type=int, default=50000, help="sources in the table for the memory figure")
    args = p.parse_args()

    for stage, what in (("served", "OPTIONS within the rate, answered 200"),
                        ("options", "OPTIONS from a banned source, dropped"),
                        ("invite", "INVITE from a banned source, dropped")):
        # a fresh process per stage: each builds its own service tree
        out = subprocess.run([sys.executable, __file__, "--child", stage, str(args.n)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
        seconds, answers = out.stdout.splitlines()[-1].split()  # log lines come first
        print(f"{what:42} {float(seconds) * 1e6:7.1f} us per datagram "
              f"({1 / float(seconds):,.0f}/s), {answers} answers sent", flush=True)
    print(f"per-source table: {table_bytes(args.sources):,.0f} bytes per source ({args.sources:,} sources)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        seconds, answers = per_datagram(sys.argv[2], int(sys.argv[3]))
        print(seconds, answers)
    else:
        main()
