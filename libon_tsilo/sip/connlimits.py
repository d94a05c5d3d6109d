"""Admission of inbound TCP/TLS connections: a cap in total and per source, and the numbers that bound
what a connection may hold (``ConnectionLimits``, filled from the ``[connections]`` config section).

- A connection is counted from the moment it is accepted until it is gone. Over a cap it is refused
  before any protocol object exists: the transport's factory returns None and Twisted closes the
  socket at once. Only inbound connections count: the ones we open carry our own requests.
- The per-source cap counts by source address; an IPv6 source counts by its /64, the block one
  subscriber gets (one host picks any address in it at no cost), and an IPv4-mapped IPv6 address
  (a dual-stack listener) counts as the IPv4 address it is.
- The process's open-file limit caps connections too: ``raise_fd_limit`` lifts the soft limit
  towards what ``max_connections`` needs and warns when the hard limit is lower.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.sip.limits import source_key  # one key per source for every limit
from libon_tsilo.sip.ratelog import RateLimitedLog

try:
    import resource
except ImportError:  # not on every platform; the fd limit is then the OS's business
    resource = None  # type: ignore[assignment]

__all__ = ["ConnectionLimits", "ConnectionAdmission", "source_key", "effective_backlog", "raise_fd_limit"]

log = Logger()

# file descriptors kept for everything that is not a SIP connection (listeners, SQLite, admin, logs)
_FD_RESERVE = 256


@dataclass(frozen=True)
class ConnectionLimits:
    """What bounds connections and flows; 0 disables a cap or timeout. See etc/libon-tsilo.toml."""

    max_connections: int = 10000  # inbound TCP/TLS connections, in total
    max_connections_per_source: int = 256  # per source IP (IPv6: per /64)
    message_timeout: float = 20.0  # seconds from a message's first byte (or the accept) to its end
    tls_handshake_timeout: float = 10.0
    unbound_idle_timeout: float | None = None  # None: the flow idle timeout (set in the config)
    listen_backlog: int = 1024
    max_udp_flows: int = 20000
    max_buffered_bytes: int = 64 * 1024 * 1024  # incomplete messages, over all connections


def somaxconn() -> int:
    """The kernel's cap on a listen backlog (Linux: net.core.somaxconn)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def effective_backlog(wanted: int) -> int:
    """``wanted``, or the kernel's cap when that is lower (said once in the log, at start)."""
    cap = somaxconn()
    if wanted > cap:
        log.warn(
            "connections.listen_backlog {wanted} is capped by the kernel to {cap} (net.core.somaxconn)",
            wanted=wanted, cap=cap,
        )
        return cap
    return wanted


def raise_fd_limit(needed: int) -> None:
    """Lift the soft open-file limit so that ``needed`` descriptors (``max_connections``, and the
    UDP pins' ``max_udp_pins``) can be open at once; warn if it cannot."""
    if resource is None or needed <= 0:
        return
    want = needed + _FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (OSError, ValueError) as e:
            log.warn("cannot raise the open-file limit to {want}: {err}", want=want, err=str(e))
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warn(
            "open-file limit {soft} is below {n} (connections.max_connections + cluster.max_udp_pins) "
            "+ {reserve}: accepts and pins will fail before their caps (raise LimitNOFILE)",
            soft=soft, n=needed, reserve=_FD_RESERVE,
        )


class ConnectionAdmission:
    """Counts inbound connections in total and per source; ``admit`` says whether one more may come."""

    def __init__(self, limits: ConnectionLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self.total = 0
        self.per_source: dict[str, int] = {}
        self.refused: Counter[str] = Counter()  # "max_connections" | "max_connections_per_source"
        self._warn = RateLimitedLog(log, clock)

    def admit(self, host: str) -> str | None:
        """The source key to ``release`` later, or None: refuse the connection (counted and logged)."""
        source = source_key(host)
        limits = self.limits
        if limits.max_connections and self.total >= limits.max_connections:
            self._refuse("max_connections", host, limits.max_connections)
            return None
        count = self.per_source.get(source, 0)
        if limits.max_connections_per_source and count >= limits.max_connections_per_source:
            self._refuse("max_connections_per_source", host, limits.max_connections_per_source)
            return None
        self.per_source[source] = count + 1
        self.total += 1
        return source

    def release(self, source: str) -> None:
        count = self.per_source.get(source, 0) - 1
        if count > 0:
            self.per_source[source] = count
        else:
            self.per_source.pop(source, None)
        self.total = max(self.total - 1, 0)

    def _refuse(self, cap: str, host: str, value: int) -> None:
        self.refused[cap] += 1
        self._warn.warn(
            cap, "refusing a connection from {host}: connections.{cap} = {value} reached",
            host=host, cap=cap, value=value,
        )
