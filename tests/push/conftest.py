"""Fixtures shared by the APNs tests: the in-process fake APNs, and the senders a test made (closed after it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted

from tests.fakes.apns_fake import FakeEnv, start_fake


@pytest_twisted.async_yield_fixture
async def env(tmp_path) -> AsyncIterator[FakeEnv]:
    from twisted.internet import reactor

    e = start_fake(tmp_path, reactor)
    yield e
    await e.fake.stop()


@pytest.fixture
def senders() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for s in made:
        s.close()
