"""The RFC 3261 §17 transaction layer (with RFC 6026): matching, tables, and the TU interface.

The state machines live in :mod:`transaction_client` and :mod:`transaction_server`; this module
keys them in dicts (never a list scan per message) and routes every inbound message:

- server transactions: ``(branch, sent-by, method)`` when the branch has the magic cookie, else the
  RFC 2543 tuple of §17.2.3 (Request-URI, To tag, From tag, Call-ID, CSeq, top Via);
- client transactions: ``(branch, CSeq method)``.

A response that matches no client transaction is dropped (and counted in ``strays_dropped``), except
a 2xx to an INVITE whose branch proves we sent it (sip/branch.py): the TU ACKs that one.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo import logflags
from libon_tsilo.sip.branch import is_our_branch
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.message import Request, Response, log_call_id, make_response, new_tag
from libon_tsilo.sip.timers import (
    ExpiryQueue, ExpiryTimer, State, TransactionBase, TwoXXRetransmitter, final_wait_slack,
)
from libon_tsilo.sip.transaction_client import (
    ClientTransaction,
    InviteClientTransaction,
    NonInviteClientTransaction,
    build_ack,
    build_cancel,
)
from libon_tsilo.sip.transaction_server import (
    InviteServerTransaction,
    NonInviteServerTransaction,
    ServerTransaction,
)

__all__ = [
    "TransactionLayer",
    "TransactionUser",
    "ClientTransaction",
    "ServerTransaction",
    "InviteClientTransaction",
    "NonInviteClientTransaction",
    "InviteServerTransaction",
    "NonInviteServerTransaction",
    "TwoXXRetransmitter",
    "State",
    "build_ack",
    "build_cancel",
    "MAGIC_COOKIE",
]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

MAGIC_COOKIE = "z9hG4bK"
_DEFAULT_PORTS = {"TLS": 5061, "WSS": 443, "WS": 80}


class TransactionUser(Protocol):
    def request_received(self, request: Request, stx: ServerTransaction | None, flow: Any) -> None: ...

    def cancel_received(
        self, cancel: Request, invite_stx: ServerTransaction | None, flow: Any, stx: ServerTransaction
    ) -> None:
        """``stx`` is the CANCEL's own transaction: the TU answers it (200, or 481 when
        ``invite_stx`` is None) and sends 487 on ``invite_stx`` itself (RFC 3261 §9.2)."""

    def stray_response(self, response: Response, flow: Any) -> None: ...

    # Optional hooks, called only when the TU defines them:
    #   transaction_timeout(stx)  -- timer H fired: the ACK for our 3xx-6xx never came
    #   transport_error(stx)      -- a response could not be sent


def _sent_by(req: Request) -> tuple[str, str, int]:
    via = req.top_via
    transport = via.transport.upper()
    return transport, via.host.lower(), via.port or _DEFAULT_PORTS.get(transport, 5060)


def _has_cookie(branch: str | None) -> bool:
    # A bare "z9hG4bK" (RFC 4475 badbranch) carries no uniqueness: fall back to RFC 2543 matching.
    return branch is not None and branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE)


def server_key(
    req: Request, method: str, to_tag: str | None = None, use_to_tag: bool = False
) -> tuple[Any, ...]:
    """The server-transaction key of ``req`` as if its method were ``method`` (ACK/CANCEL -> INVITE).

    ``to_tag`` overrides the request's own To tag in the RFC 2543 key (ACK matching, §17.2.3).
    """
    branch = req.branch
    if _has_cookie(branch):
        return ("3261", branch, _sent_by(req), method)
    tag = to_tag if use_to_tag else req.to.tag
    return (
        "2543", req.raw_uri, tag, req.from_.tag, req.call_id, req.cseq.seq, method,
        _sent_by(req), branch,
    )


class TransactionLayer:
    """All live transactions of one server, between the transport (below) and the TU (above)."""

    def __init__(
        self, transport: Any, clock: IReactorTime, t1: float = 0.5, t2: float = 4.0, t4: float = 5.0,
        slack_share: float = 0.0,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.t1 = t1
        self.t2 = t2
        self.t4 = t4
        # how late the final waits may end, as a share of each (timers.final_wait_slack): 0 is
        # RFC 3261's times exactly; the server runs with timers.SERVER_SLACK_SHARE
        self.slack_share = slack_share
        self.tu: TransactionUser | None = None
        # edge limits (sip/limits.py): False means the request was answered or dropped already
        self.admit: Callable[[Request, Any], bool] | None = None
        self._servers: dict[tuple[Any, ...], ServerTransaction] = {}
        self._clients: dict[tuple[Any, ...], ClientTransaction] = {}
        # client keys per destination, so an asynchronous connect failure finds its transactions
        self._by_target: dict[tuple[str, str, int], set[tuple[Any, ...]]] = {}
        # one queue per wait-state delay (64*T1, T4, timer D): see timers.ExpiryQueue
        self._expiry: dict[tuple[float, float], ExpiryQueue] = {}  # by (delay, slack)
        # and one DelayedCall for all of them (timers.ExpiryTimer)
        self._expiry_timer: ExpiryTimer | None = None
        # responses that matched no transaction and were dropped (not ours, or nothing left to do)
        self.strays_dropped = 0
        # overload control (sip/overload.py): a response for a new request refused before any
        # transaction exists for it, sent statelessly; None lets the request in
        self.gate: Callable[[Request, Any], Response | None] | None = None  # (request, flow)
        transport.sink = self.inbound
        transport.on_send_error = self.send_failed

    # -- bookkeeping ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._servers) + len(self._clients)

    @property
    def server_count(self) -> int:
        return len(self._servers)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def has_server_transaction(self, req: Request) -> bool:
        """Is ``req`` a retransmission, i.e. does its server transaction exist?"""
        return server_key(req, req.method) in self._servers

    def holds(self, req: Request) -> bool:
        """Is ``req`` ours to absorb or answer: a retransmission of a request we have a server
        transaction for, or a CANCEL or an ACK of an INVITE we have one for? (A stateless forwarder,
        sip/transport.py ``forward``, leaves those to the transactions.)"""
        method = req.method
        servers = self._servers
        if method != "ACK" and server_key(req, method) in servers:
            return True
        return (method == "CANCEL" or method == "ACK") and server_key(req, "INVITE") in servers

    def forget(self, txn: TransactionBase) -> None:
        if isinstance(txn, ClientTransaction):
            if self._clients.get(txn.key) is txn:
                del self._clients[txn.key]
                self._untrack(txn)
        elif self._servers.get(txn.key) is txn:
            del self._servers[txn.key]

    def final_slack(self, delay: float) -> float:
        """How late a final wait of ``delay`` (timers D, I, J, K, L, M; B, F) may end."""
        return final_wait_slack(delay, self.slack_share)

    def expiry(self, delay: float, slack: float = 0.0) -> ExpiryQueue:
        """The layer's queue for ``delay`` (and ``slack``, sip/timers.py), on its one timer."""
        key = (delay, slack)
        queue = self._expiry.get(key)
        if queue is None:
            if self._expiry_timer is None:
                self._expiry_timer = ExpiryTimer(self.clock)
            queue = self._expiry[key] = ExpiryQueue(self.clock, delay, self._expiry_timer, slack)
        return queue

    def stop(self) -> None:
        """Service stop: cancel every timer and drop every transaction, telling nobody."""
        for txn in [*self._servers.values(), *self._clients.values()]:
            txn.halt()
        for queue in self._expiry.values():
            queue.clear()
        self._servers.clear()
        self._clients.clear()
        self._by_target.clear()

    def tu_hook(self, name: str, *args: Any) -> None:
        hook = getattr(self.tu, name, None)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.failure("TU hook {hook} failed", hook=name)

    # -- client side ------------------------------------------------------------------------------

    def send_request(
        self, req: Request, target: Any, flow: Any, on_response: Callable[[Response], Any]
    ) -> ClientTransaction:
        """Start a client transaction; the request must already carry our top Via with a fresh branch.

        Timeouts and transport errors reach ``on_response`` as locally generated 408 / 503.
        """
        if req.method == "ACK":
            raise ValueError("ACK is not sent in a transaction: use the transport directly")
        branch = req.branch
        if not _has_cookie(branch):
            raise ValueError(f"send_request: top Via needs a z9hG4bK branch, got {branch!r}")
        key = ("client", branch, req.cseq.method)
        if key in self._clients:
            raise ValueError(f"send_request: a transaction with branch {branch} {req.cseq.method} exists")
        cls = InviteClientTransaction if req.method == "INVITE" else NonInviteClientTransaction
        ctx = cls(self, key, req, target, flow, on_response)
        self._clients[key] = ctx
        self._by_target.setdefault(_target_key(target), set()).add(key)
        ctx.start()
        return ctx

    def _untrack(self, ctx: ClientTransaction) -> None:
        tkey = _target_key(ctx.target)
        keys = self._by_target.get(tkey)
        if keys is not None:
            keys.discard(ctx.key)
            if not keys:
                del self._by_target[tkey]

    def send_failed(self, target: Any, reason: str) -> None:
        """The transport's ``on_send_error``: a connection (or name lookup) failed after send_request
        returned. Transactions towards that target still waiting for a first response get a 503."""
        for key in list(self._by_target.get(_target_key(target), ())):
            ctx = self._clients.get(key)
            if ctx is not None and ctx.state in (State.CALLING, State.TRYING):
                log.info("{txn}: {reason}", txn=ctx.id, reason=reason, call_id=log_call_id(ctx.request))
                ctx.transport_failed()

    def _response_in(self, resp: Response, flow: Any) -> None:
        try:
            key = ("client", resp.branch, resp.cseq.method)
        except ParseError as exc:
            log.info("response dropped: {reason}", reason=exc.reason, call_id=log_call_id(resp))
            return
        ctx = self._clients.get(key)
        if ctx is not None and ctx.on_response is not None:
            ctx.response_received(resp)
        elif 200 <= resp.status < 300 and key[2] == "INVITE" and self.tu is not None \
                and is_our_branch(key[1]):
            # RFC 6026: a 2xx after the INVITE transaction ended still needs an ACK from the TU. Only
            # for an INVITE we sent (its branch verifies): RFC 3261 §18.1.2 drops a response whose top
            # Via is not ours, and answering it would reflect ACK and BYE to any address it names.
            self.tu.stray_response(resp, flow)
        else:
            self.strays_dropped += 1
            if logflags.debug_enabled:
                log.debug("stray {status} dropped", status=resp.status, call_id=log_call_id(resp))

    # -- server side ------------------------------------------------------------------------------

    def inbound(self, msg: Request | Response, flow: Any) -> None:
        """The transport's sink: every parsed inbound message."""
        try:
            if isinstance(msg, Response):
                self._response_in(msg, flow)
            else:
                self._request_in(msg, flow)
        except ParseError as exc:
            self._reject_malformed(msg, flow, exc)
        except Exception:
            # One bad message must never stop the server (nor the transport's read loop).
            log.failure("transaction layer failed on {msg!r}", msg=msg, call_id=log_call_id(msg))

    def _reject_malformed(self, msg: Request | Response, flow: Any, exc: ParseError) -> None:
        if not isinstance(msg, Request) or msg.method == "ACK":
            log.info("malformed message dropped: {reason}", reason=exc.reason, call_id=log_call_id(msg))
            return
        try:
            self.transport.send_response(make_response(msg, exc.status, exc.reason), flow)
        except Exception:
            log.failure("cannot answer a malformed request", call_id=log_call_id(msg))

    def _request_in(self, req: Request, flow: Any) -> None:
        method = req.method
        if method == "ACK":
            self._ack_in(req, flow)
            return
        if self.admit is not None and not self.admit(req, flow):
            return
        key = server_key(req, method)
        stx = self._servers.get(key)
        if stx is not None:
            stx.request_retransmitted()
            return
        refusal = self.gate(req, flow) if self.gate is not None else None
        if refusal is not None:
            self.transport.send_response(refusal, flow)
            return
        if self.tu is None:
            self.transport.send_response(make_response(req, 503, "Service Unavailable"), flow)
            return
        invite_stx = self._servers.get(server_key(req, "INVITE")) if method == "CANCEL" else None
        stx = self._new_server(req, flow, key)
        if stx.terminated:
            return  # the 100 Trying could not be sent
        # The one guard of the request path: here a request enters the application (router,
        # registrar, call layer), and only here is a server transaction sure to exist to answer on.
        # The layers above let exceptions through.
        try:
            if method == "CANCEL":
                self.tu.cancel_received(req, invite_stx, flow, stx)
            else:
                self.tu.request_received(req, stx, flow)
        except ParseError as exc:
            # a header the application needed is malformed: the sender's fault, not a bug
            log.info("{method} refused: {reason}", method=method, reason=exc.reason, call_id=log_call_id(req))
            self._answer_error(stx, exc.status, exc.reason)
        except Exception:
            log.failure("TU failed on {method}", method=method, call_id=log_call_id(req))
            self._answer_error(stx, 500, "Server Internal Error")

    def _new_server(self, req: Request, flow: Any, key: tuple[Any, ...]) -> ServerTransaction:
        cls = InviteServerTransaction if req.method == "INVITE" else NonInviteServerTransaction
        stx = cls(self, key, req, flow)
        self._servers[key] = stx
        stx.start()
        return stx

    def _ack_in(self, ack: Request, flow: Any) -> None:
        stx = self._find_invite_for_ack(ack)
        if isinstance(stx, InviteServerTransaction) and stx.ack_received():
            return
        if self.tu is not None:
            self.tu.request_received(ack, None, flow)

    def _find_invite_for_ack(self, ack: Request) -> ServerTransaction | None:
        key = server_key(ack, "INVITE")
        stx = self._servers.get(key)
        if stx is not None or key[0] == "3261":
            return stx
        # RFC 2543: the ACK carries the To tag of our response, which the INVITE did not have.
        stx = self._servers.get(server_key(ack, "INVITE", to_tag=None, use_to_tag=True))
        if stx is None or stx.last_response is None:
            return None
        try:
            our_tag = stx.last_response.to.tag
        except ParseError:
            return None
        return stx if our_tag == ack.to.tag else None

    def _answer_error(self, stx: ServerTransaction, status: int, reason: str | None) -> None:
        if stx.state not in (State.TRYING, State.PROCEEDING):
            return  # the application answered before it failed: one final response only
        try:
            stx.respond(make_response(stx.request, status, reason, to_tag=new_tag()))
        except Exception:
            log.failure("cannot send {status}", status=status, call_id=log_call_id(stx.request))


def _target_key(target: Any) -> tuple[str, str, int]:
    return (
        str(getattr(target, "transport", "")).lower(),
        str(getattr(target, "host", "")).strip("[]").lower(),
        int(getattr(target, "port", 0) or 0),
    )
