"""Prometheus metrics (ops/metrics.py): message hooks, the scrape-time collector, push metrics."""

from __future__ import annotations

import types
from typing import Any

import pytest
from prometheus_client import REGISTRY as GLOBAL_REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred

from libon_tsilo.ops.metrics import (
    MessageCounters,
    install_message_hooks,
    make_registry,
    render,
)
from libon_tsilo.ops.rpc import Rpc
from libon_tsilo.push.base import DEAD_TOKEN, DELIVERED, PushResult
from libon_tsilo.sip.message import parse_message
from tests.fakes.calls import FakeCall
from tests.ops.test_rpc import binding, build
from tests.push.test_waker import FakeSender, call_info, dev, make


def samples(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


INVITE = (
    b"INVITE sip:alice@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:bob@127.0.0.1>;tag=1\r\nTo: <sip:alice@127.0.0.1>\r\n"
    b"Call-ID: m1@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)
RINGING = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc\r\n"
    b"From: <sip:bob@127.0.0.1>;tag=1\r\nTo: <sip:alice@127.0.0.1>;tag=2\r\n"
    b"Call-ID: m1@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)


class FakeTransport:
    def __init__(self) -> None:
        self.got: list[Any] = []
        self.sent: list[Any] = []
        self.sink = lambda msg, flow: self.got.append(msg)

    def send_request(self, req: Any, target: Any, flow: Any = None) -> Any:
        self.sent.append(req)
        return "flow"

    def send_response(self, resp: Any, flow: Any) -> None:
        self.sent.append(resp)


def test_message_hooks_count_in_and_out_and_keep_behaviour():
    transport = FakeTransport()
    counters = MessageCounters()
    install_message_hooks(transport, counters)
    invite, ringing = parse_message(INVITE), parse_message(RINGING)
    transport.sink(invite, None)
    transport.sink(ringing, None)
    assert transport.got == [invite, ringing]
    assert transport.send_request(invite, "target", None) == "flow"
    transport.send_response(ringing, None)
    transport.send_response(ringing, None)
    assert counters.requests_in == {"INVITE": 1}
    assert counters.responses_in == {("INVITE", 180): 1}
    assert counters.requests_out == {"INVITE": 1}
    assert counters.responses_out == {("INVITE", 180): 2}
    assert counters.as_dict()["responses_out"] == {"INVITE 180": 2}


def test_the_hooks_are_callable_objects_and_the_counts_plain_dicts():
    # issue 15: the hooks run on every message; as closures they were interpreted functions
    # (ops/message_counters.py is compiled by mypyc), and a Counter is a dict subclass, which
    # compiled code increments through the generic protocol
    transport = FakeTransport()
    counters = MessageCounters()
    install_message_hooks(transport, counters)
    for hook in (transport.sink, transport.send_request, transport.send_response):
        assert not isinstance(hook, types.FunctionType), hook
    transport.sink(parse_message(INVITE), None)
    assert type(counters.requests_in) is dict and counters.requests_in == {"INVITE": 1}


def test_what_the_stateless_forwarder_takes_is_counted_in_once():
    transport = FakeTransport()
    transport.forward = lambda msg, flow: msg.method == "INVITE" if hasattr(msg, "method") else False
    counters = MessageCounters()
    install_message_hooks(transport, counters)
    invite, ringing = parse_message(INVITE), parse_message(RINGING)
    for msg in (invite, ringing):  # what the transport does: the forwarder first, the sink if declined
        if not transport.forward(msg, None):
            transport.sink(msg, None)
    assert transport.got == [ringing]
    assert counters.requests_in == {"INVITE": 1} and counters.responses_in == {("INVITE", 180): 1}


def test_a_failed_send_is_not_counted_and_still_raises():
    transport = FakeTransport()

    def fail(req, target, flow=None):
        raise OSError("no route")

    transport.send_request = fail
    counters = MessageCounters()
    install_message_hooks(transport, counters)
    with pytest.raises(OSError):
        transport.send_request(parse_message(INVITE), "t")
    assert counters.requests_out == {}


def test_a_response_without_readable_cseq_counts_as_unknown():
    class Odd:
        status = 500

        @property
        def cseq(self):
            raise ValueError("bad")

    counters = MessageCounters()
    counters.inbound(Odd())
    assert counters.responses_in == {("unknown", 500): 1}


def test_a_message_passed_on_as_bytes_counts_by_method_or_cseq_method_and_status():
    from libon_tsilo.ops.message_counters import tally_bytes

    requests: list[dict] = [{}, {}]
    responses: list[dict] = [{}, {}]
    tally_bytes(b"BYE sip:b@x SIP/2.0\r\nCSeq: 2 BYE\r\n\r\n", requests)
    tally_bytes(b"SIP/2.0 180 Ringing\r\nCSeq: 1 INVITE\r\n\r\n", responses)
    tally_bytes(b"SIP/2.0 200 OK\r\nX: \xe9\r\ncseq :\t7  BYE\r\n\r\n", responses)  # another spelling
    tally_bytes(b"SIP/2.0 500 Oops\r\nCall-ID: c\r\n\r\n", responses)  # no CSeq
    tally_bytes(b"SIP/2.0 503 No\r\nCSeq: x INVITE\r\n\r\n", responses)  # unreadable CSeq
    assert requests == [{"BYE": 1}, {"BYE": 1}]
    assert responses[0] == responses[1] == {("INVITE", 180): 1, ("BYE", 200): 1, ("unknown", 500): 1,
                                            ("unknown", 503): 1}


def test_collector_reads_live_objects_at_scrape_time(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    parts = root.parts
    counters = MessageCounters()
    counters.inbound(parse_message(INVITE))
    counters.outbound(parse_message(RINGING))
    registry = make_registry(parts, counters)
    before = samples(registry)
    assert before[("libon_tsilo_bindings", ())] == 0
    assert before[("libon_tsilo_tsilo_stored_transactions", ())] == 0
    assert before[("libon_tsilo_parked_calls", ())] == 0
    assert before[("libon_tsilo_sip_requests_received_total", (("method", "INVITE"),))] == 1
    assert before[("libon_tsilo_sip_responses_sent_total", (("code", "180"), ("method", "INVITE")))] == 1
    assert before[("libon_tsilo_transactions", (("kind", "server"),))] == 0
    assert before[("libon_tsilo_dialogs", ())] == 0
    assert before[("libon_tsilo_flows", ())] == 0
    assert before[("libon_tsilo_calls_flow_failovers_total", ())] == 0
    assert before[("libon_tsilo_calls_dead_node_bindings_total", ())] == 0
    # review finding 15: no REFER yet, but the series exist (rate() and alerts see 0, not "no data")
    assert before[("libon_tsilo_calls_transfers_total", ())] == 0
    assert before[("libon_tsilo_calls_transfers_refused_total", ())] == 0

    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))
    parts.silo.store(FakeCall("c1@x", "alice"))
    parts.silo.counters.latency.add(0.25)
    after = samples(registry)  # nothing was updated on the events: read now
    assert after[("libon_tsilo_bindings", ())] == 1
    assert after[("libon_tsilo_registered_aors", ())] == 1
    assert after[("libon_tsilo_tsilo_stored_ruris", ())] == 1
    assert after[("libon_tsilo_tsilo_stored_transactions", ())] == 1
    assert after[("libon_tsilo_tsilo_total_transactions_total", ())] == 1
    assert after[("libon_tsilo_tsilo_added_branches_total", ())] == 0
    assert after[("libon_tsilo_tsilo_register_to_invite_seconds", (("quantile", "0.5"),))] == 0.25


def test_dropped_stray_responses_are_counted(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    registry = make_registry(root.parts)
    assert samples(registry)[("libon_tsilo_sip_strays_dropped_total", ())] == 0
    root.parts.transactions.strays_dropped += 2
    assert samples(registry)[("libon_tsilo_sip_strays_dropped_total", ())] == 2


def test_parked_calls_and_states(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    parts = root.parts

    class State:
        def __init__(self, name):
            self.name = name

    class Call:
        def __init__(self, state):
            self.state = State(state)

    parts.b2bua.calls.update({"a": Call("parked"), "b": Call("parked"), "c": Call("connected")})
    s = samples(make_registry(parts, None))
    assert s[("libon_tsilo_parked_calls", ())] == 2
    assert s[("libon_tsilo_calls", (("state", "parked"),))] == 2
    assert s[("libon_tsilo_calls", (("state", "connected"),))] == 1
    assert s[("libon_tsilo_calls", (("state", "forking"),))] == 0
    parts.b2bua.calls.clear()


def test_session_timer_and_duration_limit_counters(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    s = samples(make_registry(root.parts, None))
    assert s[("libon_tsilo_calls_session_expired_total", ())] == 0
    root.parts.b2bua.counters["session_expired"] += 2
    root.parts.b2bua.counters["duration_limit"] += 1
    s = samples(make_registry(root.parts, None))
    assert s[("libon_tsilo_calls_session_expired_total", ())] == 2
    assert s[("libon_tsilo_calls_duration_limit_total", ())] == 1


def test_transfer_counters(tmp_path):
    """REFERs accepted and refused (b2bua/transfer.py counts them in the call manager's counters)."""
    root, _clock = build(tmp_path=tmp_path)
    parts = root.parts
    parts.b2bua.counters.update({"transfers": 2, "transfers_refused": 1})
    s = samples(make_registry(parts, None))
    assert s[("libon_tsilo_calls_transfers_total", ())] == 2
    assert s[("libon_tsilo_calls_transfers_refused_total", ())] == 1


def test_a_broken_layer_does_not_break_the_scrape(tmp_path):
    root, _clock = build(tmp_path=tmp_path)

    class BrokenSilo:
        def stats(self):
            raise RuntimeError("boom")

    root.parts.silo = BrokenSilo()
    s = samples(make_registry(root.parts, None))
    assert ("libon_tsilo_bindings", ()) in s
    assert not any(name.startswith("libon_tsilo_tsilo_") for name, _ in s)


def _pushed_waker(clock: Any) -> Any:
    """A real PushWaker after two apns deliveries (0.2 s and 0.3 s), one fcm dead token (1.5 s),
    and one woken device registering 2.5 s after its push."""
    apns, fcm = FakeSender("apns", script=["hold", "hold"]), FakeSender("fcm", script=["hold"])
    waker, _ = make(clock, [apns, fcm])
    waker.wake(call_info("c1", deadline=clock.seconds() + 30), [dev(1), dev(2, provider="fcm")])
    waker.wake(call_info("c2", deadline=clock.seconds() + 30), [dev(3)])
    held: list[Deferred[PushResult]] = [*apns.held, *fcm.held]
    clock.advance(0.2)
    held[0].callback(PushResult(DELIVERED, "ok", 200))
    clock.advance(0.1)
    held[1].callback(PushResult(DELIVERED, "ok", 200))
    clock.advance(1.2)
    held[2].callback(PushResult(DEAD_TOKEN, "Unregistered", 410))
    clock.advance(1.2)  # dev(1)'s push was delivered 2.5 s ago
    waker.binding_refreshed(dev(1, flow_id="tcp:dev1#2"), None)
    return waker


def test_push_metrics_and_the_rpc_read_the_one_push_record(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    waker = _pushed_waker(clock)
    root.parts.extra["push"] = waker
    s = samples(make_registry(root.parts, None))
    assert s[("libon_tsilo_pushes_total", (("outcome", "delivered"), ("provider", "apns")))] == 2
    assert s[("libon_tsilo_pushes_total", (("outcome", "dead_token"), ("provider", "fcm")))] == 1
    assert s[("libon_tsilo_push_latency_seconds_count", (("provider", "apns"),))] == 2
    assert s[("libon_tsilo_push_latency_seconds_bucket", (("le", "0.25"), ("provider", "apns")))] == 1
    assert s[("libon_tsilo_push_latency_seconds_sum", (("provider", "fcm"),))] == pytest.approx(1.5)
    assert s[("libon_tsilo_push_to_register_seconds_count", ())] == 1
    assert s[("libon_tsilo_push_to_register_seconds_bucket", (("le", "2.0"),))] == 0
    assert s[("libon_tsilo_push_to_register_seconds_bucket", (("le", "3.0"),))] == 1
    rpc = Rpc(root.parts, root).call("stats", {})["push"]
    assert rpc["by_provider"]["apns"]["delivered"] == 2 and rpc["by_provider"]["fcm"]["dead_token"] == 1
    assert rpc["push_to_register"]["count"] == 1 and rpc["push_latency"]["count"] == 2
    # one record: a push counted after the first scrape shows up in both, once
    waker.wake(call_info("c3", deadline=clock.seconds() + 30), [dev(4)])
    s = samples(make_registry(root.parts, None))
    assert s[("libon_tsilo_pushes_total", (("outcome", "delivered"), ("provider", "apns")))] == 3
    assert Rpc(root.parts, root).call("stats", {})["push"]["by_provider"]["apns"]["delivered"] == 3


def test_waker_give_ups_are_counted(tmp_path):
    """Issue 12: calls answered at once (every push failed), missed-call alerts without a token."""
    root, _clock = build(tmp_path=tmp_path)

    class Waker:
        def stats(self) -> dict[str, Any]:
            return {"calls_all_failed": 3, "missed_call_pushes": 2, "missed_call_without_alert_token": 1}

    root.parts.extra["push"] = Waker()
    s = samples(make_registry(root.parts, None))
    assert s[("libon_tsilo_push_calls_all_failed_total", ())] == 3
    assert s[("libon_tsilo_push_missed_call_pushes_total", ())] == 2
    assert s[("libon_tsilo_push_missed_call_without_alert_token_total", ())] == 1


def test_no_push_layer_no_push_families(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    s = samples(make_registry(root.parts, None))
    assert not any(name.startswith("libon_tsilo_push") for name, _ in s)


def test_a_broken_push_layer_does_not_break_the_scrape(tmp_path):
    root, _clock = build(tmp_path=tmp_path)

    class Broken:
        push_stats = None  # replaced below by an object whose outcomes() raises

    class BadStats:
        def outcomes(self):
            raise RuntimeError("boom")

    broken = Broken()
    broken.push_stats = BadStats()
    root.parts.extra["push"] = broken
    s = samples(make_registry(root.parts, None))
    assert ("libon_tsilo_bindings", ()) in s
    assert not any(name.startswith("libon_tsilo_push") for name, _ in s)


def test_our_registry_is_not_the_global_one(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    registry = make_registry(root.parts, None)
    assert registry is not GLOBAL_REGISTRY
    assert b"process_cpu_seconds_total" not in render(registry)


def test_failed_digest_limits_are_configured_and_counted(tmp_path):
    from libon_tsilo.ops.config import config_from_dict
    from libon_tsilo.ops.service import make_service
    from twisted.internet.task import Clock

    clock = Clock()
    cfg = config_from_dict(
        {"location": {"backend": "memory"}, "auth": {"failed_per_source": 2, "failed_per_user": 3,
                                                      "failed_window": 30, "failed_block": 90}},
        base_dir=tmp_path,
    )
    parts = make_service(cfg, clock=clock).parts
    limiter = parts.extra["auth"].limiter
    assert (limiter.limits.per_source, limiter.limits.per_user) == (2, 3)
    assert (limiter.limits.window, limiter.limits.block) == (30.0, 90.0)
    registry = make_registry(parts, None)
    assert samples(registry)[("libon_tsilo_auth_limited_total", (("limit", "source"),))] == 0
    limiter.failed("alice", "192.0.2.1")
    limiter.failed("alice", "192.0.2.1")
    assert limiter.source_blocked("192.0.2.1")
    s = samples(registry)
    assert s[("libon_tsilo_auth_failures_total", ())] == 2
    assert s[("libon_tsilo_auth_limited_total", (("limit", "source"),))] == 1
    assert s[("libon_tsilo_auth_blocked", (("limit", "source"),))] == 1
    assert s[("libon_tsilo_auth_blocked", (("limit", "user"),))] == 0
    parts.extra["auth"].stop()

# --- [limits] ---------------------------------------------------------------------------------


def _options(i: int) -> bytes:
    return (
        f"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKo{i}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:x@192.0.2.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\n"
        f"Call-ID: o{i}@x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def test_source_rate_limit_is_wired_and_counted(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from libon_tsilo.sip.flow import FlowKey

    root, _clock = build(tmp_path=tmp_path)
    parts = root.parts
    sent: list[Any] = []
    monkeypatch.setattr(parts.transport, "send_response", lambda resp, flow: sent.append(resp.status))
    flow = SimpleNamespace(key=FlowKey("udp", ("127.0.0.1", 5060), ("192.0.2.1", 5070)), id="f", live=True)
    for i in range(110):  # default burst 100, no time passes
        parts.transactions.inbound(parse_message(_options(i)), flow)
    assert sent == [200] * 100 + [503]
    s = samples(make_registry(parts, None))
    assert s[("libon_tsilo_limit_hits_total", (("limit", "source_rate_refused"),))] == 1
    assert s[("libon_tsilo_limit_hits_total", (("limit", "source_rate_dropped"),))] == 9
    assert s[("libon_tsilo_limit_banned_sources", ())] == 1
    # loopback is exempt by default
    local = SimpleNamespace(key=FlowKey("udp", ("127.0.0.1", 5060), ("127.0.0.1", 5070)), id="l", live=True)
    for i in range(200, 400):
        parts.transactions.inbound(parse_message(_options(i)), local)
    assert sent.count(200) == 300


# --- [connections]: what the connection limits did, and the flows they keep ----------------------


def test_connection_limit_metrics(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    transport = root.parts.transport
    registry = make_registry(root.parts, MessageCounters())
    transport.admission.refused["max_connections_per_source"] += 3
    transport.counters["message_timeout"] += 2
    transport.flows.evicted += 5
    got = samples(registry)
    assert got[("libon_tsilo_connections_refused_total", (("cap", "max_connections_per_source"),))] == 3
    assert got[("libon_tsilo_connections_refused_total", (("cap", "max_connections"),))] == 0
    assert got[("libon_tsilo_connections_closed_by_limit_total", (("limit", "message_timeout"),))] == 2
    assert got[("libon_tsilo_connections_closed_by_limit_total", (("limit", "tls_handshake_timeout"),))] == 0
    assert got[("libon_tsilo_udp_flows_evicted_total", ())] == 5
    # [cluster] max_udp_pins: the pins this worker made, refused at the bound, failed, closed idle
    transport.pins.counters.update(made=4, full=2, failed=1, idle=3)
    got = samples(registry)
    for outcome, n in (("made", 4), ("refused_full", 2), ("failed", 1), ("closed_idle", 3)):
        assert got[("libon_tsilo_udp_pins_total", (("outcome", outcome),))] == n
    assert got[("libon_tsilo_udp_pins", ())] == 0
    assert got[("libon_tsilo_connections_inbound", ())] == 0
    assert got[("libon_tsilo_buffered_bytes", ())] == 0


def test_service_wires_connection_limits_and_keeps_flows_of_bindings_and_calls(tmp_path):
    from libon_tsilo.ops.config import config_from_dict
    from libon_tsilo.ops.service import make_service
    from libon_tsilo.sip.flow import Flow, FlowKey

    cfg = {"location": {"backend": "memory"}, "auth": {"enabled": False},
           "connections": {"unbound_idle_timeout": 30, "max_udp_flows": 7, "message_timeout": 5}}
    root = make_service(config_from_dict(cfg, base_dir=tmp_path))
    parts = root.parts
    flows = parts.transport.flows
    assert (flows.unbound_idle_timeout, flows.max_udp_flows) == (30, 7)
    assert parts.transport.limits.message_timeout == 5
    key = FlowKey("tcp", ("127.0.0.1", 5060), ("10.0.0.2", 40000))
    flow = Flow(key, "tcp:flow#1", lambda data: None)
    assert not flows.needed(flow)
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.2:5060", parts.clock,
                                         flow_id=flow.id, flow_live=True))
    assert flows.needed(flow)  # a registration uses it
    other = Flow(key, "tcp:flow#2", lambda data: None)
    parts.b2bua.flows[other.id] = {"call-1"}
    assert flows.needed(other)  # a call runs over it
    # recheck() is what a removed binding triggers: the flow goes back to the unbound idle timeout
    # (FlowTable is compiled: its methods cannot be replaced, so the re-armed timer shows it)
    flows.add(flow)
    flows._timers[flow.id].reset(3600)  # as if it slept the long (needed) timeout
    [b] = parts.location.lookup("alice")
    parts.location.remove(b, "expired")
    assert flows._timers[flow.id].getTime() == pytest.approx(flows.clock.seconds() + 30, abs=1)
    flows.closed(flow)  # its timer cancelled


def test_overload_metrics(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    detector = root.parts.extra["overload"]
    registry = make_registry(root.parts, None)
    calm = samples(registry)
    assert calm[("libon_tsilo_overloaded", ())] == 0
    assert calm[("libon_tsilo_overload_admitted_fraction", ())] == 1.0
    assert calm[("libon_tsilo_overload_rejected_invites_total", ())] == 0
    detector.start()
    clock.advance(0.1 + 0.5)  # two ticks, 0.5 s late
    clock.advance(0.1 + 0.5)
    detector.fraction = 0.0
    assert not detector.admit() and not detector.admit()
    hot = samples(registry)
    detector.stop()
    assert hot[("libon_tsilo_overloaded", ())] == 1
    assert hot[("libon_tsilo_overload_admitted_fraction", ())] == 0.0
    assert hot[("libon_tsilo_reactor_lag_seconds", ())] == pytest.approx(0.255)  # 0.3*0.5, then +0.3*(0.5-0.15)
    assert hot[("libon_tsilo_overload_episodes_total", ())] == 1
    assert hot[("libon_tsilo_overload_rejected_invites_total", ())] == 2
    from libon_tsilo.ops.rpc import Rpc

    stats = Rpc(root.parts, root).call("stats")["overload"]
    assert (stats["state"], stats["shed"], stats["admitted_fraction"]) == ("overloaded", 2, 0.0)


def test_overload_timer_parks_are_counted(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    detector = root.parts.extra["overload"]
    registry = make_registry(root.parts, None)
    detector.start()
    for _ in range(3):  # the first tick sets the read hook, the second sees no message and parks
        clock.advance(0.1)
    parked = samples(registry)
    detector.stop()
    assert parked[("libon_tsilo_overload_timer_parks_total", ())] == 1
    assert root.parts.transport.on_read is None  # stop() took the read hook back


def test_calls_out_metrics(tmp_path):
    """Calls up per trunk (a gauge for every configured trunk), calls placed, refusals by reason."""
    from libon_tsilo.ops.config import config_from_dict
    from libon_tsilo.ops.service import make_service
    from twisted.internet.task import Clock

    cfg = config_from_dict({"location": {"backend": "memory"}, "auth": {"enabled": False},
                            "trunks": [{"name": "a", "targets": ["sip:127.0.0.1:5099"]},
                                       {"name": "b", "targets": ["sip:127.0.0.1:5098"]}],
                            "routes": [{"trunk": "a"}]}, base_dir=tmp_path)
    root = make_service(cfg, clock=Clock())
    policy = root.parts.b2bua.calls_out.policy
    policy.admit("c1", "alice", root.parts.b2bua.calls_out.destinations.routes.trunks["a"])
    policy.refuse(policy.check_caller(False, None), "c2", authenticated=False)
    s = samples(make_registry(root.parts, None))
    assert s[("libon_tsilo_calls_out_active", (("trunk", "a"),))] == 1
    assert s[("libon_tsilo_calls_out_active", (("trunk", "b"),))] == 0
    assert s[("libon_tsilo_calls_out_placed_total", ())] == 1
    assert s[("libon_tsilo_limit_hits_total", (("limit", "call_out_unauthenticated"),))] == 1
