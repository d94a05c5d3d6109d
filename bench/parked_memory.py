"""Memory per parked call: what one INVITE to an AOR without a device keeps alive.

    .venv/bin/python bench/parked_memory.py [-n 5000] [--top 25] [--traceback 1]
    .venv/bin/python bench/parked_memory.py --process [-n 10000]

In-process (the default): the real service tree (``make_service``, memory location store, auth
off, ring timeout 1 h) on the asyncio reactor, which is never run; N INVITE datagrams go straight
into the transport's inbound path (``TransportLayer.datagram_received``) from a fake UDP socket
that drops what the server sends; the due timers run once after each batch (``runUntilCurrent``)
for the parked calls' compaction (``PARKED_COMPACT_DELAY``, b2bua/call.py). tracemalloc compares
a snapshot taken after a warm-up with one taken once the N calls are parked, and prints the bytes
per parked call and the biggest allocation sites (``--traceback K`` groups by the K innermost
frames, to tell which caller of a helper allocates).

``--process``: the same measure as ``bench/latefork.py --parked N`` (the real twistd process,
SIPp sending the INVITEs over UDP, RSS growth from /proc): RSS includes the allocator's slack and
the interpreter's free lists, so it is higher than the tracemalloc figure.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INVITE = (
    "INVITE sip:park-{n}@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:16000;branch=z9hG4bK-4242-{n}-inv;rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:caller@127.0.0.1:16000>;tag=4242C{n}\r\n"
    "To: <sip:park-{n}@127.0.0.1:5060>\r\n"
    "Call-ID: {n}-4242@127.0.0.1\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:caller@127.0.0.1:16000>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n"
    "\r\n"
)
# the SDP of tests/e2e/scenarios/bench_park.xml, as SIPp fills it in
SDP = (
    "v=0\r\n"
    "o=caller 1 1 IN IP4 127.0.0.1\r\n"
    "s=-\r\n"
    "c=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\n"
    "m=audio 6000 RTP/AVP 0\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
)


def invite(n: int) -> bytes:
    return (INVITE.format(n=n, length=len(SDP)) + SDP).encode()


class _FakeUDP:
    """Stands for the listening UDP socket: counts what the server sends, keeps nothing."""

    local = ("127.0.0.1", 5060)
    v6 = False
    sent = 0

    def send_to(self, data: bytes, addr: Any) -> None:
        self.sent += 1


def in_process(n: int, warmup: int, top: int, frames: int) -> int:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from libon_tsilo.b2bua.call import PARKED_COMPACT_DELAY
    from libon_tsilo.ops.config import config_from_dict
    from libon_tsilo.ops.logging import make_observer
    from libon_tsilo.ops.service import make_service

    globalLogBeginner.beginLoggingTo([make_observer("warn", "text")], redirectStandardIO=False)
    config = config_from_dict({
        "sip": {"listen": ["udp:127.0.0.1:0"], "domains": ["localhost", "127.0.0.1"]},
        "auth": {"enabled": False},
        "location": {"backend": "memory"},
        "log": {"level": "warn"},
        "calls": {"ring_timeout": 3600, "invite_cancel_grace": 0},
    })
    root = make_service(config, clock=reactor)
    parts = root.parts
    transport = parts.transport
    sock = _FakeUDP()
    transport.add_udp_endpoint(sock)
    addr = ("127.0.0.1", 16000)
    datagrams = [invite(i) for i in range(warmup + n)]  # built before the first snapshot

    def wait_compacted() -> None:
        # a parked call drops its INVITE to bytes once it has waited PARKED_COMPACT_DELAY (b2bua/call.py)
        time.sleep(PARKED_COMPACT_DELAY + 0.05)
        reactor.runUntilCurrent()

    tracemalloc.start(max(frames, 1))
    for data in datagrams[:warmup]:  # first-use caches, interned strings, dict resizes
        transport.datagram_received(sock, data, addr)
    wait_compacted()
    gc.collect()
    before = tracemalloc.take_snapshot()
    for data in datagrams[warmup:]:
        transport.datagram_received(sock, data, addr)
    wait_compacted()
    gc.collect()
    after = tracemalloc.take_snapshot()
    stats = parts.b2bua.stats()
    parked = stats["by_state"].get("parked", 0)
    if parked != warmup + n:
        print(f"expected {warmup + n} parked calls, got {stats['by_state']}")
        return 1

    key = "traceback" if frames > 1 else "lineno"
    diff = after.compare_to(before, key)
    total = sum(d.size_diff for d in diff)
    blocks = sum(d.count_diff for d in diff)
    print(f"{n} parked calls (after {warmup} warm-up calls), {sock.sent} datagrams sent")
    print(f"top {top} allocation sites (size per parked call, blocks per parked call):")
    for d in diff[:top]:
        where = d.traceback.format() if frames > 1 else [str(d.traceback[0])]
        print(f"  {d.size_diff / n:8.1f} B {d.count_diff / n:6.2f}  {where[0].strip()}")
        for line in where[1:]:
            if not line.startswith("    "):
                print(f"{'':28}{line.strip()}")
    print(f"RESULT tracemalloc: {total / n:.0f} bytes per parked call ({blocks / n:.1f} blocks), "
          f"{total / 2**20:.1f} MiB for {n}")
    return 0


def process(n: int) -> int:
    from bench import latefork

    return latefork.main(["--parked", str(n)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=None, help="parked calls (default 5000; 10000 with --process)")
    ap.add_argument("--warmup", type=int, default=200, help="calls parked before the first snapshot")
    ap.add_argument("--top", type=int, default=25, help="allocation sites to list")
    ap.add_argument("--traceback", type=int, default=1, metavar="K", help="group by the K innermost frames")
    ap.add_argument("--process", action="store_true", help="RSS growth of the real server (SIPp)")
    args = ap.parse_args(argv)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    if args.process:
        return process(args.n or 10000)
    return in_process(args.n or 5000, args.warmup, args.top, args.traceback)


if __name__ == "__main__":
    raise SystemExit(main())
