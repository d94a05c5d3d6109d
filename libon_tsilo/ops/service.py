"""The service tree: one MultiService that owns every listening port, timer and thread of the server.

`make_service(config)` builds it from a validated Config. Each layer is wired by one small
``_add_*`` function that reads what earlier ones put into `Parts` and adds its own objects, so
adding registrar/silo/b2bua/push/admin is one call each. Stopping the root service first runs the
registered drainers (bounded by ``ops.drain_timeout``), then stops children in reverse order, which
closes the ports and cancels their timers.

Nothing here imports ``twisted.internet.reactor`` at module level: the plugin must be able to
install the asyncio reactor before the first reactor import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.threadpool import ThreadPool

from libon_tsilo.ops.config import Config, ConfigError, ConnectionsConfig, TlsConfig
from libon_tsilo.registrar.binding import Binding, LocationObserver

if TYPE_CHECKING:
    from libon_tsilo.b2bua.manager import CallManager
    from libon_tsilo.ops.rpc import Rpc
    from libon_tsilo.push.waker import PushWaker
    from libon_tsilo.registrar.location import LocationStore
    from libon_tsilo.registrar.redis_store import RedisBindingStore
    from libon_tsilo.registrar.registrar import Registrar
    from libon_tsilo.silo.silo import Silo
    from libon_tsilo.sip.connlimits import ConnectionLimits
    from libon_tsilo.sip.flow import Flow, FlowTable
    from libon_tsilo.sip.router import Router
    from libon_tsilo.sip.tls import TLSContextFactory
    from libon_tsilo.sip.transaction import TransactionLayer
    from libon_tsilo.sip.transport import TransportLayer

__all__ = [
    "Parts",
    "LibonTsiloService",
    "ThreadPoolService",
    "make_service",
    "make_tls_context_factory",
]

log = Logger()


@dataclass
class Parts:
    """Everything the wiring functions build; later layers read earlier ones from here.

    None until its ``_add_*`` function ran (a test may build only some layers); ``waker`` stays
    None without a push sender, ``b2bua`` and ``router`` are always built by make_service."""

    config: Config
    clock: IReactorTime
    tls_context_factory: TLSContextFactory | None = None
    transport: TransportLayer | None = None
    transactions: TransactionLayer | None = None
    router: Router | None = None  # the TransactionUser that dispatches requests to the app layers
    registrar: Registrar | None = None
    location: LocationStore | None = None
    silo: Silo | None = None
    waker: PushWaker | None = None
    b2bua: CallManager | None = None
    node_id: str = ""  # this node in a cluster (ops/node.py); "" = a single server
    extra: dict[str, Any] = field(default_factory=dict)


class ThreadPoolService(Service):
    """A bounded thread pool for blocking calls (pyfcm), started and stopped with the tree."""

    def __init__(self, size: int, name: str = "libon-tsilo") -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class LibonTsiloService(MultiService):
    """The root service. It also hands our log observer to twistd (see ops/logging.py)."""

    def __init__(self, config: Config, clock: IReactorTime, log_observer: ILogObserver | None = None) -> None:
        super().__init__()
        self.setName("libon-tsilo")
        self.config = config
        self.clock = clock
        self.log_observer = log_observer
        self.parts = Parts(config=config, clock=clock)
        # callables returning a Deferred that fires when in-flight work (calls) is done; cancelled
        # when [ops] drain_timeout runs out
        self.drainers: list[Callable[[], Deferred[Any] | None]] = []
        self.draining = False  # set by the graceful shutdown (ops/shutdown.py)

    def setServiceParent(self, parent: Any) -> None:
        # twistd creates the Application after makeService and, when it starts logging, prefers an
        # ILogObserver component on it over its default observer: that is where ours goes.
        if (
            self.log_observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def stopService(self) -> Deferred[None]:
        d = self._drain()
        d.addCallback(lambda _: self._flush())
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    def _drain(self) -> Deferred[None]:
        if not self.drainers or not self.running:
            return _succeed()
        waits = [maybeDeferred(drain) for drain in self.drainers]
        done: Deferred[str] = Deferred()
        all_done = DeferredList(waits, consumeErrors=True)

        def timeout() -> None:
            _fire(done, "timeout")
            for wait in waits:  # stops their polling timers; all_done fires then
                if not wait.called:
                    wait.cancel()

        def drained(_: object) -> None:
            if timer.active():
                timer.cancel()
            _fire(done, "drained")

        timer = self.clock.callLater(self.config.ops.drain_timeout, timeout)
        all_done.addCallback(drained)
        return done.addCallback(lambda how: log.info("drain finished: {how}", how=how))

    def _flush(self) -> Deferred[Any]:
        """Persist every binding change before the services (and the SQLite store) stop."""
        location = self.parts.location
        if location is None:
            return _succeed()
        d = maybeDeferred(location.flush)
        d.addErrback(lambda f: log.failure("flushing the location store failed", f))
        return d


_T = TypeVar("_T")


def _built(part: _T | None) -> _T:
    """A part an earlier ``_add_*`` function built (WIRING's order guarantees it)."""
    if part is None:
        raise RuntimeError("ops/service.py: a layer was wired before one it needs")
    return part


def _succeed() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.callback(None)
    return d


def _fire(d: Deferred[Any], value: Any) -> None:
    if not d.called:
        d.callback(value)


class _OnStop(Service):
    """Runs a plain object's stop() (cancel timers, forget state) when the tree stops."""

    def __init__(self, stop: Callable[[], Any]) -> None:
        self._stop = stop

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        return maybeDeferred(self._stop)


def _attach(root: MultiService, obj: Any, name: str) -> None:
    """Put ``obj`` in the tree under ``name``: as itself when it is a service, else through its
    stop() method. Children stop in the reverse order of attachment, so the transport (attached
    first) goes down last, after everything that could still send."""
    svc = obj if IService.providedBy(obj) else _OnStop(obj.stop)
    svc.setName(name)
    svc.setServiceParent(root)


class _CallsService(Service):
    """Ends the calls still up when the tree stops (after the drain gave up): their ring, session
    and retransmission timers go with them, and the silo and the waker hear that they ended."""

    def __init__(self, calls: CallManager) -> None:
        self.calls = calls

    def stopService(self) -> None:
        super().stopService()
        for call in list(self.calls.calls.values()):
            try:
                call.end("shutdown")
            except Exception:
                log.failure("ending a call at shutdown failed", call_id=call.call_id)


# ---------------------------------------------------------------------------------------------
# TLS


def make_tls_context_factory(tls: TlsConfig) -> TLSContextFactory | None:
    """The sip/tls context factory for [tls], or None with neither a certificate nor a CA file.

    A CA file alone still matters: it is the trust root of our outbound TLS connections. Bad PEM
    files (unparsable, key not matching) surface as ConfigError so the plugin reports them like any
    other config problem, before anything listens.
    """
    if not tls.certificate and not tls.ca_file:
        return None
    from libon_tsilo.sip.tls import TLSConfigError, TLSContextFactory

    try:
        return TLSContextFactory(
            certificate=tls.certificate,
            private_key=tls.private_key,
            ca_file=tls.ca_file,
            verify_client=tls.verify_client,
        )
    except TLSConfigError as exc:
        key, sep, problem = str(exc).partition(": ")
        raise ConfigError(key if sep else "tls", problem if sep else str(exc)) from None


# ---------------------------------------------------------------------------------------------
# wiring: one function per layer, called in dependency order by make_service


def _add_node_identity(root: LibonTsiloService, parts: Parts) -> None:
    from libon_tsilo.ops.node import resolve_node_id

    parts.node_id = resolve_node_id(parts.config)


def _add_sip_stack(root: LibonTsiloService, parts: Parts) -> None:
    cfg = parts.config.sip
    parts.tls_context_factory = make_tls_context_factory(parts.config.tls)
    from libon_tsilo.sip.timers import SERVER_SLACK_SHARE
    from libon_tsilo.sip.transaction import TransactionLayer
    from libon_tsilo.sip.transport import TransportLayer

    internal = [parts.config.cluster.node_address] if parts.config.cluster.node_address else []
    parts.transport = TransportLayer(
        [*cfg.listen, *internal],  # the cluster's internal listener last: public ones come first
        parts.clock,
        flow_idle_timeout=float(cfg.flow_idle_timeout),
        max_message_size=cfg.max_message_size,
        tls_context_factory=parts.tls_context_factory,
        advertised_host=cfg.advertised_host or None,
        limits=_connection_limits(parts.config.connections),
        udp_receive_buffer=cfg.udp_receive_buffer,
        reuse_port=cfg.listen if parts.config.cluster.reuse_port else (),  # the public ones only
        max_udp_pins=parts.config.cluster.max_udp_pins if parts.config.cluster.reuse_port else 0,
    )
    _attach(root, parts.transport, "transport")
    # the final waits end in batches (sip/timers.py final_wait_slack): fewer wake-ups at a steady load
    parts.transactions = TransactionLayer(
        parts.transport, parts.clock, t1=cfg.t1, t2=cfg.t2, t4=cfg.t4, slack_share=SERVER_SLACK_SHARE
    )
    _attach(root, parts.transactions, "transactions")


def _add_limits(root: LibonTsiloService, parts: Parts) -> None:
    """[limits]: the per-source request limiter at the transaction layer's entry (sip/limits.py).

    parts.extra["limits"] lists every object with a ``limit_hits()`` (the /metrics counters);
    parts.extra["limit_exempt"] is the exempt-source filter the call layer's limits share.
    """
    from libon_tsilo.sip.limits import SourceFilter, SourceLimiter

    cfg = parts.config.limits
    # [cluster] trusted_peers are exempt on the internal listener only (_exempt_nodes_on_internal_listener):
    # on the public ones a broad private range may hold devices or an SNATing balancer
    exempt = SourceFilter([*cfg.exempt_sources, *_trusted_peers(parts.config).networks()])
    parts.extra["limit_exempt"] = exempt
    parts.extra.setdefault("limits", [])
    if cfg.requests_per_second <= 0:
        return
    transport = _built(parts.transport)
    limiter = SourceLimiter(
        parts.clock, cfg.requests_per_second, cfg.burst, cfg.ban_time, exempt, cfg.max_sources,
        respond=lambda resp, flow: transport.send_response(resp, flow),  # late: metrics wrap it
    )
    _built(parts.transactions).admit = limiter.admit
    parts.extra["source_limiter"] = limiter
    parts.extra["limits"].append(limiter)


def _connection_limits(cfg: ConnectionsConfig) -> ConnectionLimits:
    """[connections] as the transport's ConnectionLimits (the same names: sip/ cannot import ops/)."""
    from dataclasses import asdict

    from libon_tsilo.sip.connlimits import ConnectionLimits

    return ConnectionLimits(**asdict(cfg))


class _FlowRelease(LocationObserver):
    """The flow of a removed binding goes back to the unbound idle timeout."""

    def __init__(self, flows: FlowTable) -> None:
        self.flows = flows

    def binding_added(self, binding: Binding, flow: Flow | None) -> None:
        pass

    def binding_refreshed(self, binding: Binding, flow: Flow | None) -> None:
        pass

    def binding_removed(self, binding: Binding, reason: str) -> None:
        if binding.flow_id is not None:
            self.flows.recheck(binding.flow_id)


class LocationService(Service):
    """Restores the bindings at start; flushes them to disk and stops the expiry timer at stop."""

    def __init__(self, location: LocationStore) -> None:
        self.location = location

    def startService(self) -> None:
        super().startService()
        self.location.start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return maybeDeferred(self.location.stop)


def _redis_persistence(parts: Parts) -> RedisBindingStore:
    """[location] backend = "redis": the cluster's bindings (registrar/redis_store.py)."""
    from libon_tsilo.registrar.asyncio_bridge import NeedsAsyncioReactor, reactor_loop
    from libon_tsilo.registrar.redis_store import RedisBindingStore, make_redis_client

    loc = parts.config.location
    try:
        loop = reactor_loop()  # e.g. `twistd -r epoll` overrode [ops] reactor
    except NeedsAsyncioReactor as exc:
        raise ConfigError("location.backend", str(exc)) from None
    client = make_redis_client(loc.url, loc.username, loc.password, loc.sentinels, loc.service_name)
    cluster = parts.config.cluster
    # unless the node that answers a REGISTER relays (and holds, cluster/ordering.py) every INVITE to
    # its device, a node forking directly must hear of the binding only after the 200 is sent
    # ("auto": the workers sharing our public socket fork to our UDP devices directly)
    relays_all = cluster.udp_via_path is True or (cluster.udp_via_path == "auto" and not cluster.reuse_port)
    after_answer = not (cluster.node_address and relays_all)
    return RedisBindingStore(
        client, parts.clock, node_id=parts.node_id, key_prefix=loc.key_prefix, loop=loop,
        publish_after_answer=after_answer,
        stop_wait=parts.config.ops.drain_timeout,  # write-backs still pending are acknowledged data
    )


def _add_registrar(root: LibonTsiloService, parts: Parts) -> None:
    from libon_tsilo.registrar.auth import AuthPolicy
    from libon_tsilo.registrar.auth_limits import FailureLimits
    from libon_tsilo.registrar.location import LocationStore
    from libon_tsilo.registrar.registrar import Registrar
    from libon_tsilo.registrar.sqlite_store import SqliteBindingStore
    from libon_tsilo.registrar.users import UsersDB

    cfg = parts.config
    persistence: SqliteBindingStore | RedisBindingStore | None = None
    if cfg.location.backend == "sqlite":
        from twisted.internet import reactor

        persistence = SqliteBindingStore(
            cfg.location.path, parts.clock, flush_interval=cfg.location.flush_interval_ms / 1000.0,
            reactor=reactor,
        )
    elif cfg.location.backend == "redis":
        persistence = _redis_persistence(parts)
    parts.location = location = LocationStore(parts.clock, persistence, node_id=parts.node_id)
    auth = None
    if cfg.auth.enabled:
        auth = AuthPolicy(
            parts.clock, UsersDB(cfg.auth.users_db), realm=cfg.auth.realm, secret=cfg.auth.secret,
            nonce_lifetime=float(cfg.auth.nonce_lifetime), peers=_trusted_peers(cfg),
            algorithms=cfg.auth.algorithms, local_domains=cfg.sip.domains,
            limits=FailureLimits(
                per_source=cfg.auth.failed_per_source, per_user=cfg.auth.failed_per_user,
                window=float(cfg.auth.failed_window), block=float(cfg.auth.failed_block),
                known_source_ttl=float(cfg.auth.known_source_ttl),
            ),
        )
    parts.extra["auth"] = auth
    reg = cfg.registrar
    parts.registrar = registrar = Registrar(
        parts.clock, location, domains=cfg.sip.domains, auth=auth, use_domain=reg.use_domain,
        min_expires=reg.min_expires, max_expires=reg.max_expires, default_expires=reg.default_expires,
        max_contacts=reg.max_contacts, on_max_contacts=reg.on_max_contacts,
        pnsreg_interval=reg.pnsreg_interval, push_providers=cfg.push.providers,
        flow_timer=reg.flow_timer,
    )
    parts.extra.setdefault("limits", []).append(registrar)  # a Path over MAX_PATH_BYTES
    flows = _built(parts.transport).flows
    flows.subscribe_close(registrar.flow_closed)
    # a flow a binding came over lives as long as the registration (RFC 5626), not the unbound idle
    flows.add_keeper(lambda flow_id: bool(location.by_flow(flow_id)))
    location.subscribe(_FlowRelease(flows))
    _attach(root, LocationService(location), "location")
    if auth is not None:
        _attach(root, auth, "auth")  # nonce and failure-window timers


def _add_silo(root: LibonTsiloService, parts: Parts) -> None:
    from libon_tsilo.silo.silo import Silo

    location = _built(parts.location)
    calls, limits = parts.config.calls, parts.config.limits
    parts.silo = silo = Silo(parts.clock, location, max_pending_per_aor=calls.max_pending_per_aor,
                             max_total=limits.max_parked_total)
    location.subscribe(silo)
    _attach(root, silo, "silo")  # the linger timers of ended calls


def _add_push(root: LibonTsiloService, parts: Parts) -> None:
    """Senders for `[push] providers`, a PushWaker over them (parts.waker, parts.extra["push"]).

    No sender at all leaves parts.waker None (the call layer logs instead of pushing). Credentials
    that cannot be loaded are logged once, critically, at start (and at each reload). The waker
    observes the location store (push-to-REGISTER latency, refresh pushes) and removes bindings of
    dead tokens through the registrar. parts.extra["reload_push"]() re-reads the push credentials.
    """
    from libon_tsilo.push.router import PushRouter, build_senders
    from libon_tsilo.push.waker import PushWaker

    cfg = parts.config.push
    if not cfg.providers:
        return
    fcm_pool = None
    if "fcm" in cfg.providers and cfg.fcm:
        pool_svc = ThreadPoolService(cfg.fcm_threads, name="push-fcm")
        pool_svc.setName("push-fcm-threads")
        pool_svc.setServiceParent(root)
        fcm_pool = pool_svc.pool
    reactor = parts.clock if hasattr(parts.clock, "callFromThread") else None  # else the global one

    def load(push_cfg: Any) -> list[Any]:
        senders, errors = build_senders(push_cfg, parts.clock, fcm_pool, reactor=reactor)
        for error in errors:
            log.critical("push disabled for {what}; fix the configuration and reload", what=error)
        return senders

    senders = load(cfg)
    if not senders:
        log.critical("[push] providers = {p} but no sender could be built: devices will not be woken",
                     p=list(cfg.providers))
        return
    waker = PushWaker(
        parts.clock,
        PushRouter(senders),
        remove_binding=_built(parts.registrar).remove,
        skip_push_if_registered_within=float(cfg.skip_push_if_registered_within),
        cancelled_ios_call=cfg.cancelled_ios_call,
        refresh_before_expiry=float(cfg.refresh_before_expiry),
        close_grace=float(parts.config.calls.ring_timeout) + 5.0,
        pushes_per_device_per_minute=parts.config.limits.pushes_per_device_per_minute,
    )
    parts.extra.setdefault("limits", []).append(waker)
    _built(parts.location).subscribe(waker)

    class PushService(Service):
        def startService(self) -> None:
            super().startService()
            waker.start(parts.location)

        def stopService(self) -> Deferred[Any]:
            super().stopService()
            return waker.stop()

    svc = PushService()
    svc.setName("push")
    svc.setServiceParent(root)

    def reload_push(new_config: Config | None = None) -> bool:
        """Rebuild the senders from the [push] credentials of ``new_config`` (SIGHUP: the reloader's
        freshly loaded Config), else of the config file read again; False when nothing was applied."""
        from libon_tsilo.ops.config import load_config

        push_cfg = new_config.push if new_config is not None else cfg
        if new_config is None and parts.config.source is not None:
            try:
                push_cfg = load_config(parts.config.source).push
            except ConfigError as err:
                log.error("push: credentials not reloaded: {error}", error=str(err))
                return False
        new = load(push_cfg)
        if not new:
            log.error("push: no sender could be built from the new configuration; keeping the old ones")
            return False
        waker.replace_senders(new)
        log.info("push: {n} sender(s) reloaded", n=len(new))
        return True

    parts.waker = waker
    parts.extra["push"] = waker
    parts.extra["reload_push"] = reload_push


def _trusted_peers(cfg: Config) -> Any:
    """[auth] trusted_sources and [[gateways]]: the one list of trusted peers (registrar/peers.py)."""
    from libon_tsilo.registrar.peers import Gateway, TrustedPeers

    gateways = [Gateway(g.name, g.sources, g.strip_prefix, g.add_prefix) for g in cfg.gateways]
    return TrustedPeers(cfg.auth.trusted_sources, gateways)


def _number_and_voicemail_kwargs(parts: Parts, auth: Any) -> dict[str, Any]:
    """Issue 13 for the call layer: numbers -> users (gateways, users' numbers) and [voicemail]."""
    from libon_tsilo.b2bua.voicemail import VoicemailPolicy
    from libon_tsilo.routing.numbers import e164_of, owner_of
    from libon_tsilo.registrar.users import UsersDB

    cfg = parts.config
    if auth is not None:
        users = auth.users
    elif cfg.gateways or cfg.voicemail.target:
        users = parts.extra["users_db"] = UsersDB(cfg.auth.users_db)  # digest off: numbers, voicemail
    else:
        return {}
    plan = cfg.dial_plan()

    def user_of_number(uri: Any, gateway: Any) -> str | None:
        """A gateway's dialled number -> the user who owns it (one mapping with calls out's)."""
        record = owner_of(e164_of(uri, plan, gateway.rewrite if gateway is not None else None), users)
        return record.username if record is not None else None

    def user_wants_voicemail(user: str) -> bool:
        record = users.get(user)
        return record is None or record.voicemail  # not in the database: the server's default (on)

    kwargs: dict[str, Any] = {"user_of_number": user_of_number, "home_domain": cfg.sip.domains[0]}
    vm = cfg.voicemail
    if vm.target:
        kwargs["voicemail"] = VoicemailPolicy.build(vm.target, vm.on_busy, vm.on_no_answer, vm.on_unavailable,
                                                    user_wants_voicemail)
    return kwargs


def _add_b2bua(root: LibonTsiloService, parts: Parts) -> None:
    from libon_tsilo.b2bua.manager import (
        CallManager,
        CallSettings,
        authorizer_from_peers,
        authorizer_from_policy,
    )
    from libon_tsilo.b2bua.ports import TransactionPort
    from libon_tsilo.sip.hostnames import HostSet

    from libon_tsilo.routing.local import LocalDomains

    cfg = parts.config
    domains = HostSet(cfg.sip.domains)
    is_local = LocalDomains(domains)  # compiled: a lambda here was an interpreted call per call
    auth = parts.extra.get("auth")
    kwargs: dict[str, Any] = {}
    if auth is not None:
        kwargs["authorize"] = authorizer_from_policy(auth)
        kwargs["user_exists"] = auth.users.exists  # the users database: unknown users get 404 at once
    elif cfg.gateways or cfg.auth.trusted_sources:
        kwargs["authorize"] = authorizer_from_peers(_trusted_peers(cfg))  # no digest, peers still trusted
    kwargs.update(_number_and_voicemail_kwargs(parts, auth))
    if cfg.limits.max_parked_per_source > 0:
        from libon_tsilo.b2bua.admission import CallerSources

        exempt = parts.extra.get("limit_exempt", ())
        kwargs["sources"] = CallerSources(cfg.limits.max_parked_per_source, exempt)
    kwargs["calls_out"] = _calls_out(parts, is_local)
    parts.b2bua = calls = CallManager(
        parts.clock,
        TransactionPort(_built(parts.transactions), parts.clock),
        _built(parts.silo),
        _built(parts.location),
        parts.waker,
        CallSettings.from_config(cfg.calls, use_domain=cfg.registrar.use_domain),
        is_local=is_local,
        **kwargs,
    )
    parts.extra.setdefault("limits", []).extend((calls, kwargs["calls_out"].policy))
    flows = _built(parts.transport).flows
    flows.subscribe_close(calls.flow_closed)
    flows.add_keeper(calls.flows.__contains__)  # a call's connection stays
    _attach(root, _CallsService(calls), "calls")


def _calls_out(parts: Parts, is_local: Callable[[Any], bool]) -> Any:
    """Calls to phone numbers and routed domains (issue 13): [dialplan], [[trunks]], [[routes]]."""
    from libon_tsilo.b2bua.outbound import CallsOut
    from libon_tsilo.registrar.registrar import aor_key
    from libon_tsilo.routing.destinations import Destinations
    from libon_tsilo.routing.policy import CallOutPolicy
    from libon_tsilo.routing.routes import Route, RouteTable
    from libon_tsilo.routing.trunks import Trunk

    cfg = parts.config
    trunks = [Trunk.from_config(t) for t in cfg.trunks]
    routes = RouteTable([Route(r.trunk, r.prefix, r.domain) for r in cfg.routes], trunks)
    auth = parts.extra.get("auth")
    users = auth.users if auth is not None else parts.extra.get("users_db")
    location, use_domain = _built(parts.location), cfg.registrar.use_domain
    destinations = Destinations(cfg.dial_plan(), routes, users, is_local=is_local,
                                user_exists=users.exists if users is not None else None,
                                registered=lambda uri: bool(location.lookup(aor_key(uri, use_domain))))
    policy = CallOutPolicy(parts.clock, cfg.calls_out.max_calls_per_user)
    return CallsOut(destinations, policy, users, cfg.calls_out.ring_timeout, cfg.sip.domains[0])


def _add_router(root: LibonTsiloService, parts: Parts) -> None:
    from libon_tsilo.sip.router import Router
    from libon_tsilo.sip.uas_core import UASCore

    parts.router = router = Router(UASCore(server=parts.config.sip.user_agent))
    _built(parts.transactions).tu = router
    registrar = _built(parts.registrar)
    router.route("REGISTER", registrar.handle_register, registrar.extensions)
    calls = parts.b2bua
    if calls is not None:
        router.route("INVITE", calls.handle_invite)
        router.in_dialog = calls.handle_in_dialog
        router.ack = calls.handle_ack
        router.cancel = calls.handle_cancel
        router.stray = calls.stray_response


class MessagesService(Service):
    """Restores the waiting messages at start (after the bindings); flushes and closes their store at
    stop (before the transport goes down: a delivery still in flight is simply tried again later)."""

    def __init__(self, outbox: Any, delivery: Any) -> None:
        self.outbox = outbox
        self.delivery = delivery

    def startService(self) -> None:
        super().startService()
        self.outbox.start()
        self.delivery.start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.delivery.stop()
        return maybeDeferred(self.outbox.stop)


def _add_messages(root: LibonTsiloService, parts: Parts) -> None:
    """[messages]: SIP MESSAGE store-and-forward (libon_tsilo/messaging/), parts.extra["messages"]."""
    cfg = parts.config
    if not cfg.messages.enabled:
        return
    from libon_tsilo.messaging.accept import MessageAcceptor
    from libon_tsilo.messaging.delivery import MessageDelivery
    from libon_tsilo.messaging.outbox import Outbox
    from libon_tsilo.messaging.store import MemoryMessageStore, MessageStore
    from libon_tsilo.messaging.uac import TransactionSender
    from libon_tsilo.registrar.registrar import aor_key
    from libon_tsilo.routing.local import LocalDomains
    from libon_tsilo.sip.hostnames import HostSet

    store: MessageStore
    loc, flush_interval = cfg.location, cfg.location.flush_interval_ms / 1000.0
    if loc.backend == "sqlite":
        from twisted.internet import reactor

        from libon_tsilo.messaging.sqlite_store import SqliteMessageStore

        store = SqliteMessageStore(cfg.messages.db, parts.clock, flush_interval, reactor=reactor)
    elif loc.backend == "redis":
        from twisted.internet import reactor

        from libon_tsilo.messaging.redis_store import RedisMessageStore, make_blocking_client

        client = make_blocking_client(loc.url, loc.username, loc.password, loc.sentinels, loc.service_name)
        store = RedisMessageStore(client, parts.clock, node_id=parts.node_id, key_prefix=loc.key_prefix,
                                  flush_interval=flush_interval, reactor=reactor)
    else:
        store = MemoryMessageStore()
    location = _built(parts.location)
    outbox = Outbox(parts.clock, store, ttl=float(cfg.messages.ttl))
    delivery = MessageDelivery(parts.clock, outbox, location, TransactionSender(_built(parts.transactions)),
                               notifier=parts.waker, push_preview=cfg.messages.push_preview)
    location.subscribe(delivery)
    auth = parts.extra.get("auth")
    acceptor = MessageAcceptor(
        parts.clock, outbox, delivery, is_local=LocalDomains(HostSet(cfg.sip.domains)),
        aor_key=lambda uri: aor_key(uri, cfg.registrar.use_domain), auth=auth,
        user_exists=auth.users.exists if auth is not None else None, max_size=cfg.messages.max_size,
        max_per_user=cfg.messages.max_per_user, per_sender_per_minute=cfg.messages.per_sender_per_minute,
        max_total=cfg.messages.max_total, max_per_sender_per_user=cfg.messages.max_per_sender_per_user,
        user_of_number=_message_user_of_number(cfg, auth.users if auth is not None else None),
        home_domain=cfg.sip.domains[0],
    )
    _built(parts.router).route("MESSAGE", acceptor.handle_message)
    parts.extra.setdefault("limits", []).append(acceptor)
    parts.extra["messages"] = acceptor
    _attach(root, MessagesService(outbox, delivery), "messages")


def _message_user_of_number(cfg: Config, users: Any) -> Any:
    """A MESSAGE to a number -> its owner's user name: the calls' mapping (routing/numbers.py)."""
    if users is None:
        return None  # no users database (digest off): nobody owns a number
    from libon_tsilo.routing.numbers import e164_of, owner_of

    plan = cfg.dial_plan()

    def user_of_number(uri: Any) -> str | None:
        record = owner_of(e164_of(uri, plan), users)
        return record.username if record is not None else None

    return user_of_number


def _add_cluster(root: LibonTsiloService, parts: Parts) -> None:
    """[cluster] node_address: our Path entries on REGISTER, forks through other nodes, the relay
    of their forks over our flows (libon_tsilo/cluster/). parts.extra["cluster_relay"]."""
    cfg = parts.config.cluster
    if not cfg.node_address:
        return
    from libon_tsilo.cluster.node import ClusterNode
    from libon_tsilo.cluster.relay import Relay
    from libon_tsilo.util import random_token

    if not cfg.secret:
        log.info("cluster: no [cluster] secret: the flow tokens of this node last until it restarts")
    transactions = _built(parts.transactions)
    node = ClusterNode(_built(parts.transport), cfg.node_address, (cfg.secret or random_token(32)).encode(),
                       trusted_peers=cfg.trusted_peers, peers=cfg.peers, udp_via_path=cfg.udp_via_path,
                       host=cfg.host)
    relay = Relay(node, transactions, parts.clock)
    router = _built(parts.router)
    router.proxy = relay.handle
    router.cancel = relay.wrap_cancel(router.cancel)
    # stateless where nothing needs a transaction (RFC 3261 §16.11, cluster/relay.py), from the transport
    _built(parts.transport).forward = relay.forward
    _built(parts.transport).forward_bytes = relay.forward_bytes
    _built(parts.registrar).path_stamp = node.path_entry
    relay.register_answered = _built(parts.registrar).when_answered  # cluster/ordering.py
    if parts.b2bua is not None:
        parts.b2bua.path_router = node.next_hop
        _mark_for_siblings(root, parts.b2bua.port, node)
    if parts.extra.get("messages") is not None:  # [messages]: MESSAGEs to devices on other nodes too
        # (always through the Path; its Via is marked when it leaves our shared socket: a sibling
        # the device is pinned to passes the answer on)
        parts.extra["messages"].delivery.sender.path_router = node.next_hop_relayed
        _mark_for_siblings(root, parts.extra["messages"].delivery.sender, node, "cluster-mark-messages")
    parts.extra["cluster_node"] = node
    parts.extra["cluster_relay"] = relay
    parts.extra.setdefault("limits", []).append(relay)
    if node.auto and cfg.reuse_port and cfg.max_udp_pins > 0:  # the straight fork pins the device
        node.pin = _built(parts.transport).pin_udp
        if parts.b2bua is not None:
            parts.b2bua.path_sent = node.branch_sent  # pinned when a branch is sent, not when routed
        parts.extra["limits"].append(_built(parts.transport).pins)
    _exempt_nodes_on_internal_listener(parts, node)
    _add_cluster_liveness(root, parts, node)


def _mark_for_siblings(root: LibonTsiloService, port: Any, node: Any, name: str = "cluster-mark") -> None:
    """udp_via_path = "auto": once the transport listens (the shared sockets are known), the call
    layer's (and the MESSAGE sender's) Via and Contact name this node, so that a worker sharing our
    public socket passes on what the kernel gives it of our dialogs (cluster/node.py ``mark``)."""
    if not node.auto or not hasattr(port, "mark"):
        return

    class _SiblingMark(Service):  # started after the transport, which binds in its startService
        def startService(self) -> None:
            super().startService()
            port.mark = node.mark

    _attach(root, _SiblingMark(), name)


def _exempt_nodes_on_internal_listener(parts: Parts, node: Any) -> None:
    """The other nodes send every relayed call from one address each: a trusted peer's request on
    our internal listener skips the per-source limiter; on a public listener it is limited as any."""
    limiter = parts.extra.get("source_limiter")
    if limiter is None:
        return
    from libon_tsilo.sip.listen import same_ip

    admit, trusted = limiter.admit, node.trusted
    internal: list[tuple[str, int]] = []  # (host, port) once the listener is bound (OS-picked port)

    def admit_unless_a_node(request: Any, flow: Any) -> bool:
        # every request passes here: the port first, then the cached source lookup, and the
        # address parse (same_ip) only when the text differs
        if not internal:
            try:
                internal.append(node.bound)
            except RuntimeError:
                return admit(request, flow)
        host, port = internal[0]
        key = flow.key
        local = key.local
        if local[1] == port and key.remote[0] in trusted and (local[0] == host or same_ip(local[0], host)):
            return True
        return admit(request, flow)

    _built(parts.transactions).admit = admit_unless_a_node
    parts.extra["cluster_relay"].internal_exempt = True  # the relay skips the call for them itself


def _add_cluster_liveness(root: LibonTsiloService, parts: Parts, node: Any) -> None:
    """Each node beats in Redis and knows which peers are alive: the call layer goes around a dead
    node's bindings (cluster/liveness.py). Needs the Redis store; without it every peer is alive."""
    from libon_tsilo.cluster.liveness import PeerLiveness
    from libon_tsilo.registrar.redis_store import RedisBindingStore

    store = _built(parts.location).persistence
    if not isinstance(store, RedisBindingStore):
        return
    node.liveness = liveness = PeerLiveness(parts.clock, node.member, store.heartbeat, store.leave)
    if parts.b2bua is not None:
        parts.b2bua.peer_alive = node.peer_alive
    parts.extra["cluster_liveness"] = liveness
    _attach(root, liveness, "cluster-liveness")


def _add_overload(root: LibonTsiloService, parts: Parts) -> None:
    """[overload]: the lag detector and its gate on new INVITEs (parts.extra["overload"])."""
    cfg = parts.config.overload
    if not cfg.enabled or parts.transactions is None:
        return
    from libon_tsilo.sip.overload import OverloadDetector, install

    detector = OverloadDetector(
        parts.clock, enter_lag=cfg.enter_lag_ms / 1000.0, leave_lag=cfg.leave_lag_ms / 1000.0,
        depth=parts.transactions.__len__, max_depth=cfg.max_transactions,
    )
    detector.setName("overload")
    detector.setServiceParent(root)
    node = parts.extra.get("cluster_node")  # a peer's relayed INVITE was admitted by that peer
    install(detector, parts.transport, parts.transactions, retry_after=cfg.retry_after,
            exempt=node.exempt_from_overload if node is not None else None)
    parts.extra["overload"] = detector


def _add_manhole(root: LibonTsiloService, parts: Parts) -> None:
    cfg = parts.config.manhole
    if not cfg.listen:
        return
    from pathlib import Path

    from libon_tsilo.ops.manhole import HOST_KEY_NAME, ManholeService, load_host_key, make_namespace

    rpc = _ops_tools(root, parts)
    # the state directory: where [location] path lives (writable under systemd's StateDirectory=)
    try:
        host_key = load_host_key(Path(parts.config.location.path).parent / HOST_KEY_NAME)
    except Exception as exc:  # unreadable, corrupt, or a read-only state directory
        raise ConfigError("manhole.listen", f"cannot load or create the host key: {exc}") from None
    svc = ManholeService(
        cfg.listen, make_namespace(root, parts, rpc), host_key,
        authorized_keys=cfg.authorized_keys, passwords=cfg.passwords,
        reactor=parts.clock if _is_reactor(parts.clock) else None,
        max_failures=parts.config.limits.login_max_failures, ban_time=parts.config.limits.login_ban_time,
    )
    svc.setServiceParent(root)
    parts.extra["manhole"] = svc
    parts.extra.setdefault("limits", []).append(svc.guard)


def _ops_tools(root: LibonTsiloService, parts: Parts) -> Rpc:
    """What the manhole and the admin API share, built once: the RPC functions and the message
    counters (hooked into the transport whether or not anything serves them: one dict increment)."""
    rpc = parts.extra.get("rpc")
    if rpc is not None:
        return rpc
    from libon_tsilo.ops.metrics import MessageCounters, install_message_hooks
    from libon_tsilo.ops.rpc import Rpc

    counters = MessageCounters()
    parts.extra["message_counters"] = counters
    install_message_hooks(parts.transport, counters)
    # (pushes are counted by the PushWaker itself: metrics and the RPC read waker.push_stats)
    rpc = Rpc(parts, root)
    parts.extra["rpc"] = rpc
    return rpc


def _add_admin(root: LibonTsiloService, parts: Parts) -> None:
    rpc = _ops_tools(root, parts)
    cfg = parts.config.admin
    if not cfg.listen:
        return
    from libon_tsilo.ops.admin import AdminResource, AdminService
    from libon_tsilo.ops.metrics import make_registry

    registry = make_registry(parts, parts.extra.get("message_counters"))
    parts.extra["metrics_registry"] = registry
    if not cfg.token:
        log.warn("admin API: no [admin] token set: /rpc answers loopback clients only")
    limits = parts.config.limits
    resource = AdminResource(
        rpc, registry, token=cfg.token, metrics_public=cfg.metrics_public, clock=parts.clock,
        max_failures=limits.login_max_failures, ban_time=limits.login_ban_time,
    )
    parts.extra.setdefault("limits", []).append(resource)  # cross-site requests, wrong tokens
    svc = AdminService(cfg.listen, resource, reactor=parts.clock if _is_reactor(parts.clock) else None)
    svc.setServiceParent(root)
    parts.extra["admin"] = svc


def _add_shutdown(root: LibonTsiloService, parts: Parts) -> None:
    """SIGTERM: refuse new INVITEs (503), end parked calls (480), drain, flush, exit 0."""
    from libon_tsilo.ops.shutdown import GracefulShutdown

    real = _is_reactor(parts.clock)
    svc = GracefulShutdown(
        root, parts, retry_after=max(1, parts.config.ops.drain_timeout),
        reactor=parts.clock if real else None, handle_sigterm=real,
    )
    svc.setServiceParent(root)
    root.drainers.append(svc.drain)
    parts.extra["shutdown"] = svc


def _is_reactor(clock: Any) -> bool:
    from twisted.internet.interfaces import IReactorTCP

    return IReactorTCP.providedBy(clock)


WIRING: list[Callable[[LibonTsiloService, Parts], None]] = [
    _add_node_identity,
    _add_sip_stack,
    _add_limits,
    _add_registrar,
    _add_silo,
    _add_push,
    _add_b2bua,
    _add_router,
    _add_messages,
    _add_cluster,
    _add_overload,
    _add_manhole,
    _add_admin,
    _add_shutdown,
]


def make_service(
    config: Config, clock: IReactorTime | None = None, log_observer: ILogObserver | None = None
) -> LibonTsiloService:
    """Build the whole server from a validated Config; nothing listens until the service starts."""
    if clock is None:
        from twisted.internet import reactor  # late: the plugin picks the reactor first

        clock = cast(IReactorTime, reactor)
    root = LibonTsiloService(config, clock, log_observer)
    for wire in WIRING:
        wire(root, root.parts)
    return root
