"""Graceful shutdown: SIGTERM (``systemctl stop``) drains calls, then the process exits 0.

The sequence, driven by the root service's stopService (ops/service.py):

1. SIGTERM: our handler (installed once the reactor runs, replacing Twisted's) stops the reactor
   *without* recording the signal, so twistd exits 0 instead of re-raising SIGTERM (-15).
2. :meth:`GracefulShutdown.begin`: from now on a new INVITE gets ``503 Service Unavailable`` with
   ``Retry-After`` (through the router's ``refuse_new`` hook); every parked call (waiting for a
   device to wake) gets ``480 Temporarily Unavailable`` at once; ``/rpc/health`` says "draining".
   REGISTERs, in-dialog requests (BYE, re-INVITE), ACKs and CANCELs are still served.
3. :meth:`GracefulShutdown.drain` (a drainer of the root service) fires once no call is left,
   polling the call table on the clock; the root gives it ``[ops] drain_timeout`` seconds, after
   which the remaining calls are abandoned (logged with their Call-IDs).
4. The location store is flushed, then the services stop in reverse order (ports closed, timers
   cancelled, SQLite closed) and the reactor stops.

A second SIGTERM during the drain stops waiting for calls at once (for an impatient operator;
systemd itself escalates to SIGKILL only after ``TimeoutStopSec``).
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

__all__ = ["GracefulShutdown", "POLL_INTERVAL"]

log = Logger()

POLL_INTERVAL = 0.25  # seconds between two looks at the call table while draining


class GracefulShutdown(Service):
    """Refuses new calls, ends parked ones, and waits for the answered ones (see the module doc)."""

    def __init__(
        self,
        root: Any,
        parts: Any,
        retry_after: int = 30,
        poll_interval: float = POLL_INTERVAL,
        reactor: Any = None,
        handle_sigterm: bool = True,
    ) -> None:
        self.setName("shutdown")
        self.root = root
        self.parts = parts
        self.clock = parts.clock
        self.retry_after = max(1, int(retry_after))
        self.poll_interval = poll_interval
        self._reactor = reactor
        self.handle_sigterm = handle_sigterm
        self.begun = False
        self.parked_ended = 0
        self._previous_handler: Any = None
        self._installed = False
        self._waiting: list[Deferred[Any]] = []
        self._sigterms = 0

    # -- SIGTERM ---------------------------------------------------------------------------------

    def _get_reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> None:
        super().startService()
        if self.handle_sigterm:
            # after the reactor's own handlers are in place (they are installed as it starts running)
            self._get_reactor().callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running or self._installed:
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            self._installed = False
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous_handler)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # a signal handler interrupts arbitrary code: do the work in the reactor loop
        self._get_reactor().callFromThread(self.sigterm)

    def sigterm(self) -> None:
        """What SIGTERM does (in the reactor thread): stop the reactor, or cut a running drain short."""
        self._sigterms += 1
        reactor = self._get_reactor()
        if self._sigterms == 1:
            log.info(
                "SIGTERM: shutting down; calls may go on for up to {timeout} s",
                timeout=self.parts.config.ops.drain_timeout,
            )
            if reactor.running:
                reactor.stop()
            return
        log.warn("SIGTERM again: not waiting for the remaining calls")
        self.stop_waiting("second SIGTERM")

    # -- shutdown sequence -----------------------------------------------------------------------

    def begin(self) -> None:
        """Refuse new INVITEs (503) and end parked calls (480). Idempotent."""
        if self.begun:
            return
        self.begun = True
        self.root.draining = True
        router = self.parts.router
        if router is not None:
            router.refuse_new = self.refuse
        b2bua = self.parts.b2bua
        if b2bua is not None:
            self.parked_ended = b2bua.shutdown_parked(480)
            log.info(
                "shutdown: new INVITEs get 503; {parked} parked call(s) got 480; {calls} call(s) left",
                parked=self.parked_ended,
                calls=len(b2bua.calls),
            )

    def refuse(self, request: Any) -> Any:
        """The router's refuse_new hook: a 503 with Retry-After for a new INVITE, else None."""
        if request.method != "INVITE":
            return None
        from libon_tsilo.sip.message import make_response, new_tag

        response = make_response(request, 503, "Service Unavailable", to_tag=new_tag())
        response.set_header("Retry-After", str(self.retry_after))
        try:
            call_id = request.call_id
        except Exception:
            call_id = None
        log.info("shutdown: INVITE refused with 503", call_id=call_id)
        return response

    def calls_left(self) -> int:
        b2bua = self.parts.b2bua
        return len(b2bua.calls) if b2bua is not None else 0

    def drain(self) -> Deferred[Any]:
        """Begin, then fire when no call is left (polling on the clock). Cancelling stops the polling."""
        self.begin()
        if self.calls_left() == 0:
            return succeed("no calls")
        timer: list[Any] = []

        def cancel(d: Deferred[Any]) -> None:
            if timer and timer[0].active():
                timer[0].cancel()
            self._log_abandoned()

        d: Deferred[Any] = Deferred(cancel)
        self._waiting.append(d)

        def poll() -> None:
            timer.clear()
            if d.called:
                return
            if self.calls_left() == 0:
                self._waiting.remove(d)
                d.callback("calls ended")
                return
            timer.append(self.clock.callLater(self.poll_interval, poll))

        log.info("shutdown: waiting for {n} call(s) to end", n=self.calls_left())
        poll()
        return d

    def stop_waiting(self, why: str) -> None:
        """Fire every pending drain now (second SIGTERM)."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.cancel()

    def _log_abandoned(self) -> None:
        b2bua = self.parts.b2bua
        if b2bua is None:
            return
        for call_id, call in list(b2bua.calls.items()):
            state = getattr(getattr(call, "state", None), "name", "?")
            log.warn("shutdown: call still {state} at exit, abandoned", state=state, call_id=call_id)
