"""Prometheus metrics on a registry of our own (never prometheus_client's global one).

Most figures are read from the live objects at scrape time by :class:`TsiloCollector` (live
transactions, dialogs, calls per state, bindings, flows, the silo's Kamailio counters), so nothing
is updated on the hot path except two cheap hooks:

* :class:`MessageCounters` counts SIP messages in and out by method and status code. It is fed by
  :func:`install_message_hooks`, which wraps the transport's ``sink``, ``send_request`` and
  ``send_response`` (one dict increment per message; retransmissions count, they are messages too).
* :class:`PushMetrics` holds the push counters and latency histograms. Push senders report each
  push through their ``on_result(provider, outcome, latency_s)`` hook, which the service wiring
  points at :func:`observe_push`; whoever sees a woken device register calls
  :func:`observe_push_to_register` with the seconds from the push to that REGISTER.

:func:`make_registry` builds the registry the admin API serves at ``/metrics``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger

from libon_tsilo.sip.message import Request, Response

__all__ = [
    "MessageCounters",
    "PushMetrics",
    "TsiloCollector",
    "install_message_hooks",
    "make_registry",
    "observe_push",
    "observe_push_to_register",
    "push_metrics",
    "render",
    "CONTENT_TYPE",
]

log = Logger()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "libon_tsilo"

# push latency: a push is one HTTP/2 POST (APNs/FCM) plus retries; push-to-REGISTER is a phone waking
PUSH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, float("inf"))
WAKE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, float("inf"))


# ---------------------------------------------------------------------------------------------
# SIP messages in / out


class MessageCounters:
    """SIP messages in and out: requests by method, responses by (CSeq method, status code)."""

    def __init__(self) -> None:
        self.requests_in: Counter[str] = Counter()
        self.responses_in: Counter[tuple[str, int]] = Counter()
        self.requests_out: Counter[str] = Counter()
        self.responses_out: Counter[tuple[str, int]] = Counter()

    def inbound(self, msg: Any) -> None:
        self._count(msg, self.requests_in, self.responses_in)

    def outbound(self, msg: Any) -> None:
        self._count(msg, self.requests_out, self.responses_out)

    @staticmethod
    def _count(msg: Any, requests: Counter[str], responses: Counter[tuple[str, int]]) -> None:
        # the type first: getattr(response, "method", None) on a slotted Response raises and catches
        # an AttributeError inside, the dearest step of counting a message
        kind = type(msg)
        if kind is not Response:
            method = msg.method if kind is Request else getattr(msg, "method", None)
            if method is not None:
                requests[method] += 1
                return
        try:
            cseq_method = msg.cseq.method
        except Exception:  # a response whose CSeq cannot be read still counts
            cseq_method = "unknown"
        responses[(cseq_method, int(getattr(msg, "status", 0)))] += 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "requests_in": dict(self.requests_in),
            "responses_in": {f"{m} {c}": n for (m, c), n in self.responses_in.items()},
            "requests_out": dict(self.requests_out),
            "responses_out": {f"{m} {c}": n for (m, c), n in self.responses_out.items()},
        }


def install_message_hooks(transport: Any, counters: MessageCounters) -> None:
    """Count every message through ``transport``: wrap its sink (in) and its two send functions (out).

    Call it after the transaction layer has set ``transport.sink``. Counting never breaks sending:
    a failure in the counter is swallowed (and logged once).
    """
    sink = transport.sink
    send_request = transport.send_request
    send_response = transport.send_response
    broken: list[bool] = []
    # the counters are bound here, not looked up per message: three wrappers run on every message
    tally = MessageCounters._count
    requests_in, responses_in = counters.requests_in, counters.responses_in
    requests_out, responses_out = counters.requests_out, counters.responses_out

    def failed() -> None:
        if not broken:
            broken.append(True)
            log.failure("metrics: message counter failed (reported once)")

    def counting_sink(msg: Any, flow: Any) -> None:
        try:
            tally(msg, requests_in, responses_in)
        except Exception:
            failed()
        sink(msg, flow)

    def counting_send_request(req: Any, target: Any, flow: Any = None) -> Any:
        result = send_request(req, target, flow)
        try:
            tally(req, requests_out, responses_out)
        except Exception:
            failed()
        return result

    def counting_send_response(resp: Any, flow: Any) -> None:
        send_response(resp, flow)
        try:
            tally(resp, requests_out, responses_out)
        except Exception:
            failed()

    transport.sink = counting_sink
    transport.send_request = counting_send_request
    transport.send_response = counting_send_response


# ---------------------------------------------------------------------------------------------
# push


class PushMetrics(Collector):
    """Push counters and histograms (event-time: latencies cannot be read back at scrape time)."""

    def __init__(self) -> None:
        self.pushes = PromCounter(
            f"{PREFIX}_pushes",
            "Pushes sent, by provider and final outcome (after retries)",
            ["provider", "outcome"],
            registry=None,
        )
        self.push_latency = PromHistogram(
            f"{PREFIX}_push_latency_seconds",
            "Time from starting a push to its final outcome",
            ["provider"],
            buckets=PUSH_BUCKETS,
            registry=None,
        )
        self.push_to_register = PromHistogram(
            f"{PREFIX}_push_to_register_seconds",
            "Time from a call push to the woken device's REGISTER",
            buckets=WAKE_BUCKETS,
            registry=None,
        )

    def observe_push(self, provider: str, outcome: str, latency_s: float) -> None:
        self.pushes.labels(provider, outcome).inc()
        self.push_latency.labels(provider).observe(max(float(latency_s), 0.0))

    def observe_push_to_register(self, latency_s: float) -> None:
        self.push_to_register.observe(max(float(latency_s), 0.0))

    def collect(self) -> Iterator[Metric]:
        yield from self.pushes.collect()
        yield from self.push_latency.collect()
        yield from self.push_to_register.collect()


# the process-wide instance the push layer reports to (one server per process)
push_metrics = PushMetrics()


def observe_push(provider: str, outcome: str, latency_s: float) -> None:
    """One push finished (``outcome``: delivered, dead_token, retryable, config_error). Never raises."""
    try:
        push_metrics.observe_push(provider, outcome, latency_s)
    except Exception:
        log.failure("metrics: observe_push failed")


def observe_push_to_register(latency_s: float) -> None:
    """A device woken by a call push registered ``latency_s`` seconds after the push. Never raises."""
    try:
        push_metrics.observe_push_to_register(latency_s)
    except Exception:
        log.failure("metrics: observe_push_to_register failed")


# ---------------------------------------------------------------------------------------------
# scrape-time collector over the live objects


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    if labels:
        g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
        g.add_metric(list(labels.values()), value)
        return g
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class TsiloCollector(Collector):
    """Reads ``parts`` (the service tree's objects) at each scrape; absent layers are skipped."""

    def __init__(self, parts: Any, messages: MessageCounters | None = None) -> None:
        self.parts = parts
        self.messages = messages

    def collect(self) -> Iterator[Metric]:
        for part in (self._messages, self._sip, self._calls, self._location, self._silo):
            try:
                yield from part()
            except Exception:  # a broken layer must not take /metrics down with it
                log.failure("metrics: collecting {part} failed", part=part.__name__)

    def _messages(self) -> Iterator[Metric]:
        m = self.messages
        if m is None:
            return
        for direction, requests, responses in (
            ("received", m.requests_in, m.responses_in),
            ("sent", m.requests_out, m.responses_out),
        ):
            req = CounterMetricFamily(
                f"{PREFIX}_sip_requests_{direction}",
                f"SIP requests {direction}, by method",
                labels=["method"],
            )
            for method, n in sorted(requests.items()):
                req.add_metric([method], n)
            yield req
            resp = CounterMetricFamily(
                f"{PREFIX}_sip_responses_{direction}",
                f"SIP responses {direction}, by CSeq method and status code",
                labels=["method", "code"],
            )
            for (method, code), n in sorted(responses.items()):
                resp.add_metric([method, str(code)], n)
            yield resp

    def _sip(self) -> Iterator[Metric]:
        p = self.parts
        if p.transactions is not None:
            g = GaugeMetricFamily(f"{PREFIX}_transactions", "Live SIP transactions", labels=["kind"])
            g.add_metric(["server"], p.transactions.server_count)
            g.add_metric(["client"], p.transactions.client_count)
            yield g
        if p.transport is not None:
            yield _gauge(
                "flows", "Live connections/flows (TCP, TLS, UDP 5-tuples)", p.transport.flows.live_count()
            )
        if p.router is not None:
            c = CounterMetricFamily(
                f"{PREFIX}_router_requests",
                "Requests handed to the router (after the transaction layer)",
                labels=["method"],
            )
            for method, n in sorted(p.router.counters.items()):
                c.add_metric([method], n)
            yield c

    def _calls(self) -> Iterator[Metric]:
        b2bua = self.parts.b2bua
        if b2bua is None:
            return
        by_state: Counter[str] = Counter(getattr(c.state, "name", "?") for c in list(b2bua.calls.values()))
        g = GaugeMetricFamily(f"{PREFIX}_calls", "Live calls, by state", labels=["state"])
        for state in sorted(set(by_state) | {"parked", "forking", "connected"}):
            g.add_metric([state], by_state.get(state, 0))
        yield g
        yield _gauge("parked_calls", "Calls parked waiting for a woken device", by_state.get("parked", 0))
        yield _gauge("dialogs", "Live dialogs (A- and B-legs)", len(b2bua.dialogs))
        counters = getattr(b2bua, "counters", {})
        for key, doc in (
            ("calls", "INVITEs that became calls"),
            ("answered", "Calls answered"),
            ("rejected", "INVITEs rejected"),
        ):
            if key in counters:
                yield _counter(f"calls_{key}" if key != "calls" else "calls_started", doc, counters[key])

    def _location(self) -> Iterator[Metric]:
        loc = self.parts.location
        if loc is None:
            return
        yield _gauge("bindings", "Registered contacts (bindings)", loc.all_count())
        yield _gauge("registered_aors", "AORs with at least one binding", loc.aor_count())
        # the SQLite copy (group commit): rows skipped for bad data, retried after a database error
        db = loc.persistence_stats() if hasattr(loc, "persistence_stats") else None
        if db is not None:
            yield _counter("location_db_commits", "Binding batches committed (location db)", db["commits"])
            for what in ("written", "skipped", "retried"):
                doc = f"Binding changes {what} (location db)"
                yield _counter(f"location_db_rows_{what}", doc, db["rows_" + what])
            yield _gauge("location_db_pending", "Binding changes queued or being written", db["pending"])

    def _silo(self) -> Iterator[Metric]:
        silo = self.parts.silo
        if silo is None:
            return
        s = silo.stats()
        # Kamailio's tsilo statistic names, under our prefix
        yield _gauge("tsilo_stored_ruris", "R-URIs (AORs) with stored transactions", s["stored_ruris"])
        yield _gauge(
            "tsilo_stored_transactions", "Transactions (calls) stored in the silo", s["stored_transactions"]
        )
        yield _counter("tsilo_total_ruris", "R-URIs ever stored", s["total_ruris"])
        yield _counter("tsilo_total_transactions", "Transactions ever stored", s["total_transactions"])
        yield _counter("tsilo_added_branches", "Branches added on REGISTER (late forks)", s["added_branches"])
        if "rejected_full" in s:
            yield _counter(
                "tsilo_rejected_full", "Calls refused: too many pending for the AOR", s["rejected_full"]
            )
        if "lingering" in s:
            yield _gauge("tsilo_lingering", "Ended calls still forking to late iOS devices", s["lingering"])
        latency = s.get("register_to_invite") or {}
        g = GaugeMetricFamily(
            f"{PREFIX}_tsilo_register_to_invite_seconds",
            "REGISTER-to-INVITE latency of late forks over the last samples (quantiles)",
            labels=["quantile"],
        )
        for q, key in (("0.5", "p50"), ("0.99", "p99")):
            value = latency.get(key)
            if value is not None:
                g.add_metric([q], value)
        yield g


# ---------------------------------------------------------------------------------------------


def make_registry(
    parts: Any, messages: MessageCounters | None = None, push: PushMetrics | None = None
) -> CollectorRegistry:
    """A registry of our own with the live-object collector and the push metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TsiloCollector(parts, messages))
    registry.register(push if push is not None else push_metrics)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
