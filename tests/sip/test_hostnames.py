"""Canonical hosts: every spelling of one of our domains is ours, nothing else is."""

from __future__ import annotations

import pytest

from libon_tsilo.sip.hostnames import HostSet, canonical_host

# the spellings of issue 11 item 3, and more that inet_aton / ipaddress accept
LOOPBACK_SPELLINGS = [
    "127.0.0.1", "127.0.0.1.", "127.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1",
    "[::ffff:127.0.0.1]", "::ffff:127.0.0.1", "[::FFFF:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_ipv4_spellings_are_one_address(host: str) -> None:
    assert canonical_host(host) == "127.0.0.1"
    assert host in HostSet(["localhost", "127.0.0.1"])


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost.", "LocalHost."])
def test_names_ignore_case_and_one_root_dot(host: str) -> None:
    assert canonical_host(host) == "localhost"
    assert host in HostSet(["localhost"])


@pytest.mark.parametrize("host", ["::1", "[::1]", "[0:0:0:0:0:0:0:1]", "0::1", "[::1%lo]"])
def test_ipv6_spellings(host: str) -> None:
    assert canonical_host(host) == "::1"
    assert host in HostSet(["[::1]"])


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.2", "localhost..", "evil-localhost", "localhost.evil.org", "127.0.0.1 evil",
        "127.0.0.1\t", "127.0.0.256", "4294967296", "::2", "[::ffff:127.0.0.2]", "", "[", "[]",
        "1.2.3.4.5", "x" * 300,
    ],
)
def test_others_are_not_ours(host: str) -> None:
    assert host not in HostSet(["localhost", "127.0.0.1", "::1"])


def test_configured_spelling_is_kept() -> None:
    hosts = HostSet(["Example.COM", "127.0.0.1"])
    assert hosts.spelling("example.com.") == "Example.COM"
    assert hosts.spelling("127.1") == "127.0.0.1"
    assert hosts.spelling("example.org") is None
    assert len(hosts) == 2 and hosts and not HostSet()


def test_names_that_look_numeric_stay_names() -> None:
    # a name that happens to use hex letters is not an address
    assert canonical_host("cafe.example") == "cafe.example"
    assert canonical_host("deadbeef") == "deadbeef"
