"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

from tests.certs import CertPaths, make_test_certs

# the redis_server fixture (a real redis-server on a free loopback port): see tests/redis_server.py
pytest_plugins = ["tests.redis_server"]


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
