"""What one reactor wake-up costs on this machine, with no SIP in it: the floor under every message.

    .venv/bin/python bench/wakeup_cost.py [--rates 50,200,1000] [--n 3000]

A receiver pinned to CPU 0 sleeps in epoll_wait on a loopback UDP socket; a sender on CPU 1 sends
it a datagram every 1/rate s and, with ``reply``, waits for the echo. The receiver's CPU time
(/proc/PID/task/*/schedstat, ns) divided by the datagrams is the cost of a wake-up: epoll_wait
returning, one recvfrom, and with ``reply`` one sendto that wakes the sender. Two receivers: a
C program (the kernel's and the machine's share alone: compiled here with the system's ``cc``),
and Python (the same loop with ``select.epoll``: what the interpreter adds on caches that went
cold while it slept). The lower the rate, the longer each sleep and the colder the caches.

Why it matters: bench/cluster.py's CPU per call divides by calls, but a node pays per wake-up
too, and the cluster adds wake-ups by design (node A learns of the REGISTER from Redis, node B
waits for Redis's answer): this is how much each costs on the box the figures come from.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_port, cpu_ns  # noqa: E402

C_RECEIVER = r"""
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int reply = atoi(argv[2]);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[1]));
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (bind(s, (void *)&a, sizeof a) != 0) { perror("bind"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    char buf[2048];
    for (;;) {
        struct epoll_event got[8];
        epoll_wait(ep, got, 8, -1);
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        int n = recvfrom(s, buf, sizeof buf, 0, (void *)&from, &len);
        if (reply && n > 0) sendto(s, buf, n, 0, (void *)&from, len);
    }
}
"""

PY_RECEIVER = """
import select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
reply = sys.argv[2] == "1"
ep = select.epoll()
ep.register(s.fileno(), select.EPOLLIN)

def loop():
    poll, recvfrom, sendto = ep.poll, s.recvfrom, s.sendto
    while True:
        poll()
        data, peer = recvfrom(2048)
        if reply:
            sendto(data, peer)

loop()
"""


def measure(command: list[str], rate: float, n: int, reply: bool) -> float:
    """Microseconds of the receiver's CPU per datagram it woke up for."""
    port = bench_port()
    receiver = subprocess.Popen(["taskset", "-c", "0", *command, str(port), "1" if reply else "0"])
    try:
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.settimeout(1.0)
        time.sleep(0.3)  # the receiver binds (not a measurement)
        start = cpu_ns(receiver.pid)
        due = time.monotonic()
        for _ in range(n):
            tx.sendto(b"x" * 400, ("127.0.0.1", port))
            if reply:
                tx.recv(2048)
            due += 1.0 / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # the load's pacing, not a measurement
        time.sleep(0.05)
        return (cpu_ns(receiver.pid) - start) / n / 1000.0
    finally:
        receiver.kill()
        receiver.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="50,200,1000", help="datagrams per second, comma-separated")
    ap.add_argument("--n", type=int, default=3000, help="datagrams per measurement")
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {1})
    cc = shutil.which("cc") or shutil.which("gcc")
    with tempfile.TemporaryDirectory(prefix="wakeup-") as tmp:
        receivers: list[tuple[str, list[str]]] = []
        if cc is not None:
            source = Path(tmp) / "rx.c"
            source.write_text(C_RECEIVER)
            subprocess.run([cc, "-O2", "-o", str(Path(tmp) / "rx"), str(source)], check=True)
            receivers.append(("C", [str(Path(tmp) / "rx")]))
        else:
            print("no C compiler: the C receiver is left out")
        script = Path(tmp) / "rx.py"
        script.write_text(PY_RECEIVER)
        receivers.append(("Python", [sys.executable, str(script)]))
        print(f"command: {' '.join([sys.executable, *sys.argv])}; load average {os.getloadavg()[0]:.2f}")
        print("us of the receiver's CPU per wake-up (epoll_wait + recvfrom [+ sendto to a sleeping peer])")
        for rate in [float(r) for r in args.rates.split(",") if r.strip()]:
            cells = []
            for name, command in receivers:
                for reply in (False, True):
                    cost = measure(command, rate, args.n, reply)
                    cells.append(f"{name}{' +reply' if reply else ''} {cost:.1f}")
            print(f"  {rate:g}/s: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
