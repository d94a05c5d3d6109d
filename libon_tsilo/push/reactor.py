"""Installing Twisted's asyncio reactor, when ``[ops] reactor = "asyncio"`` asks for it (ops/reactor.py).

Nothing in push/ needs asyncio any more (APNs is our own HTTP/2 client on Twisted): the server runs
the epoll reactor by default; the unit tests run on the asyncio one (pytest-twisted), the end-to-end
tests on the default.
"""

from __future__ import annotations

import sys

__all__ = ["ReactorError", "ensure_asyncio_reactor"]


_MESSAGE = "libon-tsilo needs the asyncio reactor: run `twistd -r asyncio -n libon-tsilo ...`"


class ReactorError(RuntimeError):
    """Raised when a reactor other than asyncioreactor is already installed."""


def ensure_asyncio_reactor() -> None:
    """Install twisted's asyncio reactor unless one is already installed.

    Must run before anything imports ``twisted.internet.reactor``; afterwards only the check
    remains possible, because Twisted cannot swap reactors.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
        return
    from twisted.internet import reactor
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        raise ReactorError(_MESSAGE)
