"""A call: the caller's leg, the device branches, and the rules that tie them together.

The state objects (states.py) decide what an event means; this class does the work: it builds
and sends branch INVITEs, relays provisionals, answers the caller, cancels losers and cleans up
every table, timer and silo entry when the call ends. In-dialog relaying is in relay.py.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from libon_tsilo.b2bua import cdr, relay, reliable, session_timer, voicemail
from libon_tsilo.b2bua.capabilities import ALLOW, OWN_HEADERS, supported
from libon_tsilo.b2bua.dialog import Dialog
from libon_tsilo.b2bua.forking import REASON_ANSWERED, REASON_REPLACED
from libon_tsilo.b2bua.identity import (
    TRUST_DOMAIN_KEYS,
    UNTRUSTED,
    CallerTrust,
    b_leg_caller,
    b_leg_identity_headers,
)
from libon_tsilo.b2bua.legs import ALeg, BLeg, BranchState
from libon_tsilo.b2bua.ports import Hop, ServerHandle, hop_of_flow
from libon_tsilo.b2bua.targets import best_flow, is_outbound, target_key
from libon_tsilo.b2bua.states import (
    CallState,
    Connected,
    Diverted,
    Ended,
    Forking,
    Parked,
    exhausted_status,
)
from libon_tsilo.b2bua.waker import WakeResult, wake_outcome
from libon_tsilo import logflags
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.headers import NameAddr, canonical_key
from libon_tsilo.sip.message import Request, Response, make_response, new_call_id, new_tag
from libon_tsilo.sip.timers import cancel_expiry
from libon_tsilo.sip.uri import URI
from libon_tsilo.util import redact_key, redact_uri

if TYPE_CHECKING:
    from libon_tsilo.b2bua.manager import CallManager

__all__ = ["Call", "hop_for_binding"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib
_P = ParamSpec("_P")

_DEFAULT_PORT = {"udp": 5060, "tcp": 5060, "tls": 5061}
# A parked call keeps its INVITE as bytes only (ALeg.compact) once it has waited this long: most
# late forks come sooner (a device that registers moments after the INVITE), and for those the
# compaction and the re-parse at the fork were ~40,000 instructions of a call for nothing; a call
# that really waits (a push, a sleeping phone) is compacted as before, one second later
PARKED_COMPACT_DELAY = 1.0


def _is_udp(binding: Binding) -> bool:
    """Is the device reached over UDP (its REGISTER's transport, else its Contact's)?"""
    if binding.received:
        return binding.received[0].lower() == "udp"
    hop = hop_for_binding(binding, False)
    return hop is not None and hop.transport == "udp"


def hop_for_binding(binding: Binding, flow_live: bool) -> Hop | None:
    """Where a branch to `binding` goes: its flow when live, else its received address, else its Contact."""
    flow_id = binding.flow_id if flow_live else None
    if binding.received:
        transport, host, port = binding.received
        return Hop(transport.lower(), host, int(port), flow_id)
    try:
        uri = URI.parse(binding.contact_uri)
    except (ParseError, ValueError):
        return None
    transport = uri.transport or ("tls" if uri.scheme == "sips" else "udp")
    if not getattr(uri, "host", None):
        return None
    return Hop(transport, uri.host_bare, uri.port or _DEFAULT_PORT.get(transport, 5060), flow_id)


# allow-list -> (name, canonical key, strip 100rel?) per header: computed once per configured tuple,
# not per forked INVITE; trust-domain headers (P-Asserted-Identity...) go by b2bua/identity.py;
# Allow and Supported are ours (capabilities.py), never the caller's
_ALLOW_KEYS: dict[tuple[str, ...], tuple[tuple[str, str, bool], ...]] = {}


def _allow_keys(allowlist: tuple[str, ...]) -> tuple[tuple[str, str, bool], ...]:
    keys = _ALLOW_KEYS.get(allowlist)
    if keys is None:
        keys = tuple((name, canonical_key(name), name.lower() == "require")
                     for name in allowlist
                     if canonical_key(name) not in TRUST_DOMAIN_KEYS and name.lower() not in OWN_HEADERS)
        if len(_ALLOW_KEYS) < 16:
            _ALLOW_KEYS[allowlist] = keys
    return keys


def _strip_100rel(value: str) -> str:
    # 100rel is hop by hop (b2bua/reliable.py): the caller's support says nothing of ours
    return ", ".join(v.strip() for v in value.split(",") if v.strip().lower() != "100rel")


def _add_capabilities(msg: Request | Response, session_timers: bool, reliable: bool = True) -> None:
    msg.add_header("Allow", ALLOW)
    tags = supported(session_timers, reliable)
    if tags:
        msg.add_header("Supported", tags)


class Call:
    """One INVITE from a caller to a local AOR, from arrival to the last BYE."""

    # thousands may be parked at once: slots spare each one its attribute dict
    __slots__ = (
        "mgr", "clock", "port", "call_id", "aor", "callee_uri", "caller_uri", "caller_name", "created_at",
        "ring_deadline", "a", "branches", "_by_key", "state", "failures", "winner", "early_media_from",
        "wake_d", "wake_result", "woken", "_waker_used", "_ring_timer", "_late_ack", "offer_busy",
        "pending_acks", "late_reason", "ended", "end_reason", "trust", "timers", "_device_ids",
        "transfer", "a_answered", "answered_at", "final_status", "voicemail_reason", "suspects",
        "_compact_entry",
    )

    def __init__(self, mgr: CallManager, invite: Request, stx: ServerHandle, flow: Any, aor: str,
                 callee_uri: str, trust: CallerTrust = UNTRUSTED):
        self.mgr = mgr
        self.clock = mgr.clock
        self.port = mgr.port
        self.call_id = invite.call_id
        self.aor = aor
        self.callee_uri = callee_uri
        self.trust = trust
        caller_uri, self.caller_name = b_leg_caller(invite.from_, trust)  # what the callee is shown
        self.caller_uri = str(caller_uri)
        self.created_at = self.clock.seconds()
        self.ring_deadline = self.created_at + mgr.settings.ring_timeout
        hop = hop_of_flow(flow)
        tag = new_tag()
        contacts = invite.contacts
        # From and To as text: the dialog parses them when it first needs them (memory while parked)
        self.a = ALeg(invite, stx, Dialog(
            self.call_id, f"{invite.header('To')};tag={tag}", invite.header("From") or "",
            str(contacts[0].uri) if contacts else self.caller_uri,
            hop, self.port.contact(hop.transport),
            remote_seq=invite.cseq.seq, route_set=invite.header_values("Record-Route"), local_tag=tag,
        ))
        # by (Call-ID, our tag): a device that reconnects gets a second branch with the same Call-ID
        self.branches: dict[tuple[str, str], BLeg] = {}
        self._by_key: dict[str, BLeg] = {}  # by target_key: one live branch per device instance
        self.state: CallState = Forking()
        self.failures: list[int] = []
        self.winner: BLeg | None = None
        self.early_media_from: BLeg | None = None
        self.wake_d: Deferred[Any] | None = None
        # cluster nodes (transport, host, port) that failed a branch of this call (408/503/timeout)
        self.suspects: set[tuple[str, str, int]] | None = None
        self.wake_result: WakeResult | None = None
        self.woken: dict[str, Any] = {}  # pushed devices (by target_key) that have not registered since
        self._waker_used = False
        # the ring timeout's place in the manager's queue for its delay (sip/timers.ExpiryQueue)
        self._ring_timer: list[Any] | None = None
        # while parked: the place in the manager's queue that compacts the INVITE (PARKED_COMPACT_DELAY)
        self._compact_entry: list[Any] | None = None
        self._late_ack: BLeg | None = None  # late-offer INVITE: the B-leg ACK waits for the caller's
        self.offer_busy = False  # a re-INVITE/UPDATE is in flight (glare -> 491)
        # relayed re-INVITE 2xx waiting for the ACK, by (tag of the leg that sent the re-INVITE, CSeq)
        self.pending_acks: dict[tuple[str, int], relay.PendingAck] = {}
        self.late_reason: str | None = None  # Reason of the Invite/Cancel CANCELs
        self.ended = False
        self.end_reason: str | None = None
        self.timers: session_timer.SessionTimers | None = None  # RFC 4028, once answered
        self._device_ids: dict[str, str] | None = None  # device -> the Call-ID of its B-leg
        self.transfer: Any = None  # b2bua/transfer.py: a REFER this call is part of, while it runs
        self.a_answered = False  # our 2xx to the caller went out
        self.voicemail_reason: str | None = None  # forwarded to voicemail, and why (b2bua/voicemail.py)
        self.answered_at: float | None = None  # when a branch's 2xx connected the call (the CDR's answer)
        self.final_status: int | None = None  # our final failure to the caller, if it got one

    # -- description (silo dump / admin) -------------------------------------------------------

    @property
    def key(self) -> str:
        return self.call_id

    def describe(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "caller": self.caller_uri,
            "caller_name": self.caller_name,
            "aor": self.aor,
            "age": round(self.clock.seconds() - self.created_at, 3),
            "state": self.state.name,
            "branches": [b.describe() for b in self.branches.values()],
            "waiting_for": len(self.woken),
        }

    def device_call_id(self, binding: Binding) -> str:
        """The Call-ID this device's B-leg carries, decided at the first ask (a push or a fork) and
        kept for the call: the push names it, the INVITE and any CANCEL carry it."""
        ids = self._device_ids
        if ids is None:
            ids = self._device_ids = {}
        provider, prid = binding.pn_provider, binding.pn_prid
        # a woken app may register under another binding identity (a new +sip.instance): its push
        # token is what the push went to
        device = f"pn:{provider}:{prid}" if provider and prid else binding.key
        call_id = ids.get(device)
        if call_id is None:
            call_id = ids[device] = new_call_id()
        return call_id

    # -- start ---------------------------------------------------------------------------------

    def start(self, bindings: list[Binding]) -> None:
        """Fork to reachable bindings, wake the others, park if nothing could be sent."""
        if not bindings and self.mgr.voicemail is not None \
                and self.divert(480, None, None, "no device registered", ring_timeout=False):
            return  # nothing to push and nothing to ring: voicemail at once, not after the ring timeout
        self.start_ring_timer(self.mgr.settings.ring_timeout)
        sleeping = []
        seen: set[str] = set()
        for b in bindings:
            key = target_key(b)
            if key in seen:
                continue  # another flow of a device already handled: fork() picks its best flow
            seen.add(key)
            if b.reg_id is not None and b.instance:  # its live flow, if it has one, decides: fork or push
                b = self._best_flow(b.instance, ()) or b
            if not b.push_capable or (self._flow_live(b) and self._awake(b)):
                self.fork(b)
            else:
                sleeping.append(b)
        if self.state.final:
            return
        if not any(b.pending for b in self.branches.values()):
            self.park()
        if sleeping:
            self.wake(sleeping)

    def _ring_timeout(self) -> None:
        self._ring_timer = None
        self.react(self.state.ring_timeout)

    def react(self, handler: Callable[Concatenate[Call, _P], None], *args: _P.args, **kw: _P.kwargs) -> None:
        """Run a CallState event method (`self.state.answered`...) for this call. Events come from
        timers, the waker and device responses, not from a request the SIP layer could answer: a bug
        here must still end the call."""
        try:
            handler(self, *args, **kw)
        except Exception:
            log.failure("call failed on {event}", event=handler.__name__, call_id=self.call_id)
            self.fail("internal error")

    def fail(self, why: str) -> None:
        """A bug must not leave the caller hanging nor leak the call."""
        if not self.state.final:
            self.finish_unanswered(500, "Server Internal Error", None, why)
        elif not self.ended:
            self.fail_answered(why)

    def fail_answered(self, why: str, reason: str = "Server Internal Error", status: int = 500,
                      bye_reason: str | None = session_timer.REASON_INTERNAL) -> None:
        """The call cannot go on once a device answered: each party learns it is over (a 500 to a
        caller not yet answered, a BYE to whoever is in the dialog), else both would see 481 later."""
        if not self.a_answered and isinstance(self.state, Connected):  # in connect(), or its 2xx held
            try:
                self.port.respond(self.a.stx, make_response(self.a.invite, status, reason,
                                                            to_tag=self.a.dialog.local_tag))
            except Exception:
                log.failure("cannot answer {status}", status=status, call_id=self.call_id)
            self.cancel_branches(None, keep=self.winner)
        told = None if self.a_answered else self.a  # a caller with our final failure gets no BYE
        relay.hang_up(self, told, why, bye_reason)

    # -- silo interface ------------------------------------------------------------------------

    def can_append(self) -> bool:
        return not self.state.final and not self.ended

    def add_branch(self, binding: Binding) -> bool:
        before = len(self.branches)
        self.react(self.state.binding_appeared, binding)
        return len(self.branches) > before

    # -- parking -------------------------------------------------------------------------------

    def park(self) -> None:
        """No branch is running: wait in the Parked state for a device (docs/ARCHITECTURE.md,
        "Suspend and resume")."""
        self.state = Parked()
        if self._compact_entry is None:
            self._compact_entry = self.mgr.expiry(PARKED_COMPACT_DELAY).add(self._compact_parked)
        if logflags.debug_enabled:  # see libon_tsilo/logflags.py: a filtered event still costs µs
            log.debug("parked waiting for a device of {aor}", aor=self.aor, call_id=self.call_id)

    def _compact_parked(self) -> None:
        self._compact_entry = None
        if isinstance(self.state, Parked) and not self.ended:
            self.a.compact()

    def _keep_parsed(self) -> None:
        """The call goes on (or ends, which compacts it anyway): no compaction for the wait."""
        entry = self._compact_entry
        if entry is not None:
            self._compact_entry = None
            cancel_expiry(entry)

    def resume(self, binding: Binding) -> None:
        self._keep_parsed()
        self.state = Forking()
        if not self.fork(binding):
            self.check_exhausted()

    # -- waking --------------------------------------------------------------------------------

    def wake(self, bindings: list[Binding]) -> None:
        for b in bindings:
            self.woken[target_key(b)] = b
        self._waker_used = True
        try:
            d = self.mgr.waker.wake(self, bindings)
        except Exception:
            log.failure("waker failed", call_id=self.call_id)
            d = succeed(WakeResult(all_failed=True, reason="waker error"))
        self.wake_d = d
        d.addCallbacks(self._woke, self._wake_error, callbackArgs=(d,), errbackArgs=(d,))

    def _woke(self, result: Any, d: Deferred[Any] | None = None) -> None:
        if d is not None and self.wake_d is not None and d is not self.wake_d:
            return  # a later wake (a device behind a node that died) is still in flight: it decides
        self.wake_d = None
        self.wake_result = wake_outcome(result)
        if self.wake_result.all_failed:
            log.info("every push failed: {reason}", reason=self.wake_result.reason, call_id=self.call_id)
        self.react(self.state.wake_done)

    def _wake_error(self, failure: Failure, d: Deferred[Any] | None = None) -> None:
        log.failure("waker errback", failure, call_id=self.call_id)
        self._woke(WakeResult(all_failed=True, reason="waker error"), d)

    def more_possible(self) -> bool:
        """Can a branch still come? (a push in flight or delivered, or a never-forked parked call)."""
        if self.wake_d is not None:
            return True
        r = self.wake_result
        if r is not None and r.all_failed:
            return False
        if r is not None and r.woken > 0 and self.woken:
            return True
        # like Kamailio's t_suspend: a call that never forked waits for any device to register
        return not self.branches

    def _awake(self, binding: Binding) -> bool:
        """A push-capable binding with a live flow: fork now, or push? The waker may decide (e.g. only
        devices that registered moments ago are awake); without an opinion, a live flow is enough."""
        decide = getattr(self.mgr.waker, "fork_directly", None)
        if decide is None:
            return True
        try:
            return bool(decide(binding))
        except Exception:
            log.failure("waker.fork_directly failed", call_id=self.call_id)
            return True

    def _flow_live(self, binding: Binding) -> bool:
        # the registrar's flag can be stale, the flow table's view can be missing: both must agree
        return bool(binding.flow_id) and binding.flow_live \
            and self.port.flow_live(binding.flow_id)

    # -- forking -------------------------------------------------------------------------------

    def fork(self, binding: Binding, tried: tuple[str, ...] = ()) -> bool:
        """Send a branch INVITE to `binding`. False when it is a duplicate or over the limit.

        An RFC 5626 device (instance + reg-id) gets one branch whatever the number of its flows: it
        goes over the most recently registered live flow not in `tried`; a flow that is down is
        never reopened towards the device (§5.3: it is behind a NAT, only its own flow reaches it).
        """
        if self.state.final or self.ended:
            return False
        if binding.reg_id is not None and binding.instance:  # is_outbound(), inline: once per branch
            found = self._best_flow(binding.instance, tried)
            if found is None:
                if self._node_down(binding) or self._remote_flow_gone(binding):
                    return self._behind_dead_node(binding)
                log.info("device {key}: no live flow left", key=redact_key(binding.key), call_id=self.call_id)
                return False
            binding = found
        if binding.path and self.mgr.path_router is not None and self._gone_with_its_node(binding):
            return self._behind_dead_node(binding)
        hop, flow_id, routes = self._route(binding)
        key = target_key(binding)
        old = self._by_key.get(key)
        if old is not None:
            if old.binding.key != binding.key:
                # another flow of a device whose branch still rings over a flow that can carry the answer
                if old.pending and (old.hop.transport == "udp" or self.port.flow_live(old.sent_flow)):
                    return False
            elif old.sent_contact == binding.contact_uri and old.sent_flow == flow_id:
                return False
            if old.pending:
                # the device reconnected (new contact or connection): the old branch is dead weight
                log.info("device {key} reconnected: new branch", key=redact_key(binding.key),
                         call_id=self.call_id)
                if old.sent_flow is not None and old.hop.transport != "udp" \
                        and not self.port.flow_live(old.sent_flow):
                    # its connection is gone: no CANCEL for the live branch's Call-ID; timer B ends it
                    old.state, old.cancelled = BranchState.CANCELLING, True
                else:
                    old.cancel(REASON_REPLACED)
        # live branches only: failed, failed-over and replaced ones ring no one
        if sum(1 for b in self.branches.values() if b.pending) >= self.mgr.settings.max_branches:
            self.mgr.limit_bit("max_branches", "max_branches ({n}) reached, not forking to {contact}",
                               n=self.mgr.settings.max_branches, contact=redact_uri(binding.contact_uri),
                               call_id=self.call_id)
            return False
        if hop is None:
            log.warn("no address for binding {contact}", contact=redact_uri(binding.contact_uri),
                     call_id=self.call_id)
            return False
        leg = self._new_branch(binding, hop, flow_id, routes)
        leg.tried = tried
        self.branches[leg.dialog.key] = leg
        self._by_key[key] = leg
        self.woken.pop(key, None)
        self.mgr.register_leg(self, leg)
        self.state = Forking()
        self._send_branch(leg)
        if is_outbound(binding):
            # the device can answer over this flow only: hear of its loss (branch_flow_lost)
            self.mgr.watch_flow(self, flow_id, hop.transport)
        return True

    def branch_flow_lost(self, flow_id: str) -> None:
        """An outbound device's connection closed while its branch rang: no answer can come over it,
        so the branch fails as Flow Failed (RFC 5626 §5.3) and moves to the device's next flow."""
        for leg in list(self.branches.values()):
            if leg.sent_flow == flow_id and leg.state in (BranchState.CALLING, BranchState.EARLY):
                # its transaction still runs to timer B; branch_response ignores what it ends with
                self.branch_response(leg, make_response(leg.invite, 430, "Flow Failed"))

    def _best_flow(self, instance: str, tried: tuple[str, ...]) -> Binding | None:
        location = self.mgr.location
        if location is None:
            return None
        return best_flow(location.lookup(self.aor), instance, self._flow_usable, tried)

    def _flow_usable(self, binding: Binding) -> bool:
        # a UDP flow is its address pair: it cannot close, only go quiet (the device's STUN keep-alives
        # tell it, not us, when its NAT mapping changed; it then registers again)
        received = binding.received
        return (received is not None and received[0] == "udp") or self._flow_live(binding) \
            or (self._node_hop(binding) is not None  # another node's flow: that node says 430 if gone
                and binding.flow_live and not self._node_down(binding))

    def _node_hop(self, binding: Binding) -> tuple[list[str], Hop | None] | None:
        """How a Path starting at a cluster node routes (see CallManager.path_router); None: it does
        not (no Path, no cluster, an edge proxy's Path)."""
        router = self.mgr.path_router
        if router is None or not binding.path:
            return None
        found = router(binding.path)
        if found is None:
            return None
        routes, node = found
        if node is None:
            return routes, None
        transport, host, port, local = node
        return routes, Hop(transport, host, port, None, local)

    def _route(self, binding: Binding) -> tuple[Hop | None, str | None, list[str]]:
        """Where a branch to `binding` goes: (hop, flow id when over a live flow of ours, Route set).
        A binding whose Path starts at another cluster node goes to that node, which relays it over
        the device's flow (cluster/relay.py); one starting at this node, over our flow."""
        routes = binding.path
        if routes and self.mgr.path_router is not None:
            via = self._node_hop(binding)
            if via is not None:
                routes, node = via
                if node is not None:
                    if not self._peer_up(node, binding):
                        # a UDP device behind a dead node (fork() took the others): straight to its
                        # address from our public socket, the rest of its Path as Route
                        return hop_for_binding(binding, False), None, routes[1:]
                    return node, None, routes
        flow_live = self._flow_live(binding)
        return hop_for_binding(binding, flow_live), binding.flow_id if flow_live else None, routes

    # -- a cluster node down (issue 14): what its bindings still offer ------------------------

    def _peer_up(self, node: Hop, binding: Binding) -> bool:
        if self.suspects and (node.transport, node.host, node.port) in self.suspects:
            return False
        alive = self.mgr.peer_alive
        return alive is None or alive(node.transport, node.host, node.port, binding.registered_at)

    def _node_down(self, binding: Binding) -> bool:
        """Does the binding's Path lead to a cluster node that is down (or failed this call)?"""
        if not binding.path or self.mgr.path_router is None:
            return False
        via = self._node_hop(binding)
        return via is not None and via[1] is not None and not self._peer_up(via[1], binding)

    def _gone_with_its_node(self, binding: Binding) -> bool:
        """Is the binding's connection gone with (or on) the cluster node its Path names?"""
        return (self._node_down(binding) and not _is_udp(binding)) \
            or (binding.push_capable and self._remote_flow_gone(binding))

    def _remote_flow_gone(self, binding: Binding) -> bool:
        """A TCP/TLS binding whose connection closed on the node that holds it (it published
        flow_live false through the location store)?"""
        if binding.flow_live or _is_udp(binding) or not binding.path or self.mgr.path_router is None:
            return False
        via = self._node_hop(binding)
        return via is not None and via[1] is not None

    def _behind_dead_node(self, binding: Binding) -> bool:
        """A TCP/TLS binding whose connection ended with its node, or closed there: push it if it
        can be woken (it then registers wherever it lands), else skip it. Returns fork()'s answer:
        no branch."""
        self.mgr.counters["dead_node_bindings"] += 1
        key = target_key(binding)
        if binding.push_capable and key not in self.woken:
            log.info("device {key}: its connection ended on its node, pushing it",
                     key=redact_key(binding.key), call_id=self.call_id)
            self.wake([binding])
        elif not binding.push_capable:
            log.info("device {key}: its connection ended with its node, skipped", key=redact_key(binding.key),
                     call_id=self.call_id)
        return False

    def _peer_failed(self, leg: BLeg, resp: Response) -> bool:
        """A branch sent to another node timed out or failed in our transport: that node is suspect
        for the rest of this call, and the branch goes around it (fork() and _route() treat it as
        down). A 408/503 that came back through the node is the device's answer, not the node's
        failure: going around would ring the device a second time."""
        if not getattr(leg.ctx, "failed_locally", False) or leg.cancelled or self.state.final or self.ended:
            return False
        hop = leg.hop
        if hop.local is None or not self._node_down_after(leg, hop):
            return False
        log.info("node {host}:{port} failed a branch ({status}): going around it", host=hop.host,
                 port=hop.port, status=resp.status, call_id=self.call_id)
        leg.state = BranchState.FAILED
        self.mgr.unregister_leg(leg)
        if self._by_key.get(target_key(leg.binding)) is leg:
            del self._by_key[target_key(leg.binding)]
        before = self.wake_d
        if self.fork(leg.binding):
            return True
        if self.wake_d is not before:  # pushed: the call waits for the device's REGISTER
            self.check_exhausted()
            return True
        return False

    def _node_down_after(self, leg: BLeg, hop: Hop) -> bool:
        via = self._node_hop(leg.binding)
        if via is None or via[1] is None:
            return False
        node = via[1]
        if (node.transport, node.host, node.port) != (hop.transport, hop.host, hop.port):
            return False
        if self.suspects is None:
            self.suspects = set()
        self.suspects.add((node.transport, node.host, node.port))
        return True

    def _fail_over(self, leg: BLeg, resp: Response) -> bool:
        """A branch's flow failed (a local transport error or timeout, or 430 Flow Failed from an edge
        proxy on its Path): send the same branch over the device's next flow, if it has one."""
        if leg.cancelled or self.state.final or self.ended or not is_outbound(leg.binding):
            return False
        if not (resp.status == 430 or getattr(leg.ctx, "failed_locally", False)):
            return False
        tried = leg.tried + (leg.binding.key,)
        instance = leg.binding.instance  # set: is_outbound said so
        if instance is None or self._best_flow(instance, tried) is None:
            return False
        log.info("flow of {key} failed ({status}): trying the device's next flow",
                 key=redact_key(leg.binding.key), status=resp.status, call_id=self.call_id)
        leg.state = BranchState.FAILED
        self.mgr.unregister_leg(leg)
        if not self.fork(leg.binding, tried):
            return False
        self.mgr.counters["flow_failovers"] += 1
        return True

    def _new_branch(self, binding: Binding, hop: Hop, flow_id: str | None, routes: list[str]) -> BLeg:
        a = self.a.invite
        caller_uri, display = b_leg_caller(a.from_, self.trust)
        local = NameAddr(caller_uri, display, {"tag": new_tag()})
        remote = NameAddr(URI.parse(self.callee_uri))
        contact = self.port.contact(hop.transport, hop.local)
        dialog = Dialog(self.device_call_id(binding), local, remote, binding.contact_uri, hop, contact)
        req = Request("INVITE", binding.contact_uri)
        for route in routes:
            req.add_header("Route", route)
        mf = a.max_forwards
        req.add_header("Max-Forwards", str(max(0, min(70, (mf if mf is not None else 70) - 1))))
        req.add_header("From", dialog.local_text)  # kept: the ACK and the BYE say the same
        req.add_header("To", dialog.remote_text)
        req.add_header("Call-ID", dialog.call_id)
        req.add_header("CSeq", f"{dialog.local_seq} INVITE")
        req.add_header("Contact", dialog.contact)
        for name, key, strip in _allow_keys(self.mgr.settings.header_allowlist):
            for value in a.values(key):  # an index lookup; most allowlisted headers are absent
                if strip:
                    value = _strip_100rel(value)
                if value:
                    req.add_header(name, value)
        for name, value in b_leg_identity_headers(a, self.trust, self.mgr.settings.header_allowlist):
            req.add_header(name, value)
        _add_capabilities(req, bool(self.mgr.settings.session_expires), reliable.offers_to_device(a))
        session_timer.offer(req, self.mgr.settings)
        if a.body:
            req.add_header("Content-Type", a.content_type or "application/sdp")
            req.body = a.body
        leg = BLeg(binding, req, dialog, self.clock.seconds())
        leg.sent_contact = binding.contact_uri
        leg.sent_flow = flow_id
        return leg

    def _send_branch(self, leg: BLeg) -> None:
        if logflags.debug_enabled:
            # the hop, not only the Contact: a branch may go through another node or straight around it
            hop = leg.hop
            where = f"{hop.transport}:{hop.host}:{hop.port}" if hop is not None else "-"
            contact = redact_uri(leg.binding.contact_uri)
            log.debug("fork to {contact} via {where}", contact=contact, where=where, call_id=self.call_id)
        sent = self.mgr.path_sent
        if sent is not None and leg.binding.path:
            sent(leg.binding.path)  # before the send: the device's answer may come at once
        leg.ctx = self.port.send_request(leg.invite, leg.hop, partial(self.branch_response, leg))

    def branch_response(self, leg: BLeg, resp: Response) -> None:
        """Every response of a branch INVITE (from its client transaction or a stray 2xx)."""
        status = resp.status
        if status == 100:
            return
        if leg.state == BranchState.FAILED:
            # a branch given up while its transaction ran (branch_flow_lost): how that transaction ends
            # is noise, but a device that answered anyway must not be left in a call nobody takes
            if 200 <= status < 300:
                leg.state = BranchState.ANSWERED
                leg.dialog.set_remote_from(resp)
                self.ack_and_bye(leg, resp)
            return
        if status == 422 and session_timer.retry_branch(self, leg, resp):
            self._send_branch(leg)  # RFC 4028 §7.3: again, with the interval it asked for
            return
        if status >= 200 and status < 300 and leg.state == BranchState.ANSWERED:
            # a retransmitted 2xx: our ACK got lost
            if leg.acked:
                self.send_branch_ack(leg)
            return
        if status < 200:
            relay_it, leg_reliable = reliable.device_provisional(self, leg, resp)  # PRACKs a reliable one
            if not relay_it or leg.cancelled:
                return  # a branch we CANCELled (replaced, or lost the race) no longer speaks to the caller
            leg.note(resp)
            if leg.state == BranchState.CALLING:
                leg.state = BranchState.EARLY
            self.react(self.state.provisional, leg, resp, leg_reliable)
            return
        leg.note(resp)
        if status < 300:
            leg.state = BranchState.ANSWERED
            leg.dialog.set_remote_from(resp)
            self.react(self.state.answered, leg, resp)
        else:
            if self._peer_failed(leg, resp) or self._fail_over(leg, resp):
                return
            if getattr(leg.ctx, "failed_locally", False) or status == 430:
                # RFC 3261 §8.1.3.1, RFC 5626 §5.3: our own failure to reach the device says only
                # that it is unavailable; relayed as is it would read as a crash (503 -> 500)
                resp = make_response(leg.invite, 480, "Temporarily Unavailable")
            leg.state = BranchState.FAILED
            self.mgr.unregister_leg(leg)
            self.react(self.state.failed, leg, resp)

    def relay_provisional(self, leg: BLeg, resp: Response, leg_reliable: bool = False) -> None:
        out = make_response(self.a.invite, resp.status, resp.reason, to_tag=self.a.dialog.local_tag)
        out.add_header("Contact", self.a.dialog.contact)
        if resp.body and self.early_media_from is None:
            # early media: only the first device's SDP reaches the caller
            self.early_media_from = leg
            out.add_header("Content-Type", resp.content_type or "application/sdp")
            out.body = resp.body
        reliable.send_to_caller(self, out, leg_reliable)

    def check_exhausted(self) -> None:
        """Every branch is done: answer the best failure, or keep waiting if a device may still come."""
        if self.state.final or any(b.pending for b in self.branches.values()):
            return
        if self.more_possible():
            if not isinstance(self.state, Parked):
                self.park()
            return
        why = "every push failed" if self.wake_result is not None and self.wake_result.all_failed \
            else "no device can answer"
        self.unanswered(exhausted_status(self.failures), None, None, why)

    def cancel_branches(self, reason: str | None, keep: BLeg | None = None) -> None:
        for leg in list(self.branches.values()):
            if leg is not keep:
                leg.cancel(reason)

    # -- the caller's final answer -------------------------------------------------------------

    def connect(self, leg: BLeg, resp: Response) -> None:
        """First 2xx wins: ACK it, cancel the others, answer the caller with its SDP."""
        self.winner = leg
        self.state = Connected()
        self.answered_at = self.clock.seconds()
        self._stop_ring_timer()
        # RFC 3262 §3: no 2xx while a reliable 18x with SDP is unacknowledged; it keeps being resent
        held = bool(self.a.reliable) and self.a.reliable.sdp_unacked()
        if not held:
            self.a.stop_provisionals()
        if self.a.invite.body:
            self.send_branch_ack(leg)
        else:
            self._late_ack = leg  # the offer is in this 2xx: the answer comes in the caller's ACK
        self.cancel_branches(REASON_ANSWERED, keep=leg)
        self.late_reason = REASON_ANSWERED
        ok = make_response(self.a.invite, resp.status, resp.reason, to_tag=self.a.dialog.local_tag)
        ok.add_header("Contact", self.a.dialog.contact)
        _add_capabilities(ok, bool(self.mgr.settings.session_expires))
        if resp.body:
            ok.add_header("Content-Type", resp.content_type or "application/sdp")
            ok.body = resp.body
        self.timers = session_timer.start(self, resp, ok)
        if held:
            self.a.reliable.hold_final(lambda: self._answer_caller(ok))
        else:
            self._answer_caller(ok)
        self.mgr.counters["answered"] += 1
        self.mgr.watch_flow(self, leg.hop.flow_id, leg.hop.transport)
        self._release_silo()
        self._waker_done(answered_elsewhere=True)
        if logflags.debug_enabled:
            log.debug("answered by {contact}", contact=redact_uri(leg.binding.contact_uri),
                      call_id=self.call_id)

    def _answer_caller(self, ok: Response) -> None:
        self.a.stop_provisionals()
        self.a.retransmit = self.port.respond_2xx(self.a.stx, ok, self._no_ack)
        self.a_answered = True

    def unanswered(self, status: int, reason: str | None, branch_reason: str | None, why: str,
                   ring_timeout: bool = False) -> None:
        """No device will answer: forward the call to voicemail when the policy says so, else
        give the caller ``status``."""
        if self.mgr.voicemail is not None and self.divert(status, reason, branch_reason, why, ring_timeout):
            return
        self.finish_unanswered(status, reason, branch_reason, why)

    # -- voicemail (b2bua/voicemail.py) --------------------------------------------------------

    def divert(self, status: int, reason: str | None, branch_reason: str | None, why: str,
               ring_timeout: bool) -> bool:
        """Forward to ``[voicemail] target`` instead of failing with ``status``; False when this
        call does not go to voicemail (policy, the user's choice, or a target we cannot reach)."""
        policy = self.mgr.voicemail
        if policy is None or self.state.final or not self.may_divert():
            return False
        vm_reason = policy.reason_for(status, ring_timeout)
        if vm_reason is None:
            return False
        user = self.callee_uri.partition(":")[2].rpartition("@")[0]
        try:
            if not policy.user_wants(user):
                return False
        except Exception:
            log.failure("users database: voicemail setting of {user} unreadable", user=user,
                        call_id=self.call_id)
            return False
        vm_uri = voicemail.voicemail_uri(policy.target, self.callee_uri, vm_reason)
        now = self.clock.seconds()
        target = Binding(aor=self.aor, contact_uri=vm_uri, contact=f"<{vm_uri}>", expires_at=now,
                         registered_at=now, call_id="", cseq=0, key="voicemail")
        hop = hop_for_binding(target, False)
        if hop is None:
            return False
        diverted = Diverted(status, reason, why)
        self.state = diverted
        self._stop_ring_timer()
        self.cancel_branches(branch_reason)
        self.late_reason = branch_reason or f'SIP;cause={status};text="{why}"'
        self.early_media_from = None  # the voicemail greeting is the early media now
        self._release_silo()  # no more late forks (pushed iOS devices still get their Invite/Cancel)
        self._waker_done(answered_elsewhere=False)
        leg = self._new_branch(target, hop, None, [])  # no Path: the voicemail server is no device
        leg.invite.add_header("Diversion", voicemail.diversion(self.callee_uri, vm_reason))
        leg.invite.add_header("History-Info", voicemail.history_info(self.callee_uri, vm_uri, vm_reason))
        diverted.leg = leg
        self.voicemail_reason = vm_reason
        self.branches[leg.dialog.key] = leg
        self._by_key[target.key] = leg
        self.mgr.register_leg(self, leg)
        self.mgr.voicemail_counts[vm_reason] += 1
        log.info("call for {user} forwarded to voicemail: {reason} ({why})", user=user, reason=vm_reason,
                 why=why, call_id=self.call_id)
        self.start_ring_timer(self.mgr.settings.ring_timeout)
        self._send_branch(leg)
        return True

    def may_divert(self) -> bool:
        """Could voicemail still answer this call, should the devices fail?"""
        return self.mgr.voicemail is not None and not isinstance(self.state, Diverted)

    def voicemail_failed(self, diverted: Diverted, why: str) -> None:
        """Voicemail could not take the call: the caller gets what the devices gave."""
        self.mgr.voicemail_counts["failed"] += 1
        log.info("{why}: the caller gets {status}", why=why, status=diverted.status, call_id=self.call_id)
        self.finish_unanswered(diverted.status, diverted.reason, None, f"{diverted.why}; {why}")

    def finish_unanswered(self, status: int, reason: str | None, branch_reason: str | None, why: str) -> None:
        """Give the caller a final failure, cancel every branch and end the call."""
        if self.state.final:
            return
        self.state = Ended()
        self.final_status = status
        self.late_reason = branch_reason or f'SIP;cause={status};text="{why}"'
        try:
            self.port.respond(self.a.stx, make_response(self.a.invite, status, reason,
                                                        to_tag=self.a.dialog.local_tag))
        except Exception:
            log.failure("cannot answer {status}", status=status, call_id=self.call_id)
        self.cancel_branches(branch_reason)
        self._release_silo()
        self.end(why)

    def caller_cancel(self, reason: str | None) -> None:
        held = self.a.reliable and self.a.reliable.held_final is not None
        if held and not self.ended:  # our 2xx waits for a PRACK (RFC 3262 §3): the INVITE is still open
            self.a.stop_provisionals()
            self.fail_answered("cancelled by the caller", "Request Terminated", 487, reason)
            return
        self.react(self.state.caller_cancel, reason)

    def _no_ack(self) -> None:
        log.warn("caller never ACKed our 2xx: hanging up", call_id=self.call_id)
        self.a.retransmit = None
        relay.hang_up(self, None, "no ACK")

    # -- ACKs ----------------------------------------------------------------------------------

    def send_branch_ack(self, leg: BLeg, body: bytes = b"", content_type: str | None = None) -> None:
        leg.acked = True
        if body:
            leg.ack_body = (body, content_type)
        body, content_type = leg.ack_body
        ack = leg.dialog.request("ACK", body, content_type, seq=leg.invite.cseq.seq)
        self.port.send_ack(ack, leg.hop)

    def caller_acked(self, ack: Request) -> None:
        """The caller's ACK for our 2xx to its INVITE (retransmissions stop; a late answer goes on)."""
        self.a.stop_retransmit()
        leg, self._late_ack = self._late_ack, None
        if leg is not None:
            self.send_branch_ack(leg, ack.body, ack.content_type)

    def ack_and_bye(self, leg: BLeg, resp: Response) -> None:
        """A 2xx nobody will take (a second device answered, or the call is over)."""
        log.info("late 2xx from {contact}: ACK and BYE", contact=redact_uri(leg.binding.contact_uri),
                 call_id=self.call_id)
        self.send_branch_ack(leg)
        self.port.send_request(leg.dialog.request("BYE"), leg.hop, _ignore)
        self.mgr.unregister_leg(leg)

    # -- Invite/Cancel for pushed devices that wake after the end ------------------------------

    def late_binding_after_end(self, binding: Binding) -> bool:
        """A pushed device registered after the caller got its answer: send it the INVITE and, at
        once, a CANCEL with the Reason (iOS PushKit must always get a call to report to CallKit)."""
        key = target_key(binding)
        if key not in self.woken:
            return False
        self.woken.pop(key)
        hop, flow_id, routes = self._route(binding)
        if hop is not None:
            leg = self._new_branch(binding, hop, flow_id, routes)
            self._send_branch(leg)
            leg.cancel(self.late_reason or REASON_ANSWERED)
        if not self.woken:
            self.mgr.silo.unlinger(self)
        return hop is not None

    def _release_silo(self) -> None:
        """The caller has its answer: the call leaves the silo's pending calls (an answered call must
        not count against max_pending_per_aor, however long it lasts), unless pushed iOS devices are
        still expected: then it moves to the silo's grace table for their Invite/Cancel.
        """
        self.mgr.release_source(self)
        grace = self.mgr.settings.invite_cancel_grace
        wanting = {k: b for k, b in self.woken.items() if self.mgr.invite_cancel_wanted(b)}
        self.woken = wanting
        if grace > 0 and wanting:
            self.mgr.silo.linger(self, grace, self.mgr.expiry(grace))
        else:
            self.mgr.silo.remove(self)

    def _waker_done(self, answered_elsewhere: bool) -> None:
        if self._waker_used:
            self._waker_used = False
            try:
                self.mgr.waker.call_ended(self, answered_elsewhere)
            except Exception:
                log.failure("waker.call_ended failed", call_id=self.call_id)

    # -- the end -------------------------------------------------------------------------------

    def start_ring_timer(self, delay: float) -> None:
        self._stop_ring_timer()
        self._ring_timer = self.mgr.expiry(delay).add(self._ring_timeout)

    def _stop_ring_timer(self) -> None:
        entry = self._ring_timer
        if entry is not None:
            self._ring_timer = None
            cancel_expiry(entry)

    def end(self, why: str) -> None:
        """Release everything the call holds. Idempotent; pending branches were cancelled before."""
        if self.ended:
            return
        self.ended = True
        self.end_reason = why
        if not isinstance(self.state, Ended):
            self.state = Ended()
        self._stop_ring_timer()
        self._keep_parsed()
        if self.timers is not None:
            self.timers.stop()
            self.timers = None
        self.a.stop_retransmit()
        self.a.stop_provisionals()
        if self.mgr.silo.get(self.call_id) is self:
            self.mgr.silo.remove(self)
        self.wake_d = None
        self._waker_done(answered_elsewhere=self.winner is not None)
        for pending in self.pending_acks.values():
            pending.retransmit.stop()
        self.pending_acks.clear()
        # The transactions outlive the call by up to 64*T1 (absorbing retransmissions): let them
        # keep bytes, not the parsed INVITEs and, through their callbacks, this whole call.
        self.a.compact()
        for leg in self.branches.values():
            if leg.ctx is not None and leg.state == BranchState.ANSWERED:
                leg.ctx.detach()
        self.mgr.forget(self)
        if logflags.info_enabled:  # see libon_tsilo/logflags.py: a filtered event still costs µs
            # the CDR: `reason` and the others are fields of their own (in the JSON log too)
            log.info(cdr.FORMAT, **cdr.fields(self, why), call_id=self.call_id)

    def cdr_trunk(self) -> str:
        """The trunk the call went through, "-" for a call that stayed local (b2bua/outbound.py)."""
        return "-"

    def transferable(self, leg: Any) -> bool:
        """May `leg` be the transferee of a REFER (move into a new call)? Not a trunk's leg (outbound.py)."""
        return True

    def in_dialog(self, leg: Any, request: Request, stx: Any) -> None:
        relay.request(self, leg, request, stx)

    def ack_in_dialog(self, leg: Any, ack: Request) -> None:
        relay.ack(self, leg, ack)

    def flow_lost(self, flow_id: str) -> None:
        relay.flow_lost(self, flow_id)


def _ignore(resp: Response) -> None:
    return None
