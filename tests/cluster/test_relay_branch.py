"""cluster/relay_branch.py: the stateless relay's Via branches (RFC 3261 §16.11)."""

from __future__ import annotations

from libon_tsilo.cluster.relay_branch import PREFIX, RelayBranches
from libon_tsilo.sip.headers import Via

PEER = "SIP/2.0/UDP 10.0.0.1:5071;branch=z9hG4bK-a1;rport=5071;received=10.0.0.1"


def test_a_retransmission_cancel_and_non_2xx_ack_get_the_same_branch_others_another():
    ours = RelayBranches(b"secret", "udp:10.0.0.2:5071")
    first = ours.for_request(Via.parse(PEER))
    assert first is not None and first.startswith(PREFIX) and first[7:9] == "sl"
    assert ours.for_request(Via.parse(PEER)) == first  # same Via: a retransmission, CANCEL or ACK
    assert ours.for_request(Via.parse(PEER.replace("-a1", "-a2"))) != first  # another transaction
    other_node = RelayBranches(b"secret", "udp:10.0.0.3:5071")
    assert other_node.for_request(Via.parse(PEER)) != first
    assert ours.for_request(Via.parse("SIP/2.0/UDP 10.0.0.1:5071;branch=1234")) is None  # RFC 2543
    assert ours.for_request(Via.parse("SIP/2.0/UDP 10.0.0.1:5071;branch=z9hG4bK")) is None


def test_only_the_next_via_the_branch_was_made_for_verifies():
    ours = RelayBranches(b"secret", "udp:10.0.0.2:5071")
    branch = ours.for_request(Via.parse(PEER))
    assert branch is not None
    # a UA may write the Via's parameters in another order: the fields count, not the text
    assert ours.verify(branch, Via.parse("SIP/2.0/UDP 10.0.0.1:5071;received=10.0.0.1;rport=5071;branch=z9hG4bK-a1"))
    for forged in (PEER.replace("rport=5071", "rport=9"), PEER.replace("received=10.0.0.1", "received=192.0.2.1"),
                   PEER + ";maddr=192.0.2.1", PEER.replace("UDP", "TCP"), PEER.replace("-a1", "-a9"),
                   "SIP/2.0/UDP 10.0.0.1:5071;rport=5071;received=10.0.0.1"):
        assert not ours.verify(branch, Via.parse(forged)), forged
    assert not RelayBranches(b"other", "udp:10.0.0.2:5071").verify(branch, Via.parse(PEER))


def test_the_branch_is_the_keyed_blake2b_of_the_received_branch_and_the_routing_fields():
    # a node that restarts (or is upgraded) with the same secret and address must check the
    # branches it gave before: the hash is pinned, whatever way it is computed
    import hashlib

    key = hashlib.blake2b(b"secret\0udp:10.0.0.2:5071", digest_size=32).digest()
    data = "\0".join(("z9hG4bK-a1", "UDP", "10.0.0.1", "5071", "10.0.0.1", "5071", "")).encode()
    expected = PREFIX + hashlib.blake2b(data, key=key, digest_size=12).hexdigest()
    ours = RelayBranches(b"secret", "udp:10.0.0.2:5071")
    assert ours.for_request(Via.parse(PEER)) == expected
    assert ours.for_request(Via.parse(PEER)) == expected  # the keyed state is not used up by a MAC
