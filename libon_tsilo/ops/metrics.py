"""Prometheus metrics on a registry of our own (never prometheus_client's global one).

Most figures are read from the live objects at scrape time by :class:`TsiloCollector` (live
transactions, dialogs, calls per state, bindings, flows, the silo's Kamailio counters), so nothing
is updated on the hot path except two cheap hooks:

* :class:`MessageCounters` counts SIP messages in and out by method and status code. It is fed by
  :func:`install_message_hooks`, which wraps the transport's ``sink``, ``send_request`` and
  ``send_response`` (one dict increment per message; retransmissions count, they are messages too).
  Both live in ops/message_counters.py, compiled with mypyc (they run on every message).
* Pushes are counted once, by the PushWaker (push/stats.py); :class:`PushCollector` reads that
  record at scrape time, as the admin RPC and the manhole do through ``PushWaker.stats()``.

:func:`make_registry` builds the registry the admin API serves at ``/metrics``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger

from libon_tsilo.ops.message_counters import MessageCounters, install_message_hooks

__all__ = [
    "MessageCounters",
    "PushCollector",
    "TsiloCollector",
    "install_message_hooks",
    "make_registry",
    "render",
    "CONTENT_TYPE",
]

log = Logger()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "libon_tsilo"


# ---------------------------------------------------------------------------------------------
# push


class PushCollector(Collector):
    """/metrics' push families, read from the PushWaker's PushStats (``parts.extra["push"]``)."""

    def __init__(self, parts: Any) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        stats = getattr(self.parts.extra.get("push"), "push_stats", None)
        if stats is None:
            return
        try:
            families = list(self._families(stats))
        except Exception:  # a broken push layer must not take /metrics down with it
            log.failure("metrics: collecting push statistics failed")
            return
        yield from families

    def _families(self, stats: Any) -> Iterator[Metric]:
        pushes = CounterMetricFamily(
            f"{PREFIX}_pushes", "Pushes sent, by provider and final outcome (after retries)",
            labels=["provider", "outcome"],
        )
        for provider, outcomes in stats.outcomes()["by_provider"].items():
            for outcome, n in outcomes.items():
                pushes.add_metric([provider, outcome], n)
        yield pushes
        latency = HistogramMetricFamily(
            f"{PREFIX}_push_latency_seconds", "Time from starting a push to its final outcome",
            labels=["provider"],
        )
        for provider, histogram in sorted(stats.latency.items()):
            latency.add_metric([provider], _buckets(histogram), histogram.sum)
        yield latency
        wake = HistogramMetricFamily(
            f"{PREFIX}_push_to_register_seconds", "Time from a call push to the woken device's REGISTER",
        )
        wake.add_metric([], _buckets(stats.push_to_register), stats.push_to_register.sum)
        yield wake


def _buckets(histogram: Any) -> list[tuple[str, float]]:
    return [(floatToGoString(bound), n) for bound, n in histogram.cumulative()]


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


def _connection_metrics(c: dict[str, Any]) -> Iterator[Metric]:
    """What the [connections] limits did: refusals at accept, connections closed, UDP evictions."""
    yield _gauge("connections_inbound", "Accepted TCP/TLS connections open", c["inbound"])
    yield _gauge("buffered_bytes", "Bytes held for incomplete messages, all connections", c["buffered_bytes"])
    yield _gauge("udp_flows", "UDP sources held as flows", c["udp_flows"])
    refused = CounterMetricFamily(f"{PREFIX}_connections_refused", "Connections refused at accept, by cap",
                                  labels=["cap"])
    for cap in ("max_connections", "max_connections_per_source"):
        refused.add_metric([cap], c["refused"].get(cap, 0))
    yield refused
    closed = CounterMetricFamily(f"{PREFIX}_connections_closed_by_limit", "Connections closed by a limit",
                                 labels=["limit"])
    for limit in ("message_timeout", "tls_handshake_timeout", "max_buffered_bytes"):
        closed.add_metric([limit], c["closed"].get(limit, 0))
    yield closed
    yield _counter("udp_flows_evicted", "UDP flows evicted at connections.max_udp_flows",
                   c["udp_flows_evicted"])
    # [cluster] max_udp_pins: connected sockets that bring a device's answers to the forking worker
    pins = c.get("udp_pins") or {}
    yield _gauge("udp_pins", "UDP devices pinned to this worker (connected sockets)", pins.get("open", 0))
    outcomes = CounterMetricFamily(f"{PREFIX}_udp_pins_total", "UDP pins by outcome: made, refused_full "
                                   "(cluster.max_udp_pins), failed (socket error), closed_idle",
                                   labels=["outcome"])
    for outcome in ("made", "refused_full", "failed", "closed_idle"):
        outcomes.add_metric([outcome], pins.get(outcome, 0))
    yield outcomes


def _gateway_voicemail_metrics(b2bua: Any, config: Any) -> Iterator[Metric]:
    """Issue 13: calls in from each [[gateways]] entry, calls forwarded to voicemail by reason."""
    calls = CounterMetricFamily(f"{PREFIX}_gateway_calls", "Calls in from a gateway, by its name",
                                labels=["gateway"])
    seen = getattr(b2bua, "gateway_calls", {})
    for name in sorted({g.name for g in getattr(config, "gateways", ())} | set(seen)):
        calls.add_metric([name], seen.get(name, 0))
    yield calls
    counts = getattr(b2bua, "voicemail_counts", {})
    vm = CounterMetricFamily(f"{PREFIX}_voicemail_calls", "Unanswered calls forwarded to voicemail, by "
                             "reason (no-answer, user-busy, unavailable)", labels=["reason"])
    for reason, n in sorted(counts.items()):
        if reason != "failed":
            vm.add_metric([reason], n)
    yield vm
    yield _counter("voicemail_failed", "Forwarded calls voicemail did not take (the caller got the failure)",
                   counts.get("failed", 0))


class TsiloCollector(Collector):
    """Reads ``parts`` (the service tree's objects) at each scrape; absent layers are skipped."""

    def __init__(self, parts: Any, messages: MessageCounters | None = None) -> None:
        self.parts = parts
        self.messages = messages

    def collect(self) -> Iterator[Metric]:
        for part in (self._node, self._messages, self._sip, self._calls, self._location, self._silo,
                     self._auth, self._limits, self._waker, self._overload, self._cluster_relay):
            try:
                yield from part()
            except Exception:  # a broken layer must not take /metrics down with it
                log.failure("metrics: collecting {part} failed", part=part.__name__)

    def _node(self) -> Iterator[Metric]:
        # which node answers this scrape (issue 14): join on it in PromQL, e.g. `* on(instance)
        # group_left(node) libon_tsilo_node_info`; "" = a single server
        info = GaugeMetricFamily(f"{PREFIX}_node_info", "This process's cluster node id", labels=["node"])
        info.add_metric([getattr(self.parts, "node_id", "")], 1)
        yield info

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
            yield _counter("sip_strays_dropped", "Responses matching no transaction, dropped unanswered "
                           "(not ours: RFC 3261 §18.1.2)", p.transactions.strays_dropped)
        if p.transport is not None:
            yield _gauge(
                "flows", "Live connections/flows (TCP, TLS, UDP 5-tuples)", p.transport.flows.live_count()
            )
            yield from _connection_metrics(p.transport.connection_stats())
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
            # RFC 4028: a leg stopped refreshing (or our refresh got 408/481); [calls] max_call_duration
            ("session_expired", "Answered calls ended because a session timer expired"),
            ("duration_limit", "Answered calls ended at calls.max_call_duration"),
            ("flow_failovers", "Branches moved to another flow of their device (RFC 5626)"),
            ("dead_node_bindings", "Bindings behind a cluster node that is down: pushed or skipped"),
            ("transfers", "REFERs accepted: blind transfers started (b2bua/transfer.py)"),
            ("transfers_refused", "REFERs refused, the call left as it was"),
        ):
            if key in counters:
                yield _counter(f"calls_{key}" if key != "calls" else "calls_started", doc, counters[key])
        yield from _gateway_voicemail_metrics(b2bua, self.parts.config)
        out = getattr(b2bua, "calls_out", None)
        if out is not None:  # issue 13: calls up per trunk (refusals: limit_hits, call_out_<reason>)
            g = GaugeMetricFamily(f"{PREFIX}_calls_out_active", "Calls out up, per trunk", labels=["trunk"])
            active = out.policy.active()
            for trunk in sorted(out.destinations.routes.trunks):
                g.add_metric([trunk], active.get(trunk, 0))
            yield g
            yield _counter("calls_out_placed", "Calls out placed to a trunk", out.policy.placed)

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
        # [location] backend = "redis": is this node connected (REGISTERs get 500 while not)
        redis = loc.redis_stats() if hasattr(loc, "redis_stats") else None
        if redis is not None:
            yield _gauge("redis_up", "1 while the location Redis is connected", int(bool(redis["up"])))
            yield _counter("redis_loads", "Full loads of the bindings from Redis (start, reconnects)",
                           redis["loads"])
            yield _counter("redis_remote_changes", "Binding changes of other nodes applied here",
                           redis["remote_changes_applied"])
            # bindings of ours Redis lost (a restore, a fail-over) and does not have again yet
            yield _gauge("redis_write_back_pending", "Own bindings Redis lost, not yet written back",
                         redis["write_back_pending"])
            # another live process has our [cluster] node_id: this one stays out of the cluster
            yield _gauge("redis_node_id_conflict", "1 when another process holds this node id",
                         int(bool(redis["duplicate_node_id_of"])))

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


    def _auth(self) -> Iterator[Metric]:
        # failed digest attempts (registrar/auth_limits.py): what bit, and what is blocked now
        auth = self.parts.extra.get("auth") if isinstance(getattr(self.parts, "extra", None), dict) else None
        if auth is None:
            return
        s = auth.limiter.stats()
        yield _counter("auth_failures", "Digest attempts refused (wrong password, unknown user, replay...)",
                       s["failures"])
        c = CounterMetricFamily(f"{PREFIX}_auth_limited", "Requests refused unchecked by a failed-digest "
                                "limit", labels=["limit"])
        c.add_metric(["source"], s["refused_source"])
        c.add_metric(["user"], s["refused_user"])
        yield c
        g = GaugeMetricFamily(f"{PREFIX}_auth_blocked", "Sources blocked / users throttled now",
                              labels=["limit"])
        g.add_metric(["source"], s["blocked_sources_now"])
        g.add_metric(["user"], s["throttled_users_now"])
        yield g
        yield _gauge("auth_replay_entries", "Nonces in the digest replay table", auth.replay_table_size())

    def _cluster_relay(self) -> Iterator[Metric]:
        """[cluster] node_address: what this node relayed for the others (cluster/relay.py)."""
        relay = self.parts.extra.get("cluster_relay")
        if relay is None:
            return
        c = relay.counters
        fam = CounterMetricFamily(f"{PREFIX}_cluster_relayed", "Requests relayed between a peer node and "
                                  "a device's flow, by direction", labels=["direction"])
        fam.add_metric(["to_device"], c["to_device"])
        fam.add_metric(["to_peer"], c["to_peer"])
        yield fam
        yield _counter("cluster_flow_failed", "Relayed requests answered 430 Flow Failed (RFC 5626)",
                       c["flow_failed"])
        liveness = self.parts.extra.get("cluster_liveness")
        if liveness is not None:  # the nodes beating in Redis (cluster/liveness.py), this one included
            yield _gauge("cluster_nodes_alive", "Cluster nodes alive at this node's last beat",
                         len(liveness.view or ()))

    def _limits(self) -> Iterator[Metric]:
        """[limits]: how often each abuse limit bit (objects in parts.extra["limits"] report them)."""
        doc = "Requests, pushes, calls or logins refused by an abuse limit"
        hits = CounterMetricFamily(f"{PREFIX}_limit_hits", doc, labels=["limit"])
        for source in self.parts.extra.get("limits", ()):
            for name, n in sorted(source.limit_hits().items()):
                hits.add_metric([name], n)
        yield hits
        limiter = self.parts.extra.get("source_limiter")
        if limiter is not None:
            banned = len(limiter.banned())
            yield _gauge("limit_banned_sources", "Sources whose requests are dropped now", banned)
            yield _gauge("limit_tracked_sources", "Sources in the request-rate table", len(limiter))

    # issue 12: calls the waker gave up on at once, and missed-call alerts it could not send
    _WAKER_COUNTERS = (
        ("calls_all_failed", "Parked calls answered at once because every push failed"),
        ("missed_call_pushes", "Missed-call alert pushes sent"),
        ("missed_call_without_alert_token", "Missed-call alerts not sent: no pn-alert-prid in the binding"),
    )

    def _waker(self) -> Iterator[Metric]:
        waker = self.parts.extra.get("push")
        stats = waker.stats() if callable(getattr(waker, "stats", None)) else None
        if not isinstance(stats, dict):
            return
        for key, doc in self._WAKER_COUNTERS:
            if key in stats:
                yield _counter(f"push_{key}", doc, stats[key])

    def _overload(self) -> Iterator[Metric]:
        detector = self.parts.extra.get("overload")  # sip/overload.py, when [overload] enabled
        if detector is None:
            return
        yield _gauge("overloaded", "1 while overload control refuses new INVITEs", int(detector.overloaded))
        yield _gauge("overload_admitted_fraction", "Share of new INVITEs admitted", detector.fraction)
        yield _gauge("reactor_lag_seconds", "How late a 100 ms timer fires, smoothed", detector.lag)
        yield _counter("overload_episodes", "Times the server entered overload", detector.episodes)
        yield _counter("overload_rejected_invites", "New INVITEs refused with 503 (overload)", detector.shed)
        yield _counter("overload_timer_parks", "Times the lag timer stopped: no message came", detector.parks)


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# [messages]: SIP MESSAGE store-and-forward (libon_tsilo/messaging/)


class InstantMessageCollector(Collector):
    """Waiting instant messages (gauge) and what became of the others (counters)."""

    _COUNTERS = (
        ("accepted", "MESSAGEs accepted (202) and stored"),
        ("delivered", "Deliveries of a stored message to a device (2xx)"),
        ("failed", "Deliveries to a device that failed or timed out (retried at its next REGISTER)"),
        ("pushed", "Message pushes sent to sleeping devices"),
        ("done", "Messages deleted once every device got them"),
        ("expired", "Messages deleted unread by some device at [messages] ttl"),
    )

    def __init__(self, parts: Any) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        acceptor = self.parts.extra.get("messages")
        if acceptor is None:
            return
        try:
            s = acceptor.stats()
        except Exception:
            log.failure("metrics: collecting messages failed")
            return
        yield _gauge("im_waiting", "Instant messages stored, waiting for a device", s["waiting"])
        for name, doc in self._COUNTERS:
            yield _counter(f"im_{name}", doc, s[name])


def make_registry(parts: Any, messages: MessageCounters | None = None) -> CollectorRegistry:
    """A registry of our own with the live-object collector and the push collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TsiloCollector(parts, messages))
    registry.register(PushCollector(parts))
    registry.register(InstantMessageCollector(parts))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
