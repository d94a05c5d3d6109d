"""The MESSAGE we send to one device: a new non-dialog request from us as a UAC (RFC 3428 §4).

It carries the stored body, Content-Type, the sender as From (its verified identity, a fresh tag)
and the Date it was sent with, under our own Call-ID and CSeq; the device's Path becomes its Route
set. Where it goes: the device's connection when live (RFC 5626: only its own flow reaches a device
behind a NAT), else the address its REGISTER came from, else its Contact. In a cluster
(``path_router``: cluster/node.py ``next_hop``, as the call layer uses it) a binding whose Path starts
at another node goes to that node, with the Path as Route set, and that node relays it over the
device's flow (cluster/relay.py); one whose Path starts at this node goes over our flow without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer

from libon_tsilo.messaging.store import StoredMessage
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import NameAddr
from libon_tsilo.sip.message import Request, Response, new_branch, new_call_id, new_tag
from libon_tsilo.sip.uri import URI

if TYPE_CHECKING:
    from libon_tsilo.sip.transaction import TransactionLayer

__all__ = ["MessageSender", "TransactionSender", "build_message"]

_DEFAULT_PORT = {"udp": 5060, "tcp": 5060, "tls": 5061}
# (Path) -> None (not a cluster node's), (rest, None) (ours), (path, (transport, host, port, local))
PathRouter = Callable[[list[str]], "tuple[list[str], tuple[str, str, int, tuple[str, int]] | None] | None"]


class MessageSender(Protocol):
    def send(self, binding: Binding, msg: StoredMessage) -> defer.Deferred[Response]:
        """Send ``msg`` to the device of ``binding``; fires with the final response (a locally made
        408/503 on timeout or transport failure); fails when no request could be sent at all."""

    def flow_live(self, flow_id: str | None) -> bool: ...


def build_message(binding: Binding, msg: StoredMessage, routes: list[str] | None = None) -> Request:
    """The MESSAGE request for ``binding`` (no Via yet: the sender stamps it); ``routes``: the Route
    set (default: the binding's Path)."""
    req = Request("MESSAGE", binding.contact_uri)
    for route in binding.path if routes is None else routes:
        req.add_header("Route", route)
    req.add_header("Max-Forwards", "70")
    req.add_header("From", str(NameAddr(msg.sender, msg.sender_name or None, {"tag": new_tag()})))
    req.add_header("To", str(NameAddr(msg.to_uri)))
    req.add_header("Call-ID", new_call_id())
    req.add_header("CSeq", "1 MESSAGE")
    req.add_header("Date", msg.date)
    req.add_header("Content-Type", msg.content_type)
    req.body = msg.body
    return req


class TransactionSender:
    """MessageSender over the real transaction layer (and its transport, for our Via and flows)."""

    def __init__(self, layer: TransactionLayer, path_router: PathRouter | None = None) -> None:
        self.layer = layer
        self.path_router = path_router
        # ";nd=..." on what we send from a public socket other workers share (set by ops, as the call
        # layer's, cluster/node.py ``mark``): a worker the device is pinned to passes its answer on
        self.mark = ""

    def flow_live(self, flow_id: str | None) -> bool:
        if flow_id is None:
            return False
        flow = self.layer.transport.flows.get(flow_id)
        return bool(flow is not None and flow.live)

    def send(self, binding: Binding, msg: StoredMessage) -> defer.Deferred[Response]:
        from libon_tsilo.sip.transport import Target  # the transport module may load TLS bits

        flow: Any = None
        routes, node = list(binding.path), None
        if routes and self.path_router is not None:
            found = self.path_router(routes)
            if found is not None:
                routes, node = found
        local: tuple[str, int] | None = None
        if node is not None:
            transport, host, port, local = node  # another node's: it relays over the device's flow
        else:
            if binding.flow_id and binding.flow_live and self.flow_live(binding.flow_id):
                flow = self.layer.transport.flows.get(binding.flow_id)
            hop = _hop(binding)
            if hop is None:
                return defer.fail(ValueError(f"no address for {binding.contact_uri}"))
            transport, host, port = hop
        req = build_message(binding, msg, routes)
        via_host, via_port = local or self.layer.transport.local_via(transport, host)
        mark = "" if local else self.mark
        req.add_header(
            "Via", f"SIP/2.0/{transport.upper()} {via_host}:{via_port};branch={new_branch()};rport{mark}",
            first=True,
        )
        d: defer.Deferred[Response] = defer.Deferred()

        def on_response(resp: Response) -> None:
            if resp.status >= 200 and not d.called:
                d.callback(resp)

        self.layer.send_request(req, Target(transport, host, port, None, local), flow, on_response)
        return d


def _hop(binding: Binding) -> tuple[str, str, int] | None:
    if binding.received:
        transport, host, port = binding.received
        return transport.lower(), host, int(port)
    try:
        uri = URI.parse(binding.contact_uri)
    except (ParseError, ValueError):
        return None
    if not getattr(uri, "host", None):
        return None
    transport = uri.transport or ("tls" if uri.scheme == "sips" else "udp")
    return transport, uri.host_bare, uri.port or _DEFAULT_PORT.get(transport, 5060)
