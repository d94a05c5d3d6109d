"""Running asyncio code (redis-py's asyncio client) under Twisted, seen from Twisted as Deferreds.

The server runs Twisted's asyncio reactor when ``[location] backend = "redis"`` (ops/reactor.py
resolves ``[ops] reactor = "auto"`` so): the reactor *is* an asyncio loop, so a coroutine runs on it
directly, with no thread and no hand-off per reply (the alternative, a private loop in a thread,
adds two thread wake-ups to every Redis round trip and every pub/sub message). The
rest of the code sees Deferreds only, never coroutines (Sygnal's way: ``Deferred.fromFuture``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

__all__ = ["NeedsAsyncioReactor", "as_deferred", "reactor_loop"]

T = TypeVar("T")


class NeedsAsyncioReactor(RuntimeError):
    """The installed reactor is not Twisted's asyncio reactor."""


def reactor_loop() -> asyncio.AbstractEventLoop:
    """The asyncio loop under the installed reactor; raises NeedsAsyncioReactor without one."""
    from twisted.internet import reactor

    loop = getattr(reactor, "_asyncioEventloop", None)
    if loop is None:
        raise NeedsAsyncioReactor(
            f'the Redis location backend needs the asyncio reactor ([ops] reactor = "auto" or "asyncio"), '
            f"not {type(reactor).__name__}"
        )
    return loop


def as_deferred(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop) -> Deferred[T]:
    """Schedule ``coro`` on ``loop`` (the reactor's); cancelling the Deferred cancels the task."""
    return Deferred.fromFuture(asyncio.ensure_future(coro, loop=loop))
