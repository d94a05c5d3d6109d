"""push/reactor.py: the asyncio-reactor guard (checked in fresh interpreters) and deferred_from_coro."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from libon_tsilo.push.reactor import ReactorError, deferred_from_coro, ensure_asyncio_reactor

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )


def test_installs_asyncio_reactor_when_none_is_installed() -> None:
    out = _run(
        "from libon_tsilo.push.reactor import ensure_asyncio_reactor\n"
        "ensure_asyncio_reactor()\n"
        "from twisted.internet import reactor\n"
        "print(type(reactor).__name__)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "AsyncioSelectorReactor"


def test_another_reactor_is_refused_with_the_twistd_hint() -> None:
    out = _run(
        "from twisted.internet import selectreactor; selectreactor.install()\n"
        "from libon_tsilo.push.reactor import ensure_asyncio_reactor, ReactorError\n"
        "try:\n"
        "    ensure_asyncio_reactor()\n"
        "except ReactorError as e:\n"
        "    print(e)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "libon-tsilo needs the asyncio reactor: run `twistd -r asyncio -n libon-tsilo ...`"
    )


def test_already_asyncio_in_this_process_is_fine() -> None:
    ensure_asyncio_reactor()  # pytest-twisted runs with --reactor=asyncio
    assert issubclass(ReactorError, RuntimeError)


@pytest_twisted.ensureDeferred
async def test_deferred_from_coro_carries_result_and_errors() -> None:
    async def ok() -> int:
        await asyncio.sleep(0)
        return 42

    async def boom() -> None:
        await asyncio.sleep(0)
        raise KeyError("x")

    assert await deferred_from_coro(ok()) == 42
    with pytest.raises(KeyError):
        await deferred_from_coro(boom())


@pytest_twisted.ensureDeferred
async def test_cancelling_the_deferred_cancels_the_task_with_twisted_error() -> None:
    from twisted.internet.defer import CancelledError

    started = asyncio.Event()
    cancelled: list[bool] = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    d = deferred_from_coro(forever())
    await deferred_from_coro(started.wait())
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert cancelled == [True]
