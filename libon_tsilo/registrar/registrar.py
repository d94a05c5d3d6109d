"""REGISTER processing (RFC 3261 §10.3) with RFC 3327 Path, RFC 5626 instances/flows, RFC 8599 push.

The request is validated completely before anything changes: a REGISTER that fails (423, 500 out of
order, 403, 555...) leaves the location store untouched, and the 200 OK lists the bindings as they
are after the update.

Matching an incoming Contact to an existing binding of the AOR, first rule that applies:
1. both carry ``+sip.instance``: same instance and same reg-id (RFC 5626 §6; two reg-ids of one
   instance are two flows, kept apart even when their push parameters are equal);
2. the RFC 8599 §5.3 push triple (provider, prid, param) is equal: the same app install, even if its
   instance or contact host changed (app reinstall, new IP);
3. neither carries an instance: RFC 3261 §19.1.4 URI equality, and a pn param present on one side
   only means no match (§5.3).
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from libon_tsilo import logflags
from libon_tsilo.registrar.auth import AuthPolicy
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.registrar.location import BindingEvent, LocationStore, StoreClosed
from libon_tsilo.registrar.pending_answers import PendingAnswers
from libon_tsilo.registrar.push_params import PN_URI_PARAMS, feature_caps, parse_push_params, pn_triple_match
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import NameAddr, parse_uint, unquote
from libon_tsilo.sip.hostnames import HostSet, canonical_host
from libon_tsilo.sip.message import Request, Response, make_response, new_tag
from libon_tsilo.sip.uri import URI, TelURI, unescape

if TYPE_CHECKING:
    from libon_tsilo.sip.flow import Flow

__all__ = ["Registrar", "aor_key", "SUPPORTED_EXTENSIONS"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

# option tags a REGISTER may Require of us (RFC 3261 §8.2.2.3)
SUPPORTED_EXTENSIONS = frozenset({"path", "outbound"})

# seconds a device waits before registering again when its binding could not be stored
NOT_STORED_RETRY_AFTER = 5
# RFC 3327 sets no bound, but every binding of a REGISTER keeps a copy of its Path, in the store and
# (in a cluster) in every node's replica and every change message: an edge proxy or two write
# ~100-300 bytes; 64 KiB of it times max_contacts is an amplification, not a route
MAX_PATH_BYTES = 2048


class _AnswerWhenStored:
    """A REGISTER's answer, sent once the location store committed its change (the 200) or could
    not (500, or 503 when stopping, with Retry-After); then its held events, and the flow's pending
    answer is done. The store calls it as it would a Deferred (``LocationStore.notify_durable``):
    a Deferred and its callback chain cost ~25k instructions per REGISTER on the Redis store."""

    def __init__(self, registrar: Registrar, stx: Any, resp: Response, request: Request,
                 events: list[BindingEvent], flow_id: str | None) -> None:
        self.registrar = registrar
        self.stx = stx
        self.resp = resp
        self.request = request
        self.events = events
        self.flow_id = flow_id
        if flow_id is not None:  # a call relayed to this flow waits for the answer (pending_answers.py)
            registrar.answers.begin(flow_id)

    def callback(self, result: object) -> None:
        self._answer(self.resp)

    def errback(self, reason: BaseException | Failure) -> None:
        # a store calls its waiters in a loop: one that raised would leave the others unanswered
        try:
            self._refuse(reason)
        except Exception:
            log.failure("REGISTER: answering a failed commit failed", call_id=self.request.header("call-id"))

    def _refuse(self, reason: BaseException | Failure) -> None:
        request = self.request
        closed = reason.check(StoreClosed) is not None if isinstance(reason, Failure) else isinstance(
            reason, StoreClosed)
        message = reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
        log.warn(
            "REGISTER for {to}: binding not stored ({reason}), answering {status}",
            to=request.header("to"),
            reason=message,
            status=503 if closed else 500,
            call_id=request.header("call-id"),
        )
        if closed:  # shutting down: another server (or this one, restarted) will take it
            resp = make_response(request, 503, "Service Unavailable", to_tag=new_tag())
        else:
            resp = make_response(request, 500, "Binding Not Stored", to_tag=new_tag())
        resp.add_header("Retry-After", str(NOT_STORED_RETRY_AFTER))
        self._answer(resp)

    def _answer(self, resp: Response) -> None:
        """Never raises: the store calls this from its write's completion, among other waiters."""
        registrar = self.registrar
        try:
            self.stx.respond(resp)
        except Exception:
            log.failure("REGISTER: answering after the commit failed", call_id=self.request.header("call-id"))
        # the bindings are stored (or live in memory, for the device's next REGISTER) whatever
        # became of the answer
        try:
            registrar.store.emit_events(self.events)
        except Exception:
            log.failure("REGISTER: the events after the commit failed",
                        call_id=self.request.header("call-id"))
        if self.flow_id is not None:
            registrar.answers.done(self.flow_id)


def aor_key(uri: URI, use_domain: bool) -> str:
    """The location key of an address-of-record: ``sip:alice@example.com``, or ``alice``.

    Scheme and user are lower-cased, escapes resolved, the host canonical (sip/hostnames.py: one
    key for ``LOCALHOST.`` and ``localhost``, ``127.1`` and ``127.0.0.1``), port and parameters
    dropped; sips: is keyed as sip: because it names the same user (the transport security is a
    routing matter).
    """
    if isinstance(uri, TelURI):
        number = uri.number.lower()
        return number if not use_domain else f"tel:{number}"
    user = unescape(uri.user).lower() if uri.user else ""
    if not use_domain:
        return user
    scheme = "sip" if uri.scheme in ("sip", "sips") else uri.scheme
    host = canonical_host(uri.host)
    if ":" in host:  # IPv6: keyed as a URI writes it (and as keys were stored before)
        host = f"[{host}]"
    return f"{scheme}:{user}@{host}" if user else f"{scheme}:{host}"


class _Reject(Exception):
    """Abort processing with this response (status, reason, extra headers)."""

    def __init__(
        self, status: int, reason: str | None = None, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(reason or str(status))
        self.status = status
        self.reason = reason
        self.headers = list(headers)


# plain classes rather than dataclasses: compiled with mypyc, a dataclass's generated __init__ stays
# interpreted (one of each per REGISTER)
class _Plan:
    """One Contact of the request, validated, before it touches the store."""

    def __init__(
        self, contact: NameAddr, expires: int, binding: Binding | None, old: Binding | None = None
    ) -> None:
        self.contact = contact
        self.expires = expires
        self.binding = binding  # None when expires == 0
        self.old = old


class _Outcome:
    def __init__(self) -> None:
        self.caps: list[str] = []
        self.outbound = False


class Registrar:
    # option tags a REGISTER may Require (the router lets them past the UAS core's 420)
    extensions = SUPPORTED_EXTENSIONS

    def __init__(
        self,
        clock: IReactorTime,
        store: LocationStore,
        domains: Iterable[str] = (),
        auth: AuthPolicy | None = None,
        use_domain: bool = True,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        max_contacts: int = 10,
        on_max_contacts: str = "reject",
        pnsreg_interval: int = 130,
        push_providers: Iterable[str] = (),
        flow_timer: int = 120,
    ) -> None:
        if on_max_contacts not in ("reject", "replace_oldest"):
            raise ValueError(f"on_max_contacts: unknown mode {on_max_contacts!r}")
        self.clock = clock
        self.store = store
        # empty: accept any domain (a lab setup); [sip] domains always has a default in practice
        self.domains = HostSet(domains)
        self.auth = auth
        self.use_domain = use_domain
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = min(max(default_expires, min_expires), max_expires)
        self.max_contacts = max_contacts
        self.on_max_contacts = on_max_contacts
        self.pnsreg_interval = pnsreg_interval
        self.push_providers = tuple(p.lower() for p in push_providers)
        # RFC 5626 §4.4.1: seconds within which an outbound device must send a keep-alive on a
        # TCP/TLS flow (0: no Flow-Timer; the device then uses its default)
        self.flow_timer = flow_timer
        # cluster (set by ops): our own Path entry for a binding registered over a flow, put first
        # (RFC 3327: the registrar's own hop), (flow, outbound) -> entry. It is not echoed in the 200:
        # the device never sees it, the other nodes route to it. None: a single node.
        self.path_stamp: Callable[[Flow, bool], str | None] | None = None
        # REGISTERs whose answer waits for the commit, per flow (the cluster relay asks)
        self.answers = PendingAnswers()
        self.path_too_long = 0  # REGISTERs refused for a Path over MAX_PATH_BYTES
        self._date = _DateCache()

    # -- public API -----------------------------------------------------------------------------

    def handle_register(self, request: Request, stx: Any, flow: Flow | None) -> None:
        """Process a REGISTER and answer it on ``stx`` (anything with ``.respond(resp)``).

        A 200 OK promises that the bindings survive a crash: with a persistent store it is sent
        when the changes are committed, and a REGISTER whose change could not be stored gets a 5xx
        with Retry-After instead (the in-memory binding stays: the device is reachable, and it will
        register again). The binding events (the silo's late fork) go out after the answer.
        """
        store = self.store
        # its changes go in one write, started once its answer waits on it: a write that fails at
        # once (the connection gone) then fails the answer too, never a 200 for nothing stored
        store.hold_writes()
        try:
            store.hold_events()
            try:
                resp, changed = self._answered(request, flow)
            finally:
                events = store.release_events()
            if changed is None or resp.status != 200 or store.persistence is None:
                stx.respond(resp)
                store.emit_events(events)
                return
            flow_id = flow.id if flow is not None else None
            answer = _AnswerWhenStored(self, stx, resp, request, events, flow_id)
            if not store.notify_durable(changed, answer):  # nothing left to wait for
                answer.callback(None)
        finally:
            store.release_writes()

    def _answered(self, request: Request, flow: Flow | None) -> tuple[Response, str | None]:
        """The REGISTER's answer and the AOR whose bindings it changed (None: none); a refusal or a
        failure is an answer too."""
        try:
            return self._process(request, flow)
        except _Reject as rej:
            log.info(
                "REGISTER for {to} refused: {status} {reason}",
                to=request.header("to"),
                status=rej.status,
                reason=rej.reason or "",
                call_id=request.header("call-id"),
            )
            resp = make_response(request, rej.status, rej.reason, to_tag=new_tag())
            for name, value in rej.headers:
                resp.add_header(name, value)
        except ParseError as exc:
            resp = make_response(request, exc.status, exc.reason, to_tag=new_tag())
        except Exception:
            log.failure("REGISTER processing failed", call_id=request.header("call-id"))
            resp = make_response(request, 500, "Server Internal Error", to_tag=new_tag())
        return resp, None

    def remove(self, binding: Binding, reason: str) -> bool:
        """Drop a binding (push layer: dead token; admin API: ul.rm)."""
        return self.store.remove(binding, reason)

    def when_answered(self, flow_id: str) -> Deferred[None] | None:
        """Fires once every REGISTER over ``flow_id`` is answered; None when none waits now."""
        return self.answers.when_answered(flow_id)

    def flow_closed(self, flow: Flow) -> None:
        """FlowTable close subscriber: bindings stay, marked as no longer reachable over that flow."""
        self.store.flow_closed(flow.id)

    def lookup(self, aor: str) -> list[Binding]:
        return self.store.lookup(aor)

    def limit_hits(self) -> dict[str, int]:
        """/metrics libon_tsilo_limit_hits_total (ops wires it)."""
        return {"register_path_too_long": self.path_too_long}

    # -- processing -----------------------------------------------------------------------------

    def _process(self, request: Request, flow: Flow | None) -> tuple[Response, str | None]:
        """The answer, and the AOR when its bindings changed (the answer waits for them on disk)."""
        to_uri = request.to.uri
        aor = self._aor(to_uri)
        self._check_require(request)
        if request.has_header("path") and sum(map(len, request.header_values("Path"))) > MAX_PATH_BYTES:
            self.path_too_long += 1
            raise _Reject(400, "Path Too Long")
        if self.auth is not None:
            result = self.auth.check(request, flow, "register")
            if result.response is not None:
                return result.response, None
        call_id = request.call_id
        cseq = request.cseq.seq
        contacts = request.contacts
        now = self.clock.seconds()
        existing = self.store.lookup(aor)
        outcome = _Outcome()

        if request.contact_star:
            if request.expires != 0:
                raise _Reject(400, "Contact * requires Expires: 0")
            for b in existing:
                self._check_order(b, call_id, cseq)
            for b in existing:
                self.store.remove(b, "unregistered")
            log.info("REGISTER {aor}: all bindings removed", aor=aor, call_id=call_id)
            return self._ok(request, aor, now, outcome, flow), aor if existing else None

        plans = [self._plan(request, aor, c, call_id, cseq, flow, now, outcome) for c in contacts]
        evict = self._apply_plan(plans, existing, call_id, cseq)
        for b in evict:
            self.store.remove(b, "replaced")
        for plan in plans:
            if plan.binding is None:
                if plan.old is not None:
                    self.store.remove(plan.old, "unregistered")
            else:
                self.store.add_or_update(plan.binding, flow, replaces=plan.old)
                outcome.outbound |= plan.binding.reg_id is not None
        if plans and logflags.debug_enabled:  # see logflags.py (the lookup is for the log only)
            log.debug(
                "REGISTER {aor}: {n} contact(s) processed, {total} binding(s)",
                aor=aor,
                n=len(plans),
                total=len(self.store.lookup(aor)),
                call_id=call_id,
            )
        return self._ok(request, aor, now, outcome, flow), aor if plans or evict else None

    def _aor(self, to_uri: URI) -> str:
        if to_uri.scheme not in ("sip", "sips") or isinstance(to_uri, TelURI):
            raise _Reject(404, "Not Found (AOR must be a sip: URI)")
        if not to_uri.user:
            raise _Reject(404, "Not Found (no user in To)")
        if self.domains and to_uri.host not in self.domains:
            raise _Reject(404, "Not Found (domain not served here)")
        return aor_key(to_uri, self.use_domain)

    @staticmethod
    def _check_require(request: Request) -> None:
        required = {v.strip().lower() for v in request.header_values("Require") if v.strip()}
        unknown = sorted(required - SUPPORTED_EXTENSIONS)
        if unknown:
            raise _Reject(420, "Bad Extension", [("Unsupported", ", ".join(unknown))])

    @staticmethod
    def _check_first_hop(request: Request) -> None:
        """RFC 5626 §6: a device asking for outbound flows must have reached us directly (we are its
        edge proxy) or through an edge proxy that said, with ``ob`` on its Path, that it keeps them."""
        if not {"outbound"} & _option_tags(request, "Supported", "Require"):
            return  # an RFC 3261 device: reg-id is just part of the binding's identity
        if len(request.vias) == 1:
            return
        paths = request.header_values("Path")
        if paths:
            try:
                if "ob" in NameAddr.parse(paths[0]).uri.params:
                    return
            except ParseError:
                pass
        raise _Reject(439, "First Hop Lacks Outbound Support")

    @staticmethod
    def _check_order(b: Binding, call_id: str, cseq: int) -> None:
        # RFC 3261 §10.3 step 7: same Call-ID and a CSeq not higher means a stale or replayed request
        if b.call_id == call_id and cseq <= b.cseq:
            raise _Reject(500, "Out of order")

    def _plan(
        self,
        request: Request,
        aor: str,
        contact: NameAddr,
        call_id: str,
        cseq: int,
        flow: Flow | None,
        now: float,
        outcome: _Outcome,
    ) -> _Plan:
        uri = contact.uri
        if isinstance(uri, TelURI) or uri.scheme not in ("sip", "sips"):
            raise _Reject(400, f"Unsupported Contact URI scheme {uri.scheme}")
        expires = self._expires(request, contact)
        if expires == 0:
            return _Plan(contact, 0, None, self._probe(aor, contact))
        q = self._q(contact)
        instance, reg_id = self._instance(contact)
        if reg_id is not None:
            self._check_first_hop(request)
        pn = parse_push_params(contact)
        pn_provider = pn_prid = pn_param = None
        if pn.present:
            if pn.provider is None:
                raise _Reject(400, "pn-prid/pn-param without pn-provider")
            if pn.provider == "":
                if not self.push_providers:
                    raise _Reject(555)
                for p in self.push_providers:
                    self._add_cap(outcome, feature_caps(p))
            elif pn.provider not in self.push_providers:
                raise _Reject(555)
            elif pn.is_query:
                self._add_cap(outcome, feature_caps(pn.provider))
            else:
                pn_provider, pn_prid, pn_param = pn.provider, pn.prid, pn.param
                interval = self.pnsreg_interval if pn.pnsreg else None
                self._add_cap(outcome, feature_caps(pn.provider, interval))
        shown = contact.copy()
        shown.params.pop("expires", None)
        binding = Binding(
            aor=aor,
            contact_uri=str(uri),
            contact=str(shown),
            expires_at=now + expires,
            registered_at=now,
            call_id=call_id,
            cseq=cseq,
            q=q,
            instance=instance,
            reg_id=reg_id,
            flow_id=flow.id if flow is not None else None,
            flow_live=bool(flow is not None and getattr(flow, "live", True)),
            received=self._received(request, flow),
            path=self._path(request, flow, reg_id is not None),
            user_agent=request.header("User-Agent"),
            pn_provider=pn_provider,
            pn_prid=pn_prid,
            pn_param=pn_param,
            pnsreg=pn.pnsreg and pn_prid is not None,
            node=self.store.node_id,  # the flow is in this node's table ([cluster] node_id)
        )
        return _Plan(contact, expires, binding)

    def _path(self, request: Request, flow: Flow | None, outbound: bool) -> list[str]:
        path = request.header_values("Path")
        if self.path_stamp is not None and flow is not None:
            ours = self.path_stamp(flow, outbound)
            if ours is not None:
                path.insert(0, ours)
        return path

    @staticmethod
    def _add_cap(outcome: _Outcome, cap: str) -> None:
        if cap not in outcome.caps:
            outcome.caps.append(cap)

    def _expires(self, request: Request, contact: NameAddr) -> int:
        raw = contact.params.get("expires")
        if raw is not None:
            try:  # parse_uint bounds the digits: int() of 4,300 or more raises ValueError
                value = parse_uint(unquote(raw), "expires parameter")
            except ParseError:
                raise _Reject(400, "Bad expires parameter") from None
        elif request.expires is not None:
            value = request.expires
        else:
            value = self.default_expires
        if value == 0:
            return 0
        if value < self.min_expires:
            raise _Reject(423, None, [("Min-Expires", str(self.min_expires))])
        return min(value, self.max_expires)

    @staticmethod
    def _q(contact: NameAddr) -> float:
        raw = contact.params.get("q")
        if raw is None:
            return 1.0
        try:
            q = float(raw)
        except ValueError:
            raise _Reject(400, "Bad q parameter") from None
        if not 0.0 <= q <= 1.0:
            raise _Reject(400, "Bad q parameter")
        return round(q, 3)

    @staticmethod
    def _instance(contact: NameAddr) -> tuple[str | None, int | None]:
        raw = contact.params.get("+sip.instance")
        instance = unquote(raw) if raw else None
        if not instance:
            # RFC 5626 §6: a reg-id without an instance is ignored
            return None, None
        reg_raw = contact.params.get("reg-id")
        if reg_raw is None:
            return instance, None
        try:
            return instance, parse_uint(reg_raw, "reg-id", 2**31 - 1)
        except ParseError:
            raise _Reject(400, "Bad reg-id parameter") from None

    @staticmethod
    def _received(request: Request, flow: Flow | None) -> tuple[str, str, int] | None:
        via = request.top_via
        if flow is not None:
            remote_host, remote_port = flow.key.remote[0], flow.key.remote[1]
            return (flow.key.transport, via.received or remote_host, via.rport or remote_port)
        return (via.transport.lower(), via.received or via.host, via.rport or via.port or 5060)

    # -- matching and limits --------------------------------------------------------------------

    def _probe(self, aor: str, contact: NameAddr) -> Binding | None:
        """The binding an expires=0 Contact removes (matched as a registration would be)."""
        instance, reg_id = self._instance(contact)
        pn = parse_push_params(contact)
        probe = Binding(
            aor=aor,
            contact_uri=str(contact.uri),
            contact="",
            expires_at=0.0,
            registered_at=0.0,
            call_id="",
            cseq=0,
            instance=instance,
            reg_id=reg_id,
            pn_provider=pn.provider or None,
            pn_prid=pn.prid or None,
            pn_param=pn.param or None,
        )
        return self._match(probe, contact.uri, self.store.lookup(aor))

    @staticmethod
    def _match(new: Binding, uri: URI, candidates: Iterable[Binding]) -> Binding | None:
        candidates = list(candidates)
        if new.instance:
            for b in candidates:
                if b.instance == new.instance and b.reg_id == new.reg_id:
                    return b
        for b in candidates:
            if pn_triple_match(new, b) and not (new.instance and b.instance == new.instance):
                return b
        if new.instance:
            return None
        for b in candidates:
            if b.instance:
                continue
            if any((p in uri.params) != (p in _uri_params(b)) for p in PN_URI_PARAMS):
                continue
            try:
                if URI.parse(b.contact_uri) == uri:
                    return b
            except ParseError:
                continue
        return None

    def _apply_plan(
        self, plans: list[_Plan], existing: list[Binding], call_id: str, cseq: int
    ) -> list[Binding]:
        """Match every plan, check ordering and max_contacts; returns the bindings to evict."""
        working = {b.key: b for b in existing}
        touched: set[str] = set()
        for plan in plans:
            if plan.binding is not None:
                plan.old = self._match(plan.binding, plan.contact.uri, working.values())
            if plan.old is not None and working.get(plan.old.key) is not plan.old:
                plan.old = None  # already consumed by an earlier Contact of this request
            if plan.old is not None:
                self._check_order(plan.old, call_id, cseq)
                del working[plan.old.key]
            if plan.binding is not None:
                # the same identity twice in one request: the last Contact wins
                working[plan.binding.key] = plan.binding
                touched.add(plan.binding.key)
        evict: list[Binding] = []
        excess = len(working) - self.max_contacts
        if excess > 0:
            if self.on_max_contacts == "reject":
                raise _Reject(403, f"Too Many Contacts (max {self.max_contacts})")
            olds = sorted((b for k, b in working.items() if k not in touched), key=lambda b: b.registered_at)
            if len(olds) < excess:
                raise _Reject(403, f"Too Many Contacts (max {self.max_contacts})")
            evict = olds[:excess]
        return evict

    # -- the answer -----------------------------------------------------------------------------

    def _ok(self, request: Request, aor: str, now: float, outcome: _Outcome, flow: Flow | None) -> Response:
        resp = make_response(request, 200, to_tag=new_tag())
        for b in self.store.lookup(aor):
            resp.add_header("Contact", b.contact_header(now))
        resp.add_header("Date", self._date.at(now))
        supported = {v.strip().lower() for v in request.header_values("Supported")}
        if "path" in supported:
            for p in request.header_values("Path"):
                resp.add_header("Path", p)
        if outcome.outbound and "outbound" in supported | _option_tags(request, "Require"):
            resp.add_header("Require", "outbound")
            # UDP flows are kept by STUN keep-alives at the device's own default interval (§4.4.2)
            if self.flow_timer and flow is not None and flow.key.transport in ("tcp", "tls"):
                resp.add_header("Flow-Timer", str(self.flow_timer))
        for cap in outcome.caps:
            resp.add_header("Feature-Caps", cap)
        return resp


class _DateCache:
    """RFC 1123 date in GMT; formatted once per second, as every 200 OK carries one. An object's
    attributes rather than a module global: compiled, a global is a dict lookup and a type check."""

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def at(self, now: float) -> str:
        second = int(now)
        if self.second != second:
            self.text = email.utils.formatdate(second, usegmt=True)
            self.second = second
        return self.text



def _option_tags(request: Request, *headers: str) -> set[str]:
    return {v.strip().lower() for name in headers for v in request.header_values(name)}


def _uri_params(b: Binding) -> dict[str, str | None]:
    try:
        return URI.parse(b.contact_uri).params
    except ParseError:
        return {}
