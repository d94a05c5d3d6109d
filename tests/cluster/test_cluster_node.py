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
