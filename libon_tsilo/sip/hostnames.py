"""One answer to "is this host one of ours?", whatever way the host is spelled.

A SIP host reaches us in many spellings that name the same place: ``LOCALHOST``, ``localhost.``
(the DNS root dot), ``127.1``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1`` (every form inet_aton
accepts), ``[::ffff:127.0.0.1]`` (an IPv4-mapped IPv6 address, bracketed or not). A locality check
on the raw text lets a caller dodge digest (``From: alice@localhost.`` is "not ours") while a phone
still shows "alice". So every such check compares canonical forms: names lower-cased with one
trailing dot dropped, IPv4 in dotted quad, IPv6 compressed without brackets or zone, and an
IPv4-mapped IPv6 address as the IPv4 address it maps.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

__all__ = ["HostSet", "canonical_host"]

# inet_aton reads decimal, octal and hex parts; it also stops at the first blank and accepts what
# follows ("127.0.0.1 evil"), so only text made of these characters is handed to it
_IPV4_CHARS = frozenset("0123456789abcdefxABCDEFX.")
_MAX_HOST = 255  # longer is no DNS name nor address; not cached
_cache: dict[str, str] = {}
_CACHE_SIZE = 4096


def canonical_host(host: str) -> str:
    """The canonical spelling of ``host``; two hosts name the same place when these are equal."""
    found = _cache.get(host)
    if found is not None:
        return found
    canon = _canonical(host)
    if len(host) <= _MAX_HOST:
        if len(_cache) >= _CACHE_SIZE:  # an attacker varying hosts only churns it
            _cache.clear()
        _cache[host] = canon
    return canon


def _canonical(host: str) -> str:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in text:
        try:
            addr = ipaddress.IPv6Address(text.partition("%")[0])
        except ValueError:
            return host.lower()
        mapped = addr.ipv4_mapped
        return str(mapped) if mapped is not None else str(addr)
    if text.endswith("."):
        text = text[:-1]
    if text and set(text) <= _IPV4_CHARS and text[0] in "0123456789":
        try:
            return socket.inet_ntoa(socket.inet_aton(text))
        except OSError:
            pass
    return text.lower()


class HostSet:
    """Our domains (``[sip] domains``), looked up by canonical host.

    Empty means "no list": ``bool(hosts)`` is False and callers that treat an empty list as "any
    domain" (a lab setup) can test for that.
    """

    __slots__ = ("_hosts",)

    def __init__(self, hosts: Iterable[str] = ()) -> None:
        # canonical -> the configured spelling (what we write when we name the domain ourselves)
        self._hosts: dict[str, str] = {}
        for host in hosts:
            self._hosts.setdefault(canonical_host(host), host)

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and canonical_host(host) in self._hosts

    def __bool__(self) -> bool:
        return bool(self._hosts)

    def __len__(self) -> int:
        return len(self._hosts)

    def spelling(self, host: str) -> str | None:
        """The configured spelling of ``host`` when it is one of ours, else None."""
        return self._hosts.get(canonical_host(host))
