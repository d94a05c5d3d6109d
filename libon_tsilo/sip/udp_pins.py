"""Connected UDP sockets that bring a device's datagrams to the process that sent to it ("pins").

Workers of one host bind one public UDP socket with SO_REUSEPORT, and the kernel hands each
source's datagrams to one of them (a hash of the 4-tuple). A worker that sends to a device whose
datagrams the kernel hands to another worker (the layer above decides when: ``pin_udp``) opens one
more socket, bound with SO_REUSEPORT to the very same address and port, and connect()s it to the
device: Linux gives a datagram to the socket whose 4-tuple matches it exactly before it
picks one of the group by hash (which skips connected sockets), so the device's answers, requests
and re-REGISTERs come to this worker; every other source is spread as before. What we send keeps
its source address and port: the device's NAT sees nothing new.

What arrives on a pin is handled as if it came on the shared socket: the pin's endpoint has the
shared socket's local address (same flows, same limits, same ``received``/``rport``, STUN and
keep-alives). A pin is only an optimisation: a pin that could not be made (at ``max_pins``, or a
socket error), or was closed, loses nothing, since the workers still pass each other what the
kernel gave the wrong one; and the kernel drops a dead worker's sockets at once.

Lifetime: a pin through which no datagram went either way for a whole sweep period
(``PIN_IDLE``) is closed at the next sweep, so it lives 32 to 64 s after its last datagram.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.sip.ratelog import RateLimitedLog

__all__ = ["PIN_IDLE", "PinReader", "UdpPins"]

log = Logger()

HostPort = tuple[str, int]

# 64*T1 (RFC 3261 Timer B/F): every answer to a request we sent comes within a transaction's life,
# so a pin with no datagram either way for that long serves no transaction of ours; a call that
# stays silent longer (a long ring, a long talk) loses only the pin: its next answers are passed on
PIN_IDLE = 32.0


class PinReader:
    """The reactor's reader of one pin: each wake-up, the compiled read loop of its endpoint."""

    def __init__(self, sock: socket.socket, endpoint: Any) -> None:
        self.sock = sock
        self.endpoint = endpoint

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        endpoint = self.endpoint
        endpoint.used = True
        # ECONNREFUSED (an ICMP port-unreachable for an earlier send, reported on a connected
        # socket only) ends a drain as on the shared socket: the next wake-up reads on
        endpoint.drain(self.sock, 65535, False)

    def connectionLost(self, reason: Any) -> None:
        pass  # UdpPins closes the socket

    def logPrefix(self) -> str:
        return "udp-pin"


class _Pin:
    __slots__ = ("endpoint", "shared", "reader")

    def __init__(self, endpoint: Any, shared: Any, reader: PinReader) -> None:
        self.endpoint = endpoint
        self.shared = shared
        self.reader = reader


class UdpPins:
    """The pins of one transport layer, by the device's (host, port) (canonical IP text).

    ``endpoints`` is what the transport's sends read: the pin's endpoint, to send through it.
    ``max_pins`` bounds the pins (one file descriptor each); 0 turns pinning off."""

    def __init__(self, reactor: Any, clock: IReactorTime, max_pins: int, idle: float = PIN_IDLE) -> None:
        self.reactor = reactor
        self.clock = clock
        self.max_pins = max_pins
        self.idle = idle
        self.endpoints: dict[HostPort, Any] = {}
        self._pins: dict[HostPort, _Pin] = {}
        self._sweep: Any = None  # IDelayedCall, while there are pins
        # made, full (refused at max_pins), failed (socket error), idle (closed by the sweep)
        self.counters: Counter[str] = Counter()
        self._warn = RateLimitedLog(log, clock)

    def pin(self, shared: Any, remote: HostPort, make_endpoint: Callable[[], Any]) -> bool:
        """Pin ``remote`` to this process on the shared socket ``shared`` (an endpoint with a real
        socket); True when it is pinned (now or already). ``make_endpoint()`` gives the pin's
        endpoint, with ``shared``'s local address."""
        found = self._pins.get(remote)
        if found is not None:
            return found.shared is shared
        if len(self._pins) >= self.max_pins:
            if self.max_pins > 0:
                self.counters["full"] += 1
                self._warn.warn("full", "{n} UDP pins open ([cluster] max_udp_pins): not pinning "
                                "{host}:{port}; its answers go through the worker the kernel gives them to",
                                n=len(self._pins), host=remote[0], port=remote[1])
            return False
        sock = None
        try:
            sock = socket.socket(shared.family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(shared.local)
            sock.connect(remote)
            sock.setblocking(False)
            endpoint = make_endpoint()
            endpoint.opened(shared.port, sock)
            reader = PinReader(sock, endpoint)
            self.reactor.addReader(reader)
        except Exception as e:  # OSError (EMFILE, EADDRINUSE...), or a reactor that cannot add it
            if sock is not None:
                sock.close()
            self.counters["failed"] += 1
            self._warn.warn("failed", "cannot pin UDP {host}:{port} on {local}: {err}", host=remote[0],
                            port=remote[1], local=shared.local, err=str(e))
            return False
        self._pins[remote] = _Pin(endpoint, shared, reader)
        self.endpoints[remote] = endpoint
        self.counters["made"] += 1
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.idle, self._swept)
        return True

    def unpin(self, remote: HostPort) -> None:
        found = self._pins.pop(remote, None)
        if found is None:
            return
        del self.endpoints[remote]
        self._close(found)

    def _close(self, found: _Pin) -> None:
        reader = found.reader
        try:
            self.reactor.removeReader(reader)
        except Exception:
            log.failure("cannot remove a UDP pin's reader")
        reader.sock.close()
        # the flows made by its datagrams keep its endpoint: they send from the shared socket now
        shared = found.shared
        found.endpoint.opened(shared.port, shared.sock)

    def _swept(self) -> None:
        self._sweep = None
        for remote, found in list(self._pins.items()):
            endpoint = found.endpoint
            if endpoint.used:
                endpoint.used = False
            else:
                self.counters["idle"] += 1
                self.unpin(remote)
        if self._pins:
            self._sweep = self.clock.callLater(self.idle, self._swept)

    def close_all(self) -> None:
        """Close every pin (the transport stops)."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for remote in list(self._pins):
            self.unpin(remote)

    def __len__(self) -> int:
        return len(self._pins)

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {"open": len(self._pins), "made": c["made"], "refused_full": c["full"], "failed": c["failed"],
                "closed_idle": c["idle"]}

    def limit_hits(self) -> dict[str, int]:
        return {"udp_pins_full": self.counters["full"]}
