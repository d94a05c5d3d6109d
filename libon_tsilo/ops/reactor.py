"""The Twisted reactor the server runs on (``[ops] reactor``), installed before anything imports it.

Twisted's epoll reactor costs less CPU per datagram and per timer than its asyncio reactor over the
stdlib selector loop (bench/reactor_cost.py, bench/sidebyside.py), so "auto" is epoll. Nothing needs
asyncio since APNs is our own HTTP/2 client on Twisted (push/apns_http2.py); "asyncio" stays one
config line away, and "auto" is asyncio when ``[location] backend = "redis"``: redis-py's asyncio
client then runs on the reactor's own loop (registrar/asyncio_bridge.py).

A reactor already installed (``twistd -r NAME``) is kept: the command line wins over the config.
"""

from __future__ import annotations

import sys

from libon_tsilo.ops.config import Config

__all__ = ["reactor_for", "install_reactor"]


def reactor_for(config: Config) -> str:
    """"epoll" or "asyncio": what ``[ops] reactor`` asks for, "auto" resolved."""
    if config.ops.reactor != "auto":
        return config.ops.reactor
    return "asyncio" if config.location.backend == "redis" else "epoll"


def install_reactor(config: Config) -> str:
    """Install the reactor ``config`` wants unless one is installed already; returns its name."""
    wanted = reactor_for(config)
    if wanted == "asyncio":
        # raises when another reactor is installed already
        from libon_tsilo.push.reactor import ensure_asyncio_reactor

        ensure_asyncio_reactor()
        return "asyncio"
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import epollreactor

        epollreactor.install()
    return running_reactor()


def running_reactor() -> str:
    """The installed reactor's short name, for the start-up log line."""
    from twisted.internet import reactor

    name = type(reactor).__name__
    return {"EPollReactor": "epoll", "AsyncioSelectorReactor": "asyncio"}.get(name, name)
