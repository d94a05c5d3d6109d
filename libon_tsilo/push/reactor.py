"""Bridge between Twisted and asyncio: aioapns is asyncio-only, so the process runs the asyncio reactor."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

__all__ = ["ReactorError", "ensure_asyncio_reactor", "deferred_from_coro"]

T = TypeVar("T")

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


def deferred_from_coro(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    """Run an asyncio coroutine on the reactor's loop and expose it as a Deferred.

    Cancelling the Deferred cancels the asyncio task; the Twisted side then sees Twisted's
    CancelledError (asyncio's is a BaseException that Twisted code does not expect).
    """
    d = Deferred.fromFuture(asyncio.ensure_future(coro))

    def translate(failure: Failure) -> Failure:
        if failure.check(asyncio.CancelledError):
            return Failure(CancelledError())
        return failure

    d.addErrback(translate)
    return d
