"""aiothread.py: coroutines on a loop of their own thread, outcomes back on the reactor thread."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import CancelledError

from libon_tsilo.aiothread import AsyncioThread


class ThreadReactor:
    """callFromThread queues the call; the test thread plays the reactor thread and runs it."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def run_next(self) -> None:
        f, args = self.calls.get(timeout=5)
        f(*args)


@pytest.fixture
def bridge() -> Iterator[tuple[AsyncioThread, ThreadReactor]]:
    reactor = ThreadReactor()
    service = AsyncioThread(reactor)
    service.startService()
    yield service, reactor
    if service.running:
        service.stopService()


def outcome(d: Any) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_result_comes_back_on_the_reactor_thread(bridge: tuple[AsyncioThread, ThreadReactor]) -> None:
    service, reactor = bridge

    async def where() -> tuple[int, bool]:
        await asyncio.sleep(0)
        return threading.get_ident(), asyncio.get_running_loop() is service.loop

    seen = outcome(service.run(where()))
    assert seen == []  # nothing fires until the reactor thread runs the call
    reactor.run_next()
    ident, on_loop = seen[0]
    assert ident != threading.get_ident() and on_loop


def test_exception_becomes_a_failure(bridge: tuple[AsyncioThread, ThreadReactor]) -> None:
    service, reactor = bridge

    async def boom() -> None:
        raise ValueError("bad token")

    seen = outcome(service.run(boom()))
    reactor.run_next()
    assert seen[0].check(ValueError) and str(seen[0].value) == "bad token"


def test_cancel_reaches_the_coroutine(bridge: tuple[AsyncioThread, ThreadReactor]) -> None:
    service, reactor = bridge
    started, cancelled = threading.Event(), threading.Event()

    async def waits() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    d = service.run(waits())
    assert started.wait(5)
    seen = outcome(d)
    d.cancel()
    assert seen[0].check(CancelledError)  # Twisted's, at once
    assert cancelled.wait(5)
    reactor.run_next()  # the future's late news is ignored: the Deferred fired once
    assert len(seen) == 1


def test_stop_cancels_what_runs_and_ends_the_thread(bridge: tuple[AsyncioThread, ThreadReactor]) -> None:
    service, reactor = bridge
    started, cancelled = threading.Event(), threading.Event()

    async def waits() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    seen = outcome(service.run(waits()))
    assert started.wait(5)
    thread = service._thread
    service.stopService()
    assert cancelled.is_set() and thread is not None and not thread.is_alive()
    reactor.run_next()
    assert seen[0].check(CancelledError)
    with pytest.raises(RuntimeError):
        service.run(waits())
