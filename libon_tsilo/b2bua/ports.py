"""What the call layer needs from the SIP stack below it, and the adapter onto the real one.

Calls speak to one small `SipPort`, so that unit tests can record every message on a fake and
the real transaction/transport layers can evolve behind `TransactionPort` without touching the
call logic. A `Hop` says where a leg's next message goes: over its flow when that is live, else
to the address the device was last seen at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from twisted.internet.interfaces import IReactorTime

from libon_tsilo.sip.message import Request, Response, new_branch
from libon_tsilo.sip.timers import ExpiryQueue, TwoXXRetransmitter
# at module level: compiled (mypyc), an import inside a function runs each call (~1,200 to ~5,000
# instructions: three sends and a 2xx per late-fork call)
from libon_tsilo.sip.transport import Target

if TYPE_CHECKING:
    from libon_tsilo.sip.transaction import TransactionLayer

__all__ = [
    "Hop", "SipPort", "ClientHandle", "RetransmitHandle", "ServerHandle", "TransactionPort", "hop_of_flow",
]


# One per leg: slots spare each its attribute dict. Never changed once built (hashable, as when it
# was frozen), but not frozen: compiled with mypyc, a dataclass's generated __init__ stays interpreted
# (two per late-fork call, ~7,000 instructions each), and a frozen one cannot have it written out.
@dataclass(slots=True, init=False, unsafe_hash=True)
class Hop:
    transport: str  # "udp" | "tcp" | "tls"
    host: str
    port: int
    flow_id: str | None
    # our own (host, port) as bound, to send from and to put in Via and Contact, when it is not the
    # public listener: a hop to another cluster node leaves from the internal listener
    local: tuple[str, int] | None

    def __init__(self, transport: str, host: str, port: int, flow_id: str | None = None,
                 local: tuple[str, int] | None = None) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.flow_id = flow_id
        self.local = local


def hop_of_flow(flow: Any) -> Hop:
    """The hop back to whoever sent a request on `flow` (its source address, its connection)."""
    host, port = flow.key.remote
    return Hop(flow.key.transport, host, port, flow.id)


class ClientHandle(Protocol):
    def cancel(self, extra_headers: Any = (), on_response: Any = None) -> None: ...

    def detach(self) -> None:
        """The call ended: stop calling back (a later 2xx is the stack's stray 2xx)."""


class ServerHandle(Protocol):
    """What a call answers its caller's INVITE through: the real ServerTransaction, or
    transfer.py's stand-in for the INVITE the B2BUA places itself."""

    def respond(self, resp: Response) -> None: ...


class RetransmitHandle(Protocol):
    def stop(self) -> None: ...


class SipPort(Protocol):
    def send_request(self, req: Request, hop: Hop, on_response: Callable[[Response], Any]) -> ClientHandle:
        """Stamp our Via on `req` and start a client transaction towards `hop`."""

    def send_ack(self, ack: Request, hop: Hop) -> None:
        """ACK for a 2xx: no transaction (RFC 3261 §13.2.2.4); our Via is stamped here too."""

    def respond(self, stx: ServerHandle, resp: Response) -> None: ...

    def respond_2xx(
        self, stx: ServerHandle, resp: Response, on_give_up: Callable[[], Any]
    ) -> RetransmitHandle:
        """Send a 2xx to INVITE and keep retransmitting it until stop() (the ACK came) or 64*T1."""

    def contact(self, transport: str, local: tuple[str, int] | None = None) -> str:
        """Our own Contact value for a leg on this transport (at ``local`` when given)."""

    def flow_live(self, flow_id: str | None) -> bool: ...


class TransactionPort:
    """SipPort over the real `TransactionLayer` (and its transport, for ACKs and our address)."""

    def __init__(self, layer: TransactionLayer, clock: IReactorTime, user: str = "b2bua") -> None:
        self.layer = layer
        self.clock = clock
        self.user = user
        # ";nd=..." on what we send from a public socket other workers share (cluster/node.py
        # ``mark``): the worker the kernel gives the answer to passes it on to us; "" otherwise
        self.mark = ""

    @property
    def transport(self) -> Any:
        return self.layer.transport

    @property
    def t1(self) -> float:
        """RFC 3261 T1: the start of a reliable 18x's retransmission interval (RFC 3262 §3)."""
        return float(self.layer.t1)

    def _flow(self, hop: Hop) -> Any:
        if hop.flow_id is None:
            return None
        flow = self.transport.flows.get(hop.flow_id)
        return flow if flow is not None and flow.live else None

    def _target(self, hop: Hop) -> Any:
        return Target(hop.transport, hop.host, hop.port, None, hop.local)

    def _stamp_via(self, req: Request, hop: Hop) -> None:
        local = hop.local
        if local:
            host, port = _via_address(local)
            mark = ""
        else:
            host, port = self.transport.local_via(hop.transport, hop.host)
            mark = self.mark
        via = f"SIP/2.0/{hop.transport.upper()} {host}:{port};branch={new_branch()};rport{mark}"
        req.add_header("Via", via, first=True)

    def send_request(self, req: Request, hop: Hop, on_response: Callable[[Response], Any]) -> ClientHandle:
        self._stamp_via(req, hop)
        return self.layer.send_request(req, self._target(hop), self._flow(hop), on_response)

    def send_ack(self, ack: Request, hop: Hop) -> None:
        self._stamp_via(ack, hop)
        self.transport.send_request(ack, self._target(hop), self._flow(hop))

    def respond(self, stx: ServerHandle, resp: Response) -> None:
        stx.respond(resp)

    def respond_2xx(
        self, stx: ServerHandle, resp: Response, on_give_up: Callable[[], Any]
    ) -> RetransmitHandle:
        stx.respond(resp)
        reliable = getattr(stx, "reliable", False)
        return TwoXXRetransmitter(
            self.clock, lambda: stx.respond(resp), self.layer.t1, self.layer.t2, on_give_up,
            retransmit=not reliable, expiry=self.layer.expiry,
        )

    def expiry(self, delay: float) -> ExpiryQueue:
        """The transaction layer's queue for `delay` (CallManager.expiry): the call timers then share
        the layer's one DelayedCall, armed anyway for the transactions' final waits."""
        return self.layer.expiry(delay)

    def contact(self, transport: str, local: tuple[str, int] | None = None) -> str:
        host, port = _via_address(local) if local else self.transport.local_via(transport)
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{self.user}@{host}:{port}{suffix}{'' if local else self.mark}>"

    def flow_live(self, flow_id: str | None) -> bool:
        if flow_id is None:
            return False
        flow = self.transport.flows.get(flow_id)
        return bool(flow is not None and flow.live)


def _via_address(local: tuple[str, int]) -> tuple[str, int]:
    host, port = local
    return (f"[{host}]" if ":" in host else host, port)
