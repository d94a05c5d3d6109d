"""push/reactor.py: the asyncio-reactor guard, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from libon_tsilo.push.reactor import ReactorError, ensure_asyncio_reactor

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
