"""A small HTTP/2 client for the APNs provider API: a pool of h2 connections over Twisted TLS.

Why our own and not aioapns: docs/ARCHITECTURE.md, "push/: the APNs client". In short, aioapns'
public API dials only Apple's two hosts, has no per-request timeout (a cancelled send leaves its
stream, its slot and its future behind), drops Retry-After, and mints one JWT per connection from
the wall clock, so an ExpiredProviderToken cannot be fixed by retrying.

One `APNsClient` per app: up to ``max_connections`` TLS connections (ALPN h2), each carrying as
many streams as the server's SETTINGS_MAX_CONCURRENT_STREAMS allows (APNs starts a token-auth
connection at 1 and raises it after the first accepted push). Requests beyond that wait in a FIFO
queue. Each request is one Deferred; cancelling it (the caller's timeout, or the call ended)
resets its stream and frees its slot at once. The client never retries: that is the sender's
RetryPolicy, bounded by the push's deadline.

Trust: APNs (or the configured relay) is authenticated by TLS against the system roots or the
configured CA; its answers are still bounded (one small JSON body per stream) and a protocol
error closes that connection only.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import NoAvailableStreamIDError, ProtocolError
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["APNsClient", "APNsConnectionError", "APNsResponse", "MAX_BODY"]

log = Logger()

# an APNs answer is {"reason": ..., "timestamp": ...}: anything longer is cut, not buffered
MAX_BODY = 4096


@dataclass(frozen=True)
class APNsResponse:
    status: int  # 0 when the server sent no valid :status
    apns_id: str
    reason: str  # the JSON body's "reason"; "" on success
    timestamp: int | None  # 410: when the token stopped being valid (ms since the epoch)
    retry_after: bytes | None


class APNsConnectionError(Exception):
    """The request got no answer: connect or TLS failed, connection lost, GOAWAY, stream reset."""


@dataclass(eq=False)
class _Request:
    headers: list[tuple[str, str]]
    body: bytes
    d: Deferred[APNsResponse] = field(init=False)
    conn: _Connection | None = None
    stream_id: int = 0


@dataclass(eq=False)
class _Stream:
    request: _Request
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


class _Connection(Protocol):
    """One HTTP/2 connection; the client hands it requests while it has free stream slots."""

    def __init__(self, client: APNsClient) -> None:
        self.client = client
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, _Stream] = {}
        self.ready = False  # the server's SETTINGS arrived: its stream limit is known
        self.closing = False  # GOAWAY, stream ids exhausted or client closed: no new streams
        self.lost = False
        self._idle: IDelayedCall | None = None

    # -- what the client asks ------------------------------------------------------------

    def free_slots(self) -> int:
        if not self.ready or self.closing or self.lost:
            return 0
        limit: int = self.h2.remote_settings.max_concurrent_streams
        return limit - int(self.h2.open_outbound_streams)

    def start(self, req: _Request) -> bool:
        """Open a stream for ``req``; False when this connection can take no more streams."""
        try:
            stream_id: int = self.h2.get_next_available_stream_id()
        except NoAvailableStreamIDError:  # 2^30 requests on one connection: start a fresh one
            self.close()
            return False
        self._stop_idle()
        req.conn, req.stream_id = self, stream_id
        self.streams[stream_id] = _Stream(req)
        try:
            self.h2.send_headers(stream_id, req.headers)
            self.h2.send_data(stream_id, req.body, end_stream=True)
        except ProtocolError as e:  # flow-control window smaller than a push: a server we can't use
            self._fail(stream_id, f"cannot send: {type(e).__name__}")
        self._flush()
        return True

    def abandon(self, stream_id: int) -> None:
        """The request was cancelled: reset its stream so a late answer finds nothing."""
        if self.streams.pop(stream_id, None) is None:
            return
        if not self.lost:
            try:
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            except ProtocolError:  # the server closed the stream meanwhile
                pass
            self._flush()
        self._maybe_idle()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()

    # -- twisted Protocol --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.client._connections.append(self)
        self.h2.initiate_connection()
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            log.warn("APNs connection to {host}: HTTP/2 protocol error {error}; closing it",
                     host=self.client.host, error=type(e).__name__)
            self._fail_all("protocol error")
            self._flush()
            self.close()
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.headers = dict(event.headers)
            elif isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and len(stream.body) < MAX_BODY:
                    stream.body += event.data[: MAX_BODY - len(stream.body)]
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self._answer(event.stream_id)
            elif isinstance(event, StreamReset):
                self._fail(event.stream_id, "stream reset by the server")
            elif isinstance(event, RemoteSettingsChanged):
                self.ready = True
            elif isinstance(event, ConnectionTerminated):
                self._goaway(event.last_stream_id)
        self._flush()
        self.client._pump()
        self._maybe_idle()  # a connection whose requests were cancelled while it was dialed

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._stop_idle()
        self._fail_all(f"connection lost: {reason.getErrorMessage()}")
        self.client._lost(self)

    # -- internals ---------------------------------------------------------------------------

    def _answer(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        status_raw = stream.headers.get(b":status", b"")
        reason, timestamp = _parse_body(bytes(stream.body))
        response = APNsResponse(
            status=int(status_raw) if status_raw.isdigit() else 0,
            apns_id=stream.headers.get(b"apns-id", b"").decode("ascii", "replace"),
            reason=reason,
            timestamp=timestamp,
            retry_after=stream.headers.get(b"retry-after"),
        )
        stream.request.conn = None
        self._maybe_idle()
        stream.request.d.callback(response)

    def _fail(self, stream_id: int, why: str) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.request.conn = None
            stream.request.d.errback(APNsConnectionError(why))
        self._maybe_idle()

    def _fail_all(self, why: str) -> None:
        for stream_id in list(self.streams):
            self._fail(stream_id, why)

    def _goaway(self, last_stream_id: int | None) -> None:
        # RFC 9113 §6.8: streams above last_stream_id were not processed (safe to retry); those
        # below may still be answered before the server closes
        self.closing = True
        for stream_id in list(self.streams):
            if last_stream_id is None or stream_id > last_stream_id:
                self._fail(stream_id, "GOAWAY from the server")
        if not self.streams:
            self.close()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def _maybe_idle(self) -> None:
        if self.streams or self.lost:
            return
        if self.closing:
            self.close()
        elif self._idle is None:
            # a silent NAT or firewall drops idle connections without telling us; a new handshake
            # after a quiet minute is cheaper than a call push stuck on a dead connection
            self._idle = self.client.clock.callLater(self.client.idle_timeout, self.close)

    def _stop_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None


def _parse_body(body: bytes) -> tuple[str, int | None]:
    """APNs error bodies are {"reason": str, "timestamp": int}; anything else reads as no reason."""
    if not body:
        return "", None
    try:
        data = json.loads(body)
    except ValueError:
        return "", None
    if not isinstance(data, dict):
        return "", None
    reason = data.get("reason")
    timestamp = data.get("timestamp")
    return (
        reason if isinstance(reason, str) else "",
        timestamp if isinstance(timestamp, int) and not isinstance(timestamp, bool) else None,
    )


class APNsClient:
    """POSTs to one APNs host over a small pool of HTTP/2 connections (see the module doc)."""

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        host: str,
        port: int,
        tls: IOpenSSLClientConnectionCreator,
        *,
        max_connections: int = 2,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.host = host
        self.port = port
        self.tls = tls
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._connections: list[_Connection] = []
        self._dialing: list[Deferred[Any]] = []
        self._queue: deque[_Request] = deque()
        self._closed = False

    def post(self, headers: list[tuple[str, str]], body: bytes) -> Deferred[APNsResponse]:
        """Send one request (``headers`` include the pseudo-headers); fires with the answer or
        fails with APNsConnectionError. Cancelling it abandons the request wherever it is."""
        req = _Request(headers, body)
        req.d = Deferred(lambda _: self._cancel(req))
        if self._closed:
            req.d.errback(APNsConnectionError("client closed"))
            return req.d
        self._queue.append(req)
        self._pump()
        return req.d

    def close(self) -> None:
        """Close every connection; queued and in-flight requests fail."""
        self._closed = True
        self._fail_queue("client closed")
        for attempt in list(self._dialing):
            attempt.cancel()
        for conn in list(self._connections):
            conn.close()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- internals ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start queued requests on free slots; dial one more connection if they are all taken."""
        while self._queue:
            conn = next((c for c in self._connections if c.free_slots() > 0), None)
            if conn is None:
                break
            req = self._queue.popleft()
            if not conn.start(req):
                self._queue.appendleft(req)
        if not self._queue or self._closed or self._dialing:
            return
        # a connection still in its handshake will bring slots: wait for it rather than dial a burst
        if any(not c.ready and not c.closing and not c.lost for c in self._connections):
            return
        live = [c for c in self._connections if not c.closing and not c.lost]
        if len(live) < self.max_connections:
            self._dial()

    def _dial(self) -> None:
        endpoint = wrapClientTLS(
            self.tls, HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.connect_timeout)
        )
        attempt: Deferred[Any] = endpoint.connect(Factory.forProtocol(lambda: _Connection(self)))
        self._dialing.append(attempt)

        def done(result: Any) -> None:
            self._dialing.remove(attempt)
            if isinstance(result, Failure):
                self._connect_failed(f"cannot connect: {result.getErrorMessage()}")
            else:
                self._pump()

        attempt.addBoth(done)

    def _connect_failed(self, why: str) -> None:
        # nothing else will serve the queue soon: fail it now rather than at each request's timeout
        if not any(c.ready and not c.closing and not c.lost for c in self._connections):
            self._fail_queue(why)

    def _lost(self, conn: _Connection) -> None:
        if conn in self._connections:
            self._connections.remove(conn)
        if not conn.ready:  # the TLS handshake or the HTTP/2 preface failed
            self._connect_failed("connection closed before HTTP/2 settings")
        if not self._closed:
            self._pump()

    def _fail_queue(self, why: str) -> None:
        while self._queue:
            self._queue.popleft().d.errback(APNsConnectionError(why))

    def _cancel(self, req: _Request) -> None:
        if req.conn is not None:
            req.conn.abandon(req.stream_id)
            req.conn = None
            self._pump()
        elif req in self._queue:
            self._queue.remove(req)
