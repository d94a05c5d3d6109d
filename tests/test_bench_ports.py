"""bench/sidebyside.py --ports: every port a benchmark takes comes from the range it was given."""

from __future__ import annotations

import socket

import pytest

from bench import common
from tests.e2e.proc import free_port


@pytest.fixture(autouse=True)
def _no_range_left_behind():
    yield
    common._port_range.clear()


def test_ports_come_from_the_range_skipping_a_busy_one() -> None:
    first = free_port()  # OS-picked, as every test port; the range is built around it
    common.use_ports(f"{first}-{first}")
    assert common.bench_port() == first
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind((common.HOST, first))
        with pytest.raises(RuntimeError, match="no free port left"):
            common.bench_port()


def test_without_a_range_the_os_picks() -> None:
    assert 0 < common.bench_port() < 65536


@pytest.mark.parametrize("spec", ["80-90", "27999-27000", "x-1", "70000"])
def test_a_bad_range_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        common.use_ports(spec)
