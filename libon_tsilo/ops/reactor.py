"""The Twisted reactor the server runs on (``[ops] reactor``), installed before anything imports it.

Twisted's epoll reactor costs less CPU per datagram and per timer than its asyncio reactor over the
stdlib selector loop (bench/reactor_cost.py, bench/sidebyside.py), so "auto" is epoll. Nothing needs
asyncio since APNs is our own HTTP/2 client on Twisted (push/apns_http2.py); "asyncio" stays one
config line away, and "uvloop" is the same asyncio reactor over uvloop's loop, which costs what epoll
costs (issue 15). "auto" is uvloop when ``[location] backend = "redis"``: redis-py's asyncio client
then runs on the reactor's own loop (registrar/asyncio_bridge.py). Measured for that choice:
69.3k instructions per datagram on uvloop against 70.8k on epoll (``bench/reactor_cost.py
--reactors epoll+port,uvloop+port``); a late-fork call's timers cost ~90k instructions (2.6 %) more
through the asyncio reactor (``bench/redis_cost.py --icount --stages call-memory --reactor
uvloop``), less than epoll with Redis on a thread of its own would add: two thread hand-offs per
Redis reply and per feed message. Of those ~90k, ~50k were Twisted's asyncio reactor re-arming its loop timer
on nearly every ``callLater``: the server's asyncio reactor is ops/lean_asyncio.py, which does not,
and which reads our UDP port without Twisted's per-event log context, as ops/lean_epoll.py does:
41.9k instructions per datagram against 58.7k before and 51.9k on the lean epoll reactor
(``bench/reactor_cost.py --n 1000 --reactors lean+port,leanuv+port``); with a call due now run
from the loop's next turn rather than a timer, ``call-memory`` costs the same on both (1.87M).

A reactor already installed (``twistd -r NAME``) is kept: the command line wins over the config.
"""

from __future__ import annotations

import sys

from libon_tsilo.ops.config import Config

__all__ = ["reactor_for", "install_reactor"]


def reactor_for(config: Config) -> str:
    """"epoll", "asyncio" or "uvloop": what ``[ops] reactor`` asks for, "auto" resolved."""
    if config.ops.reactor != "auto":
        return config.ops.reactor
    # redis-py needs an asyncio loop; uvloop's costs what epoll costs per datagram, the stdlib's ~50 % more
    return "uvloop" if config.location.backend == "redis" else "epoll"


def install_reactor(config: Config) -> str:
    """Install the reactor ``config`` wants unless one is installed already; returns its name."""
    wanted = reactor_for(config)
    if wanted == "uvloop" and "twisted.internet.reactor" not in sys.modules:
        import asyncio

        import uvloop

        # Twisted's asyncio reactor makes its loop with the current policy: uvloop's from here on
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        wanted = "asyncio"
    if wanted == "asyncio" and "twisted.internet.reactor" not in sys.modules:
        # Twisted's asyncio reactor, its loop timer re-armed only when needed, our UDP listeners'
        # reads without its per-event log context (ops/lean_asyncio.py)
        from libon_tsilo.ops import lean_asyncio
        from libon_tsilo.sip.twisted_io import UDPPort
        from libon_tsilo.sip.udp_pins import PinReader

        lean_asyncio.install().lean_readers = frozenset({UDPPort, PinReader})
    if wanted == "asyncio":
        # raises when another reactor is installed already
        from libon_tsilo.push.reactor import ensure_asyncio_reactor

        ensure_asyncio_reactor()
        return running_reactor()
    if "twisted.internet.reactor" not in sys.modules:
        # Twisted's epoll reactor, but our UDP listeners' reads skip its per-event log context
        # (ops/lean_epoll.py: ~1.4 us per wake-up)
        from libon_tsilo.ops import lean_epoll

        reactor = lean_epoll.install()
        from libon_tsilo.sip.twisted_io import UDPPort
        from libon_tsilo.sip.udp_pins import PinReader

        reactor.lean_readers = frozenset({UDPPort, PinReader})
    return running_reactor()


def running_reactor() -> str:
    """The installed reactor's short name, for the start-up log line ("uvloop": asyncio over it)."""
    from twisted.internet import reactor

    name = type(reactor).__name__
    if name in ("AsyncioSelectorReactor", "LeanAsyncioReactor"):
        loop = getattr(reactor, "_asyncioEventloop", None)
        return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    return {"EPollReactor": "epoll", "LeanEPollReactor": "epoll"}.get(name, name)
