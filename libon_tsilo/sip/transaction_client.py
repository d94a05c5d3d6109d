"""Client transactions: RFC 3261 §17.1 with the RFC 6026 Accepted state, and CANCEL/ACK building."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.logger import Logger

from libon_tsilo.sip.message import Request, Response, make_response, parse_message, log_call_id
from libon_tsilo.sip.timers import LayerServices, State, TransactionBase, backoff, is_reliable

__all__ = [
    "ClientTransaction",
    "InviteClientTransaction",
    "NonInviteClientTransaction",
    "build_cancel",
    "build_ack",
]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

ResponseCallback = Callable[[Response], Any]
TIMER_D = 32.0  # RFC 3261 §17.1.1.2: at least 32 s on unreliable transports


def _build_request(method: str, invite: Request, to_value: str, extra: Iterable[tuple[str, str]]) -> Request:
    # Rendered as text then parsed, so the result is an ordinary Request like any received one.
    lines = [
        f"{method} {invite.raw_uri} SIP/2.0",
        f"Via: {invite.top_via}",
        *(f"Route: {route}" for route in invite.header_values("Route")),
        "Max-Forwards: 70",
        f"From: {invite.header('From')}",
        f"To: {to_value}",
        f"Call-ID: {invite.call_id}",
        f"CSeq: {invite.cseq.seq} {method}",
        *(f"{name}: {value}" for name, value in extra),
        "Content-Length: 0",
    ]
    # surrogateescape: header text keeps a peer's non-UTF-8 bytes that way (parse_message decodes so)
    msg = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))
    assert isinstance(msg, Request)
    return msg


def build_cancel(invite: Request, extra_headers: Iterable[tuple[str, str]] = ()) -> Request:
    """CANCEL per RFC 3261 §9.1: same R-URI, top Via, Route, From, To, Call-ID and CSeq number.

    ``extra_headers`` (e.g. ``[("Reason", 'SIP;cause=200;text="Call completed elsewhere"')]``)
    are appended as given.
    """
    return _build_request("CANCEL", invite, invite.header("To") or "", extra_headers)


def build_ack(invite: Request, response: Response) -> Request:
    """ACK for a 3xx-6xx final response (RFC 3261 §17.1.1.3): the To comes from the response (its tag)."""
    return _build_request("ACK", invite, response.header("To") or invite.header("To") or "", ())


class ClientTransaction(TransactionBase):
    """One request we send and the responses it gets; the TU hears every response through ``on_response``.

    Timeouts and transport failures reach ``on_response`` as locally generated 408 / 503 responses.
    """

    __slots__ = ("request", "target", "flow", "on_response", "_interval", "failed_locally", "_first")

    def __init__(
        self,
        layer: LayerServices,
        key: tuple[Any, ...],
        request: Request,
        target: Any,
        flow: Any,
        on_response: ResponseCallback,
    ) -> None:
        super().__init__(layer, key, f"ctx:{key[1]}:{key[2]}")
        self.request = request
        self.target = target
        self.flow = flow
        # None once detach()ed: the layer then takes a 2xx down its stray-response path
        self.on_response: ResponseCallback | None = on_response
        self.reliable = self._reliable_now()
        # the final response was made here (timeout, transport error), not by the peer: a TU that
        # chooses among responses (a forking B2BUA) must not relay it as the peer's own
        self.failed_locally = False
        # the first resend of timer A or E (after T1, the same for every transaction): a place in the
        # layer's shared T1 queue, since nearly every request is answered before it; the later,
        # doubling resends (rare) are DelayedCalls
        self._first: list[Any] | None = None

    @property
    def method(self) -> str:
        return self.request.method

    def _reliable_now(self) -> bool:
        if self.flow is not None:
            return is_reliable(self.flow.key.transport)
        return is_reliable(getattr(self.target, "transport", None))

    def _transmit(self, msg: Request | None = None) -> bool:
        """Send the request (or an ACK) towards the target; False on any transport error."""
        try:
            flow = self.layer.transport.send_request(msg or self.request, self.target, self.flow)
        except Exception:
            log.failure("{txn}: transport error", txn=self.id, call_id=log_call_id(self.request))
            return False
        if flow is not None:
            self.flow = flow
            self.reliable = self._reliable_now()
        return True

    def _first_send(self) -> bool:
        if self._transmit():
            return True
        # Delivered on the next reactor turn: the caller must get the transaction object before
        # its callback runs (RFC 3261 §8.1.3.1: a transport error is a 503 to the TU).
        self.timers.start("error", 0, self._fail, 503, "Service Unavailable")
        return False

    def _deliver(self, resp: Response) -> None:
        on_response = self.on_response
        if on_response is None:
            return
        try:
            on_response(resp)
        except Exception:
            log.failure("{txn}: TU failed on {status}", txn=self.id, status=resp.status,
                        call_id=log_call_id(resp))

    def _fail(self, status: int, reason: str) -> None:
        self.failed_locally = True
        self.terminate()
        self._deliver(make_response(self.request, status, reason))

    def _deadline(self) -> None:
        """Timers B and F (64*T1, the same for every transaction of the layer): a place in the layer's
        shared ExpiryQueue instead of a DelayedCall each; ``_end_wait()`` leaves it."""
        delay = 64 * self.layer.t1
        self._expiry = self.layer.expiry(delay, self.layer.final_slack(delay)).add(self._timed_out)

    def _first_resend(self, fn: Callable[[], None]) -> None:
        """Timer A or E's first firing, T1 after the request left."""
        self._first = self.layer.expiry(self.layer.t1).add(fn)

    def _end_wait(self) -> None:
        super()._end_wait()
        entry = self._first
        if entry is not None:
            self._first = None
            entry[2].discard(entry)

    def _timed_out(self) -> None:
        self._expiry = None
        self._fail(408, "Request Timeout")

    def transport_failed(self) -> None:
        """The transport reported, after the fact, that the request never left: a 503 to the TU."""
        if not self.terminated:
            self._fail(503, "Service Unavailable")

    def start(self) -> None:
        raise NotImplementedError

    def response_received(self, resp: Response) -> None:
        raise NotImplementedError

    def _settle(self) -> None:
        """Entering a wait state the TU will hear nothing more from (Completed): drop the TU's
        callback, and with it whatever it holds (a whole call), and keep our request as bytes."""
        self.on_response = _ignore
        self.request.compact()

    def detach(self) -> None:
        """The TU is done with this transaction (its call ended). In Accepted, the transaction ends
        now instead of at timer M: all M does is hand 2xx retransmissions to the TU, and with no
        transaction a 2xx takes the layer's stray path, which does what the TU would (ACK, and BYE
        since no dialog wants it). Nothing then waits 64*T1 holding the TU's objects."""
        if self.state is State.ACCEPTED:
            self.on_response = None
            self.terminate()

    def cancel(
        self,
        extra_headers: Iterable[tuple[str, str]] = (),
        on_response: ResponseCallback | None = None,
    ) -> None:
        """Only INVITE transactions can be cancelled; for others this is a logged no-op."""
        log.warn("{txn}: cancel() ignored for {method}", txn=self.id, method=self.method,
                 call_id=log_call_id(self.request))


class InviteClientTransaction(ClientTransaction):
    """Calling (A, B) -> Proceeding -> Completed (ACK, D) | Accepted (M, RFC 6026) -> Terminated."""

    __slots__ = ("ack", "cancel_request", "_cancel_wanted")

    # the parameters spelled out: mypyc passes super().__init__(*args) the tuple as one argument
    def __init__(
        self,
        layer: LayerServices,
        key: tuple[Any, ...],
        request: Request,
        target: Any,
        flow: Any,
        on_response: ResponseCallback,
    ) -> None:
        super().__init__(layer, key, request, target, flow, on_response)
        self.ack: Request | None = None
        self.cancel_request: Request | None = None
        self._cancel_wanted: tuple[list[tuple[str, str]], ResponseCallback | None] | None = None

    def start(self) -> None:
        self.state = State.CALLING
        if not self._first_send():
            return
        self._interval = self.layer.t1
        if not self.reliable:
            self._first_resend(self._timer_a)
        self._deadline()  # timer B

    def _timer_a(self) -> None:
        self._first = None
        # Timer A doubles without the T2 cap; timer B bounds it.
        self._interval *= 2
        self.timers.start("A", self._interval, self._timer_a)
        if not self._transmit():
            self._fail(503, "Service Unavailable")

    def response_received(self, resp: Response) -> None:
        status = resp.status
        if self.state in (State.CALLING, State.PROCEEDING):
            self._cancel_timer("A")
            self._end_wait()  # timer B
            if status < 200:
                self.state = State.PROCEEDING
                self._deliver(resp)
                if self._cancel_wanted is not None and self.state is State.PROCEEDING:
                    self._send_cancel()
            elif status < 300:
                self.state = State.ACCEPTED
                self._cancel_timer("cancel")
                self._accepted_wait()  # timer M
                self._deliver(resp)
            else:
                self.state = State.COMPLETED
                self._cancel_timer("cancel")
                self._send_ack(resp)
                self._wait_then_terminate("D", 0 if self.reliable else TIMER_D)
                self._deliver(resp)
                if not self.terminated:
                    self._settle()
        elif self.state is State.ACCEPTED and 200 <= status < 300:
            # RFC 6026 §8.4: every 2xx (retransmissions, other forks) goes to the TU, which ACKs it.
            self._deliver(resp)
        elif self.state is State.COMPLETED and status >= 300:
            if self.ack is not None:
                self._transmit(self.ack)

    def _settle(self) -> None:
        super()._settle()
        if self.ack is not None:
            self.ack.compact()
        if self.cancel_request is not None:
            self.cancel_request.compact()

    def _send_ack(self, resp: Response) -> None:
        try:
            self.ack = build_ack(self.request, resp)
        except Exception:
            log.failure("{txn}: cannot build ACK", txn=self.id, call_id=log_call_id(self.request))
            return
        self._transmit(self.ack)

    def cancel(
        self,
        extra_headers: Iterable[tuple[str, str]] = (),
        on_response: ResponseCallback | None = None,
    ) -> None:
        """Send a CANCEL (RFC 3261 §9.1) once a provisional arrived; no-op after a final response.

        In Calling the wish is remembered and acted on when the first provisional arrives.
        ``on_response`` hears the CANCEL's own final response (200, 481, local 408/503).
        """
        if self._cancel_wanted is not None:
            return
        self._cancel_wanted = (list(extra_headers), on_response)
        if self.state is State.PROCEEDING:
            self._send_cancel()

    def _send_cancel(self) -> None:
        assert self._cancel_wanted is not None
        extra, callback = self._cancel_wanted
        if self.cancel_request is not None:
            return
        try:
            self.cancel_request = build_cancel(self.request, extra)
        except Exception:
            log.failure("{txn}: cannot build CANCEL", txn=self.id, call_id=log_call_id(self.request))
            return
        on_cancel_response = callback if callback is not None else _ignore
        self.layer.send_request(self.cancel_request, self.target, self.flow, on_cancel_response)
        # RFC 3261 §9.1: without a final response 64*T1 after the CANCEL, consider the INVITE cancelled.
        self.timers.start("cancel", 64 * self.layer.t1, self._fail, 487, "Request Terminated")


class NonInviteClientTransaction(ClientTransaction):
    """Trying (E, F) -> Proceeding (E at T2, F) -> Completed (K) -> Terminated."""

    __slots__ = ()

    def start(self) -> None:
        self.state = State.TRYING
        if not self._first_send():
            return
        self._interval = self.layer.t1
        if not self.reliable:
            self._first_resend(self._timer_e)
        self._deadline()  # timer F

    def _timer_e(self) -> None:
        self._first = None
        if self.state is State.TRYING:
            self._interval = backoff(self._interval, self.layer.t2)
        else:
            self._interval = self.layer.t2
        self.timers.start("E", self._interval, self._timer_e)
        if not self._transmit():
            self._fail(503, "Service Unavailable")

    def response_received(self, resp: Response) -> None:
        if self.state not in (State.TRYING, State.PROCEEDING):
            return  # Completed absorbs retransmitted finals
        if resp.status < 200:
            self.state = State.PROCEEDING
            self._deliver(resp)
            return
        self.state = State.COMPLETED
        self._cancel_timer("E")
        self._end_wait()  # timer F
        self._wait_then_terminate("K", 0 if self.reliable else self.layer.t4)
        self._deliver(resp)
        if not self.terminated:
            self._settle()


def _ignore(resp: Response) -> None:
    return None
