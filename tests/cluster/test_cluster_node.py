"""cluster/node.py: where a Path leads, seen from this node (ClusterNode.next_hop)."""

from __future__ import annotations

from libon_tsilo.cluster.flow_token import FlowRef
from libon_tsilo.cluster.node import ClusterNode
from libon_tsilo.sip.listen import parse_listen_spec


class _Transport:
    specs = [parse_listen_spec("udp:127.0.0.1:0"), parse_listen_spec("udp:10.0.0.1:0")]
    bound = [("udp", "127.0.0.1", 5060), ("udp", "10.0.0.1", 5070)]

    def local_via(self, transport: str, remote_host: str | None = None) -> tuple[str, int]:
        return ("127.0.0.1", 5060)


def _node(secret: bytes = b"k") -> ClusterNode:
    return ClusterNode(_Transport(), "udp:10.0.0.1:0", secret, trusted_peers=["10.0.0.0/24"])  # type: ignore[arg-type]


def test_own_entry_forks_here_with_the_rest_as_route_even_with_a_token_from_before_a_restart():
    node = _node()
    assert node.bound == ("10.0.0.1", 5070)  # the internal listener, not the public one on port 0 too
    stale = _node(b"old secret").uri(_node(b"old secret").tokens.mint(FlowRef("f", "udp", "192.0.2.1", 1)))
    edge = "<sip:edge.example.net;lr>"
    assert node.next_hop([f"<{stale}>", edge]) == ([edge], None)


def test_another_nodes_entry_is_the_next_hop_and_a_stranger_is_not_a_node():
    node = _node()
    path = ["<sip:TOKEN@10.0.0.2:5070;transport=tcp;lr;ob>"]
    assert node.next_hop(path) == (path, ("tcp", "10.0.0.2", 5070, ("10.0.0.1", 5070)))
    assert node.next_hop(["<sip:TOKEN@198.51.100.1:5070;lr>"]) is None  # not in trusted_peers
    assert node.next_hop(["<sip:10.0.0.2:5070;lr>"]) is None  # no token: an edge proxy's Path
    assert node.next_hop(["not a uri"]) is None


def test_path_entry_names_the_flow_and_udp_can_go_without():
    from tests.fakes.sip import FakeFlow

    node = _node()
    tcp = FakeFlow("tcp", ("192.0.2.7", 40000), id="tcp#7")
    entry = node.path_entry(tcp, outbound=True)
    assert entry is not None and entry.endswith("@10.0.0.1:5070;transport=udp;lr;ob>")
    ref, _ = node.own_flow(entry)
    assert (ref.flow_id, ref.transport, ref.host, ref.port) == ("tcp#7", "tcp", "192.0.2.7", 40000)
    direct = ClusterNode(_Transport(), "udp:10.0.0.1:0", b"k", udp_via_path=False)  # type: ignore[arg-type]
    assert direct.path_entry(FakeFlow("udp"), outbound=False) is None
    assert direct.path_entry(tcp, outbound=False) is not None  # a connection is only ever on its node


def test_own_flow_checks_an_entry_of_ours_once_and_never_remembers_a_strangers(monkeypatch):
    import libon_tsilo.cluster.node as node_module

    node = _node()
    entry = f"<{node.uri(node.tokens.mint(FlowRef('udp#1', 'udp', '192.0.2.9', 5062)))}>"
    forged = f"<{_node(b'other').uri(_node(b'other').tokens.mint(FlowRef('udp#1', 'udp', '192.0.2.9', 5062)))}>"
    reads = []
    real_read = node.tokens.read
    monkeypatch.setattr(node.tokens, "read", lambda token: reads.append(token) or real_read(token))
    first = node.own_flow(entry)
    assert first is not None and first[0].host == "192.0.2.9"
    assert node.own_flow(entry) == first  # the ACK and BYE of a relayed call read it again
    assert len(reads) == 1  # one HMAC check per entry, not one per message
    assert node.own_flow(forged) is None and node.own_flow(forged) is None
    assert len(reads) == 3  # a forged entry is checked every time: it never enters the memo
    monkeypatch.setattr(node_module, "_OWN_ROUTES_MAX", 2)
    for port in range(3):
        node.own_flow(f"<{node.uri(node.tokens.mint(FlowRef('f', 'udp', '192.0.2.9', port)))}>")
    assert len(node._own_routes) <= 2  # bounded


# -- udp_via_path = "auto": workers sharing one public UDP socket (SO_REUSEPORT) -------------------


class _Worker:
    """A worker's transport: the public UDP socket (shared with SO_REUSEPORT or not), a public TCP
    one, then the internal listener."""

    def __init__(self, public: str = "udp:0.0.0.0:5060", internal_port: int = 5071, shared: bool = True) -> None:
        spec = parse_listen_spec(public)
        self.specs = [spec, parse_listen_spec("tcp:0.0.0.0:5060"), parse_listen_spec("udp:10.0.0.1:0")]
        self.bound = [("udp", spec.host, spec.port), ("tcp", "0.0.0.0", 5060), ("udp", "10.0.0.1", internal_port)]
        self.reuse_port = frozenset(self.specs[:2]) if shared else frozenset()

    def local_via(self, transport: str, remote_host: str | None = None) -> tuple[str, int]:
        return ("192.0.2.10", 5060)


def _worker(host: str = "sip1", udp_via_path: bool | str = "auto", **transport) -> ClusterNode:
    internal = transport.pop("internal_port", 5071)
    return ClusterNode(_Worker(internal_port=internal, **transport), "udp:10.0.0.1:0", b"k",  # type: ignore[arg-type]
                       trusted_peers=["10.0.0.0/24"], udp_via_path=udp_via_path, host=host)


def _device_flow():
    from tests.fakes.sip import FakeFlow

    return FakeFlow("udp", ("198.51.100.7", 40000), id="udp-device", local=("0.0.0.0", 5060))


def test_auto_a_worker_sharing_the_public_socket_forks_straight_to_the_device():
    taker, forker = _worker(internal_port=5071), _worker(internal_port=5072)
    entry = taker.path_entry(_device_flow(), outbound=False)
    assert entry is not None and ";sock=" in entry  # the socket the REGISTER came in on
    assert forker.next_hop([entry, "<sip:edge.example.net;lr>"]) == (["<sip:edge.example.net;lr>"], None)
    # a sender that does not mark its Via (MESSAGE) still goes through the Path: its answer comes back
    assert forker.next_hop_relayed([entry])[1] == ("udp", "10.0.0.1", 5071, ("10.0.0.1", 5072))


def test_auto_another_host_on_0000_too_is_reached_through_the_path():
    entry = _worker(host="sip1").path_entry(_device_flow(), outbound=False)
    other_host = _worker(host="sip2", internal_port=5072)
    assert other_host.next_hop([entry])[1] == ("udp", "10.0.0.1", 5071, ("10.0.0.1", 5072))


def test_auto_another_address_or_port_or_a_socket_not_shared_is_reached_through_the_path():
    entry = _worker().path_entry(_device_flow(), outbound=False)
    for other in (_worker(public="udp:0.0.0.0:5080", internal_port=5072),
                  _worker(public="udp:192.0.2.10:5060", internal_port=5072)):
        assert other.next_hop([entry])[1] is not None
    # a socket bound without SO_REUSEPORT is nobody else's: no hash in the Path, relayed
    lone = _worker(shared=False).path_entry(_device_flow(), outbound=False)
    assert lone is not None and ";sock=" not in lone
    assert _worker(internal_port=5072).next_hop([lone])[1] is not None


def test_udp_via_path_true_and_false_keep_their_meaning():
    entry = _worker().path_entry(_device_flow(), outbound=False)
    assert _worker(udp_via_path=True, internal_port=5072).next_hop([entry])[1] is not None
    assert _worker(udp_via_path=True).path_entry(_device_flow(), outbound=False).find(";sock=") < 0
    assert _worker(udp_via_path=False).path_entry(_device_flow(), outbound=False) is None


def test_a_tcp_binding_is_always_relayed_and_a_mark_leads_only_to_a_node():
    from tests.fakes.sip import FakeFlow

    taker, forker = _worker(internal_port=5071), _worker(internal_port=5072)
    tcp = taker.path_entry(FakeFlow("tcp", ("198.51.100.7", 40000), id="tcp#1"), outbound=False)
    assert ";sock=" not in tcp and forker.next_hop([tcp])[1] is not None
    # the mark a worker writes in its Via and Contact names its internal listener
    assert taker.mark.startswith(";nd=") and _worker(shared=False).mark == ""
    mark = taker.mark[len(";nd="):]
    assert forker.sibling(mark) is not None and forker.sibling(mark).port == 5071  # a trusted host: a node
    assert taker.sibling(mark) is None  # ourselves
    import base64

    for where in ("udp:203.0.113.9:6379", "tls:10.0.0.2:5071"):  # not a trusted host, not a node transport
        assert forker.sibling(base64.urlsafe_b64encode(where.encode()).decode().rstrip("=")) is None
    assert forker.sibling("!!not base64") is None and forker.sibling("eA") is None


def test_auto_a_branch_sent_straight_pins_the_device_on_the_shared_socket_and_nothing_else_does():
    taker, forker = _worker(internal_port=5071), _worker(internal_port=5072)
    pinned: list[tuple[tuple[str, int], tuple[str, int]]] = []
    forker.pin = lambda local, remote: pinned.append((local, remote)) or True
    taker.pin = forker.pin
    entry = taker.path_entry(_device_flow(), outbound=False)
    forker.next_hop([entry])
    assert pinned == []  # routed only: a candidate the call may skip pins nothing
    forker.branch_sent([entry])
    forker.branch_sent([entry])  # a second branch: the transport reuses the live pin
    assert pinned == [(("0.0.0.0", 5060), ("198.51.100.7", 40000))] * 2
    # a device this worker took itself, another host's, a TCP device: no pin (a MESSAGE, routed
    # with next_hop_relayed, goes through the Path and never tells branch_sent)
    tcp = taker.path_entry(_device_flow_tcp(), outbound=False)
    other_host = _worker(host="sip2", internal_port=5073)
    other_host.pin = forker.pin
    for node in (taker, other_host):
        node.next_hop([entry])
        node.branch_sent([entry])
    forker.next_hop([tcp])
    forker.branch_sent([tcp])
    forker.branch_sent([])
    assert len(pinned) == 2
    # pinning off (ops leaves ``pin`` None at [cluster] max_udp_pins = 0): the fork is unchanged
    forker.pin = None
    assert forker.next_hop([entry]) == ([], None)
    forker.branch_sent([entry])


def test_a_malformed_token_in_a_siblings_entry_pins_nothing():
    forker = _worker(internal_port=5072)
    pinned: list[object] = []
    forker.pin = lambda local, remote: pinned.append(remote) or True
    sock = forker.shared_sockets()[("0.0.0.0", 5060)]
    for token in ("x", "!!", "A" * 600):
        entry = f"<sip:{token}@10.0.0.1:5071;transport=udp;lr;sock={sock}>"
        assert forker.next_hop([entry]) == ([], None)  # still straight: the pin is only a hint
        forker.branch_sent([entry])
    assert pinned == []


def _device_flow_tcp():
    from tests.fakes.sip import FakeFlow

    return FakeFlow("tcp", ("198.51.100.7", 40000), id="tcp-device", local=("0.0.0.0", 5060))


def test_a_device_refreshing_over_the_same_flow_gets_the_same_entry_without_a_new_token():
    from tests.fakes.sip import FakeFlow

    node = _node()
    minted: list[FlowRef] = []
    tokens = node.tokens
    real_mint = tokens.mint
    tokens.mint = lambda ref: minted.append(ref) or real_mint(ref)  # type: ignore[method-assign]
    flow = FakeFlow("udp", ("192.0.2.7", 40000), id="udp#7")
    first = node.path_entry(flow, outbound=False)
    assert node.path_entry(flow, outbound=False) == first and len(minted) == 1
    assert node.path_entry(flow, outbound=True) != first and len(minted) == 2  # ;ob: another entry
    other = FakeFlow("udp", ("192.0.2.7", 40001), id="udp#8")
    assert node.path_entry(other, outbound=False) != first and len(minted) == 3
    node._own_routes.clear()  # its memo of our entries was cleared (bounded): minted again, remembered
    assert node.path_entry(flow, outbound=False) == first and len(minted) == 4
    assert node.own_flow(first)[0].flow_id == "udp#7"
