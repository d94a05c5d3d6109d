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

**Workers sharing one public UDP socket** (``udp_via_path = "auto"``, :meth:`next_hop`): a UDP
device's NAT knows one (public address, port) of ours; the workers of a host bound to that same
address and port with SO_REUSEPORT all send from it, so any of them reaches the device straight,
without the relay. The REGISTER's node writes in its Path entry which socket it came in on
(``;sock=``: a hash of ``[cluster] host``, the socket's bound address and port; only for sockets
bound with SO_REUSEPORT), and a node whose own sending socket has the same hash forks to the
device itself. Another host, even bound to 0.0.0.0 as well, has another ``host``: relayed. The
kernel hands every datagram of the device's 5-tuple to one worker, the one that took its REGISTER,
not to the worker that sent: so each worker marks its Via and Contact (``;nd=``: its internal
address), and the worker that gets a datagram marked for another passes it there (relay.py).
Trust: the hash comes from Redis (a node wrote it), and matching it only sends to the binding's
own received address, as a single node would; a mark only ever leads to a node (:meth:`sibling`).
The forking worker also pins the device once it sends it a branch (:meth:`branch_sent`,
sip/udp_pins.py: a socket connected to it on the shared port), so that the kernel hands it the
device's datagrams and nothing needs passing on; the marks stay as the fallback.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from libon_tsilo.cluster.flow_token import FlowRef, FlowTokens
from libon_tsilo.cluster.liveness import PeerLiveness, member
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import NameAddr
from libon_tsilo.sip.limits import SourceFilter
from libon_tsilo.sip.listen import (
    ListenSpec, format_hostport, is_ip_literal, is_ipv6, parse_listen_spec, same_ip,
)
from libon_tsilo.sip.transport import Target
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
HostPort = tuple[str, int]
SOCK_PARAM = "sock"  # the Path entry's parameter naming the public UDP socket a REGISTER came in on
MARK_PARAM = "nd"  # the Via and Contact parameter naming the node that sent (its internal address)


class ClusterNode:
    """The internal address of this node and the Path entries naming it (see the module doc)."""

    def __init__(
        self,
        transport: TransportLayer,
        node_address: str,
        secret: bytes,
        trusted_peers: list[str] | tuple[str, ...] = ("127.0.0.0/8", "::1/128"),
        peers: list[str] | tuple[str, ...] = (),
        udp_via_path: bool | str = "auto",
        host: str = "",
    ) -> None:
        self.transport = transport
        self.spec: ListenSpec = parse_listen_spec(node_address)
        self.secret = secret
        self.udp_via_path = udp_via_path
        self.auto = udp_via_path == "auto"
        self.host_id = host or socket.gethostname()  # [cluster] host: tells one host's 0.0.0.0 from another's
        # our public UDP sockets bound with SO_REUSEPORT -> their hash; the hashes we send from
        self._shared: dict[tuple[str, int], str] | None = None
        self._direct: frozenset[str] = frozenset()
        self._mark: str | None = None
        self.own_mark = ""  # the value of our own ``nd`` (set with ``mark``): never a sibling
        # a mark -> the node it names, as ``sibling`` resolved it (the relay reads it first: a dict
        # look-up in compiled code, where ``sibling`` is an interpreted call per response)
        self.siblings: dict[str, Target] = {}
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
        # (flow id, device address, outbound, ;sock=) -> our Path entry: a device refreshing its
        # binding over the same flow gets the same entry, without a new HMAC (~20k instructions)
        self._entries: dict[tuple[str, str, int, bool, str | None], str] = {}
        # Path entry text -> did the node it names mint its token (with a secret shared by the nodes)
        self._minted: dict[str, bool] = {}
        # which peers are alive (liveness.py; set by ops with the Redis store), None: all of them
        self.liveness: PeerLiveness | None = None
        # (our shared socket's local address, a device's address) -> pinned? (the transport's
        # ``pin_udp``, set by ops when [cluster] max_udp_pins > 0); None: no pins
        self.pin: Callable[[HostPort, HostPort], bool] | None = None
        # a sibling's Path entry -> (our shared socket, the device's address) to pin, or None
        # (next_hop fills it, branch_sent reads it)
        self._pin_targets: dict[str, tuple[HostPort, HostPort] | None] = {}

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
        key = flow.key
        sock = None
        if key.transport == "udp":
            if self.udp_via_path is False:
                return None
            if self.auto:
                sock = self.shared_sockets().get(key.local)
        remote_host, remote_port = key.remote
        cache = (flow.id, remote_host, remote_port, outbound, sock)
        entry = self._entries.get(cache)
        if entry is not None and entry in self._own_routes:
            return entry
        ref = FlowRef(flow.id, key.transport, remote_host, remote_port)
        token = self.tokens.mint(ref)
        entry = f"<{self.uri(token)}{';ob' if outbound else ''}{f';{SOCK_PARAM}={sock}' if sock else ''}>"
        self.remember_own(entry, ref, token)  # a forked INVITE's Route names it: no HMAC to check it
        if len(self._entries) >= _OWN_ROUTES_MAX:
            self._entries.clear()
        self._entries[cache] = entry
        return entry

    def remember_own(self, entry: str, ref: FlowRef, token: str) -> None:
        """``entry`` is ours, naming ``ref``: we wrote it (a Path or Record-Route entry), so
        ``own_flow`` need not read its token back."""
        if len(self._own_routes) >= _OWN_ROUTES_MAX:
            self._own_routes.clear()
        self._own_routes[entry] = (ref, token)

    # -- workers sharing one public UDP socket (udp_via_path = "auto"; see the module doc) ---------

    def socket_id(self, host: str, port: int) -> str:
        """The hash naming our public UDP socket bound to (host, port), as written in a Path entry."""
        text = f"{self.host_id}\0udp\0{host}\0{port}".encode()
        return hashlib.blake2b(text, digest_size=8).hexdigest()

    def shared_sockets(self) -> dict[tuple[str, int], str]:
        """Our public UDP listeners bound with SO_REUSEPORT (other workers may share them) -> their
        hash; known once the transport listens."""
        if self._shared is None:
            transport = self.transport
            reuse = getattr(transport, "reuse_port", ())
            shared: dict[tuple[str, int], str] = {}
            first: dict[bool, tuple[str, int]] = {}  # the listener a datagram to a v4/v6 address leaves by
            for spec, (name, host, port) in zip(transport.specs, transport.bound):
                if name != "udp":
                    continue
                first.setdefault(is_ipv6(host), (host, port))
                if spec in reuse and spec != self.spec:
                    shared[(host, port)] = self.socket_id(host, port)
            self._shared = shared
            self._direct = frozenset(shared[a] for a in first.values() if a in shared)
        return self._shared

    def direct_ids(self) -> frozenset[str]:
        """The hashes of the shared sockets this node sends UDP from (the first of each family)."""
        self.shared_sockets()
        return self._direct

    @property
    def mark(self) -> str:
        """``;nd=...`` for our Via and Contact when we send from a shared socket; "" otherwise."""
        if self._mark is None:
            self._mark = ""
            if self.auto and self.shared_sockets():
                self.own_mark = self._member_name()
                self._mark = f";{MARK_PARAM}={self.own_mark}"
        return self._mark

    def _member_name(self) -> str:
        """Our ``nd`` value: our internal address (``member()``), base64url without padding."""
        return base64.urlsafe_b64encode(self.member().encode()).rstrip(b"=").decode()

    def sibling(self, mark: str) -> Target | None:
        """The node a Via's or Contact's ``nd`` names, to pass it a datagram of its dialog that the
        kernel gave us; None: us, or not a node of the cluster (never just any address)."""
        found = self.siblings.get(mark)
        if found is not None:
            return found
        if not self.own_mark:
            self.own_mark = self._member_name()
        if mark == self.own_mark:
            return None
        try:
            raw = base64.urlsafe_b64decode(mark + "=" * (-len(mark) % 4)).decode()
            transport, hostport = raw.split(":", 1)
            host, _, port_text = hostport.rpartition(":")
            port = int(port_text)
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return None
        host = host.strip("[]")
        if raw == self.member() or transport not in ("udp", "tcp") or not self.is_node(transport, host, port):
            return None
        # only nodes are remembered: a stranger's marks cannot fill this
        if len(self.siblings) >= _OWN_ROUTES_MAX:
            self.siblings.clear()
        found = self.siblings[mark] = Target(transport, host, port, None, self.bound)
        return found

    def uri(self, token: str) -> str:
        """Our internal SIP URI carrying ``token``: a Path and Record-Route entry towards peers."""
        return f"sip:{token}{self.uri_tail()}"

    def uri_tail(self) -> str:
        """What follows the token in :meth:`uri` (the same for every token: the relay keeps it)."""
        host, port = self.via_address
        return f"@{host}:{port};transport={self.spec.transport};lr"

    def public_uri(self, token: str, transport: str) -> str:
        """Our public SIP URI carrying ``token``, for the Record-Route a device sees."""
        return f"sip:{token}{self.public_uri_tail(transport)}"

    def public_uri_tail(self, transport: str) -> str:
        """What follows the token in :meth:`public_uri` for ``transport``."""
        host, port = self.transport.local_via(transport)
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"@{host}:{port}{suffix};lr"

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
        ``(rest, None)``: it starts with our own entry, or (``udp_via_path = "auto"``) with the entry
        of a worker sharing the public socket we send from: fork straight to the device, with the
        rest as Route. ``(path, hop)``: send to the node of its first entry, the whole Path as Route.
        """
        return self._next_hop(path, self.auto)

    def next_hop_relayed(self, path: list[str]) -> tuple[list[str], NodeHop | None] | None:
        """``next_hop`` without the shared-socket shortcut, for a sender that does not mark its Via
        (a MESSAGE to a device, messaging/uac.py): the answer must come back to this node."""
        return self._next_hop(path, False)

    def _next_hop(self, path: list[str], shortcut: bool) -> tuple[list[str], NodeHop | None] | None:
        try:
            uri = NameAddr.parse(path[0]).uri
        except (ParseError, IndexError):
            return None
        if not isinstance(uri, URI) or uri.scheme != "sip" or not uri.user or "lr" not in uri.params:
            return None
        if self.is_self(uri):  # ours, even with a token from before a restart: the flow is here
            return path[1:], None
        if shortcut:
            sock = uri.params.get(SOCK_PARAM)
            if sock and sock in self.direct_ids():
                # a worker sharing our public socket took it: the device's NAT knows us as well
                if self.pin is not None:
                    self._pin_target_of(path[0], uri, sock)
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

    def branch_sent(self, path: list[str]) -> None:
        """A branch goes to a binding with this Path, as :meth:`next_hop` routed it (the call
        layer's ``path_sent``): when we fork straight to a UDP device a sibling took, pin it
        (sip/udp_pins.py), so that the kernel gives its answers to us rather than to that sibling,
        which would pass them on. Only here, not in ``next_hop``: the call layer routes every
        candidate binding, and skips some (a duplicate, ``max_branches``, no address); a pin for
        a branch never sent would hold a descriptor and take the device's datagrams for nothing."""
        pinned = self.pin
        if pinned is None or not path:
            return
        found = self._pin_targets.get(path[0])  # filled by next_hop's shortcut, and only there
        if found is not None:
            pinned(found[0], found[1])

    def _pin_target_of(self, entry: str, uri: URI, sock: str) -> None:
        """Remember which device a sibling's entry names, for :meth:`branch_sent`. Its address is
        the one the sibling's flow token names (read without its MAC: the entry's ``;sock=``
        matched already, and a pin only decides which of our sockets reads that address's
        datagrams, each handled as the shared socket's; it grants the address nothing)."""
        targets = self._pin_targets
        if entry not in targets:
            if len(targets) >= _OWN_ROUTES_MAX:
                targets.clear()
            targets[entry] = self._pin_target(uri, sock)

    def _pin_target(self, uri: URI, sock: str) -> tuple[HostPort, HostPort] | None:
        ref = FlowTokens.peek(uri.user)
        local = next((a for a, h in self.shared_sockets().items() if h == sock), None)
        if ref is None or ref.transport != "udp" or local is None or not is_ip_literal(ref.host) \
                or not 0 < ref.port < 65536:
            return None
        return (local, (ref.host, ref.port))

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
