"""Connection limits on the real server: accept backlog, memory per connection, UDP flows of spoofed sources.

    .venv/bin/python bench/connections.py backlog [--n 1000] [--window 1.0]
    .venv/bin/python bench/connections.py idle [--n 3000] [--partial 0]
    .venv/bin/python bench/connections.py udp-flows [--n 20000] [--idle 60]
    .venv/bin/python bench/connections.py udp-flow-bytes [--n 20000]
    .venv/bin/python bench/connections.py relay [--n 20]

Each mode starts the real server (bench/common.py: ``twistd -n libon-tsilo``, log level warn, auth
off) with UDP and TCP on one loopback port and the admin API, and reads the server's figures from
``/rpc/stats`` (``flows``, ``connections``) and its RSS from /proc.

- ``backlog``: N non-blocking connects (from N source addresses 127.4.x.y) are issued at once, then
  each socket sends an OPTIONS as soon as it is connected. Printed: how many were answered within
  ``--window`` seconds, and within 5 s.
  A connection the kernel could not queue (accept queue full: ``listen_backlog``, capped by
  net.core.somaxconn) waits for a SYN-ACK retransmission (1 s, 3 s, ...) or is dropped.
- ``idle``: N connections that send nothing (or ``--partial`` bytes of a message that never
  completes), held open; printed: RSS growth per connection. The server's own per-source cap is
  lifted for the run (all the connections come from 127.0.0.1).
- ``udp-flows``: one OPTIONS from each of N distinct source addresses (127.2.x.y, one datagram
  each, ``--rate`` per second, so the socket buffer does not overflow); nobody registers. Printed:
  the server's live flows and RSS growth once the OPTIONS transactions are over (T1 is 50 ms
  here, so 64*T1 = 3.2 s), and the flows left after the unbound idle timeout (``--idle``).
- ``udp-flow-bytes`` (in-process, no server): the transport layer alone (``TransportLayer.datagram_received``
  with a sink that drops every message, on a Clock): tracemalloc's bytes per flow for N sources, the
  flows left at the cap, and after the unbound idle timeout.
- ``relay``: N calls, one after the other, over TCP: a device registered over its own connection
  answers each forked INVITE with 180 and 200 at once; the caller (another TCP connection) times
  its INVITE -> 180 and INVITE -> 200, then ACKs and hangs up. Printed: the medians and maxima. The
  server writes 100 Trying then the 180 on the caller's connection: without TCP_NODELAY the 180
  waits for the caller's delayed ACK of the 100 (Nagle).

Every run prints the server's config overrides, so a figure can be reproduced.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HOST, BenchServer, start_bench_server  # noqa: E402
from tests.e2e.proc import free_port, options_request  # noqa: E402


def start(
    workdir: Path, connections: dict[str, Any] | None = None, sip: dict[str, Any] | None = None
) -> tuple[BenchServer, int]:
    admin = free_port(udp_too=False)
    port = free_port()
    extra: dict[str, dict[str, Any]] = {
        "sip": {"listen": [f"udp:{HOST}:{port}", f"tcp:{HOST}:{port}"], **(sip or {})},
        "admin": {"listen": f"tcp:{admin}:interface={HOST}"},
    }
    if connections:
        extra["connections"] = connections
    print("config overrides:", json.dumps({k: v for k, v in extra.items() if k != "admin"}))
    return start_bench_server(workdir, extra, port=port), admin


def stats(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{admin}/rpc/stats", timeout=10) as resp:
        return json.loads(resp.read())["result"]


def wait_for(admin: int, pred, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(admin)
        if pred(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


# -- backlog ----------------------------------------------------------------------------------------


def run_backlog(args: argparse.Namespace, workdir: Path) -> None:
    server, admin = start(workdir, args.connections, args.sip)
    try:
        sel = selectors.DefaultSelector()
        socks = []
        t0 = time.monotonic()
        for i in range(args.n):
            s = socket.socket()
            s.bind((f"127.4.{i // 250}.{i % 250 + 1}", 0))  # many sources: the per-source cap stays out
            s.setblocking(False)
            s.connect_ex((HOST, server.sip_port))
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE, "connecting")
        answered: dict[socket.socket, float] = {}
        bufs: dict[socket.socket, bytes] = {}
        deadline = t0 + 5.0
        while len(answered) < args.n and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                s = key.fileobj
                if key.data == "connecting":
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        sel.unregister(s)
                        continue
                    s.send(options_request(HOST, server.sip_port, s.getsockname()[1], "TCP"))
                    sel.modify(s, selectors.EVENT_READ, "sent")
                    continue
                try:
                    chunk = s.recv(65535)
                except OSError:
                    chunk = b""
                bufs[s] = bufs.get(s, b"") + chunk
                if not chunk or b"\r\n\r\n" in bufs[s]:
                    sel.unregister(s)
                    if bufs[s].startswith(b"SIP/2.0 200"):
                        answered[s] = time.monotonic() - t0
        within = sum(1 for t in answered.values() if t <= args.window)
        print(f"backlog: {args.n} simultaneous connects: {within} answered within {args.window:.1f} s, "
              f"{len(answered)} within 5 s; slowest {max(answered.values(), default=0):.2f} s")
        for s in socks:
            s.close()
    finally:
        server.stop()


# -- idle connections --------------------------------------------------------------------------------


def run_idle(args: argparse.Namespace, workdir: Path) -> None:
    lifted = {"max_connections_per_source": args.n + 10, "max_connections": args.n + 10}
    conn = {**lifted, **(args.connections or {})}
    server, admin = start(workdir, conn if args.lift_caps else args.connections, args.sip)
    try:
        base_flows = stats(admin)["flows"]["live"]
        time.sleep(0.5)
        before = server.rss_kib()
        # a header section that never ends: the request line and headers, then padding up to --partial
        head = options_request(HOST, server.sip_port, 5999, "TCP")[:-4]
        partial = (head + b"\r\nX-Pad: " + b"a" * args.partial)[: args.partial] if args.partial else b""
        socks = []
        for _ in range(args.n):
            s = socket.create_connection((HOST, server.sip_port))
            if partial:
                s.sendall(partial)
            socks.append(s)
        # every connection is either live on the server or was closed by a limit
        s = wait_for(admin, lambda st: st["flows"]["live"] - base_flows
                     + sum(st.get("connections", {}).get("closed", {}).values()) >= args.n, 30)
        time.sleep(1.0)
        after = server.rss_kib()
        s = stats(admin)
        live = s["flows"]["live"] - base_flows
        print(f"idle: {args.n} connections ({args.partial} bytes of a message each): {live} live on the "
              f"server, RSS {mib(before)} -> {mib(after)}: +{mib(after - before)}, "
              f"{(after - before) / max(args.n, 1):.1f} KiB per connection made")
        if "connections" in s:
            print("server connection counters:", json.dumps(s["connections"]))
        for s in socks:
            s.close()
    finally:
        server.stop()


# -- UDP flows from spoofed sources ------------------------------------------------------------------


def run_udp_flows(args: argparse.Namespace, workdir: Path) -> None:
    server, admin = start(workdir, args.connections, {"t1_ms": 50, **(args.sip or {})})
    try:
        base_flows = stats(admin)["flows"]["live"]
        time.sleep(0.5)
        before = server.rss_kib()
        t0 = time.monotonic()
        for i in range(args.n):
            src = f"127.2.{(i // 250) % 250}.{i % 250 + 1}"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((src, 5999))
                s.sendto(options_request(HOST, server.sip_port, 5999), (HOST, server.sip_port))
            # paced well under what the server answers, so that none is lost to a full socket buffer
            ahead = (i + 1) / args.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        # the OPTIONS transactions end 64*T1 = 3.2 s after their 200
        s = wait_for(admin, lambda st: st["transactions"]["live"] == 0, 30)
        time.sleep(0.5)
        after = server.rss_kib()
        flows = s["flows"]["live"] - base_flows
        print(f"udp-flows: {args.n} sources sent one OPTIONS each: {flows} flows live after the "
              f"transactions ended; RSS {mib(before)} -> {mib(after)}: +{mib(after - before)}")
        if args.idle:
            s = wait_for(admin, lambda st: st["flows"]["live"] <= base_flows, args.idle + 10)
            print(f"udp-flows: {s['flows']['live'] - base_flows} flows left after the unbound idle "
                  f"timeout ({args.idle} s)")
        conns = s.get("connections")
        if conns:
            print("server connection counters:", json.dumps(conns))
    finally:
        server.stop()


def run_udp_flow_bytes(args: argparse.Namespace, workdir: Path) -> None:
    import gc
    import tracemalloc

    from twisted.internet.task import Clock

    from libon_tsilo.sip import transport as transport_mod

    clock = Clock()
    kwargs: dict[str, Any] = {}
    if hasattr(transport_mod, "ConnectionLimits"):
        limits = {"unbound_idle_timeout": 60.0, **(args.connections or {})}
        kwargs["limits"] = transport_mod.ConnectionLimits(**limits)
    layer = transport_mod.TransportLayer([], clock, 3600.0, 65535, **kwargs)
    layer.sink = lambda msg, flow: None

    class FakeUDP:
        local = (HOST, 5060)
        v6 = False

        def send_to(self, data: bytes, addr: Any) -> None:
            pass

    udp = FakeUDP()
    datagrams = [options_request(HOST, 5060, 5999) for _ in range(args.n)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i, data in enumerate(datagrams):
        layer.datagram_received(udp, data, (f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 5060))
    gc.collect()
    after = tracemalloc.take_snapshot()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    flows = layer.flows.live_count()
    print(f"udp-flow-bytes: {args.n} sources: {flows} flows, +{grown / 1024 / 1024:.1f} MiB "
          f"({grown / max(flows, 1):.0f} bytes per flow held)")
    clock.advance(61)
    print(f"udp-flow-bytes: {layer.flows.live_count()} flows left 61 s later")


class _Stream:
    """A blocking SIP-over-TCP peer: send bytes, read whole messages (Content-Length framing)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port))
        self.sock.settimeout(5)
        # our own writes must not wait for the server's delayed ACK: only the server is measured
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]
        self.buf = b""

    def read(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = self.buf[:end].decode()
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() in ("content-length", "l"):
                        length = int(value)
                if len(self.buf) >= end + 4 + length:
                    msg, self.buf = self.buf[:end + 4 + length], self.buf[end + 4 + length:]
                    return msg
            chunk = self.sock.recv(65535)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk


def _headers(msg: bytes, name: str) -> list[str]:
    out = []
    for line in msg.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            out.append(value.strip())
    return out


def _answer(req: bytes, status: str, to_tag: str, contact: str) -> bytes:
    lines = [f"SIP/2.0 {status}"] + [f"Via: {v}" for v in _headers(req, "via")]
    lines += [f"From: {_headers(req, 'from')[0]}", f"To: {_headers(req, 'to')[0]};tag={to_tag}",
              f"Call-ID: {_headers(req, 'call-id')[0]}", f"CSeq: {_headers(req, 'cseq')[0]}",
              f"Contact: {contact}", "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def run_relay(args: argparse.Namespace, workdir: Path) -> None:
    server, admin = start(workdir, args.connections, args.sip)
    port = server.sip_port
    try:
        device, caller = _Stream(port), _Stream(port)
        contact = f"<sip:dev@{HOST}:{device.port};transport=tcp>"
        dev_via = f"Via: SIP/2.0/TCP {HOST}:{device.port};branch=z9hG4bK-reg;rport"
        device.sock.sendall((
            f"REGISTER sip:{HOST} SIP/2.0\r\n{dev_via}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:dev@{HOST}>;tag=d\r\nTo: <sip:dev@{HOST}>\r\n"
            f"Call-ID: reg@bench\r\nCSeq: 1 REGISTER\r\nContact: {contact}\r\nExpires: 600\r\n"
            "Content-Length: 0\r\n\r\n").encode())
        assert device.read().startswith(b"SIP/2.0 200"), "REGISTER failed"
        ringing: list[float] = []
        answered: list[float] = []
        for n in range(args.n):
            via = f"Via: SIP/2.0/TCP {HOST}:{caller.port};branch=z9hG4bK-c{n};rport"
            common = (f"Max-Forwards: 70\r\nFrom: <sip:caller@{HOST}>;tag=c{n}\r\n"
                      f"Call-ID: relay-{n}@bench\r\n")
            t0 = time.perf_counter()
            me = f"<sip:caller@{HOST}:{caller.port};transport=tcp>"
            caller.sock.sendall((f"INVITE sip:dev@{HOST} SIP/2.0\r\n{via}\r\n{common}To: <sip:dev@{HOST}>\r\n"
                                 f"CSeq: 1 INVITE\r\nContact: {me}\r\nContent-Length: 0\r\n\r\n").encode())
            invite = device.read()
            while not invite.startswith(b"INVITE"):
                invite = device.read()
            device.sock.sendall(_answer(invite, "180 Ringing", f"d{n}", contact))
            device.sock.sendall(_answer(invite, "200 OK", f"d{n}", contact))
            ok = b""
            while not ok.startswith(b"SIP/2.0 200"):
                got = caller.read()
                if got.startswith(b"SIP/2.0 180"):
                    ringing.append(time.perf_counter() - t0)
                ok = got
            answered.append(time.perf_counter() - t0)
            to = _headers(ok, "to")[0]
            for method, seq, branch in (("ACK", 1, f"a{n};"), ("BYE", 2, f"b{n};")):
                caller.sock.sendall((f"{method} sip:dev@{HOST} SIP/2.0\r\n{via.replace(f'c{n};', branch)}\r\n"
                                     f"{common}To: {to}\r\nCSeq: {seq} {method}\r\n"
                                     "Content-Length: 0\r\n\r\n").encode())
            while True:  # the device sees the ACK and the BYE, and answers the BYE
                got = device.read()
                if got.startswith(b"BYE"):
                    device.sock.sendall(_answer(got, "200 OK", f"d{n}", contact))
                    break
            while not caller.read().startswith(b"SIP/2.0 200"):
                pass
        ringing.sort()
        answered.sort()
        r_med, r_max = ringing[len(ringing) // 2] * 1000, ringing[-1] * 1000
        a_med, a_max = answered[len(answered) // 2] * 1000, answered[-1] * 1000
        print(f"relay over TCP, {args.n} calls: INVITE -> 180 median {r_med:.1f} ms (max {r_max:.1f}), "
              f"INVITE -> 200 median {a_med:.1f} ms (max {a_max:.1f})")
        device.sock.close()
        caller.sock.close()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["backlog", "idle", "udp-flows", "udp-flow-bytes", "relay"])
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--window", type=float, default=1.0, help="backlog: answered within this (s)")
    parser.add_argument("--partial", type=int, default=0, help="idle: bytes of a message each sends")
    parser.add_argument("--idle", type=float, default=0.0,
                        help="udp-flows: also wait this long for unbound flows to expire")
    parser.add_argument("--rate", type=float, default=2000.0, help="udp-flows: datagrams per second")
    parser.add_argument("--no-lift-caps", dest="lift_caps", action="store_false",
                        help="idle: keep the server's connection caps")
    parser.add_argument("--connections", type=json.loads, default=None,
                        help='[connections] overrides as JSON, e.g. \'{"listen_backlog": 50}\'')
    parser.add_argument("--sip", type=json.loads, default=None, help="[sip] overrides as JSON")
    args = parser.parse_args()
    if args.n is None:
        args.n = {"backlog": 1000, "idle": 3000, "udp-flows": 20000, "udp-flow-bytes": 20000,
                  "relay": 20}[args.mode]
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as tmp:
        modes = {"backlog": run_backlog, "idle": run_idle, "udp-flows": run_udp_flows,
                 "udp-flow-bytes": run_udp_flow_bytes, "relay": run_relay}
        modes[args.mode](args, Path(tmp))


if __name__ == "__main__":
    main()
