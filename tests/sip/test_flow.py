"""FlowTable / Flow: ids, lookups, idle expiry on a Clock, close notification."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from libon_tsilo.sip.flow import Flow, FlowKey, FlowTable
from libon_tsilo.sip.listen import (
    ListenSpec,
    ListenSpecError,
    format_hostport,
    parse_listen_spec,
    same_ip,
)


class FakeConn:
    """Stands in for a connection: records writes; close reports back to the table like a transport."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.close_requests = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.close_requests += 1


def tcp_flow(table: FlowTable, remote_port: int = 34567) -> tuple[Flow, FakeConn]:
    conn = FakeConn()
    key = FlowKey("tcp", ("10.0.0.1", 5060), ("10.0.0.2", remote_port))
    flow = Flow(key, table.new_id(key), conn.write, conn.close)
    table.add(flow)
    return flow, conn


def udp_flow(table: FlowTable, remote: tuple[str, int] = ("10.0.0.2", 5062)) -> Flow:
    key = FlowKey("udp", ("10.0.0.1", 5060), remote)
    return table.add(Flow(key, table.new_id(key), lambda data: None))


def test_ids_and_lookups() -> None:
    table = FlowTable(Clock(), 60)
    flow, _ = tcp_flow(table)
    assert flow.id == "tcp:10.0.0.1:5060-10.0.0.2:34567#1"
    assert table.get(flow.id) is flow
    assert table.by_key(flow.key) is flow
    assert table.find_remote("tcp", ("10.0.0.2", 34567)) is flow
    assert table.find_remote("tls", ("10.0.0.2", 34567)) is None
    assert table.live_count() == 1
    # a later connection on the same 5-tuple is a different flow
    second, _ = tcp_flow(table)
    assert second.id.endswith("#2")
    assert not flow.live and table.get(flow.id) is None


def test_udp_ids_are_stable_per_address() -> None:
    table = FlowTable(Clock(), 60)
    key = FlowKey("udp", ("::1", 5060), ("::1", 40000))
    assert table.new_id(key) == "udp:[::1]:5060-[::1]:40000" == table.new_id(key)


def test_send_writes_until_closed() -> None:
    table = FlowTable(Clock(), 60)
    flow, conn = tcp_flow(table)
    flow.send(b"hello")
    table.closed(flow)
    flow.send(b"dropped")
    assert conn.written == [b"hello"]
    assert not flow.live


def test_close_callbacks_once_and_errors_isolated() -> None:
    table = FlowTable(Clock(), 60)
    seen: list[str] = []
    table.subscribe_close(lambda f: seen.append("table:" + f.id))
    flow, _ = tcp_flow(table)

    def boom(f: Flow) -> None:
        raise RuntimeError("callback bug")

    flow.on_close(boom)
    flow.on_close(lambda f: seen.append("flow"))
    table.closed(flow)
    table.closed(flow)  # a second report must not notify again
    assert seen == ["flow", "table:" + flow.id]
    late: list[Flow] = []
    flow.on_close(late.append)  # registering after the close fires at once
    assert late == [flow]
    assert table.live_count() == 0


def test_idle_stream_flow_is_closed_via_its_connection() -> None:
    clock = Clock()
    table = FlowTable(clock, 30)
    flow, conn = tcp_flow(table)
    clock.advance(20)
    table.touch(flow)  # activity postpones expiry
    clock.advance(20)
    assert conn.close_requests == 0
    clock.advance(10)
    assert conn.close_requests == 1
    # the table still holds it until the transport reports the connection gone
    assert table.get(flow.id) is flow
    table.closed(flow)
    assert table.live_count() == 0
    assert clock.getDelayedCalls() == []


def test_idle_udp_flow_expires_from_table() -> None:
    clock = Clock()
    table = FlowTable(clock, 30)
    closed: list[Flow] = []
    table.subscribe_close(closed.append)
    flow = udp_flow(table)
    clock.advance(29.9)
    assert flow.live
    clock.advance(0.2)
    assert closed == [flow] and not flow.live
    assert table.get(flow.id) is None and table.find_remote("udp", flow.remote) is None
    assert clock.getDelayedCalls() == []


def test_zero_timeout_disables_idle_expiry() -> None:
    clock = Clock()
    table = FlowTable(clock, 0)
    udp_flow(table)
    assert clock.getDelayedCalls() == []


def test_rekey_and_alias_for_outbound_connections() -> None:
    table = FlowTable(Clock(), 60)
    pending = FlowKey("tcp", ("", 0), ("sip.example.com", 5060))
    flow = table.add(Flow(pending, table.new_id(pending), lambda d: None, lambda: None))
    assert flow.id == "tcp:*-sip.example.com:5060#1"
    assert table.find_remote("tcp", ("sip.example.com", 5060)) is flow
    real = FlowKey("tcp", ("192.0.2.1", 40000), ("192.0.2.9", 5060))
    table.rekey(flow, real)
    assert table.by_key(real) is flow and table.by_key(pending) is None
    assert table.find_remote("tcp", ("192.0.2.9", 5060)) is flow
    assert table.find_remote("tcp", ("sip.example.com", 5060)) is flow
    assert table.get(flow.id) is flow  # the id is stable across the rekey
    table.closed(flow)
    assert table.find_remote("tcp", ("sip.example.com", 5060)) is None
    assert table.find_remote("tcp", ("192.0.2.9", 5060)) is None


def test_close_all_cancels_timers() -> None:
    clock = Clock()
    table = FlowTable(clock, 30)
    flow, conn = tcp_flow(table)
    u = udp_flow(table)
    table.close_all()
    assert conn.close_requests == 1
    assert not u.live
    assert clock.getDelayedCalls() == []


# -- listen specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("udp:127.0.0.1:5060", ListenSpec("udp", "127.0.0.1", 5060)),
        ("TCP:[::1]:0", ListenSpec("tcp", "::1", 0)),
        ("tls:localhost:5061", ListenSpec("tls", "localhost", 5061)),
        ("udp:0.0.0.0:65535", ListenSpec("udp", "0.0.0.0", 65535)),
    ],
)
def test_parse_listen_spec(spec: str, expected: ListenSpec) -> None:
    assert parse_listen_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("sctp:127.0.0.1:5060", "udp|tcp|tls"),
        ("udp127.0.0.1", "udp|tcp|tls"),
        ("udp:::1:5060", "brackets"),
        ("udp:[::1:5060", "[IPv6]"),
        ("udp:[nothost]:5060", "not an IPv6"),
        ("udp:127.0.0.1", "missing port"),
        ("udp:127.0.0.1:70000", "not a port"),
        ("udp:127.0.0.1:-1", "not a port"),
        ("udp:bad_host!:5060", "not a valid host"),
        ("udp::5060", "not a valid host"),
    ],
)
def test_parse_listen_spec_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ListenSpecError) as e:
        parse_listen_spec(spec)
    assert fragment in str(e.value) and spec in str(e.value)


def test_hostport_helpers() -> None:
    assert str(ListenSpec("udp", "::1", 5060)) == "udp:[::1]:5060"
    assert format_hostport("[::1]", None) == "[::1]"
    assert format_hostport("1.2.3.4", 5) == "1.2.3.4:5"
    assert same_ip("[0::1]", "::1") and not same_ip("::1", "127.0.0.1")
    assert same_ip("Example.COM", "example.com")
