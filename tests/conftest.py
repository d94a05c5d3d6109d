"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.certs import CertPaths, make_test_certs

# the redis_server fixture (a real redis-server on a free loopback port): see tests/redis_server.py
pytest_plugins = ["tests.redis_server"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a mypyc extension older than its source (setup.py builds them in place):
    Python would import the stale extension and the edited .py would never run."""
    package = Path(__file__).resolve().parents[1] / "libon_tsilo"
    stale = [str(so.relative_to(package.parent)) for so in package.rglob("*.so")
             if (py := so.parent / f"{so.name.split('.')[0]}.py").exists() and py.stat().st_mtime > so.stat().st_mtime]
    if stale:
        pytest.exit(f"stale compiled modules {stale}: ./scripts/test rebuilds them "
                    "(or .venv/bin/pip install -e . ; LIBON_TSILO_PURE=1 for pure Python)", returncode=4)


@pytest.fixture(scope="session")
def test_certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A throwaway CA + server cert (127.0.0.1, ::1, localhost) + client cert; paths: .ca .cert .key."""
    return make_test_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def _debug_events_on():
    """A test that makes a log observer sets logflags.debug_enabled: the next test starts as a
    library user does, with every event emitted."""
    yield
    from libon_tsilo import logflags

    logflags.debug_enabled = True
    logflags.info_enabled = True
