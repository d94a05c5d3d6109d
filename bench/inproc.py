"""In-process CPU cost per SIP message: the real service tree, no sockets, no SIPp.

    .venv/bin/python bench/inproc.py [--n 5000] [--scenario register|call|all]
    .venv/bin/python bench/inproc.py --icount [--n 300]          # deterministic, under valgrind
    .venv/bin/python bench/inproc.py --limits-on ...             # loopback not exempt from [limits]
    .venv/bin/python bench/inproc.py --icount --scenario register --location sqlite [--batch 8]

The service tree is built with ``make_service`` (asyncio reactor, memory location store, auth
off, log level warn), as bench/common.py runs it. Datagrams go straight into the transport's
inbound path (``TransportLayer.datagram_received``) and every datagram the server sends lands in an
in-memory outbox instead of a socket, so the figures are the server's CPU cost per message, free
of kernel and SIPp noise.

Scenarios and stages:

- ``register``: N REGISTERs, each for its own AOR, measured in four cumulative stages:
  ``parse`` (parse_message + validate), ``transport`` (the transport's inbound path, with a sink
  that drops the message), ``txn`` (plus the transaction layer, with a TU that answers 200 at
  once) and ``full`` (the real router, UAS core, registrar and location store).
- ``call``: N late-fork calls, as bench/latefork.py drives them: the caller's INVITE is parked,
  the device REGISTERs, the server forks the INVITE to it, a fake device answers 180 and 200
  in-process, the caller ACKs and hangs up, the BYE is relayed and answered. The fake device and
  caller build their messages by copying header lines from the server's datagrams (no parsing),
  so their own cost stays small (it is included in the figure).

With ``--location sqlite`` the REGISTERs are committed to a SQLite file, ``--batch`` of them per
commit (the group commit the server's timer makes), written inline: the counts include SQLite but
not the worker thread's hand-off per commit.

Without ``--icount`` each stage prints microseconds per message (per call for ``call``), wall
clock: on a shared VM expect +-30 %. With ``--icount`` the script runs itself under
``valgrind --tool=callgrind`` once with N messages and once with none, per stage, and prints the
difference divided by N: instructions per message, reproducible to a few tenths of a percent.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import callgrind  # noqa: E402

REGISTER_STAGES = ("parse", "transport", "txn", "full")
# --location sqlite: the REGISTERs are committed to a SQLite file, BATCH per commit (group commit)
LOCATION = os.environ.get("INPROC_LOCATION", "memory")
BATCH = int(os.environ.get("INPROC_BATCH", "8"))
CALLER = ("127.0.0.1", 16000)
DEVICE = ("127.0.0.1", 17000)

REGISTER = (
    "REGISTER sip:127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-r{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:{user}@127.0.0.1>;tag=t{n}\r\n"
    "To: <sip:{user}@127.0.0.1>\r\n"
    "Call-ID: r{n}@bench\r\n"
    "CSeq: 1 REGISTER\r\n"
    "Contact: <sip:{user}@127.0.0.1:{port};transport=udp>\r\n"
    "Expires: 3600\r\n"
    "User-Agent: SIPp\r\n"
    "Content-Length: 0\r\n\r\n"
)

SDP = (
    "v=0\r\no={who} 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)

INVITE = (
    "INVITE sip:{user}@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:16000;branch=z9hG4bK-i{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:caller@127.0.0.1:16000>;tag=c{n}\r\n"
    "To: <sip:{user}@127.0.0.1:5060>\r\n"
    "Call-ID: i{n}@bench\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:caller@127.0.0.1:16000>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n{sdp}"
)

IN_DIALOG = (
    "{method} sip:{user}@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:16000;branch=z9hG4bK-{kind}{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:caller@127.0.0.1:16000>;tag=c{n}\r\n"
    "To: {to}\r\n"
    "Call-ID: i{n}@bench\r\n"
    "CSeq: {cseq} {method}\r\n"
    "Content-Length: 0\r\n\r\n"
)


def build(stage: str, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The service tree with a fake UDP socket; returns what the scenarios need. ``limits``: a
    [limits] section (bench/flood.py)."""
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
        "sip": {"listen": ["udp:127.0.0.1:5060"], "domains": ["localhost", "127.0.0.1"]},
        "auth": {"enabled": False},
        "location": {"backend": LOCATION, "path": os.path.join(tempfile.mkdtemp(), "loc.sqlite")},
        "log": {"level": "warn", "format": "text"},
        "calls": {"ring_timeout": 30, "invite_cancel_grace": 0},
        # --limits-on: every request pays the per-source limiter's token bucket (never biting)
        **({"limits": {"exempt_sources": [], "requests_per_second": 1e9, "burst": 10**9}}
           if os.environ.get("INPROC_LIMITS_ON") else {}),
        **({"limits": limits} if limits is not None else {}),
    })
    root = make_service(cfg, clock=reactor)
    if LOCATION == "sqlite":
        from twisted.internet import defer

        # batches written inline, so the count is deterministic: the worker thread's hand-off and
        # the reactor wake-up per commit are not counted (a few tens of us per commit, not per REGISTER)
        root.parts.location.persistence._run = lambda f, *a: defer.maybeDeferred(f, *a)
    tune_gc()  # as the twistd entry point does (libon_tsilo/ops/tap.py)
    parts = root.parts
    transport = parts.transport
    outbox: list[tuple[bytes, tuple[str, int]]] = []

    class FakeSocket:
        local = ("127.0.0.1", 5060)
        v6 = False

        def send_to(self, data: bytes, addr: tuple[str, int]) -> None:
            outbox.append((data, addr))

    sock = FakeSocket()
    transport.add_udp_endpoint(sock)
    if stage == "transport":
        transport.sink = lambda msg, flow: None
    elif stage == "txn":
        from libon_tsilo.sip.message import make_response

        class AnswerAtOnce:
            def request_received(self, req: Any, stx: Any, flow: Any) -> None:
                stx.respond(make_response(req, 200, to_tag="x"))

        parts.transactions.tu = AnswerAtOnce()

    def feed(data: bytes, addr: tuple[str, int]) -> None:
        transport.datagram_received(sock, data, addr)

    return {"reactor": reactor, "parts": parts, "outbox": outbox, "feed": feed}


# -- fake peers: copy header lines out of the server's datagrams, never parse them ----------------

# The peers' own cost is in the figure, so they split the head once: five multi-line regex scans
# per answer (the way they worked before) were ~1.2M of the 3.3M instructions counted per call.
_COPIED = (b"via", b"from", b"to", b"call-id", b"cseq")  # in this order, as a device answers


def head_lines(message: bytes) -> list[bytes]:
    """The header lines of a message the server sent (start line and body left out)."""
    return message[:message.find(b"\r\n\r\n")].split(b"\r\n")[1:]


def header_value(message: bytes, name: bytes) -> bytes:
    """The value of the first ``name`` header line (full name, any case)."""
    for line in head_lines(message):
        colon = line.find(b":")
        if line[:colon].lower() == name:
            return line[colon + 1:].strip()
    raise RuntimeError(f"no {name!r} header in {message[:60]!r}")


def answer(request: bytes, status: str, to_tag: str, sdp: str = "") -> bytes:
    """A device's response to a request the server sent: Via/From/To/Call-ID/CSeq copied."""
    found: dict[bytes, list[bytes]] = {name: [] for name in _COPIED}
    for line in head_lines(request):
        got = found.get(line[:line.find(b":")].lower())
        if got is not None:
            got.append(line)
    lines = [f"SIP/2.0 {status}".encode()]
    for name, copied in found.items():
        if name == b"to" and b"tag=" not in copied[0]:
            copied = [copied[0] + f";tag={to_tag}".encode()]
        lines.extend(copied)
    lines.append(b"Contact: <sip:device@127.0.0.1:17000>")
    if sdp:
        lines.append(b"Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(sdp)}\r\n\r\n{sdp}".encode())
    return b"\r\n".join(lines)


def take(outbox: list[tuple[bytes, tuple[str, int]]], addr: tuple[str, int], start: bytes) -> bytes:
    for i, (data, to) in enumerate(outbox):
        if to == addr and data.startswith(start):
            del outbox[i]
            return data
    raise RuntimeError(f"the server sent no {start!r} to {addr}: {[d[:40] for d, _ in outbox]}")


# -- scenarios ---------------------------------------------------------------------------------------


def register_messages(n: int) -> list[bytes]:
    return [REGISTER.format(n=i, user=f"u{i}", port=16000).encode() for i in range(n)]


def register_run(env: dict[str, Any], stage: str, msgs: list[bytes]) -> Callable[[], None]:
    if stage == "parse":
        from libon_tsilo.sip.message import parse_message

        def run() -> None:
            for m in msgs:
                parse_message(m).validate()
        return run
    feed, outbox = env["feed"], env["outbox"]
    location = env["parts"].location

    def run() -> None:
        for i, m in enumerate(msgs, 1):
            feed(m, ("127.0.0.1", 16000))
            if LOCATION == "sqlite" and (i % BATCH == 0 or i == len(msgs)):
                location.flush()  # one group commit per BATCH REGISTERs (the timer's job in the server)
        if stage in ("txn", "full") and len(outbox) != len(msgs):
            raise RuntimeError(f"{len(outbox)} responses to {len(msgs)} REGISTERs")
        outbox.clear()
    return run


def call_messages(n: int) -> list[tuple[bytes, bytes]]:
    sdp = SDP.format(who="caller")
    return [(INVITE.format(n=i, user=f"lf{i}", sdp=sdp, length=len(sdp)).encode(),
             REGISTER.format(n=i, user=f"lf{i}", port=17000).encode()) for i in range(n)]


def call_run(env: dict[str, Any], msgs: list[tuple[bytes, bytes]]) -> Callable[[], None]:
    feed, outbox, reactor = env["feed"], env["outbox"], env["reactor"]
    device_sdp = SDP.format(who="device")

    def one_call(i: int, invite: bytes, register: bytes) -> None:
        feed(invite, CALLER)                                  # parked: 100 Trying
        reactor.runUntilCurrent()
        feed(register, DEVICE)                                # 200 OK + forked INVITE
        reactor.runUntilCurrent()
        take(outbox, DEVICE, b"SIP/2.0 200")
        b_invite = take(outbox, DEVICE, b"INVITE ")
        feed(answer(b_invite, "180 Ringing", f"d{i}"), DEVICE)
        feed(answer(b_invite, "200 OK", f"d{i}", device_sdp), DEVICE)
        reactor.runUntilCurrent()
        take(outbox, DEVICE, b"ACK ")
        ok = take(outbox, CALLER, b"SIP/2.0 200")
        to = header_value(ok, b"to").decode()                 # the A-leg's To, with our tag
        feed(IN_DIALOG.format(method="ACK", kind="a", n=i, user=f"lf{i}", to=to, cseq=1).encode(), CALLER)
        feed(IN_DIALOG.format(method="BYE", kind="b", n=i, user=f"lf{i}", to=to, cseq=2).encode(), CALLER)
        reactor.runUntilCurrent()
        b_bye = take(outbox, DEVICE, b"BYE ")
        feed(answer(b_bye, "200 OK", f"d{i}"), DEVICE)
        reactor.runUntilCurrent()
        take(outbox, CALLER, b"SIP/2.0 200")
        outbox.clear()                                        # 100 Trying, 180 relayed

    def run() -> None:
        for i, (invite, register) in enumerate(msgs):
            one_call(i, invite, register)
        stats = env["parts"].b2bua.stats()
        if stats["calls"] or stats["total_answered"] != len(msgs):
            raise RuntimeError(f"{stats['total_answered']} of {len(msgs)} calls answered, "
                               f"{stats['calls']} left")
    return run


def run_stage(scenario: str, stage: str, n: int) -> float:
    """Build, prepare N messages, run them; returns the seconds the run took."""
    env = build(stage)
    if scenario == "call":
        run = call_run(env, call_messages(n))
    else:
        run = register_run(env, stage, register_messages(n))
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


# -- drivers -------------------------------------------------------------------------------------------


def stages(scenario: str) -> list[tuple[str, str]]:
    picked = []
    if scenario in ("register", "all"):
        picked += [("register", s) for s in REGISTER_STAGES]
    if scenario in ("call", "all"):
        picked.append(("call", "full"))
    return picked


def icount(scenario: str, stage: str, n: int) -> int:
    return callgrind.count([sys.executable, __file__, "--child", scenario, stage, str(n)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("register", "call", "all"), default="all")
    p.add_argument("--n", type=int, default=None, help="messages (calls) per stage: 5000, 1000 with --icount")
    p.add_argument("--icount", action="store_true", help="instructions per message under callgrind")
    p.add_argument("--limits-on", action="store_true",
                   help="charge loopback to the per-source limiter too (exempt by default)")
    p.add_argument("--child", nargs=3, metavar=("SCENARIO", "STAGE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--location", choices=("memory", "sqlite"), default=None,
                   help="register full stage: location backend (sqlite: commits written inline)")
    p.add_argument("--batch", type=int, default=None, help="with --location sqlite: REGISTERs per commit (8)")
    args = p.parse_args()
    if args.location:  # the children read these
        os.environ["INPROC_LOCATION"] = args.location
    if args.batch:
        os.environ["INPROC_BATCH"] = str(args.batch)
    if args.child:
        scenario, stage, n = args.child
        print(run_stage(scenario, stage, int(n)))
        return
    if args.limits_on:
        os.environ["INPROC_LIMITS_ON"] = "1"  # the child processes build the service tree
    n = args.n or (1000 if args.icount else 5000)
    unit = {"register": "REGISTER", "call": "call"}
    for scenario, stage in stages(args.scenario):
        label = f"{scenario:8} {stage:9}"
        if args.icount:
            # valgrind runs ~50x slower: one base (no messages) per stage cancels start-up costs
            per = (icount(scenario, stage, n) - icount(scenario, stage, 0)) / n
            print(f"{label} {per:>12,.0f} instructions per {unit[scenario]}", flush=True)
        else:
            # a fresh process per stage: every stage builds its own service tree
            out = subprocess.run([sys.executable, __file__, "--child", scenario, stage, str(n)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{scenario} {stage} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
            seconds = float(out.stdout.split()[-1])
            print(f"{label} {seconds / n * 1e6:>9.1f} us per {unit[scenario]} "
                  f"({n / seconds:,.0f}/s over {n})", flush=True)


if __name__ == "__main__":
    main()
