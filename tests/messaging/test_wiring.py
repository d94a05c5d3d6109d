"""[messages] in the service tree: the MESSAGE route, Allow, the named child, RPC and metrics."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.metrics import make_registry, render
from libon_tsilo.ops.rpc import Rpc
from libon_tsilo.ops.service import make_service
from libon_tsilo.sip.message import Request
from tests.fakes.sip import FakeFlow, FakeStx
from tests.messaging.helpers import FakeSender, phone
from tests.messaging.test_accept import message


def build(tmp_path: Any, **messages: Any) -> tuple[Any, Clock]:
    clock = Clock()
    clock.advance(1000)
    cfg = config_from_dict({"location": {"backend": "memory"}, "auth": {"enabled": False},
                            "messages": messages}, base_dir=tmp_path)
    return make_service(cfg, clock=clock), clock


def _options(router: Any) -> list[str]:
    req = message()
    opts = Request("OPTIONS", "sip:example.com")
    for name in ("Via", "From", "To", "Call-ID"):
        opts.add_header(name, req.header(name))
    opts.add_header("CSeq", "1 OPTIONS")
    stx = FakeStx(opts)
    router.request_received(opts, stx, FakeFlow())
    return [m.strip() for m in stx.last.header("Allow").split(",")]


def test_enabled_messages_are_routed_allowed_and_a_named_child(tmp_path):
    root, _ = build(tmp_path)
    router = root.parts.router
    assert "MESSAGE" in router.handlers and "MESSAGE" in _options(router)
    assert root.getServiceNamed("messages") is not None
    names = [s.name for s in root]
    assert names.index("messages") > names.index("location")  # starts after the bindings are restored
    assert names.index("messages") > names.index("transport")  # stops before the transport


def test_disabled_messages_get_405_without_message_in_allow(tmp_path):
    root, _ = build(tmp_path, enabled=False)
    router = root.parts.router
    stx = FakeStx()
    router.request_received(message(ruri="sip:bob@localhost"), stx, FakeFlow())
    assert stx.statuses == [405]
    assert "MESSAGE" not in [m.strip() for m in stx.last.header("Allow").split(",")]


def test_a_message_through_the_router_is_stored_and_seen_by_rpc_and_metrics(tmp_path):
    root, clock = build(tmp_path)
    parts = root.parts
    sender = parts.extra["messages"].delivery.sender = FakeSender()  # no sockets in this test
    parts.location.add_or_update(phone("sip:bob@192.0.2.20:5060", aor="sip:bob@localhost", expires_at=clock.seconds() + 3600))
    stx = FakeStx()
    parts.router.request_received(message(ruri="sip:bob@localhost"), stx, FakeFlow())
    assert stx.statuses == [202]
    assert [m.body for _, m, _ in sender.sent] == [b"hi"]  # bob's phone has no push token: at once
    rpc = Rpc(parts, root)
    [dumped] = rpc.call("msg.dump", {"aor": "sip:bob@localhost"})
    assert dumped["sender"] == "sip:alice@example.com" and dumped["size"] == 2 and "body" not in dumped
    assert rpc.call("msg.stats")["accepted"] == 1
    text = render(make_registry(parts)).decode()
    assert "libon_tsilo_im_waiting 1.0" in text and "libon_tsilo_im_accepted_total 1.0" in text
    assert 'libon_tsilo_limit_hits_total{limit="message_size"} 0.0' in text
    sender.answer(0, 200)
    assert rpc.call("msg.stats")["waiting"] == 0


def test_a_message_inside_a_dialog_goes_to_the_call_layer_not_the_store(tmp_path):
    """A MESSAGE with a To tag belongs to a call's dialog: the call layer relays it (b2bua/relay.py,
    tests/b2bua/test_relay.py) or, with no such dialog, answers 481; it is never stored."""
    root, _ = build(tmp_path)
    parts = root.parts
    seen: list[Any] = []
    parts.router.in_dialog = lambda req, stx, flow: seen.append(req.method)
    req = message(ruri="sip:bob@localhost", extra=[])
    req.set_header("To", "<sip:bob@localhost>;tag=dlg-1")
    parts.router.request_received(req, FakeStx(), FakeFlow())
    assert seen == ["MESSAGE"]
    assert len(parts.extra["messages"].outbox) == 0


def test_on_redis_the_messages_are_indexed_under_the_nodes_own_id(tmp_path, redis_server):
    """A clustered worker without [cluster] node_id derives one (ops/node.py): its messages are kept
    under that id, the one it loads them back with after a restart."""
    cfg = config_from_dict({
        "sip": {"listen": ["udp:127.0.0.1:0"], "domains": ["localhost"]},
        "auth": {"enabled": False},
        "location": {"backend": "redis", "url": redis_server.url, "key_prefix": "w:"},
        "admin": {"listen": "tcp:23457:interface=127.0.0.1"},  # never started: only its port is read
    }, base_dir=tmp_path)
    root = make_service(cfg, clock=Clock())
    node_id = root.parts.node_id
    assert node_id.endswith("-23457")
    assert root.parts.extra["messages"].outbox.store.index == f"w:msgs:{node_id}"


def test_a_message_to_a_users_number_reaches_the_user_through_the_real_users_db(tmp_path):
    """ops wires the calls' number mapping (routing/numbers.py) and the users database into MESSAGE."""
    from libon_tsilo.registrar.users import UsersDB

    users = UsersDB(str(tmp_path / "users.sqlite"))
    users.add("bob", "bob-password-1", "localhost")
    users.set_number("bob", "+33123456789")
    users.close()
    clock = Clock()
    clock.advance(1000)
    cfg = config_from_dict({"location": {"backend": "memory"},
                            "auth": {"users_db": str(tmp_path / "users.sqlite"), "trusted_sources": ["192.0.2.9"]},
                            "dialplan": {"country_code": "33"},
                            "messages": {"max_per_sender_per_user": 1}}, base_dir=tmp_path)
    parts = make_service(cfg, clock=clock).parts
    gateway = FakeFlow(remote=("192.0.2.9", 5060))
    stx = FakeStx()
    parts.router.request_received(message(ruri="tel:0123456789;phone-context=+33"), stx, gateway)
    assert stx.statuses == [202]
    assert parts.extra["messages"].outbox.count("sip:bob@localhost") == 1
    stx = FakeStx()
    parts.router.request_received(message(ruri="sip:+33123456789@localhost"), stx, gateway)
    assert stx.statuses == [480]  # the same sender to the same user: [messages] max_per_sender_per_user
    text = render(make_registry(parts)).decode()
    assert 'libon_tsilo_limit_hits_total{limit="messages_per_sender_per_user"} 1.0' in text
    stx = FakeStx()
    parts.router.request_received(message(ruri="tel:+33100000000"), stx, gateway)
    assert stx.statuses == [404]
