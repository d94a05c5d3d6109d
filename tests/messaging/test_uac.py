"""The MESSAGE we send to a device (messaging/uac.py), through the real transaction layer."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from libon_tsilo.messaging.store import StoredMessage
from libon_tsilo.messaging.uac import TransactionSender, build_message
from libon_tsilo.sip.message import Request, Response, make_response, parse_message
from libon_tsilo.sip.transaction import TransactionLayer
from tests.messaging.helpers import phone


def stored(**kw: Any) -> StoredMessage:
    base: dict[str, Any] = dict(
        id="m1", aor="sip:bob@example.com", to_uri="sip:bob@example.com", sender="sip:alice@example.com",
        sender_name="Alice", content_type="text/plain;charset=UTF-8", body="h\u00e9llo".encode(),
        date="Sat, 13 Nov 2010 23:29:00 GMT", created_at=0.0, expires_at=60.0, call_id="their-call-id",
    )
    base.update(kw)
    return StoredMessage(**base)


def test_the_request_carries_body_type_sender_date_and_our_own_ids():
    binding = phone("sip:bob@192.0.2.20:5070;transport=tcp", path=["<sip:edge.example.com;lr>"])
    req = parse_message(_with_via(binding))  # through bytes: what the device reads
    assert isinstance(req, Request)
    assert req.method == "MESSAGE" and str(req.uri) == "sip:bob@192.0.2.20:5070;transport=tcp"
    assert req.header_values("Route") == ["<sip:edge.example.com;lr>"]
    assert req.from_.uri.user == "alice" and req.from_.display == "Alice" and req.from_.tag
    assert str(req.to.uri) == "sip:bob@example.com" and req.to.tag is None
    assert req.header("Date") == "Sat, 13 Nov 2010 23:29:00 GMT"
    assert req.header("Content-Type") == "text/plain;charset=UTF-8"
    assert req.body == "h\u00e9llo".encode() and req.content_length == len(req.body)
    assert req.call_id != "their-call-id" and req.cseq.method == "MESSAGE"


def _with_via(binding: Any) -> bytes:
    req = build_message(binding, stored())
    req.add_header("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-x", first=True)
    return req.to_bytes()


class Transport:
    """What the transaction layer and the sender use of the transport: records what goes out."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, Any, Any]] = []
        self.flows: dict[str, Any] = {}
        self.sink: Any = None

    def local_via(self, transport: str, remote_host: str | None = None) -> tuple[str, int]:
        return "198.51.100.1", 5060

    def send_request(self, req: Any, target: Any, flow: Any = None) -> None:
        self.sent.append((req, target, flow))

    def send_response(self, resp: Any, flow: Any) -> None:
        pass

    on_send_error: Any = None


def test_sent_to_the_registered_address_and_answered_by_the_final_response():
    clock = Clock()
    transport = Transport()
    layer = TransactionLayer(transport, clock)  # type: ignore[arg-type]
    sender = TransactionSender(layer)
    binding = phone("sip:bob@10.0.0.5:5060", received=("udp", "192.0.2.99", 40000))
    got: list[Response] = []
    sender.send(binding, stored()).addCallback(got.append)
    [(req, target, flow)] = transport.sent
    assert (target.transport, target.host, target.port) == ("udp", "192.0.2.99", 40000) and flow is None
    assert req.top_via.host == "198.51.100.1"
    layer.inbound(parse_message(make_response(req, 100).to_bytes()), None)
    assert got == []
    layer.inbound(parse_message(make_response(req, 200).to_bytes()), None)
    assert [r.status for r in got] == [200]


def test_no_answer_is_a_408():
    clock = Clock()
    transport = Transport()
    layer = TransactionLayer(transport, clock)  # type: ignore[arg-type]
    got: list[Response] = []
    TransactionSender(layer).send(phone(), stored()).addCallback(got.append)
    clock.advance(40)
    assert [r.status for r in got] == [408]


def test_in_a_cluster_a_device_on_another_node_is_reached_through_that_node():
    clock = Clock()
    transport = Transport()
    layer = TransactionLayer(transport, clock)  # type: ignore[arg-type]
    path = ["<sip:tok@10.9.0.2:5070;lr>", "<sip:edge.example.com;lr>"]

    def path_router(p: list[str]) -> Any:
        assert p == path
        return p, ("udp", "10.9.0.2", 5070, ("10.9.0.1", 5070))

    sender = TransactionSender(layer, path_router)
    sender.send(phone(path=path, received=("tcp", "192.0.2.99", 40000), flow_id="f", flow_live=True),
                stored())
    [(req, target, flow)] = transport.sent
    assert (target.transport, target.host, target.port, target.local) == ("udp", "10.9.0.2", 5070,
                                                                          ("10.9.0.1", 5070))
    assert flow is None and req.header_values("Route") == path
    assert req.top_via.host == "10.9.0.1" and req.top_via.port == 5070


def test_in_a_cluster_our_own_path_entry_is_not_sent_to_the_device():
    clock = Clock()
    transport = Transport()
    layer = TransactionLayer(transport, clock)  # type: ignore[arg-type]
    sender = TransactionSender(layer, lambda p: (p[1:], None))
    sender.send(phone(path=["<sip:tok@10.9.0.1:5070;lr>"], received=("udp", "192.0.2.99", 40000)), stored())
    [(req, target, _)] = transport.sent
    assert (target.host, target.port) == ("192.0.2.99", 40000) and req.header_values("Route") == []


def test_workers_sharing_the_public_socket_mark_the_via_of_what_leaves_it():
    # a worker that pinned the device (sip/udp_pins.py) gets the answer: the mark leads it back to us
    clock = Clock()
    transport = Transport()
    layer = TransactionLayer(transport, clock)  # type: ignore[arg-type]
    own = TransactionSender(layer, lambda p: (p[1:], None))
    own.mark = ";nd=dWRwOjEwLjkuMC4xOjUwNzA"
    own.send(phone(path=["<sip:tok@10.9.0.1:5070;lr>"], received=("udp", "192.0.2.99", 40000)), stored())
    relayed = TransactionSender(layer, lambda p: (p, ("udp", "10.9.0.2", 5070, ("10.9.0.1", 5070))))
    relayed.mark = own.mark
    relayed.send(phone(path=["<sip:tok@10.9.0.2:5070;lr>"], received=("udp", "192.0.2.99", 40000)), stored())
    [(straight, _, _), (through, _, _)] = transport.sent
    assert straight.top_via.params.get("nd") == "dWRwOjEwLjkuMC4xOjUwNzA"
    assert "nd" not in through.top_via.params  # from our internal address: the answer comes back to it
