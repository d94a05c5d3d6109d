"""The transport's host normalisation, read per datagram and per request sent: a dict per kind of
answer, bounded (sip/transport.py ``_norm_host``, ``_ip_text``)."""

from __future__ import annotations

import pytest

from libon_tsilo.sip import transport


@pytest.mark.parametrize(("host", "norm", "ip"), [
    ("127.0.0.1", "127.0.0.1", "127.0.0.1"),
    ("[2001:DB8::0:1]", "2001:db8::1", "2001:db8::1"),
    ("2001:db8:0::1", "2001:db8::1", "2001:db8::1"),
    ("Example.COM", "example.com", ""),
    ("[not-an-ip]", "not-an-ip", ""),
])
def test_hosts_are_normalised_the_same_from_the_cache_as_on_first_read(host: str, norm: str, ip: str) -> None:
    for _ in range(2):  # parsed, then read back
        assert transport._norm_host(host) == norm
        assert transport._ip_text(host) == ip


def test_the_caches_never_hold_more_than_their_bound() -> None:
    # a source that changes address with every datagram: a parse each, never memory
    for i in range(transport._HOSTS_MAX + 10):
        host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        assert transport._norm_host(host) == host
        assert transport._ip_text(host) == host
    assert 0 < len(transport._norm_hosts) <= transport._HOSTS_MAX
    assert 0 < len(transport._ip_texts) <= transport._HOSTS_MAX
    assert transport._ip_text("10.0.0.1") == "10.0.0.1"
