"""CallManager: the entry points the transaction user calls, and the tables every call lives in.

Tables (all dicts, never scanned per message):
- `calls`: caller's Call-ID -> Call;
- `dialogs`: (Call-ID, our tag) -> (Call, leg), for every leg of every live call;
- `flows`: flow id -> Call-IDs whose legs depend on that connection.
Tests assert all three (and the silo) are empty after every scenario.

Before a call is stored (limits against INVITE floods, [limits] in the config):
- with a users database (`user_exists`), an AOR with no binding at all is answered at once: 404
  when the user does not exist, 480 when it does but no device can be woken (no waker configured);
  parking is for users a push or a REGISTER can still bring;
- a full silo (`Silo.at_capacity`, max_parked_total) and a caller source with too many unanswered
  calls (`CallerSources`, max_parked_per_source) get 503 with Retry-After: the server, not the
  callee, is what is short (RFC 3261 §21.5.4); 486 stays the callee-side answer (max_pending_per_aor).

Phone numbers (issue 13): a Request-URI that dials a number (``tel:``, or a SIP user part made of
digits that is not a user name) reaches the user who owns it when the caller is a gateway
(registrar/peers.py; `user_of_number`, never a trunk: an unknown number is 404), one of our
authenticated users (`calls_out`: a number nobody owns goes out through a trunk) or another trusted
peer; anyone else dialling a user's number gets 403 (`CallsOut.may_dial_number`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.b2bua import session_timer
from libon_tsilo.b2bua.admission import CallerSources
from libon_tsilo.b2bua.call import Call
from libon_tsilo.b2bua.capabilities import DEFAULT_ALLOWLIST
from libon_tsilo.b2bua.identity import UNTRUSTED, CallerTrust
from libon_tsilo.b2bua.legs import ALeg, BLeg
from libon_tsilo.b2bua.ports import ServerHandle, SipPort, hop_of_flow
from libon_tsilo.b2bua.states import Parked
from libon_tsilo.b2bua.voicemail import REASONS as VOICEMAIL_REASONS, VoicemailPolicy
from libon_tsilo.b2bua.waker import LoggingWaker, Waker
from libon_tsilo import logflags
from libon_tsilo.ratelimit import ThrottledLog
from libon_tsilo.registrar.registrar import aor_key as registrar_aor_key
from libon_tsilo.silo.silo import Silo
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.message import Request, Response, log_call_id, make_response
from libon_tsilo.sip.timers import ExpiryQueue, ExpiryTimer
from libon_tsilo.dialplan import number_of
from libon_tsilo.sip.uri import URI

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from libon_tsilo.b2bua.outbound import CallsOut
    from libon_tsilo.routing.destinations import Destination

    from libon_tsilo.registrar.binding import Binding

__all__ = ["CallManager", "CallSettings", "default_aor_key", "authorizer_from_policy"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

_REASONS = {403: "Forbidden", 404: "Not Found", 480: "Temporarily Unavailable", 503: "Service Unavailable"}

@dataclass(frozen=True)
class CallSettings:
    ring_timeout: float = 30.0
    max_branches: int = 12
    header_allowlist: tuple[str, ...] = DEFAULT_ALLOWLIST
    # seconds an answered/cancelled call keeps listening for pushed iOS devices (Invite/Cancel);
    # 0 turns it off. The defaults are [calls]'s (tests/b2bua/test_call_manager.py checks they agree)
    invite_cancel_grace: float = 30.0
    use_domain: bool = True
    invite_cancel_providers: tuple[str, ...] = field(default=("apns",))
    # RFC 4028 (b2bua/session_timer.py): 0 turns session timers off; max_call_duration 0 = no limit
    session_expires: int = 1800
    min_se: int = 90
    max_call_duration: float = 14_400.0

    @classmethod
    def from_config(cls, calls: Any, use_domain: bool = True) -> CallSettings:
        """From ops' CallsConfig ([calls]) and the registrar's use_domain."""
        return cls(
            ring_timeout=float(calls.ring_timeout),
            max_branches=int(calls.max_branches),
            header_allowlist=tuple(calls.header_allowlist),
            invite_cancel_grace=float(calls.invite_cancel_grace),
            use_domain=use_domain,
            session_expires=int(calls.session_expires),
            min_se=int(calls.min_se),
            max_call_duration=float(calls.max_call_duration),
        )


def default_aor_key(uri: URI, use_domain: bool) -> str:
    """The registrar's own key function: silo keys and location keys must be built the same way."""
    return registrar_aor_key(uri, use_domain)


def _allow_all(request: Request, stx: ServerHandle, flow: Any) -> bool:
    return True


def authorizer_from_policy(policy: Any) -> Callable[[Request, Any, Any], CallerTrust | bool]:
    """The `authorize` hook over the registrar's AuthPolicy: its 407 (or 403) goes out as is; a
    pass says how far the caller is trusted (b2bua/identity.py)."""

    def authorize(request: Request, stx: ServerHandle, flow: Any) -> CallerTrust | bool:
        result = policy.check(request, flow, "invite")
        if result.response is None:
            peer = getattr(result, "peer", None)
            return CallerTrust(getattr(result, "trusted", False), getattr(result, "identity", None),
                               user=getattr(result, "user", None), gateway=getattr(peer, "gateway", None))
        stx.respond(result.response)
        return False

    return authorize


def authorizer_from_peers(peers: Any) -> Callable[[Request, Any, Any], CallerTrust | bool]:
    """The `authorize` hook without digest ([auth] enabled = false): trusted peers and gateways
    (registrar/peers.py: TrustedPeers) are still who they are; everyone else is untrusted."""

    def authorize(request: Request, stx: ServerHandle, flow: Any) -> CallerTrust | bool:
        key = getattr(flow, "key", None)
        peer = peers.peer_of(key.remote[0] if key is not None else None)
        return CallerTrust(trusted=True, gateway=peer.gateway) if peer is not None else True

    return authorize


class CallManager:
    def __init__(
        self,
        clock: IReactorTime,
        port: SipPort,
        silo: Silo,
        location: Any = None,
        waker: Waker | None = None,
        settings: CallSettings | None = None,
        authorize: Callable[[Request, Any, Any], Any] = _allow_all,
        is_local: Callable[[Any], bool] | None = None,
        aor_key: Callable[[Any, bool], str] = default_aor_key,
        sources: CallerSources | None = None,
        user_exists: Callable[[str], bool] | None = None,
        calls_out: CallsOut | None = None,
        user_of_number: Callable[[URI, Any], str | None] | None = None,
        home_domain: str = "localhost",
        voicemail: VoicemailPolicy | None = None,
    ) -> None:
        """`authorize(request, stx, flow)` returns (or fires with) True or a CallerTrust to go on
        (True: an untrusted caller); False means it has answered already (407...). `is_local(uri)`
        says whether we serve the R-URI's domain. `sources` limits unanswered calls per caller
        source; `user_exists(user)` (the users database) turns calls to users without any binding
        into an immediate 404 / 480. `calls_out` (b2bua/outbound.py) takes the calls to phone numbers
        and routed domains; without it they get 416 / 404 as before. `user_of_number(uri, gateway)`
        (routing/numbers.py over the users database) maps a number a gateway sends to a user name,
        called at `home_domain` without `calls_out`. `voicemail` forwards unanswered calls
        (b2bua/voicemail.py)."""
        self.clock = clock
        self.port = port
        self.silo = silo
        self.location = location
        # cluster (set by ops): Path -> (Route set, (transport, host, port, our local address) of the
        # node to send to, or None: this node) | None (not a cluster Path). None: a single node.
        self.path_router: Callable[[list[str]], tuple[list[str], tuple[str, str, int, tuple[str, int]] | None]
                                   | None] | None = None
        # cluster (set by ops): a branch goes to a binding with this Path, as path_router routed it
        # (the node pins a UDP device it forks to straight, cluster/node.py ``branch_sent``)
        self.path_sent: Callable[[list[str]], None] | None = None
        # cluster (set by ops): is the node at (transport, host, port) alive, given that it took a
        # binding at this time (registered_at)? None: always
        self.peer_alive: Callable[[str, str, int, float], bool] | None = None
        self.waker: Waker = waker if waker is not None else LoggingWaker()
        self.settings = settings or CallSettings()
        self.authorize = authorize
        self.is_local = is_local or (lambda uri: True)
        self.aor_key = aor_key
        self.calls: dict[str, Call] = {}
        # (Call-ID, our tag) -> (the call, or what a transfer leaves of it (transfer._Leftover), leg)
        self.dialogs: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.flows: dict[str, set[str]] = {}
        self.shutting_down = False
        self.counters: dict[str, int] = {"calls": 0, "answered": 0, "rejected": 0,
                                         "session_expired": 0, "duration_limit": 0}
        self.sources = sources
        self.user_exists = user_exists
        self.calls_out = calls_out
        self.user_of_number = user_of_number
        self.home_domain = home_domain
        self.voicemail = voicemail
        # issue 13: calls forwarded to voicemail by reason (+ "failed": voicemail did not take them),
        # calls from each gateway (by its name)
        self.voicemail_counts = dict.fromkeys((*VOICEMAIL_REASONS, "failed"), 0)
        self.gateway_calls: dict[str, int] = {}
        self.can_wake = waker is not None
        limits = ("parked_per_source", "parked_total", "unknown_user", "unreachable_user", "max_branches",
                  "reliable_18x_dropped", "unknown_number")
        self.limit_counters = dict.fromkeys(limits, 0)
        self._limit_logs = {name: ThrottledLog(clock) for name in self.limit_counters}
        self.counters["flow_failovers"] = 0  # RFC 5626: branches moved to another flow of their device
        self.counters["dead_node_bindings"] = 0  # branches not sent through a cluster node that is down
        # REFERs (transfer.py): 0 from the start, so /metrics has the series before the first one
        self.counters.update(transfers=0, transfers_refused=0)
        # A call's timers with a delay fixed by the config (the ring timeout, a session timer's first
        # wait) take a place in a queue per delay rather than a DelayedCall each: nearly every one is
        # cancelled, and arming + cancelling a DelayedCall costs the reactor heap's Python-level
        # comparisons. The queues share the transaction layer's one DelayedCall when the port offers
        # them (TransactionPort.expiry), else one of ours (the tests' fake ports).
        self._expiry: dict[float, ExpiryQueue] = {}
        self._expiry_timer: ExpiryTimer | None = None

    # -- timers --------------------------------------------------------------------------------

    def expiry(self, delay: float) -> ExpiryQueue:
        """The queue that runs a callback `delay` seconds after it was added (sip/timers.py); only for
        delays the config fixes, one queue each."""
        queue = self._expiry.get(delay)
        if queue is None:
            shared = getattr(self.port, "expiry", None)
            if shared is not None:
                queue = shared(delay)
            else:
                if self._expiry_timer is None:
                    self._expiry_timer = ExpiryTimer(self.clock)
                queue = ExpiryQueue(self.clock, delay, self._expiry_timer)
            self._expiry[delay] = queue
        return queue

    def session_queue(self, delay: float) -> ExpiryQueue | None:
        """The queue for a session timer's wait of `delay` when it is the usual one (half the configured
        interval: when we refresh a leg, as for every peer without timer support, or the duration limit
        without session timers), else None: a DelayedCall then. Only config values make queues, so what
        a peer negotiates cannot make many."""
        settings = self.settings
        for usual in (settings.session_expires / 2, settings.max_call_duration):
            # a float sum (now + delay) - now may differ from delay by a few ulps
            if usual > 0 and abs(delay - usual) <= 1e-6 * usual:
                return self.expiry(usual)
        return None

    # -- tables --------------------------------------------------------------------------------

    def register_leg(self, call: Call, leg: ALeg | BLeg) -> None:
        self.dialogs[leg.dialog.key] = (call, leg)

    def unregister_leg(self, leg: ALeg | BLeg) -> None:
        found = self.dialogs.get(leg.dialog.key)
        if found is not None and found[1] is leg:
            del self.dialogs[leg.dialog.key]

    def watch_flow(self, call: Call, flow_id: str | None, transport: str) -> None:
        # UDP "flows" never close in a way that says the peer is gone
        if flow_id is not None and transport != "udp":
            self.flows.setdefault(flow_id, set()).add(call.call_id)

    def forget(self, call: Call) -> None:
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
        self.release_source(call)
        if self.calls_out is not None:
            self.calls_out.release(call)
        self.unregister_leg(call.a)
        for leg in call.branches.values():
            self.unregister_leg(leg)
        if not self.flows:
            return
        legs: tuple[ALeg | BLeg | None, ...] = (call.a, call.winner, *call.branches.values())
        for held in legs:  # branches: see Call.branch_flow_lost
            fid = held.hop.flow_id if held is not None else None
            ids = self.flows.get(fid) if fid is not None else None
            if fid is not None and ids is not None:
                ids.discard(call.call_id)
                if not ids:
                    del self.flows[fid]

    def release_source(self, call: Call) -> None:
        """The caller has its answer (or the call ended): it no longer counts against its source."""
        if self.sources is not None:
            self.sources.release(call.call_id)

    def invite_cancel_wanted(self, binding: Binding) -> bool:
        # the waker may know better (its [push] cancelled_ios_call may send a missed-call push instead)
        wanted = getattr(self.waker, "invite_cancel_wanted", None)
        if wanted is not None:
            return bool(wanted(binding))
        return getattr(binding, "pn_provider", None) in self.settings.invite_cancel_providers

    # -- entry points --------------------------------------------------------------------------

    def request_received(self, request: Request, stx: ServerHandle, flow: Any) -> None:
        """Convenience router for a TU: INVITE, ACK and in-dialog requests to the right handler."""
        if stx is None:
            self.handle_ack(request, flow)
        elif request.method == "INVITE" and not request.to.tag:
            self.handle_invite(request, stx, flow)
        else:
            self.handle_in_dialog(request, stx, flow)

    # No catch-all here: an exception (a bug, or a ParseError from a malformed header) goes to the
    # transaction layer's guard, which logs it with the Call-ID and answers 500 (or 400) once.

    def handle_invite(self, request: Request, stx: ServerHandle, flow: Any) -> None:
        if request.to.tag:
            self.handle_in_dialog(request, stx, flow)
            return
        self._invite(request, stx, flow)

    def _invite(self, request: Request, stx: ServerHandle, flow: Any) -> None:
        if self.shutting_down:
            self._reject(stx, request, 503, "Service Unavailable")
            return
        mf = request.max_forwards
        if mf is not None and mf <= 0:
            self._reject(stx, request, 483, "Too Many Hops")
            return
        if request.call_id in self.calls:
            # same Call-ID, new transaction: a merged or looped request (§8.2.2.2)
            self._reject(stx, request, 482, "Loop Detected")
            return
        uri = request.uri
        # a phone number or a routed domain: decided after digest (only our users may call out)
        dest = self.calls_out.classify(uri) if self.calls_out is not None else None
        if dest is None and uri.scheme not in ("sip", "sips"):
            self._reject(stx, request, 416, "Unsupported URI Scheme")
            return
        if dest is None and (not uri.user or not self.is_local(uri)):
            self._reject(stx, request, 404, "Not Found")
            return
        _ = (request.from_, request.to, request.cseq)  # parse now: a bad header is a 400 here
        if session_timer.refuse_small_interval(request, self.settings, self.port, stx):
            self.counters["rejected"] += 1
            return
        decision = self.authorize(request, stx, flow)
        # the usual answers first: Deferred's isinstance is an ABC's, an interpreted check
        if not isinstance(decision, (bool, CallerTrust)) and isinstance(decision, Deferred):
            decision.addCallback(lambda ok: self._authorized(ok, request, stx, flow, dest))
            decision.addErrback(self._auth_failed, request, stx)
        else:
            self._authorized(decision, request, stx, flow, dest)

    def _reachable(self, request: Request, stx: ServerHandle, uri: URI) -> bool:
        """False (answered 404 or 480) for a user with no binding who is unknown or cannot be woken."""
        if self.location is None or self.location.lookup(self.aor_key(uri, self.settings.use_domain)):
            return True
        checker = self.user_exists
        if checker is None:
            return True
        try:
            known = checker(uri.user or "")  # no user part: no such user
        except Exception:
            log.failure("users database lookup failed", call_id=log_call_id(request))
            return True
        if not known:
            self._refuse(stx, request, "unknown_user", 404, "no such user {user}", user=uri.user)
            return False
        if not self.can_wake and not self._voicemail_for(uri.user or ""):
            self._refuse(stx, request, "unreachable_user", 480, "{user} has no device and none can be woken",
                         user=uri.user)
            return False
        return True

    def _voicemail_for(self, user: str) -> bool:
        """Whether a call to `user` could go to voicemail (then it is taken, to be forwarded)."""
        if self.voicemail is None:
            return False
        try:
            return self.voicemail.user_wants(user)
        except Exception:
            log.failure("users database: voicemail setting of {user} unreadable", user=user)
            return False

    def _callee(self, ok: Any, request: Request, stx: ServerHandle, flow: Any, trust: CallerTrust,
                dest: Destination | None) -> URI | None:
        """The local user the Request-URI reaches: itself, or the owner of the number it dials. None
        when it was answered here: refused, or placed out through a trunk (b2bua/outbound.py, whose
        policy lets only our authenticated users out)."""
        uri = request.uri
        gateway = trust.gateway
        if gateway is not None and self.user_of_number is not None and self._dials_number(uri):
            # a gateway's number is a call in, never out: its owner, or nobody
            user = self.user_of_number(uri, gateway)
            if user is None:
                self._refuse(stx, request, "unknown_number", 404, "no user has the number {number} "
                             "({gateway})", number=number_of(uri), gateway=gateway.name)
                return None
            if logflags.info_enabled:
                log.info("number {number} from {gateway} is {user}'s", number=number_of(uri),
                         gateway=gateway.name, user=user, call_id=log_call_id(request))
            return self._owner_uri(user, uri)
        if dest is None or self.calls_out is None:
            return uri
        if dest.user is None:
            self.calls_out.place(self, ok, request, stx, flow, dest)
            return None
        if not self.calls_out.may_dial_number(self, ok, request, stx, dest):
            return None  # a user's number is for our users and trusted peers, not the internet: 403
        return self._owner_uri(dest.user, uri)

    def _owner_uri(self, user: str, dialled: URI) -> URI:
        """Where a number's owner is called: at the domain the SIP URI named (one of ours: users
        register there, and with [registrar] use_domain the AOR is per domain), else (tel:) at our
        first domain."""
        if dialled.scheme in ("sip", "sips") and dialled.host and self.is_local(dialled):
            return URI("sip", user, dialled.host)
        if self.calls_out is not None:
            return self.calls_out.local_uri(user)
        return URI("sip", user, self.home_domain)

    def _dials_number(self, uri: URI) -> bool:
        if uri.scheme == "tel":
            return True
        if number_of(uri) is None:
            return False
        # a user whose name is made of digits ("1000") is called by name, as before
        return not (self.user_exists is not None and self.user_exists(uri.user or ""))

    def _auth_failed(self, failure: Failure, request: Request, stx: ServerHandle) -> None:
        log.failure("authorization failed", failure, call_id=log_call_id(request))
        self._reply(stx, request, 500, "Server Internal Error")

    def _authorized(self, ok: bool | CallerTrust, request: Request, stx: ServerHandle, flow: Any,
                    dest: Destination | None = None) -> None:
        if not ok:
            return
        if request.call_id in self.calls:
            self._reject(stx, request, 482, "Loop Detected")
            return
        trust = ok if isinstance(ok, CallerTrust) else UNTRUSTED
        target = self._callee(ok, request, stx, flow, trust, dest)
        if target is None:
            return
        uri = target
        # after digest: a local caller learns nothing about our users before it authenticates
        if self.user_exists is not None and not self._reachable(request, stx, uri):
            return
        aor = self.aor_key(uri, self.settings.use_domain)
        callee = f"{uri.scheme}:{uri.user}@{uri.host}"
        if self.silo.at_capacity():
            self._refuse(stx, request, "parked_total", 503, "the silo holds {n} calls", n=self.silo.max_total)
            return
        call = Call(self, request, stx, flow, aor, callee, trust)
        if self.sources is not None and not self.sources.admit(call.call_id, flow):
            self.refuse_parked_per_source(stx, request, flow)
            return
        if not self.silo.store(call):
            self.release_source(call)
            self._reject(stx, request, 486, "Busy Here")
            return
        self.admit_call(call)
        if trust.gateway is not None:
            name = trust.gateway.name
            self.gateway_calls[name] = self.gateway_calls.get(name, 0) + 1
        try:  # the call is stored and counted now: a bug must end it, with one final response
            bindings = list(self.location.lookup(aor)) if self.location is not None else []
            if logflags.info_enabled:  # see libon_tsilo/logflags.py: a filtered event still costs µs
                log.info("call {caller} -> {aor}: {n} binding(s)", caller=call.caller_uri, aor=aor,
                         n=len(bindings), call_id=call.call_id)
            call.start(bindings)
        except Exception:
            log.failure("call setup failed", call_id=call.call_id)
            call.fail("internal error")

    def admit_call(self, call: Call) -> None:
        """The call is in the tables from now on (and every end path takes it out: `forget`)."""
        self.calls[call.call_id] = call
        self.counters["calls"] += 1
        self.register_leg(call, call.a)
        self.watch_flow(call, call.a.hop.flow_id, call.a.hop.transport)

    def refuse_parked_per_source(self, stx: ServerHandle, request: Request, flow: Any) -> None:
        assert self.sources is not None
        self._refuse(stx, request, "parked_per_source", 503, "{n} unanswered calls from {source}",
                     n=self.sources.limit, source=self.sources.source_of(flow))

    def place_call(self, request: Request, stx: ServerHandle, flow: Any, trust: CallerTrust) -> None:
        """A call the B2BUA originates itself (a transfer: b2bua/transfer.py), already authorized:
        from here on it takes the path of every INVITE (park, push, fork); `stx` gets the answers."""
        self._authorized(trust, request, stx, flow)

    def handle_cancel(
        self, cancel: Request, invite_stx: ServerHandle | None, flow: Any,
        cancel_stx: ServerHandle | None = None,
    ) -> None:
        """The caller's CANCEL. `cancel_stx` (when the TU has it) gets the 200/481 (§9.2)."""
        try:
            call = self.calls.get(cancel.call_id)
            if call is not None and invite_stx is not None and call.a.stx is not invite_stx:
                call = None
            if call is not None and call.a.dialog.remote.tag != cancel.from_.tag:
                call = None
        except ParseError as exc:
            self._reply(cancel_stx, cancel, 400, exc.reason)
            return
        if call is None:
            self._reply(cancel_stx, cancel, 481, "Call/Transaction Does Not Exist")
            return
        self._reply(cancel_stx, cancel, 200, "OK")
        call.caller_cancel(cancel.header("Reason"))

    def handle_in_dialog(self, request: Request, stx: ServerHandle, flow: Any) -> None:
        found = self.dialogs.get((request.call_id, request.to.tag or ""))
        if found is None:
            self._reply(stx, request, 481, "Call/Transaction Does Not Exist")
            return
        call, leg = found
        call.in_dialog(leg, request, stx)

    def handle_ack(self, request: Request, flow: Any) -> None:
        found = self.dialogs.get((request.call_id, request.to.tag or ""))
        if found is None:
            log.debug("ACK for no dialog dropped", call_id=log_call_id(request))
            return
        call, leg = found
        call.ack_in_dialog(leg, request)

    def stray_response(self, resp: Response, flow: Any) -> None:
        """A 2xx to one of our INVITEs after its transaction ended: ACK it, and BYE it if unwanted."""
        found = self.dialogs.get((resp.call_id, resp.from_.tag or ""))
        if found is not None and isinstance(found[1], BLeg):
            found[0].branch_response(found[1], resp)
            return
        if 200 <= resp.status < 300:
            self._ack_and_bye_unknown(resp, flow)

    def _ack_and_bye_unknown(self, resp: Response, flow: Any) -> None:
        contacts = resp.contacts
        if not contacts:
            return
        hop = hop_of_flow(flow)
        for method, seq in (("ACK", resp.cseq.seq), ("BYE", resp.cseq.seq + 1)):
            req = Request(method, str(contacts[0].uri))
            for route in reversed(resp.header_values("Record-Route")):
                req.add_header("Route", route)
            req.add_header("Max-Forwards", "70")
            req.add_header("From", resp.header("From"))
            req.add_header("To", resp.header("To"))
            req.add_header("Call-ID", resp.call_id)
            req.add_header("CSeq", f"{seq} {method}")
            if method == "ACK":
                self.port.send_ack(req, hop)
            else:
                self.port.send_request(req, hop, lambda r: None)

    def flow_closed(self, flow: Any) -> None:
        for call_id in sorted(self.flows.pop(flow.id, ())):
            call = self.calls.get(call_id)
            if call is not None:
                call.flow_lost(flow.id)

    def shutdown_parked(self, code: int = 480) -> int:
        """Graceful shutdown: from now on new INVITEs get 503; parked calls get `code` now."""
        self.shutting_down = True
        parked = [c for c in self.calls.values() if isinstance(c.state, Parked)]
        for call in parked:
            call.finish_unanswered(code, None, None, "shutdown")
        return len(parked)

    # -- inspection ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        by_state: dict[str, int] = {}
        for call in self.calls.values():
            by_state[call.state.name] = by_state.get(call.state.name, 0) + 1
        return {
            "calls": len(self.calls),
            "dialogs": len(self.dialogs),
            "by_state": by_state,
            **{f"total_{k}": v for k, v in self.counters.items()},
            "silo": self.silo.stats(),
            **({"calls_out": self.calls_out.stats()} if self.calls_out is not None else {}),
        }

    # -- replies -------------------------------------------------------------------------------

    def _reject(self, stx: ServerHandle, request: Request, status: int, reason: str) -> None:
        self.counters["rejected"] += 1
        log.info("INVITE rejected {status} {reason}", status=status, reason=reason,
                 call_id=log_call_id(request))
        self._reply(stx, request, status, reason)

    def _refuse(
        self, stx: ServerHandle, request: Request, limit: str, status: int, why: str, **fields: Any
    ) -> None:
        """A call refused before it is stored: counted per limit, logged at most once per 10 s per limit
        (a flood of INVITEs must not become a flood of log lines). A 503 says when to come back."""
        self.counters["rejected"] += 1
        self.limit_counters[limit] += 1
        self._limit_logs[limit].emit(
            log.warn if status == 503 else log.info, "INVITE refused {status} ({limit}): " + why,
            status=status, limit=limit, call_id=log_call_id(request), **fields,
        )
        if stx is None:
            return
        try:
            resp = make_response(request, status, _REASONS[status])
            if status == 503:
                resp.add_header("Retry-After", str(max(1, int(self.settings.ring_timeout))))
            self.port.respond(stx, resp)
        except Exception:
            log.failure("cannot send {status}", status=status, call_id=log_call_id(request))

    def limit_hits(self) -> dict[str, int]:
        return dict(self.limit_counters)

    def limit_bit(self, limit: str, why: str, **fields: Any) -> None:
        """A limit of a call already admitted: counted, logged at most once per 10 s per limit."""
        self.limit_counters[limit] += 1
        self._limit_logs[limit].emit(log.warn, why, limit=limit, **fields)

    def _reply(self, stx: ServerHandle | None, request: Request, status: int, reason: str | None) -> None:
        if stx is None or request.method == "ACK":
            return
        try:
            self.port.respond(stx, make_response(request, status, reason))
        except Exception:
            log.failure("cannot send {status}", status=status, call_id=log_call_id(request))
