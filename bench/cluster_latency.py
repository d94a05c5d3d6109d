"""Cross-node late fork latency: a call parked on node A, the device's REGISTER on node B.

    .venv/bin/python bench/cluster_latency.py [--n 200] [--base-port 25000]

Two real server processes (bench/common.py `start_bench_server`, each with a stats hook) share one
redis-server started here; each has its internal listener ([cluster] node_address), so A's forked
INVITE goes through B, which holds the device's flow (libon_tsilo/cluster/). Ports: the SIP, internal
and Redis ports are ``--base-port`` + 0..4 (the path engineer's range is 25000-25999).

For each of ``--n`` rounds, one AOR per round (sequential, no load): a caller socket sends an INVITE
to A and waits for its 100 (the call is then parked on A; a 50 ms pause, outside what is measured,
lets A finish with it); the device socket sends a REGISTER to B, and waits for the INVITE relayed by
B, which it refuses with 486 (the call is not the point here). Printed:

- server side, what the goal is about: REGISTER processed on B -> forked INVITE sent by A, as A's silo
  measures it (``register_to_invite``: from the binding's ``registered_at``, stamped by B, to A's
  fork; one host, one clock), p50/p95/p99 over the rounds;
- client side, an upper bound: REGISTER sent -> INVITE received by the device, which adds B's 200,
  the hop back through B's relay and both sockets.

``run_cluster_latency()`` returns the figures, for bench/cluster.py to print with its own.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HOST, start_bench_server  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def _recv_until(sock: socket.socket, predicate: Any, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("timed out waiting for a message")
        sock.settimeout(left)
        data, _ = sock.recvfrom(65535)
        if predicate(data):
            return data


def _invite(port: int, server_port: int, user: str) -> bytes:
    return (
        f"INVITE sip:{user}@{HOST}:{server_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:caller@{HOST}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{user}@{HOST}>\r\nCall-ID: {uuid.uuid4().hex}@bench\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:caller@{HOST}:{port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _register(port: int, user: str) -> bytes:
    return (
        f"REGISTER sip:{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@{HOST}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{user}@{HOST}>\r\nCall-ID: {uuid.uuid4().hex}@bench\r\nCSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{user}@{HOST}:{port}>\r\nExpires: 60\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _busy(invite: bytes) -> bytes:
    head = invite.split(b"\r\n\r\n", 1)[0].decode()
    keep = [line for line in head.split("\r\n")[1:]
            if line.split(":", 1)[0].lower() in ("via", "from", "to", "call-id", "cseq", "record-route")]
    keep = [line + ";tag=busy" if line.lower().startswith("to:") else line for line in keep]
    return ("SIP/2.0 486 Busy Here\r\n" + "\r\n".join(keep) + "\r\nContent-Length: 0\r\n\r\n").encode()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def run_cluster_latency(n: int = 200, base_port: int = 25000, workdir: Path | None = None) -> dict[str, Any]:
    """Run the measurement (see the module doc): A's silo summary (seconds), client figures in ms."""
    base = Path(workdir or tempfile.mkdtemp(prefix="cluster-latency-"))
    redis = RedisServer(base, port=base_port + 4)
    redis.start()
    nodes = []
    try:
        for i, name in enumerate(("a", "b")):
            extra = {
                "location": {"backend": "redis", "url": redis.url, "key_prefix": "lat:"},
                "cluster": {"node_id": name, "node_address": f"udp:{HOST}:{base_port + 2 + i}",
                            "secret": f"bench-{name}"},
                "calls": {"ring_timeout": 30, "invite_cancel_grace": 0},
            }
            nodes.append(start_bench_server(base / name, extra, port=base_port + i))
        a, b = nodes
        print(f"node a: {a.command}\nnode b: {b.command}\nredis: {redis.url}")
        caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        caller.bind((HOST, 0))
        device.bind((HOST, 0))
        client: list[float] = []
        run = uuid.uuid4().hex[:6]
        for i in range(n):
            user = f"lat{run}-{i}"
            caller.sendto(_invite(caller.getsockname()[1], a.sip_port, user), (HOST, a.sip_port))
            _recv_until(caller, lambda d: d.startswith(b"SIP/2.0 100"))
            time.sleep(0.05)  # not measured: A finishes parking before the REGISTER exists
            started = time.perf_counter()
            device.sendto(_register(device.getsockname()[1], user), (HOST, b.sip_port))
            invite = _recv_until(device, lambda d: d.startswith(b"INVITE "))
            client.append((time.perf_counter() - started) * 1000)
            device.sendto(_busy(invite), (HOST, b.sip_port))
        server = a.stats()["silo"]["register_to_invite"]
        return {"n": n, "server": server,
                "client_p50_ms": statistics.median(client), "client_p95_ms": _percentile(client, 0.95),
                "client_max_ms": max(client)}
    finally:
        for node in nodes:
            node.stop()
        redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--base-port", type=int, default=25000)
    args = ap.parse_args()
    figures = run_cluster_latency(args.n, args.base_port)
    s = figures["server"]
    print(f"REGISTER on B -> forked INVITE sent by A (A's silo, {s.get('count', args.n)} samples): "
          f"p50 {s['p50'] * 1000:.2f} ms, p95 {s['p95'] * 1000:.2f} ms, p99 {s['p99'] * 1000:.2f} ms")
    print(f"REGISTER sent -> INVITE at the device through B (client side, {figures['n']} rounds): "
          f"p50 {figures['client_p50_ms']:.2f} ms, p95 {figures['client_p95_ms']:.2f} ms, "
          f"max {figures['client_max_ms']:.2f} ms")


if __name__ == "__main__":
    main()
