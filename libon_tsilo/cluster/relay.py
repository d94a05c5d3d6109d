"""The edge side of a cross-node call: relay requests between another node and a device's flow.

A proxy (RFC 3261 §16) with two faces, stateless where nothing needs state (below), transaction-
stateful otherwise, in front of the router (``Router.proxy``):

- **From a peer node, on the internal listener** (the INVITE a peer forked to a binding whose Path
  starts with us, its ACK and CANCEL, and the in-dialog requests that peer sends to the device):
  the top Route is ours and its flow token names the device's flow. We pop our Route entries,
  decrement Max-Forwards, add our Via and, for a dialog-creating INVITE, two Record-Route entries
  carrying the token (RFC 5658 double Record-Route: the device sees our public address, the peer
  our internal one), and send over that flow. A TCP/TLS flow that is gone gets 430 Flow Failed
  (RFC 5626 §5.3): the forking node fails over to the device's next flow.
- **From the device, on a public listener** (BYE, re-INVITE... inside such a dialog): the Route is
  our public Record-Route entry. It is honoured only over the flow its token names (or from that
  device's address), and only towards a trusted peer (``[cluster] trusted_peers``): we are nobody's
  open relay.

Requests on the internal listener from an untrusted source get 403; a trusted peer's request there
that is neither for a flow of ours nor inside a dialog gets 403 too (the registrar and the call
layer serve the public listeners only).

**Stateless where it can be** (RFC 3261 §16.11; ``forward``, the transport's stateless forwarder,
offered each parsed message before it is validated or reaches a transaction). Every message of a
relayed call crosses this node a second time, and as a transaction-stateful proxy it paid for each
one: every header validated, a server and a client transaction with their timers, our own 100
Trying. A proxy may act statelessly per request (§16.1); what it then owes is little: take messages
from the transport, read only what it routes by (§16.3 step 1: other headers, well-formed or not,
are passed on unchanged), forward each retransmission as it comes (it cannot tell one from the first
copy), make no provisional response, give a retransmission, a CANCEL and a non-2xx ACK the branch
their INVITE got (relay_branch.py: a keyed hash of the previous hop's Via), handle CANCEL like any
request (the next hop, not us, matches it to the INVITE), and pass each response on to the next Via
after taking its own off. So a call's INVITE, ACK, CANCEL, BYE and other in-dialog requests, both
ways, and all their responses, go without a transaction, except where correctness needs state; these
take the stateful path (``handle``, on a server transaction):

- a request that arrives over a stream and leaves over UDP (a TCP internal listener towards a UDP
  device, or a TCP device towards a UDP internal listener): its sender does not retransmit (Timer A
  and E run on unreliable transports only, §17.1.1.2, §17.1.2.2), so someone must, and only a client
  transaction does;
- an INVITE from UDP onto a stream (a UDP internal listener towards a TCP/TLS device): its final
  non-2xx answer comes back over the stream, where the device does not repeat it (Timer G is for
  unreliable transports), and goes on over UDP, where it may be lost once the sender, after a 1xx,
  has stopped retransmitting the INVITE; our server transaction repeats it until the ACK
  (``_needs_state``). A non-INVITE request UDP in, stream out is stateless: its sender retransmits
  until the final answer, the next hop's server transaction absorbs the copies (§17.2.2) and
  answers each;
- a new INVITE held until the device's REGISTER is answered (cluster/ordering.py): a CANCEL must be
  able to drop it here; and what a transaction of ours takes then (``TransactionLayer.holds``: its
  retransmissions, its CANCEL, the ACK of its non-2xx answer);
- a branch without the magic cookie (nothing unique to hash), a device's request outside a dialog;
- whatever is refused or answered here: an untrusted source, a token not ours, a gone TCP/TLS flow
  (430, RFC 5626 §5.3), Max-Forwards 0 (483).

A response under a branch of ours is not even parsed (``forward_bytes``, before the parser, offered
each message by the transport): our Via is cut out of its bytes and the rest goes on as it came
(sip/wire_edit.py), after the keyed branch is checked against the next Via. What that cannot read
for sure, and every response to refuse, takes the parsed path (``forward``) as before.

The forking node keeps its own Timer A/B: what it hears first is the device's 100 Trying (RFC 3261
§17.2.1), not ours. The source limits apply to what this path takes as to anything else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo import logflags
from libon_tsilo.cluster.flow_token import FlowRef
from libon_tsilo.cluster.node import MARK_PARAM, ClusterNode
from libon_tsilo.cluster.ordering import hold_until_answered
from libon_tsilo.cluster.relay_branch import PREFIX, RelayBranches
from libon_tsilo.ratelimit import ThrottledLog
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import NameAddr, Via
from libon_tsilo.sip.message import (
    Message, Request, Response, log_call_id, make_response, new_branch, new_tag, parse_message,
)
from libon_tsilo.sip.transport import Target, TransportError, fix_via
from libon_tsilo.sip.uri import URI
from libon_tsilo.sip.wire_edit import TopVia, read_request_head, read_top_via

if TYPE_CHECKING:
    from libon_tsilo.sip.flow import Flow
    from libon_tsilo.sip.transaction import TransactionLayer

__all__ = ["Relay"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

_STREAMS = ("tcp", "tls")
_MARK_IN_URI = f";{MARK_PARAM}="
_MEMO_MAX = 4096
# untrusted source on the internal listener, a peer's request that is not for a flow of ours, a
# token used from another flow, a device's in-dialog request towards a host that is not a node
_REFUSALS = (
    "refused_untrusted", "refused_not_relay", "refused_wrong_flow", "refused_not_peer", "too_many_hops",
    "refused_bad_branch",  # a response under a branch of ours that we did not give its next hop
)


def _on_tokens_flow(flow: Flow, ref: FlowRef) -> bool:
    """Did a device's request come over the flow its token names: that flow, or its address and
    port (RFC 5626 §5.3; a UDP flow that idled out and came back)? Never just its IP: a carrier-grade
    NAT puts many subscribers behind one, and over UDP an IP is spoofed at no cost."""
    return flow.id == ref.flow_id or flow.key.remote == (ref.host, ref.port)


def _needs_state(method: str, came_reliably: bool, leaves_reliably: bool) -> bool:
    """Must a request crossing between UDP and a stream be relayed on transactions? Stream in, UDP
    out: its sender does not retransmit it (Timers A and E run on unreliable transports only, RFC 3261
    §17.1.1.2, §17.1.2.2), so our client transaction must. An INVITE either way: its final non-2xx
    answer comes back from the stream side, where the UAS does not repeat it (Timer G: unreliable
    transports only, §17.2.1), and goes on over UDP, where it can be lost while its sender, after a
    1xx, no longer retransmits the INVITE to ask again: our server transaction repeats it until the
    ACK. (A non-INVITE's sender on UDP retransmits until its final answer, Proceeding included.) An
    ACK never: nothing answers it."""
    if method == "ACK" or came_reliably == leaves_reliably:
        return False
    return came_reliably or method == "INVITE"


class Relay:
    """See the module doc. ``handle`` is the router's proxy hook; ``wrap_cancel`` its CANCEL hook."""

    def __init__(self, node: ClusterNode, transactions: TransactionLayer, clock: IReactorTime) -> None:
        self.node = node
        self.clock = clock
        self._logs: dict[str, ThrottledLog] = {}
        self.layer = transactions
        self.transport = transactions.transport
        # INVITE server transactions we relay -> the client transaction towards the other side
        self._pending: dict[Any, Any] = {}
        # "to_device", "to_peer", "flow_failed", "refused_untrusted", "refused_not_relay", ...
        self.counters: Counter[str] = Counter()
        # the registrar's when_answered (set by ops): relayed INVITEs wait for a REGISTER's 200
        self.register_answered: Callable[[str], Deferred[None] | None] | None = None
        self._branches: RelayBranches | None = None
        self._shares: bool | None = None  # do other workers send from our public socket (node.mark)?
        self._mark = ""  # node.mark, read with _shares
        # what the node (interpreted) answers per message, kept here (compiled): its internal
        # listener as bound, its Via address, the trust of each source host, the entries of ours
        self._internal: tuple[str, str, int] | None = None
        self._via: tuple[str, int] | None = None
        self._trusted: dict[str, bool] = {}
        self._own: dict[str, tuple[FlowRef, str]] = {}
        self._rr_tails: dict[str, tuple[str, str]] = {}  # a device's transport -> _record_route's tails
        # our stateless branches -> the Via we gave each one for (its text as sent, parsed)
        self._sent: dict[str, tuple[str, Via]] = {}
        # the branches of the peers' INVITEs that reached the stateful path (``handle``): their
        # CANCEL and non-2xx ACK belong to its transaction, never to the bytes path
        self._stateful_invites: dict[str, None] = {}
        # set by ops when a trusted peer's request on the internal listener skips the source limits
        self.internal_exempt = False

    @property
    def shares(self) -> bool:
        """Does this node share its public UDP socket with other workers (``udp_via_path = "auto"``,
        cluster/node.py)? Then what the kernel gives us of their dialogs is passed on to them."""
        if self._shares is None:
            self._mark = self.node.mark
            self._shares = bool(self._mark)
        return self._shares

    def _device_mark(self, transport: str) -> str:
        """Our ``;nd=`` for the Via of what we relay to a UDP device from our public socket, when
        other workers share it: a worker that pinned the device (sip/udp_pins.py) gets its answers
        and passes them on to us by it. "" otherwise."""
        if transport != "udp" or not self.shares:
            return ""
        return self._mark

    def _is_internal(self, flow: Flow) -> bool:
        """``ClusterNode.is_internal``, the common spelling compared here."""
        internal = self._internal
        if internal is None:
            host, port = self.node.bound
            internal = self._internal = (self.node.spec.transport, host, port)
        key = flow.key
        local = key.local
        if local[1] != internal[2] or key.transport != internal[0]:
            return False
        return local[0] == internal[1] or self.node.is_internal(flow)

    def _trusts(self, flow: Flow) -> bool:
        host = flow.key.remote[0]
        known = self._trusted.get(host)
        if known is None:
            known = self.node.trusts(flow)
            if len(self._trusted) >= _MEMO_MAX:
                self._trusted.clear()
            self._trusted[host] = known
        return known

    def _own_flow(self, route: str) -> tuple[FlowRef, str] | None:
        """``ClusterNode.own_flow``, its answers for our own entries kept here."""
        found = self._own.get(route)
        if found is None:
            found = self.node.own_flow(route)
            if found is not None:
                if len(self._own) >= _MEMO_MAX:
                    self._own.clear()
                self._own[route] = found
        return found

    @property
    def via_address(self) -> tuple[str, int]:
        if self._via is None:
            self._via = self.node.via_address
        return self._via

    @property
    def branches(self) -> RelayBranches:
        if self._branches is None:  # the internal address is known once the transport listens
            self._branches = RelayBranches(self.node.secret, self.node.address_text)
        return self._branches

    # -- the transport's stateless forwarder (RFC 3261 §16.11; see the module doc) -----------------

    def forward(self, msg: Message, flow: Flow) -> bool:
        """The transport's ``forward``: relay ``msg`` with no transaction when nothing needs one.
        False leaves it to the transactions and, for a request, to ``handle`` (the stateful path),
        which refuses, answers or relays it."""
        if type(msg) is Response:
            return self._forward_response(msg, flow)
        req = cast(Request, msg)
        if not req.has_header("route"):
            if self.shares and _MARK_IN_URI in req.raw_uri:
                target = self._sibling_of_uri(req, flow)
                return target is not None and self._stateless_to_sibling(req, target, flow)
            return False  # most requests a node gets are not relayed: one dict lookup
        routes = req.header_values("route")
        first = self._own_flow(routes[0])
        if first is None or self.layer.holds(req):
            return False  # not for us to relay, or a transaction of ours takes it
        if self._is_internal(flow):
            return self._trusts(flow) and self._stateless_to_device(req, routes, first[0], first[1], flow)
        return self._stateless_to_peer(req, routes, first[0], flow)

    def forward_bytes(self, data: bytes, flow: Flow) -> bool:
        """The transport's ``forward_bytes``: a response under a branch of ours, passed on with our
        Via cut out of its bytes (sip/wire_edit.py), unparsed: half of a relayed call's messages.
        Anything else, and every response to refuse, is left to the parser's path (``forward``)."""
        top = read_top_via(data)  # None for a request
        if top is None:
            return self.internal_exempt and flow.key.transport == "udp" and self._is_internal(flow) \
                and self._trusts(flow) and self._request_to_device(data, flow)
        # a sibling's mark first, whatever the branch: a device pinned to us answers what that
        # sibling relayed (its stateless branch, which only its key checks) as well as its calls
        if self.shares and self._to_sibling_as_is(top, flow):
            return True
        popped = top.pop(PREFIX)
        if popped is None:
            return False
        known = self._sent.get(popped.branch)
        if known is not None and known[0] == popped.next_via:
            via = known[1]  # the Via we gave that branch for, as we sent it: checked then
        else:
            try:
                via = Via.parse(popped.next_via)
            except ParseError:
                return False  # refused on the parser's path, as before
            if not self.branches.verify(popped.branch, via):
                return False  # the parser's path refuses it (counted and logged there)
        if flow.key.transport == "udp" and via.transport != "UDP":
            return False  # a datagram onto a stream: its Content-Length must frame it (parsed path)
        self.transport.forward_response_data(popped.data, via)
        self.counters["stateless_responses"] += 1
        return True

    def _forward_response(self, resp: Response, flow: Flow) -> bool:
        """A response to a request we relayed statelessly: take our Via off and pass it on to the
        next one; one under a branch of ours that its next Via did not get is dropped (§16.11: a
        response whose top Via is not ours is discarded). False: not ours, the transactions take it."""
        if self.shares:  # a sibling's mark first, whatever the branch (see forward_bytes)
            mark = resp.top_via.params.get(MARK_PARAM)
            target = self._sibling(mark) if mark and not self._is_internal(flow) else None
            if target is not None:
                self.counters["to_sibling_responses"] += 1
                self.transport.forward_data(resp.to_bytes(), target)
                return True
        branch = resp.branch
        if branch is None or not branch.startswith(PREFIX):
            return False
        vias = resp.vias
        if len(vias) < 2 or not self.branches.verify(branch, vias[1]):
            self._throttled("refused_bad_branch").emit(
                log.info, "relay: a {status} under a branch of ours not given to its next hop, from "
                "{source}: dropped", status=resp.status, source=flow.key.remote[0], call_id=log_call_id(resp))
            return True
        resp.remove_top_via()
        self.transport.forward_response(resp)
        self.counters["stateless_responses"] += 1
        return True

    def _request_to_device(self, data: bytes, flow: Flow) -> bool:
        """A peer node's request within a dialog (ACK, BYE, INFO...) to a UDP device, relayed
        as bytes: what ``_stateless_to_device`` does with the parsed message, on the wire (our Via
        on top, the peer's Via with received/rport as the transport sets them, our Route entries
        off, Max-Forwards less one). Anything it does not read for sure, or that the stateful path
        must take, is left to the parser's path (False): an INVITE (a new one needs Record-Route
        and may wait for the REGISTER's answer; only its To tag tells a re-INVITE), a Route set
        that goes on past our entries, a CANCEL or ACK of an INVITE a transaction of ours holds, a
        stream on either side. Only from a trusted peer on the internal listener, where the
        source limits do not apply (``internal_exempt``)."""
        if data.startswith(b"INVITE ") or data.startswith(b"SIP/2.0 "):
            return False  # an INVITE (see above), or a response
        head = read_request_head(data)
        if head is None or not head.routes or head.max_forwards <= 0:
            return False
        first = self._own_flow(head.routes[0])
        if first is None or first[0].transport != "udp" or self._own_count(head.routes) != len(head.routes):
            return False
        ref = first[0]
        try:
            via = Via.parse(head.via)
        except ParseError:
            return False
        fix_via(via, flow.key.remote)
        if (head.method == "ACK" or head.method == "CANCEL") \
                and via.params.get("branch") in self._stateful_invites:
            return False
        branch = self.branches.for_request(via)
        if branch is None:
            return False
        out = self.transport.flows.get(ref.flow_id)
        if out is not None and not out.live:
            out = None
        host, port = self.transport.local_via("udp", ref.host)
        top = str(via)
        sent = self._sent
        if len(sent) >= _MEMO_MAX:
            del sent[next(iter(sent))]
        sent[branch] = (top, via)
        if not top.isascii():
            return False
        mark = self._device_mark("udp")
        edited = head.edited(data, f"SIP/2.0/UDP {host}:{port};branch={branch};rport{mark}", top,
                             head.max_forwards - 1)
        counters = self.counters
        counters["to_device"] += 1
        counters["stateless"] += 1
        counters["stateless_bytes"] += 1
        if head.method == "CANCEL":
            counters["cancelled"] += 1
        if not self.transport.forward_data(edited, Target("udp", ref.host, ref.port), out):
            self._unsent_bytes(data, top, flow)
        return True

    def _unsent_bytes(self, data: bytes, via: str, came_over: Flow) -> None:
        """A request relayed as bytes that could not be sent (logged by the transport): answered
        503, as the parsed path's ``_send_stateless`` answers (RFC 3261 §16.9: a transport error is a
        503 to the forwarded request); an ACK gets no answer. Parsed here, on this rare path only;
        ``via`` is its top Via with the transport's received/rport, where the 503 goes."""
        if data.startswith(b"ACK "):
            return
        try:
            req = cast(Request, parse_message(data))
            req.remove_top_via()
            req.add_header("Via", via, first=True)
            resp = make_response(req, 503, None, to_tag=new_tag())
        except ParseError:
            return  # read_request_head read it: only a header it did not look at can be malformed
        self.transport.send_response(resp, came_over)

    # -- what the kernel gave us of another worker's dialogs (a shared public socket) ------------

    def _to_sibling_as_is(self, top: TopVia, flow: Flow) -> bool:
        """A response whose top Via a worker sharing our public socket wrote (``;nd=``): the device
        answered that worker's request, and the kernel handed the datagram to us, the worker its
        5-tuple hashes to. Passed on as it came, unparsed. False: not one, or left to the parser's
        path (a datagram onto a stream: its Content-Length must frame it)."""
        mark = top.param(MARK_PARAM)
        if mark is None or self._is_internal(flow):
            return False
        target = self._sibling(mark)
        if target is None or (target.transport != "udp" and flow.key.transport == "udp"):
            return False
        self.counters["to_sibling_responses"] += 1
        self.transport.forward_data(top.data, target)
        return True

    def _sibling(self, mark: str) -> Target | None:
        """``ClusterNode.sibling``: a mark it resolved already is read from its own table here, and
        our own is not one (the device a pin brings us answers our Via: 8 of them per call)."""
        node = self.node
        found = node.siblings.get(mark)
        if found is not None or mark == node.own_mark:
            return found
        return node.sibling(mark)

    def _sibling_of_uri(self, req: Request, flow: Flow) -> Target | None:
        """The worker a device's in-dialog request is for: its Request-URI is that worker's Contact,
        marked ``;nd=`` (b2bua/ports.py); None: ours, or not a node."""
        if self._is_internal(flow) or req.to.tag is None:
            return None  # a Contact of ours serves its dialogs only
        try:
            mark = req.uri.params.get(MARK_PARAM)
        except ParseError:
            return None
        return self._sibling(mark) if isinstance(mark, str) else None

    def _stateless_to_sibling(self, req: Request, target: Target, came_over: Flow) -> bool:
        return self._stateless_to_node(req, target, came_over, "to_sibling", None)

    def _stateless_to_node(self, req: Request, target: Target, came_over: Flow, counter: str,
                           routes: list[str] | None) -> bool:
        """Forward ``req`` without a transaction to the node ``target`` (a peer, or a worker sharing
        our public socket), under our Via and, when given, with ``routes`` as its Route set. False:
        the parser's path must take it; True: it went, or the source limits answered or dropped it."""
        if _needs_state(req.method, (came_over.key.transport != "udp"), target.transport in _STREAMS):
            return False
        mf = req.max_forwards
        if mf is not None and mf <= 0:
            return False
        branch = self.branches.for_request(req.top_via)
        if branch is None:
            return False
        if not self._admitted(req, came_over):
            return True  # answered 503 or dropped
        if routes is not None:
            self._set_routes(req, routes)
        req.set_header("Max-Forwards", str(69 if mf is None else mf - 1))
        host, port = self.via_address
        self.counters[counter] += 1
        self._send_stateless(req, f"SIP/2.0/{target.transport.upper()} {host}:{port};branch={branch};rport",
                             target, None, came_over, branch)
        return True

    def _admitted(self, req: Request, flow: Flow) -> bool:
        """The transaction layer's source limits, which a request taken here does not reach."""
        if self.internal_exempt and self._is_internal(flow) and self._trusts(flow):
            return True  # ops exempts a node's requests on the internal listener (one call less)
        admit = self.layer.admit
        return admit is None or admit(req, flow)

    def _stateless_to_device(self, req: Request, routes: list[str], ref: FlowRef, token: str,
                             came_over: Flow) -> bool:
        mf = req.max_forwards
        if mf is not None and mf <= 0:
            return False
        out = self.transport.flows.get(ref.flow_id)
        if out is not None and not out.live:
            out = None
        method = req.method
        to_stream = ref.transport in _STREAMS
        if to_stream and out is None:
            return False  # 430 Flow Failed
        if _needs_state(method, (came_over.key.transport != "udp"), to_stream):
            return False
        creates_dialog = method == "INVITE" and req.to.tag is None
        if creates_dialog and self._register_unanswered(ref.flow_id):
            return False  # held on a transaction until the REGISTER's 200 is sent
        branch = self.branches.for_request(req.top_via)
        if branch is None:
            return False
        if not self._admitted(req, came_over):
            return True  # answered 503 or dropped
        self._pop_own_routes(req, routes)
        req.set_header("Max-Forwards", str(69 if mf is None else mf - 1))
        if creates_dialog:  # RFC 5658, as in _to_device
            self._record_route(req, ref, token)
        host, port = self.transport.local_via(ref.transport, ref.host)
        self.counters["to_device"] += 1
        mark = self._device_mark(ref.transport)
        via = f"SIP/2.0/{ref.transport.upper()} {host}:{port};branch={branch};rport{mark}"
        self._send_stateless(req, via, Target(ref.transport, ref.host, ref.port), out, came_over, branch)
        return True

    def _stateless_to_peer(self, req: Request, routes: list[str], ref: FlowRef, came_over: Flow) -> bool:
        if not _on_tokens_flow(came_over, ref):
            return False  # 403: the token names another device
        if req.to.tag is None:
            return False  # a device's Route entry of ours serves its dialogs only: the peer refuses
        n = self._own_count(routes)
        target = self._next_target(routes[n:], req)
        if target is None:
            return False  # 403: not towards one of our nodes
        return self._stateless_to_node(req, target, came_over, "to_peer", routes[n:])

    def _expect_responses(self, req: Request, branch: str) -> None:
        """Remember, under the branch we give ``req``, its top Via (the previous hop's, as we send it
        on): a response that comes back with that very text under our branch needs neither a parse
        of it nor the branch's MAC (``forward_bytes``), which would both give what we know here."""
        text = req.header("via")
        if text is None or "," in text:
            return  # several values on the line: the response's next Via is not the whole line
        sent = self._sent
        if len(sent) >= _MEMO_MAX:
            del sent[next(iter(sent))]
        sent[branch] = (text, req.top_via)

    def _register_unanswered(self, flow_id: str) -> bool:
        answered = self.register_answered
        waiter = answered(flow_id) if answered is not None else None
        if waiter is None:
            return False
        waiter.addErrback(lambda _: None)
        waiter.cancel()  # only asked: the stateful path waits on its own
        return True

    def _send_stateless(self, req: Request, via: str, target: Target, flow: Flow | None,
                        came_over: Flow, branch: str) -> None:
        self._expect_responses(req, branch)
        req.add_header("Via", via, first=True)
        if req.method == "CANCEL":
            self.counters["cancelled"] += 1
        self.counters["stateless"] += 1
        try:
            self.transport.send_request(req, target, flow)
        except TransportError as exc:
            # what the stateful path's client transaction would have made of it: 503, or 430 for a
            # stream (RFC 5626 §5.3); an ACK gets no answer
            log.info("relayed {method} not sent: {err}", method=req.method, err=exc, call_id=log_call_id(req))
            if req.method != "ACK":
                req.remove_top_via()
                status, reason = (430, "Flow Failed") if target.transport in _STREAMS else (503, None)
                self.transport.send_response(make_response(req, status, reason, to_tag=new_tag()), came_over)
            return
        if logflags.debug_enabled:
            log.debug("relayed {method} statelessly to {host}:{port}", method=req.method, host=target.host,
                      port=target.port, call_id=log_call_id(req))

    # -- the router's hooks ----------------------------------------------------------------------

    def handle(self, req: Request, stx: Any, flow: Flow) -> bool:
        """True when the request was ours to relay or refuse; False: the router handles it."""
        if self._is_internal(flow):
            if req.method == "INVITE":
                self._remember_stateful_invite(req)
            if not self._trusts(flow):
                self._refuse(req, stx, 403, "Forbidden", "refused_untrusted", flow)
                return True
            if req.has_header("route"):
                routes = req.header_values("route")
                first = self._own_flow(routes[0])
                if first is not None:
                    out = req.copy()  # the server transaction keeps the request as it came (its Vias)
                    self._pop_own_routes(out, routes)
                    self._to_device(req, out, stx, *first)
                    return True
            # a REGISTER goes to the registrar whatever its To tag (sip/router.py): never in a dialog
            if (req.to.tag is None or req.method == "REGISTER") and req.method not in ("ACK", "CANCEL"):
                self._refuse(req, stx, 403, "Not A Relayed Request", "refused_not_relay", flow)
                return True
            return False  # a peer's in-dialog request for one of our own calls
        if not req.has_header("route"):
            target = self._sibling_of_uri(req, flow) if self.shares and _MARK_IN_URI in req.raw_uri else None
            if target is None:
                return False
            out = req.copy()
            if self._hop_count(req, out, stx):
                host, port = self.via_address
                self._stamp_via(out, target.transport, host, port)
                self.counters["to_sibling"] += 1
                self._forward(out, stx, target, None)
            return True
        routes = req.header_values("route")
        first = self._own_flow(routes[0])
        if first is None:
            return False
        out = req.copy()
        n = self._own_count(routes)
        self._set_routes(out, routes[n:])
        self._to_peer(req, out, stx, first[0], flow, routes[n:])
        return True

    def _remember_stateful_invite(self, req: Request) -> None:
        branch = req.branch
        if branch is not None:
            held = self._stateful_invites
            if len(held) >= _MEMO_MAX:
                del held[next(iter(held))]
            held[branch] = None

    def wrap_cancel(self, cancel_handler: Callable[[Request, Any, Any, Any], None] | None
                    ) -> Callable[[Request, Any, Any, Any], None]:
        """The router's CANCEL hook: a CANCEL for an INVITE we relay is ours, others go on."""

        def on_cancel(cancel: Request, invite_stx: Any, flow: Any, stx: Any) -> None:
            ctx = self._pending.get(invite_stx) if invite_stx is not None else None
            if ctx is None:
                if cancel_handler is not None:
                    cancel_handler(cancel, invite_stx, flow, stx)
                elif stx is not None:
                    stx.respond(make_response(cancel, 481, to_tag=new_tag()))
                return
            stx.respond(make_response(cancel, 200, to_tag=new_tag()))
            ctx.cancel()  # the INVITE's 487 comes back from the device and is relayed as usual
            self.counters["cancelled"] += 1

        return on_cancel

    def stats(self) -> dict[str, int]:
        return {"pending_invites": len(self._pending), **self.counters}

    def limit_hits(self) -> dict[str, int]:
        """The requests refused at the trust boundary (/metrics libon_tsilo_limit_hits_total)."""
        return {f"cluster_{name}": self.counters[name] for name in _REFUSALS}

    # -- the two directions --------------------------------------------------------------------

    def _to_device(self, req: Request, out: Request, stx: Any, ref: FlowRef, token: str) -> None:
        """``req`` as received (its server transaction answers with its Vias), ``out`` what we send."""
        if not self._hop_count(req, out, stx):
            return
        flow = self.transport.flows.get(ref.flow_id)
        if flow is not None and not flow.live:
            flow = None
        if flow is None and ref.transport in _STREAMS:
            # RFC 5626 §5.3: the flow is gone; the forking node tries the device's next one
            self._refuse(req, stx, 430, "Flow Failed", "flow_failed", None)
            return
        if out.method == "INVITE" and out.to.tag is None:
            # RFC 5658: the device (UAS) routes by the top entry, the peer (UAC) by the bottom one
            self._record_route(out, ref, token)
        host, port = self.transport.local_via(ref.transport, ref.host)
        self._stamp_via(out, ref.transport, host, port, self._device_mark(ref.transport))
        target = Target(ref.transport, ref.host, ref.port)
        self.counters["to_device"] += 1
        if out.method == "INVITE" and self._held_for_register(out, stx, target, flow, ref.flow_id):
            return
        self._forward(out, stx, target, flow)

    def _to_peer(self, req: Request, out: Request, stx: Any, ref: FlowRef, flow: Flow,
                 rest: list[str]) -> None:
        # only the device the token names may use it, and only towards one of our nodes
        if not _on_tokens_flow(flow, ref):
            self._refuse(req, stx, 403, "Forbidden", "refused_wrong_flow", flow)
            return
        target = self._next_target(rest, out)
        if target is None:
            self._refuse(req, stx, 403, "Not A Cluster Node", "refused_not_peer", flow)
            return
        if not self._hop_count(req, out, stx):
            return
        host, port = self.via_address
        self._stamp_via(out, target.transport, host, port)
        self.counters["to_peer"] += 1
        self._forward(out, stx, target, None)

    def _held_for_register(self, out: Request, stx: Any, target: Target, flow: Flow | None,
                           flow_id: str) -> bool:
        """A new INVITE for a flow whose REGISTER is not answered yet waits for the answer
        (cluster/ordering.py); meanwhile a CANCEL finds it in ``_pending`` and drops it."""
        answered = self.register_answered
        if answered is None or out.to.tag is not None:
            return False

        def send() -> None:
            self._pending.pop(stx, None)
            self._forward(out, stx, target, flow)

        def drop() -> None:
            self._pending.pop(stx, None)
            stx.respond(make_response(stx.request, 487, "Request Terminated", to_tag=new_tag()))

        held = hold_until_answered(self.clock, answered, flow_id, send, drop)
        if held is None:
            return False
        self._pending[stx] = held
        self.counters["held_for_register"] += 1
        return True

    # -- helpers -----------------------------------------------------------------------------

    def _record_route(self, req: Request, ref: FlowRef, token: str) -> None:
        """Our two Record-Route entries (RFC 5658 double Record-Route: the device routes by the top
        one, our public address, the peer by the bottom one, our internal address), remembered as
        ours: the dialog's ACK, BYE and re-INVITEs name them in their Route, both ways."""
        tails = self._rr_tails.get(ref.transport)
        if tails is None:  # what follows the token in each entry: the same for every call
            tails = self._rr_tails[ref.transport] = (
                self.node.uri_tail() + ">", self.node.public_uri_tail(ref.transport) + ">")
        internal = "<sip:" + token + tails[0]  # node.uri(token)
        public = "<sip:" + token + tails[1]  # node.public_uri(token, ref.transport)
        req.add_header("Record-Route", internal, first=True)
        req.add_header("Record-Route", public, first=True)
        own = self._own
        if len(own) >= _MEMO_MAX - 1:
            own.clear()
        own[internal] = own[public] = (ref, token)

    def _pop_own_routes(self, req: Request, routes: list[str]) -> None:
        """Remove the leading Route entries that are ours (valid tokens); ``routes`` are ``req``'s,
        the top one known to be ours already (checked once, not twice)."""
        self._set_routes(req, routes[self._own_count(routes):])

    def _own_count(self, routes: list[str]) -> int:
        """How many leading entries of ``routes`` are ours (the first one is, checked already). An
        entry whose user part is the first one's, spelled the same, carries the same token (the two
        Record-Route entries of a dialog, RFC 5658, do): ours, without reading the token again."""
        first = routes[0]
        at = first.find("@")
        same = first[:at + 1] if at > 0 and first.startswith("<sip:") else None
        n = 1
        for route in routes[1:]:
            if route != first and (same is None or not route.startswith(same)) \
                    and self._own_flow(route) is None:
                break
            n += 1
        return n

    @staticmethod
    def _set_routes(req: Request, rest: list[str]) -> None:
        req.remove_header("route")
        for route in rest:
            req.add_header("Route", route)

    def _next_target(self, routes: list[str], req: Request) -> Target | None:
        """Where a device's request goes once our entries are off ``routes``: a node of ours only."""
        try:
            uri = NameAddr.parse(routes[0]).uri if routes else req.uri
        except ParseError:
            return None
        if not isinstance(uri, URI) or uri.scheme != "sip":
            return None
        transport = (uri.transport or "udp").lower()
        port = uri.port or 5060
        # a node's internal address, not just any port of a trusted host (Redis on loopback)
        if transport not in ("udp", "tcp") or not self.node.is_node(transport, uri.host_bare, port):
            return None
        internal = self._internal
        return Target(transport, uri.host_bare, port, None,
                      (internal[1], internal[2]) if internal is not None else self.node.bound)

    def _hop_count(self, req: Request, out: Request, stx: Any) -> bool:
        mf = req.max_forwards
        if mf is None:
            mf = 70
        if mf <= 0:
            self._refuse(req, stx, 483, "Too Many Hops", "too_many_hops", None)
            return False
        out.set_header("Max-Forwards", str(mf - 1))
        return True

    @staticmethod
    def _stamp_via(req: Request, transport: str, host: str, port: int, mark: str = "") -> None:
        via = f"SIP/2.0/{transport.upper()} {host}:{port};branch={new_branch()};rport{mark}"
        req.add_header("Via", via, first=True)

    def _forward(self, req: Request, stx: Any, target: Target, flow: Flow | None) -> None:
        if req.method == "ACK":  # for a 2xx: end to end, no transaction (RFC 3261 §16.7 step 10)
            try:
                self.transport.send_request(req, target, flow)
            except TransportError as exc:
                log.info("relayed ACK not sent: {err}", err=exc, call_id=log_call_id(req))
            return
        sent: list[Any] = []  # the client transaction, for its callback (which never runs synchronously)
        ctx = self.layer.send_request(req, target, flow, lambda resp: self._response(stx, sent[0], resp))
        sent.append(ctx)
        if req.method == "INVITE":
            self._pending[stx] = ctx
        if logflags.debug_enabled:
            log.debug("relayed {method} to {host}:{port}", method=req.method, host=target.host,
                      port=target.port, call_id=log_call_id(req))

    def _response(self, stx: Any, ctx: Any, resp: Response) -> None:
        status = resp.status
        if status == 100:
            return  # hop by hop: our server transaction sent its own
        if status >= 200:
            self._pending.pop(stx, None)
        if ctx.failed_locally:
            # our own 408/503 (timeout, transport error): not a response to relay as the far end's;
            # a stream that could not carry the request is a failed flow (RFC 5626 §5.3)
            if status == 503 and ctx.target.transport in _STREAMS:
                self._refuse(stx.request, stx, 430, "Flow Failed", "flow_failed", None)
            else:
                stx.respond(make_response(stx.request, status, resp.reason, to_tag=new_tag()))
            return
        resp.remove_top_via()
        stx.respond(resp)

    def _refuse(
        self, req: Request, stx: Any, status: int, reason: str, counter: str, flow: Flow | None
    ) -> None:
        self._throttled(counter).emit(log.info, "relay: {sip_method} refused with {status} {reason}{source}",
                      sip_method=req.method, status=status, reason=reason,
                      source=f" from {flow.key.remote[0]}" if flow else "", call_id=log_call_id(req))
        if stx is not None:  # an ACK gets no answer
            stx.respond(make_response(req, status, reason, to_tag=new_tag()))


    def _throttled(self, counter: str) -> ThrottledLog:
        """Count a refusal; its log, once per 10 s per kind: a stranger must not fill the log."""
        self.counters[counter] += 1
        throttle = self._logs.get(counter)
        if throttle is None:
            throttle = self._logs[counter] = ThrottledLog(self.clock)
        return throttle
