"""Listen specs (``"udp:127.0.0.1:5060"``, ``"tcp:[::1]:5060"``) and host:port text helpers.

The one parser of ``[sip] listen``: ``ops/config.py`` checks the file with it at start-up (its
ConfigError carries our message), and the transport layer binds what it returns. Hosts are IP
literals or plain host names (names are only resolved by the OS when binding, never per message).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "ListenSpec",
    "ListenSpecError",
    "parse_listen_spec",
    "format_hostport",
    "strip_brackets",
    "is_ip_literal",
    "is_ipv6",
    "same_ip",
    "TRANSPORTS",
    "DEFAULT_PORTS",
]

TRANSPORTS = ("udp", "tcp", "tls")
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


class ListenSpecError(ValueError):
    """A listen spec is malformed; the message names the spec and what is wrong with it."""


@dataclass(frozen=True)
class ListenSpec:
    transport: str  # "udp" | "tcp" | "tls"
    host: str  # without brackets
    port: int  # 0 = let the OS pick

    def __str__(self) -> str:
        return f"{self.transport}:{format_hostport(self.host, self.port)}"


def parse_listen_spec(spec: str) -> ListenSpec:
    """Parse ``TRANSPORT:HOST:PORT``; IPv6 hosts go in brackets. Raises ListenSpecError."""
    if not isinstance(spec, str):
        raise ListenSpecError(f"listen spec must be a string, not {type(spec).__name__}")
    transport, sep, rest = spec.strip().partition(":")
    transport = transport.lower()
    if not sep:
        raise ListenSpecError(f'"{spec}": expected "udp|tcp|tls:HOST:PORT"')
    if transport not in TRANSPORTS:
        raise ListenSpecError(f'"{spec}": unknown transport "{transport}" (expected udp|tcp|tls)')
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise ListenSpecError(f'"{spec}": malformed "[IPv6]:PORT"')
        if not is_ipv6(host):
            raise ListenSpecError(f'"{spec}": "{host}" is not an IPv6 address')
        port_s = tail[1:]
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep:
            raise ListenSpecError(f'"{spec}": missing port')
        if ":" in host:
            raise ListenSpecError(f'"{spec}": an IPv6 address must be in brackets, e.g. "udp:[::1]:5060"')
        if not host or not (is_ip_literal(host) or _HOSTNAME_RE.match(host)):
            raise ListenSpecError(f'"{spec}": "{host}" is not a valid host')
    if not port_s.isdigit() or int(port_s) > 65535:
        raise ListenSpecError(f'"{spec}": "{port_s}" is not a port (0-65535)')
    return ListenSpec(transport, host, int(port_s))


def strip_brackets(host: str) -> str:
    """``"[::1]"`` -> ``"::1"``; other hosts unchanged."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


@functools.lru_cache(maxsize=4096)
def is_ip_literal(host: str) -> bool:
    """True for an IPv4 or IPv6 literal (brackets allowed), False for a name."""
    try:
        ipaddress.ip_address(strip_brackets(host))
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(strip_brackets(host))
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def same_ip(a: str, b: str) -> bool:
    """Compare two hosts as addresses (``"::1"`` equals ``"[0::1]"``); names compare case-insensitively."""
    a, b = strip_brackets(a), strip_brackets(b)
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


def format_hostport(host: str, port: int | None) -> str:
    """``host:port`` with IPv6 hosts bracketed; no ``:port`` when port is None."""
    host = strip_brackets(host)
    if ":" in host:
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"
