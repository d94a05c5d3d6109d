"""Flows: the connection (or, for UDP, the 5-tuple) a message came over.

A Flow is what other layers hold on to when they must answer "over the same connection" later: the
registrar stores ``flow.id`` in a binding, and a request to that binding goes back with
``send_request(..., flow=table.get(flow_id))``. The table of live flows, their ids and their idle
expiry are sip/flow_table.py's (compiled by mypyc; ``FlowTable`` is re-exported here). Flow stays
interpreted: the layers above (and their tests' fakes) hand flows around by their ``key``, ``id``
and ``live``, and a compiled class would refuse every other object where it is typed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger

from libon_tsilo.sip.listen import format_hostport

__all__ = ["FlowKey", "Flow", "FlowTable", "CloseCallback", "Keeper", "safe_close_call"]

log = Logger()

HostPort = tuple[str, int]
CloseCallback = Callable[["Flow"], None]
Keeper = Callable[[str], bool]  # flow id -> still needed (a binding or a call uses it)


@dataclass(frozen=True, slots=True)
class FlowKey:
    transport: str  # "udp" | "tcp" | "tls"
    local: HostPort
    remote: HostPort

    def as_tuple(self) -> tuple[str, HostPort, HostPort]:
        return (self.transport, self.local, self.remote)

    def __str__(self) -> str:
        local = format_hostport(*self.local) if self.local[0] else "*"
        return f"{self.transport}:{local}-{format_hostport(*self.remote)}"


class Flow:
    """One connection (TCP/TLS) or one UDP pseudo-flow.

    ``sender`` writes bytes on the underlying transport; ``closer`` drops the connection (None for
    UDP). The transport layer owns both; other layers only call ``send``, ``on_close`` and read state.
    """

    # slots: a flood from many UDP sources makes many of these
    __slots__ = ("key", "id", "live", "last_activity", "_sender", "_closer", "_close_cbs", "_closed",
                 "_remote_keys")

    def __init__(
        self,
        key: FlowKey,
        flow_id: str,
        sender: Callable[[bytes], None],
        closer: Callable[[], None] | None = None,
        now: float = 0.0,
    ) -> None:
        self.key = key
        self.id = flow_id
        self.live = True
        self.last_activity = now
        self._sender = sender
        self._closer = closer
        self._close_cbs: list[CloseCallback] | None = None  # made by the first on_close
        self._closed = False
        self._remote_keys: list[tuple[str, HostPort]] = []

    @property
    def transport(self) -> str:
        return self.key.transport

    @property
    def remote(self) -> HostPort:
        return self.key.remote

    @property
    def reliable(self) -> bool:
        return self.key.transport != "udp"

    def send(self, data: bytes) -> None:
        """Write ``data`` on this flow; a dead flow drops it with a log line (never raises)."""
        if not self.live:
            log.info("flow {flow_id} is closed; dropping {n} bytes", flow_id=self.id, n=len(data))
            return
        self._sender(data)

    def on_close(self, cb: CloseCallback) -> None:
        """Call ``cb(flow)`` once when the flow closes (at once if it already has)."""
        if self._closed:
            safe_close_call(cb, self)
        else:
            if self._close_cbs is None:
                self._close_cbs = []
            self._close_cbs.append(cb)

    def close(self) -> None:
        """Ask the transport to drop the connection; the close is reported when it is gone."""
        if self._closer is not None and self.live:
            self._closer()

    def _mark_closed(self) -> list[CloseCallback]:
        self._closed = True
        self.live = False
        cbs, self._close_cbs = self._close_cbs or [], None
        return cbs

    def __repr__(self) -> str:
        return f"<Flow {self.id} {'live' if self.live else 'closed'}>"


def safe_close_call(cb: CloseCallback, flow: Flow) -> None:
    try:
        cb(flow)
    except Exception:
        log.failure("flow close callback failed for {flow_id}", flow_id=flow.id)


# at the end: flow_table imports Flow from here (a cycle Python resolves, both names being defined)
from libon_tsilo.sip.flow_table import FlowTable  # noqa: E402
