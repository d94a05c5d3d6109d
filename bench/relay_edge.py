"""In-process CPU cost of the edge node of a cross-node call (issue 14, case (c) of bench/cluster.py).

    .venv/bin/python bench/relay_edge.py [--n 2000]               # wall clock, us per call
    .venv/bin/python bench/relay_edge.py --icount [--n 200]       # instructions per call (callgrind)
    .venv/bin/python bench/relay_edge.py --profile [--n 2000]     # cProfile of the relay stage
    .venv/bin/python bench/relay_edge.py --icount --sibling       # per response passed to a sibling


Node B (the node holding the device's flow) is the real service tree with a cluster config (memory
store, auth off), fed datagrams straight into its transport as bench/inproc.py does. Per call: the
device REGISTERs on B (stage ``register`` stops there); then (stage ``relay``) node A's forked
INVITE arrives on B's internal listener with B's Path entry as Route, B relays it over the device's
flow, the device answers 180 and 200, A's ACK and BYE come through B, the device answers the BYE.
A and the device are fake: their messages are built by copying header lines out of B's datagrams.
``relay`` minus ``register`` is what relaying one call costs the edge node. With --icount, two
figures: B's own work only (every call into B goes through ``operator.call``, and callgrind collects
inside ``_operator_call`` only: the fake peers' regex and string work is left out), and the whole
process (B plus the fake peers: the figure this bench printed before it could tell them apart).

``--sibling`` measures case (f) of bench/cluster.py instead: B shares its public UDP socket with a
worker A (``udp_via_path = "auto"``); A forked straight to the device from that socket, and the
kernel hands the device's 180 and 200 (A's Via, marked ``;nd=``) to B, which passes them on to A's
internal address as they came. Stage ``sibling`` is the REGISTER then those two responses; its
figure less ``register``, halved, is what B spends per response passed on.
"""

from __future__ import annotations

import argparse
import base64
import operator
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import callgrind  # noqa: E402
from bench.inproc import REGISTER, SDP, answer, take  # noqa: E402

PUBLIC = ("127.0.0.1", 29501)
INTERNAL = ("127.0.0.1", 29502)
NODE_A = ("127.0.0.1", 29503)

def device(i: int) -> tuple[str, int]:
    """Call i's device: each its own flow and flow token, as in a real cluster."""
    return ("127.0.0.1", 20000 + i % 9000)


# node A's B-leg INVITE towards the device, as A's call layer sends it: the binding's Path as Route
A_INVITE = (
    "INVITE sip:{user}@127.0.0.1:{port};transport=udp SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:29503;branch=z9hG4bK-ai{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "Route: {path}\r\n"
    "From: <sip:caller@127.0.0.1>;tag=a{n}\r\n"
    "To: <sip:{user}@127.0.0.1>\r\n"
    "Call-ID: b{n}@nodea\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:node-a@127.0.0.1:29503>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n{sdp}"
)

A_IN_DIALOG = (
    "{method} sip:{user}@127.0.0.1:{port};transport=udp SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:29503;branch=z9hG4bK-a{kind}{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "Route: {routes}\r\n"
    "From: <sip:caller@127.0.0.1>;tag=a{n}\r\n"
    "To: {to}\r\n"
    "Call-ID: b{n}@nodea\r\n"
    "CSeq: {cseq} {method}\r\n"
    "Content-Length: 0\r\n\r\n"
)

# the device's answers to the INVITE worker A sent it straight from the socket both workers share
D_RESPONSE = (
    "SIP/2.0 {status}\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:{public};branch=z9hG4bK-ai{n};rport={public};nd={mark}\r\n"
    "From: <sip:caller@127.0.0.1>;tag=a{n}\r\n"
    "To: <sip:{user}@127.0.0.1>;tag=d{n}\r\n"
    "Call-ID: b{n}@nodea\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:device@127.0.0.1:{port}>\r\n"
    "{body}"
)

_TO = re.compile(rb"^To: ([^\r]*)\r\n", re.M | re.I)
_RR = re.compile(rb"^Record-Route: ([^\r]*)\r\n", re.M | re.I)


def build() -> dict[str, Any]:
    from twisted.internet import asyncioreactor

    if "twisted.internet.reactor" not in sys.modules:
        asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from libon_tsilo.ops.config import config_from_dict
    from libon_tsilo.ops.gctune import tune_gc
    from libon_tsilo.ops.logging import make_observer
    from libon_tsilo.ops.service import make_service

    globalLogBeginner.beginLoggingTo([make_observer("warn", "text")], redirectStandardIO=False)
    cfg = config_from_dict({
        "sip": {"listen": [f"udp:{PUBLIC[0]}:{PUBLIC[1]}"], "domains": ["127.0.0.1"]},
        "auth": {"enabled": False},
        "location": {"backend": "memory", "path": os.path.join(tempfile.mkdtemp(), "loc.sqlite")},
        "log": {"level": "warn", "format": "text"},
        "calls": {"ring_timeout": 30, "invite_cancel_grace": 0},
        "cluster": {"node_id": "b", "node_address": f"udp:{INTERNAL[0]}:{INTERNAL[1]}", "secret": "bench"},
    })
    root = make_service(cfg, clock=reactor)
    tune_gc()
    parts = root.parts
    transport = parts.transport
    # what listen() would have recorded: the public listener, then the internal one
    transport.bound = [("udp", *PUBLIC), ("udp", *INTERNAL)]
    outbox: list[tuple[bytes, tuple[str, int]]] = []

    class FakeSocket:
        v6 = False

        def __init__(self, local: tuple[str, int]) -> None:
            self.local = local

        def send_to(self, data: bytes, addr: tuple[str, int]) -> None:
            outbox.append((data, addr))

    public, internal = FakeSocket(PUBLIC), FakeSocket(INTERNAL)
    transport.add_udp_endpoint(public)
    transport.add_udp_endpoint(internal)

    def feed(data: bytes, addr: tuple[str, int], sock: FakeSocket = public) -> None:
        operator.call(transport.datagram_received, sock, data, addr)  # B's work: see the module doc

    class Timers:
        """B's reactor turn, through operator.call as well."""

        @staticmethod
        def runUntilCurrent() -> None:  # noqa: N802 (the reactor's name)
            operator.call(reactor.runUntilCurrent)

    return {"reactor": Timers(), "parts": parts, "outbox": outbox, "feed": feed, "internal": internal}


def make_run(env: dict[str, Any], stage: str, n: int) -> Callable[[], None]:
    feed, outbox, reactor, internal = env["feed"], env["outbox"], env["reactor"], env["internal"]
    sdp = SDP.format(who="caller")
    device_sdp = SDP.format(who="device")
    node, transport = env["parts"].extra["cluster_node"], env["parts"].transport
    # worker A's mark (its internal address), as A writes it in its Via and Contact (cluster/node.py)
    mark = base64.urlsafe_b64encode(f"udp:{NODE_A[0]}:{NODE_A[1]}".encode()).rstrip(b"=").decode()
    sdp_body = f"Content-Type: application/sdp\r\nContent-Length: {len(device_sdp)}\r\n\r\n{device_sdp}"
    if stage == "sibling":
        env["parts"].extra["cluster_relay"]._shares = True  # as node.mark says of a reuse_port socket
    registers = [REGISTER.format(n=i, user=f"e{i}", port=device(i)[1]).encode() for i in range(n)]

    def one_call(i: int) -> None:
        DEVICE, port = device(i), device(i)[1]  # noqa: N806
        dialog = {"n": i, "user": f"e{i}", "port": port}
        feed(registers[i], DEVICE)
        reactor.runUntilCurrent()
        take(outbox, DEVICE, b"SIP/2.0 200")
        if stage == "register":
            return
        if stage == "sibling":
            for status, body in (("180 Ringing", "Content-Length: 0\r\n\r\n"), ("200 OK", sdp_body)):
                feed(D_RESPONSE.format(status=status, n=i, user=f"e{i}", port=port, public=PUBLIC[1],
                                       mark=mark, body=body).encode(), DEVICE)
                take(outbox, NODE_A, b"SIP/2.0 ")
            return
        # the Path entry B's registrar stored with the binding (it names the device's flow)
        path = node.path_entry(transport.flows.lookup("udp", PUBLIC, DEVICE), False)
        invite = A_INVITE.format(n=i, user=f"e{i}", path=path, port=port, sdp=sdp, length=len(sdp)).encode()
        feed(invite, NODE_A, internal)
        reactor.runUntilCurrent()
        d_invite = take(outbox, DEVICE, b"INVITE ")
        feed(answer(d_invite, "180 Ringing", f"d{i}"), DEVICE)
        rr = b"\r\nRecord-Route: ".join(_RR.findall(d_invite))
        ok_text = answer(d_invite, "200 OK", f"d{i}", device_sdp)
        ok_text = ok_text.replace(b"\r\nContact:", b"\r\nRecord-Route: " + rr + b"\r\nContact:", 1)
        feed(ok_text, DEVICE)
        reactor.runUntilCurrent()
        a_ok = take(outbox, NODE_A, b"SIP/2.0 200")
        to = _TO.search(a_ok).group(1).decode()
        # A's route set: the Record-Route of the 200, reversed (RFC 3261 §12.1.2)
        routes = ", ".join(reversed([r.decode() for r in _RR.findall(a_ok)]))
        ack = A_IN_DIALOG.format(method="ACK", kind="a", routes=routes, to=to, cseq=1, **dialog)
        feed(ack.encode(), NODE_A, internal)
        bye = A_IN_DIALOG.format(method="BYE", kind="b", routes=routes, to=to, cseq=2, **dialog)
        feed(bye.encode(), NODE_A, internal)
        reactor.runUntilCurrent()
        take(outbox, DEVICE, b"ACK ")
        d_bye = take(outbox, DEVICE, b"BYE ")
        feed(answer(d_bye, "200 OK", f"d{i}"), DEVICE)
        reactor.runUntilCurrent()
        take(outbox, NODE_A, b"SIP/2.0 200")
        outbox.clear()  # 100 Trying, 180 relayed

    def run() -> None:
        for i in range(n):
            one_call(i)
        if stage == "sibling":
            passed = env["parts"].extra["cluster_relay"].stats().get("to_sibling_responses", 0)
            if passed != 2 * n:
                raise RuntimeError(f"{passed} responses passed on to the sibling after {n} calls")
        if stage == "relay":
            stats = env["parts"].extra["cluster_relay"].stats()
            if stats.get("to_device", 0) != 3 * n or stats["pending_invites"]:
                raise RuntimeError(f"relay stats after {n} calls: {stats}")
    return run


def run_stage(stage: str, n: int, profile: bool = False) -> float:
    run = make_run(build(), stage, n)
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(run)
        pstats.Stats(prof).sort_stats(os.environ.get("PSORT", "tottime")).print_stats(45)
        return 0.0
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def icount(stage: str, n: int, only_b: bool) -> int:
    only = ["--toggle-collect=_operator_call"] if only_b else []
    return callgrind.count([sys.executable, __file__, "--child", stage, str(n)], options=only)

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="calls per stage: 2000, 200 with --icount")
    p.add_argument("--icount", action="store_true", help="instructions per call under callgrind")
    p.add_argument("--profile", action="store_true", help="cProfile the relay (or sibling) stage")
    p.add_argument("--sibling", action="store_true",
                   help="case (f): B passes the device's responses on to the worker sharing its socket")
    p.add_argument("--child", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(run_stage(args.child[0], int(args.child[1])))
        return
    n = args.n or (200 if args.icount else 2000)
    work = "sibling" if args.sibling else "relay"
    if args.profile:
        run_stage(work, n, profile=True)
        return
    if args.icount:
        for only_b, what in ((True, "node B only"), (False, "whole process, with the fake peers")):
            print(f"-- {what}")
            figures = {}
            for stage in ("register", work):
                figures[stage] = per = (icount(stage, n, only_b) - icount(stage, 0, only_b)) / n
                print(f"{stage:9} {per:>12,.0f} instructions per call", flush=True)
            if args.sibling:
                print(f"passing on {(figures['sibling'] - figures['register']) / 2:>10,.0f} instructions per"
                      " response (sibling - register, halved)")
            else:
                print(f"relaying  {figures['relay'] - figures['register']:>12,.0f} instructions per call"
                      " (relay - register)")
        return
    figures = {}
    for stage in ("register", work):
        out = subprocess.run([sys.executable, __file__, "--child", stage, str(n)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
        figures[stage] = per = float(out.stdout.split()[-1]) / n * 1e6
        print(f"{stage:9} {per:>9.1f} us per call", flush=True)
    if args.sibling:
        print(f"passing on {(figures['sibling'] - figures['register']) / 2:>9.1f} us per response")
    else:
        print(f"relaying  {figures['relay'] - figures['register']:>12,.0f} us per call (relay - register)")


if __name__ == "__main__":
    main()
