"""An asyncio event loop on a thread of its own, for asyncio-only libraries under any Twisted reactor.

The SIP path is cheaper on Twisted's epoll reactor than on its asyncio reactor (bench/sidebyside.py,
``[ops] reactor``), but aioapns only runs on an asyncio loop. `AsyncioThread` keeps such a library
off the reactor thread: ``run(coro)`` schedules the coroutine on the thread's loop and returns a
Deferred that fires on the reactor thread (``callFromThread``) with the coroutine's result or
failure. Cancelling the Deferred cancels the coroutine, which sees asyncio's CancelledError; the
Deferred fails with Twisted's CancelledError, as ``push.reactor.deferred_from_coro`` does.

Everything the coroutine touches must stay on the loop's thread: pass it plain values, and hand
results back only through the Deferred.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

__all__ = ["AsyncioThread"]

T = TypeVar("T")


class AsyncioThread(Service):
    """A started service owns one loop on one daemon thread; stopping it cancels what still runs."""

    def __init__(self, reactor: Any, name: str = "asyncio-thread") -> None:
        self._reactor = reactor
        self._thread_name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def startService(self) -> None:
        super().startService()
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name=self._thread_name, daemon=True)
        self._thread.start()
        ready.wait()

    def stopService(self) -> None:
        super().stopService()
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(cancel_all(), loop)
        thread.join(5.0)  # at shutdown; the cancelled coroutines only unwind

    def run(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        """Run ``coro`` on the loop's thread; its outcome fires the Deferred on the reactor thread."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("AsyncioThread.run before startService")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        d: Deferred[T] = Deferred(lambda _: future.cancel())
        future.add_done_callback(lambda f: self._reactor.callFromThread(_settle, d, f))
        return d


def _settle(d: Deferred[Any], future: concurrent.futures.Future[Any]) -> None:
    if d.called:  # cancelled from the reactor side: the Deferred has failed already
        return
    if future.cancelled():
        d.errback(Failure(CancelledError()))
        return
    err = future.exception()
    if err is not None:
        d.errback(Failure(err))
    else:
        d.callback(future.result())
