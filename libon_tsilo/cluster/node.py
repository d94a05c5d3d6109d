"""This node's place in a cluster: its internal listener, its Path entries, and where a Path leads.

RFC 3327 Path with RFC 5626 flow tokens (issue 14): a device's TCP/TLS connection ends on one node,
and only that node can reach it. So the node that accepts a REGISTER records itself as the binding's
first Path entry, ``<sip:TOKEN@INTERNAL-HOST:PORT;transport=T;lr>`` (``;ob`` for an outbound
binding), where INTERNAL is ``[cluster] node_address`` and TOKEN names the flow (flow_token.py). Any
node that forks a call to the binding reads that entry: its own entry means "fork locally, over the
flow" (no hop), another node's means "send the INVITE there, with the Path as Route set"
(:meth:`ClusterNode.next_hop`); the other node relays it (relay.py).

Trust: the internal listener accepts requests only from ``[cluster] trusted_peers`` and the peers'
hosts (:meth:`trusts`); requests between nodes never come in on the public listeners.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from libon_tsilo.cluster.flow_token import FlowRef, FlowTokens
from libon_tsilo.cluster.liveness import PeerLiveness, member
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import NameAddr
from libon_tsilo.sip.limits import SourceFilter
from libon_tsilo.sip.listen import ListenSpec, format_hostport, is_ip_literal, parse_listen_spec, same_ip
from libon_tsilo.sip.uri import URI

if TYPE_CHECKING:
    from libon_tsilo.sip.flow import Flow
    from libon_tsilo.sip.transport import TransportLayer

__all__ = ["ClusterNode", "NodeHop"]

# where a forked INVITE goes to reach another node: (transport, host, port, and our internal
# listener's (host, port) as bound, to send from)
NodeHop = tuple[str, str, int, tuple[str, int]]
# own_flow()'s memo: a few calls' worth of distinct entries per flow, the flows of a busy node
_OWN_ROUTES_MAX = 4096


class ClusterNode:
    """The internal address of this node and the Path entries naming it (see the module doc)."""

    def __init__(
        self,
        transport: TransportLayer,
        node_address: str,
        secret: bytes,
        trusted_peers: list[str] | tuple[str, ...] = ("127.0.0.0/8", "::1/128"),
        peers: list[str] | tuple[str, ...] = (),
        udp_via_path: bool = True,
    ) -> None:
        self.transport = transport
        self.spec: ListenSpec = parse_listen_spec(node_address)
        self.secret = secret
        self.udp_via_path = udp_via_path
        hosts = [parse_listen_spec(p).host for p in peers]
        peer_nets = [f"{h}/{128 if ':' in h else 32}" for h in hosts if is_ip_literal(h)]
        self.trusted = SourceFilter([*trusted_peers, *peer_nets])
        specs = [parse_listen_spec(p) for p in peers]
        self._peer_members = frozenset(member(s.transport, s.host, s.port) for s in specs)
        self._tokens: FlowTokens | None = None
        self._bound: tuple[str, int] | None = None
        self._member: str | None = None  # member(), once bound
        # Route/Path entry text -> what own_flow() read from it, for the entries that are ours
        self._own_routes: dict[str, tuple[FlowRef, str]] = {}
        # Path entry text -> did the node it names mint its token (with a secret shared by the nodes)
        self._minted: dict[str, bool] = {}
        # which peers are alive (liveness.py; set by ops with the Redis store), None: all of them
        self.liveness: PeerLiveness | None = None

    # -- the internal listener (known once the transport listens: its port may be OS-picked) ----

    @property
    def bound(self) -> tuple[str, int]:
        """(host, port) the internal listener is bound to (ops lists it last in the transport's specs,
        and the transport binds in spec order: the last entry with our spec is ours)."""
        if self._bound is None:
            specs = self.transport.specs
            try:
                index = len(specs) - 1 - specs[::-1].index(self.spec)
                _, host, port = self.transport.bound[index]
            except (ValueError, IndexError):
                raise RuntimeError(f"the internal listener {self.spec} is not listening") from None
            self._bound = (host, port)
        return self._bound

    @property
    def via_address(self) -> tuple[str, int]:
        """Our internal (host, port) as written in a Via, Contact or URI (IPv6 bracketed)."""
        host, port = self.bound
        return (f"[{host}]" if ":" in host else host, port)

    @property
    def address_text(self) -> str:
        host, port = self.bound
        return f"{self.spec.transport}:{format_hostport(host, port)}"

    @property
    def tokens(self) -> FlowTokens:
        if self._tokens is None:
            self._tokens = FlowTokens(self.secret, self.address_text)
        return self._tokens

    def is_internal(self, flow: Flow) -> bool:
        """Did this message come in on the internal listener?"""
        key = flow.key
        host, port = self.bound
        return key.transport == self.spec.transport and key.local[1] == port and same_ip(key.local[0], host)

    def exempt_from_overload(self, local: tuple[str, int], remote: tuple[str, int]) -> bool:
        """A trusted peer's request on our internal listener: the peer admitted the call already
        (sip/overload.py's ``exempt``). Any transport: the internal listener has one port."""
        host, port = self.bound
        return local[1] == port and same_ip(local[0], host) and remote[0] in self.trusted

    def trusts(self, flow: Flow) -> bool:
        return flow.key.remote[0] in self.trusted

    def member(self) -> str:
        """This node's name among the live nodes (liveness.py): its internal address."""
        host, port = self.bound
        return member(self.spec.transport, host, port)

    def peer_alive(self, transport: str, host: str, port: int, since: float | None = None) -> bool:
        """Is the node whose internal address this is alive (the call layer's ``peer_alive``)?
        ``since``: when it took the binding asked about (liveness.py: proof of life)."""
        return self.liveness is None or self.liveness.alive(member(transport, host, port), since)

    def is_node(self, transport: str, host: str, port: int) -> bool:
        """Is this internal address a node of the cluster: ours, a configured peer, or one our
        liveness view ever held (dead ones too)? A host in ``trusted_peers`` is not enough: the port
        may be any service on it (Redis on loopback), and a device's Path or in-dialog request names
        it. Only a cluster that cannot know its nodes (no ``peers``, no shared store to beat in)
        lets the host decide; with a liveness view to come, an unknown node is not one until it is
        seen (before our first beat is answered: a few ms after start, or all along while Redis is
        unreachable since start, when ``peers`` closes the gap)."""
        name = member(transport, host, port)
        if self._member is None:
            self._member = self.member()
        if name in self._peer_members or name == self._member:
            return True
        liveness = self.liveness
        if liveness is not None and name in liveness.known:
            return True
        if self._peer_members or liveness is not None:
            return False
        return host in self.trusted

    def is_self(self, uri: URI) -> bool:
        host, port = self.bound
        return (uri.port or 5060) == port and same_ip(uri.host_bare, host) \
            and (uri.transport or "udp") == self.spec.transport

    # -- Path entries -------------------------------------------------------------------------------

    def path_entry(self, flow: Flow, outbound: bool) -> str | None:
        """Our Path entry for a binding registered over ``flow`` (the registrar's ``path_stamp``);
        None for a UDP flow when any node may reach UDP devices itself (``udp_via_path`` off)."""
        if not self.udp_via_path and flow.key.transport == "udp":
            return None
        remote_host, remote_port = flow.key.remote
        token = self.tokens.mint(FlowRef(flow.id, flow.key.transport, remote_host, remote_port))
        return f"<{self.uri(token)}{';ob' if outbound else ''}>"

    def uri(self, token: str) -> str:
        """Our internal SIP URI carrying ``token``: a Path and Record-Route entry towards peers."""
        host, port = self.via_address
        return f"sip:{token}@{host}:{port};transport={self.spec.transport};lr"

    def public_uri(self, token: str, transport: str) -> str:
        """Our public SIP URI carrying ``token``, for the Record-Route a device sees."""
        host, port = self.transport.local_via(transport)
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"sip:{token}@{host}:{port}{suffix};lr"

    def own_flow(self, route: str) -> tuple[FlowRef, str] | None:
        """The flow a Route/Path entry of ours names, and its token; None when the entry is not ours."""
        known = self._own_routes.get(route)
        if known is not None:
            return known
        try:
            uri = NameAddr.parse(route).uri
        except ParseError:
            return None
        user = getattr(uri, "user", None)
        ref = self.tokens.read(user) if user else None
        if ref is None or not user:
            return None
        # A relayed call reads the same entries ~5 times (INVITE, ACK, BYE; two Route entries each):
        # remember the entries that checked (only ours: a stranger's cannot fill this), bounded.
        if len(self._own_routes) >= _OWN_ROUTES_MAX:
            self._own_routes.clear()
        found = self._own_routes[route] = (ref, user)
        return found

    def next_hop(self, path: list[str]) -> tuple[list[str], NodeHop | None] | None:
        """Where a call to a binding with this Path goes (the call layer's ``path_router``).

        None: the Path does not start at a cluster node (an edge proxy's: as a single node does).
        ``(rest, None)``: it starts with our own entry: fork over the flow, with the rest as Route.
        ``(path, hop)``: send to the node of its first entry, with the whole Path as Route.
        """
        try:
            uri = NameAddr.parse(path[0]).uri
        except (ParseError, IndexError):
            return None
        if not isinstance(uri, URI) or uri.scheme != "sip" or not uri.user or "lr" not in uri.params:
            return None
        if self.is_self(uri):  # ours, even with a token from before a restart: the flow is here
            return path[1:], None
        transport = uri.transport or "udp"
        port = uri.port or 5060
        if transport not in ("udp", "tcp") or uri.host_bare not in self.trusted:
            return None  # not a node of ours: an edge proxy's Path
        # With udp_via_path every binding's Path starts with its node's entry. Without it a UDP
        # binding's starts with the REGISTER's own Path, which may name any port of a trusted host
        # (Redis on loopback): we call only a node from our internal address. (Not always: a node
        # that joined since our last beat is unknown for up to a beat, and calls would miss it.)
        if not self.udp_via_path and not (self.is_node(transport, uri.host_bare, port)
                                          or self._minted_by_node(path[0], uri, transport, port)):
            return None
        return (path, (transport, uri.host_bare, port, self.bound))

    def _minted_by_node(self, entry: str, uri: URI, transport: str, port: int) -> bool:
        """Is ``entry``'s token one the node it names minted with our secret (the nodes share
        ``[cluster] secret``)? It proves a node we never saw beat (one that died before we started)."""
        known = self._minted.get(entry)
        if known is None:
            tokens = FlowTokens(self.secret, member(transport, uri.host_bare, port))
            known = tokens.read(uri.user) is not None
            if len(self._minted) >= _OWN_ROUTES_MAX:
                self._minted.clear()
            self._minted[entry] = known
        return known
