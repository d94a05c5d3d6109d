"""Server transactions: RFC 3261 §17.2 with the RFC 6026 Accepted state for 2xx to INVITE."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from libon_tsilo.sip.message import Request, Response, make_response, log_call_id
from libon_tsilo.sip.timers import LayerServices, State, TransactionBase, backoff, is_reliable

__all__ = ["ServerTransaction", "InviteServerTransaction", "NonInviteServerTransaction"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib


class ServerTransaction(TransactionBase):
    """One inbound request and the responses the TU gives it.

    The TU answers through :meth:`respond`; retransmissions of the request are absorbed here and
    never reach the TU.
    """

    __slots__ = ("request", "flow", "last_response", "_trying_dropped", "_interval")

    def __init__(self, layer: LayerServices, key: tuple[Any, ...], request: Request, flow: Any) -> None:
        # cookie branches are unique; RFC 2543 transactions are named by their Call-ID and CSeq
        name = key[1] if key[0] == "3261" else f"2543:{key[4]}:{key[5]}"
        super().__init__(layer, key, f"stx:{name}:{request.method}")
        self.request = request
        self.flow = flow
        self.reliable = is_reliable(flow.key.transport if flow is not None else None)
        self.last_response: Response | None = None
        # compact() dropped the 100 Trying: _resend_last rebuilds it from the request
        self._trying_dropped = False

    @property
    def method(self) -> str:
        return self.request.method

    def start(self) -> None:
        raise NotImplementedError

    def compact(self) -> None:
        """A long wait ahead (a parked call, or an ended call's final wait): keep the request and the
        last response as bytes only (Message.compact; they are parsed again when next read)."""
        self.request.compact()
        last = self.last_response
        if last is not None and last.status == 100 and self.state is State.PROCEEDING:
            # our own 100 Trying is make_response(request, 100): cheaper to rebuild on a
            # retransmitted request than to keep, even as bytes
            self.last_response = None
            self._trying_dropped = True
        elif last is not None:
            last.compact()

    def respond(self, resp: Response) -> None:
        raise NotImplementedError

    def request_retransmitted(self) -> None:
        raise NotImplementedError

    def _send(self, resp: Response) -> bool:
        """Hand a response to the transport; a failure ends the transaction (RFC 3261 §17.2.4),
        except in Accepted, which stays to absorb retransmissions (RFC 6026 §8.7)."""
        try:
            self.layer.transport.send_response(resp, self.flow)
        except Exception:
            log.failure("sending {status} failed", status=resp.status, call_id=log_call_id(self.request))
            if self.state is not State.ACCEPTED:
                self.terminate()
            self.layer.tu_hook("transport_error", self)
            return False
        return True

    def _resend_last(self) -> None:
        if self.last_response is None and self._trying_dropped and self.state is State.PROCEEDING:
            self.last_response = make_response(self.request, 100, "Trying")
        if self.last_response is not None:
            self._send(self.last_response)

    def _refuse(self, resp: Response) -> None:
        log.warn(
            "{txn}: response {status} ignored in state {state}",
            txn=self.id, status=resp.status, state=self.state, call_id=log_call_id(self.request),
        )


class InviteServerTransaction(ServerTransaction):
    """Proceeding -> Completed (3xx-6xx, timers G/H) -> Confirmed (timer I), or Accepted (2xx, timer L)."""

    __slots__ = ()

    def start(self) -> None:
        self.state = State.PROCEEDING
        # Sent at once rather than after 200 ms: the B2BUA rarely answers that fast, and it stops
        # the caller's timer A retransmissions early.
        trying = make_response(self.request, 100, "Trying")
        self.last_response = trying
        self._send(trying)

    def respond(self, resp: Response) -> None:
        status = resp.status
        if self.state is State.PROCEEDING:
            self.last_response = resp
            if status < 200:
                self._send(resp)
            elif status < 300:
                self.state = State.ACCEPTED
                self._accepted_wait()  # timer L
                self._send(resp)
                # Accepted resends nothing itself (the TU retransmits its 2xx): not kept for 64*T1
                self.last_response = None
            else:
                self.state = State.COMPLETED
                self._interval = self.layer.t1
                if not self.reliable:
                    self.timers.start("G", self._interval, self._timer_g)
                self.timers.start("H", 64 * self.layer.t1, self._timer_h)
                self._send(resp)
        elif self.state is State.ACCEPTED and 200 <= status < 300:
            # RFC 6026 §7.1: the TU's own 2xx retransmissions pass straight through.
            self._send(resp)
        else:
            self._refuse(resp)

    def request_retransmitted(self) -> None:
        # Accepted and Confirmed absorb silently: the TU retransmits 2xx itself (RFC 6026 §8.7).
        if self.state in (State.PROCEEDING, State.COMPLETED):
            self._resend_last()

    def ack_received(self) -> bool:
        """Return True when the ACK belongs to this transaction (absorbed); False: give it to the TU."""
        if self.state is State.ACCEPTED:
            return False
        if self.state is State.COMPLETED:
            self.state = State.CONFIRMED
            self._cancel_timer("G")
            self._cancel_timer("H")
            self._wait_then_terminate("I", 0 if self.reliable else self.layer.t4)
        return True

    def _timer_g(self) -> None:
        self._interval = backoff(self._interval, self.layer.t2)
        self.timers.start("G", self._interval, self._timer_g)
        self._resend_last()

    def _timer_h(self) -> None:
        log.info("{txn}: no ACK after 64*T1", txn=self.id, call_id=log_call_id(self.request))
        self.terminate()
        self.layer.tu_hook("transaction_timeout", self)


class NonInviteServerTransaction(ServerTransaction):
    """Trying -> Proceeding (1xx) -> Completed (final, timer J) -> Terminated."""

    __slots__ = ()

    def start(self) -> None:
        self.state = State.TRYING

    def respond(self, resp: Response) -> None:
        if self.state not in (State.TRYING, State.PROCEEDING):
            self._refuse(resp)
            return
        self.last_response = resp
        if resp.status < 200:
            self.state = State.PROCEEDING
            self._send(resp)
            return
        self.state = State.COMPLETED
        if self._send(resp):
            self._wait_then_terminate("J", 0 if self.reliable else 64 * self.layer.t1)
            if not self.terminated:
                # 64*T1 of waiting for a retransmission that rarely comes: hold bytes, not parsed
                # objects (fewer objects for the garbage collector to walk; resends re-parse)
                resp.compact()
                self.request.compact()

    def request_retransmitted(self) -> None:
        # In Trying the TU has not answered yet: nothing to resend, and the TU must not see it twice.
        if self.state in (State.PROCEEDING, State.COMPLETED):
            self._resend_last()
