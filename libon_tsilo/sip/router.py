"""The transaction user that dispatches requests to the application layers.

It knows no application: the registrar and the call layer register handlers by method. Every request
first goes through the UAS core's RFC 3261 §8.2 checks; what nobody handles gets the UAS core's answer
(200 to OPTIONS, 405, 501). A handler that raises never takes the server down: the request gets a 500.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from libon_tsilo.sip.message import Request, Response, make_response, new_tag, log_call_id
from libon_tsilo.sip.uas_core import UASCore

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

RequestHandler = Callable[[Request, Any, Any], None]
AckHandler = Callable[[Request, Any], None]
# (CANCEL, the INVITE's server transaction or None, flow, the CANCEL's own server transaction)
CancelHandler = Callable[[Request, Any, Any, Any], None]
ResponseHandler = Callable[[Response, Any], None]


class Router:
    """TransactionUser: §8.2 checks, then one handler per method.

    ``in_dialog`` receives requests whose To carries a tag (mid-dialog), whatever their method, so
    that a B2BUA sees BYE, re-INVITE, INFO... A mid-dialog request with no such handler gets 481.
    """

    def __init__(self, uas: UASCore) -> None:
        self.uas = uas
        self.handlers: dict[str, RequestHandler] = {}
        self.in_dialog: RequestHandler | None = None
        self.ack: AckHandler | None = None
        self.cancel: CancelHandler | None = None
        self.stray: ResponseHandler | None = None
        self.refuse_new: Callable[[Request], Response | None] | None = None
        # a proxy in front of everything (cluster relay): sees each request first, ACK included
        # (stx None), and returns True when it took it; None on a single node
        self.proxy: Callable[[Request, Any, Any], bool] | None = None
        self.counters: dict[str, int] = {}

    def route(self, method: str, handler: RequestHandler, extensions: Iterable[str] = ()) -> None:
        """Send ``method`` requests to ``handler``; ``extensions``: option tags it implements."""
        self.handlers[method] = handler
        if method not in self.uas.allow:  # what we route we do: Allow says so (405 lists it)
            self.uas.allow = (*self.uas.allow, method)
        if extensions:
            self.uas.add_extensions(method, extensions)

    # -- TransactionUser --------------------------------------------------------------------------

    def request_received(self, request: Request, stx: Any, flow: Any) -> None:
        self.counters[request.method] = self.counters.get(request.method, 0) + 1
        if self.proxy is not None and self.proxy(request, stx, flow):
            return
        if stx is None:
            if self.ack is not None:
                self.ack(request, flow)
            return
        # a handler's exception goes to the transaction layer's guard: it logs and answers 500
        problem = self.uas.check_request(request)
        if problem is not None:
            stx.respond(problem)
            return
        if request.to.tag is not None and request.method != "REGISTER":
            if self.in_dialog is not None:
                self.in_dialog(request, stx, flow)
            else:
                stx.respond(self.uas.response(request, 481))
            return
        handler = self.handlers.get(request.method)
        if handler is None:
            answer = self.uas.method_response(request)
            stx.respond(answer if answer is not None else self.uas.response(request, 501))
            return
        if self.refuse_new is not None:
            refusal = self.refuse_new(request)
            if refusal is not None:
                stx.respond(refusal)
                return
        handler(request, stx, flow)

    def cancel_received(self, cancel: Request, invite_stx: Any, flow: Any, stx: Any = None) -> None:
        if self.cancel is not None:
            self.cancel(cancel, invite_stx, flow, stx)
            return
        # No call layer: answer the way a plain UAS would (§9.2).
        if invite_stx is None:
            _respond(stx, make_response(cancel, 481, to_tag=new_tag()))
            return
        _respond(stx, make_response(cancel, 200, to_tag=new_tag()))
        _respond(invite_stx, make_response(invite_stx.request, 487, to_tag=new_tag()))

    def stray_response(self, response: Response, flow: Any) -> None:
        if self.stray is not None:
            self.stray(response, flow)


def _respond(stx: Any, resp: Response) -> None:
    if stx is None:
        return
    try:
        stx.respond(resp)
    except Exception:
        log.failure("could not send {status}", status=resp.status, call_id=log_call_id(resp))
