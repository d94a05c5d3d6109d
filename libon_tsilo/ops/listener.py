"""A service that listens on a Twisted endpoint string for an operator surface (admin API, manhole).

These surfaces are optional: a port that cannot be bound is logged and the SIP server goes on.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

__all__ = ["EndpointListener"]

log = Logger()


class EndpointListener(Service):
    """Listens on ``endpoint`` with ``listen_factory()``; ``port`` is the listening port once started."""

    #: what the log lines call this surface, e.g. "admin API"
    what = "listener"

    def __init__(self, endpoint: str, reactor: Any = None) -> None:
        self.endpoint = endpoint
        self._reactor = reactor
        self.port: Any = None
        self.listening: Deferred[Any] | None = None

    def listen_factory(self) -> Any:
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        from twisted.internet.endpoints import serverFromString

        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]

        def listening(port: Any) -> Any:
            self.port = port
            log.info("{what} listening on {address}", what=self.what, address=str(port.getHost()))
            return port

        def failed(f: Any) -> None:
            log.error(
                "{what} cannot listen on {endpoint}: {error}",
                what=self.what,
                endpoint=self.endpoint,
                error=f.getErrorMessage(),
            )

        d = serverFromString(reactor, self.endpoint).listen(self.listen_factory())
        d.addCallbacks(listening, failed)
        self.listening = d

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening)
