"""What the reactor itself costs per datagram and per timer: asyncio vs epoll, in instructions.

  .venv/bin/python bench/reactor_cost.py [--n 2000] [--reactors asyncio,epoll[,uvloop,lean+port,leanuv+port]]

The side-by-side benchmark (bench/sidebyside.py) measures the whole process on a shared machine,
where a run's CPU per call moves by 10 % or more; this script isolates the part ``[ops] reactor``
changes and counts it with callgrind (user-space instructions, reproducible to a fraction of a
percent). ``uvloop`` is the asyncio reactor over uvloop's loop (``pip install uvloop`` first: it
is not a dependency). Two UDP ports on loopback play ping-pong inside one reactor: each datagram received is
answered with one datagram, so every wake-up of the reactor finds exactly one datagram (SIP at a
few hundred calls/s looks like that), and each datagram also arms a timer and cancels the one
armed before (a SIP transaction arms and cancels several). The child runs once with N round
trips and once with none; the difference / (2 N) is the cost of one datagram received and sent,
its wake-up and one timer armed and cancelled, on that reactor. ``lean`` is the server's epoll
reactor (ops/lean_epoll.py: our UDP port's readable events skip Twisted's per-event log context),
``leanuv`` the server's asyncio reactor over uvloop (ops/lean_asyncio.py: the same for its reads,
and its loop timer re-armed only for an earlier deadline).
Kernel time is not in the count (callgrind sees user space only): the syscalls are the same on
both reactors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import callgrind  # noqa: E402


def child(reactor_name: str, n: int) -> None:
    # "NAME+port": the same reactor with the server's UDP port class (twisted_io.UDPPort: its own
    # send path; with a plain protocol, as here, Twisted's read loop), instead of Twisted's udp.Port
    reactor_name, _, with_port = reactor_name.partition("+")
    if reactor_name == "epoll":
        from twisted.internet import epollreactor

        epollreactor.install()
    elif reactor_name == "lean":  # the server's epoll reactor (ops/lean_epoll.py), our port's reads unwrapped
        from libon_tsilo.ops import lean_epoll
        from libon_tsilo.sip.twisted_io import UDPPort

        lean_epoll.install().lean_readers = frozenset({UDPPort})
    elif reactor_name == "leanuv":  # the server's asyncio reactor over uvloop (ops/lean_asyncio.py)
        import asyncio

        import uvloop

        from libon_tsilo.ops import lean_asyncio
        from libon_tsilo.sip.twisted_io import UDPPort

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        lean_asyncio.install().lean_readers = frozenset({UDPPort})
    else:
        if reactor_name == "uvloop":  # not a dependency: pip install uvloop to measure it
            import asyncio

            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    left = [2 * n]

    class Pong(DatagramProtocol):
        timer = None

        def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = reactor.callLater(32, lambda: None)
            left[0] -= 1
            if left[0] <= 0:
                self.timer.cancel()
                reactor.stop()
                return
            self.transport.write(data, addr)

    a, b = Pong(), Pong()
    if with_port:
        from libon_tsilo.sip.twisted_io import UDPPort

        def listen(proto: Pong) -> Any:
            port = UDPPort(0, proto, "127.0.0.1", 65535, reactor)
            port.startListening()
            return port
        port_a, port_b = listen(a), listen(b)
    else:
        port_a = reactor.listenUDP(0, a, interface="127.0.0.1")
        port_b = reactor.listenUDP(0, b, interface="127.0.0.1")
    if n:
        reactor.callWhenRunning(a.transport.write, b"x" * 600, ("127.0.0.1", port_b.getHost().port))
    else:
        reactor.callWhenRunning(reactor.stop)
    reactor.run()
    port_a.stopListening()
    port_b.stopListening()


def instructions(reactor_name: str, n: int) -> int:
    return callgrind.count([sys.executable, __file__, "--child", reactor_name, str(n)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="round trips (2 N datagrams)")
    ap.add_argument("--reactors", default="asyncio,epoll")
    ap.add_argument("--child", nargs=2, metavar=("REACTOR", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    per: dict[str, float] = {}
    for name in args.reactors.split(","):
        base, full = instructions(name, 0), instructions(name, args.n)
        per[name] = (full - base) / (2 * args.n)
        print(f"  {name:<8} {per[name]:,.0f} instructions per datagram (received, sent, one wake-up, "
              f"one timer armed and cancelled)", flush=True)
    if "asyncio" in per and "epoll" in per:
        print(f"RESULT epoll saves {per['asyncio'] - per['epoll']:,.0f} instructions per datagram "
              f"({(1 - per['epoll'] / per['asyncio']) * 100:.0f} % of the asyncio reactor's cost)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
