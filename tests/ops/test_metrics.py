"""Prometheus metrics (ops/metrics.py): message hooks, the scrape-time collector, push metrics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY as GLOBAL_REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from libon_tsilo.ops import metrics
from libon_tsilo.ops.metrics import (
    MessageCounters,
    PushMetrics,
    install_message_hooks,
    make_registry,
    render,
)
from libon_tsilo.sip.message import parse_message
from tests.ops.test_rpc import FakeCall, binding, build


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


def test_collector_reads_live_objects_at_scrape_time(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    parts = root.parts
    counters = MessageCounters()
    counters.inbound(parse_message(INVITE))
    counters.outbound(parse_message(RINGING))
    registry = make_registry(parts, counters, push=PushMetrics())
    before = samples(registry)
    assert before[("libon_tsilo_bindings", ())] == 0
    assert before[("libon_tsilo_tsilo_stored_transactions", ())] == 0
    assert before[("libon_tsilo_parked_calls", ())] == 0
    assert before[("libon_tsilo_sip_requests_received_total", (("method", "INVITE"),))] == 1
    assert before[("libon_tsilo_sip_responses_sent_total", (("code", "180"), ("method", "INVITE")))] == 1
    assert before[("libon_tsilo_transactions", (("kind", "server"),))] == 0
    assert before[("libon_tsilo_dialogs", ())] == 0
    assert before[("libon_tsilo_flows", ())] == 0

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
    s = samples(make_registry(parts, None, push=PushMetrics()))
    assert s[("libon_tsilo_parked_calls", ())] == 2
    assert s[("libon_tsilo_calls", (("state", "parked"),))] == 2
    assert s[("libon_tsilo_calls", (("state", "connected"),))] == 1
    assert s[("libon_tsilo_calls", (("state", "forking"),))] == 0
    parts.b2bua.calls.clear()


def test_a_broken_layer_does_not_break_the_scrape(tmp_path):
    root, _clock = build(tmp_path=tmp_path)

    class BrokenSilo:
        def stats(self):
            raise RuntimeError("boom")

    root.parts.silo = BrokenSilo()
    s = samples(make_registry(root.parts, None, push=PushMetrics()))
    assert ("libon_tsilo_bindings", ()) in s
    assert not any(name.startswith("libon_tsilo_tsilo_") for name, _ in s)


def test_push_metrics(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    push = PushMetrics()
    push.observe_push("apns", "delivered", 0.2)
    push.observe_push("apns", "delivered", 0.3)
    push.observe_push("fcm", "dead_token", 1.5)
    push.observe_push_to_register(2.5)
    s = samples(make_registry(root.parts, None, push=push))
    assert s[("libon_tsilo_pushes_total", (("outcome", "delivered"), ("provider", "apns")))] == 2
    assert s[("libon_tsilo_pushes_total", (("outcome", "dead_token"), ("provider", "fcm")))] == 1
    assert s[("libon_tsilo_push_latency_seconds_count", (("provider", "apns"),))] == 2
    assert s[("libon_tsilo_push_latency_seconds_bucket", (("le", "0.25"), ("provider", "apns")))] == 1
    assert s[("libon_tsilo_push_to_register_seconds_count", ())] == 1
    assert s[("libon_tsilo_push_to_register_seconds_bucket", (("le", "3.0"),))] == 1


def test_module_level_api_for_the_push_layer(monkeypatch):
    fresh = PushMetrics()
    monkeypatch.setattr(metrics, "push_metrics", fresh)
    metrics.observe_push("webhook", "retryable", 0.1)
    metrics.observe_push_to_register(1.0)
    assert fresh.pushes.labels("webhook", "retryable")._value.get() == 1
    # never raises into call handling
    metrics.observe_push("webhook", "retryable", "not a number")  # type: ignore[arg-type]


def test_our_registry_is_not_the_global_one(tmp_path):
    root, _clock = build(tmp_path=tmp_path)
    registry = make_registry(root.parts, None, push=PushMetrics())
    assert registry is not GLOBAL_REGISTRY
    assert b"process_cpu_seconds_total" not in render(registry)


def test_overload_metrics(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    detector = root.parts.extra["overload"]
    registry = make_registry(root.parts, None, push=PushMetrics())
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
