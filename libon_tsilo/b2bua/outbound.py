"""Calls out through a trunk ("VoIP out"): a call with one branch, whose target is the trunk.

The A-leg/B-leg machinery is the late fork's (relay, PRACK, UPDATE, re-INVITE, session timers,
CANCEL, BYE both ways); what differs is here:

- no parking and no push: the branch goes to the trunk's first target at once;
- the B-leg's request URI is ``sip:+E164@target;user=phone`` (a domain route keeps ``sip:user@domain``
  and sends it to the target, as to an outbound proxy); its From is the caller's number (from
  the users database, else the user name) at the trunk's `from_domain`; P-Asserted-Identity carries
  that number only when the trunk asks (`pai`), and the caller's internal identity never leaves;
- a 401/407 is answered once per target with the trunk's credentials (RFC 3261 §22.2: same Call-ID
  and From tag, CSeq + 1), twice when the second challenge says stale=true; only challenges from the
  trunk's `realm` are answered when one is configured;
- failover (RFC 3263 §4.3 spirit): on 503, 408, a transport failure or a timeout of one target, the
  same INVITE goes to the next target, as long as no provisional > 100 reached the caller. A target
  that sends nothing at all (not even 100 Trying) within the trunk's `failover_timeout` counts as
  timed out: waiting for Timer B (64*T1, 32 s) would leave the caller in silence; it is CANCELled
  (a 2xx it sends later is ACKed and BYEd).

Who may call out is decided before the call exists (routing/policy.py); the call only holds its
place in the per-user and per-trunk counts until it ends (CallManager.forget releases it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from libon_tsilo.b2bua.call import Call
from libon_tsilo.b2bua.identity import CallerTrust
from libon_tsilo.b2bua.legs import BLeg, BranchState
from libon_tsilo.b2bua.ports import Hop, ServerHandle
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.routing.destinations import Destination
from libon_tsilo.routing.policy import REFUSALS, CallOutPolicy, Refusal
from libon_tsilo.routing.trunks import Trunk, TrunkTarget
from libon_tsilo.sip.digest_client import authorization, pick_challenge
from libon_tsilo.sip.headers import NameAddr
from libon_tsilo.sip.message import Request, Response, make_response
from libon_tsilo.sip.uri import URI

if TYPE_CHECKING:
    from libon_tsilo.b2bua.manager import CallManager

__all__ = ["CallsOut", "OutboundCall"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

_FAILOVER = frozenset({503, 408})
_CHALLENGE = {401: ("WWW-Authenticate", "Authorization"), 407: ("Proxy-Authenticate", "Proxy-Authorization")}


class OutboundCall(Call):
    """A call from one of our users to a trunk."""

    __slots__ = ("trunk", "dest", "caller_user", "caller_number", "target_index", "auth_tries", "ringing",
                 "_retry", "_silence")

    def __init__(self, mgr: CallManager, invite: Request, stx: ServerHandle, flow: Any, trust: CallerTrust,
                 dest: Destination, caller_user: str, caller_number: str | None) -> None:
        trunk = dest.trunk
        assert trunk is not None  # CallsOut.place checked it
        super().__init__(mgr, invite, stx, flow, f"trunk:{trunk.name}", _callee_text(dest, invite), trust)
        self.trunk: Trunk = trunk
        self.dest = dest
        self.caller_user = caller_user
        self.caller_number = caller_number
        self.target_index = 0
        self.auth_tries = 0
        self.ringing = False  # a provisional > 100 reached the caller: no failover any more
        # a digest retry: (From tag, CSeq, credentials header name, the challenge) of the next INVITE
        self._retry: tuple[str, int, str, Any] | None = None
        self._silence: Any = None  # the failover_timeout of the branch waiting for its first response

    def cdr_trunk(self) -> str:
        return self.trunk.name

    def may_divert(self) -> bool:
        return False  # the callee is in the phone network, no mailbox here: the caller gets its answer

    def transferable(self, leg: Any) -> bool:
        # the call out holds the user's and the trunk's places in the counts until it ends: handing
        # the trunk's leg to a new (local, uncounted) call would free them while the trunk still bills
        return leg is self.a

    # -- start ---------------------------------------------------------------------------------

    def start_out(self, ring_timeout: float) -> None:
        self.start_ring_timer(ring_timeout)
        if not self._fork_target():
            self.finish_unanswered(503, "Service Unavailable", None, "no trunk target reachable")

    def _fork_target(self) -> bool:
        while self.target_index < len(self.trunk.targets):
            if self.fork(self._binding(self.trunk.targets[self.target_index])):
                self._watch_silence()
                return True
            self.target_index += 1
        return False

    def _watch_silence(self) -> None:
        self._stop_silence()
        if self.trunk.failover_timeout and self.target_index + 1 < len(self.trunk.targets):
            self._silence = self.clock.callLater(self.trunk.failover_timeout, self._silent)

    def _stop_silence(self) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self._silence = None

    def _silent(self) -> None:
        self._silence = None
        try:  # a timer: nobody above would log a bug, nor answer the caller
            self._give_up_silent_target()
        except Exception:
            log.failure("trunk failover failed", call_id=self.call_id)
            self.fail("internal error")

    def _give_up_silent_target(self) -> None:
        leg = next((b for b in self.branches.values() if b.state == BranchState.CALLING), None)
        if leg is None or self.state.final or self.ended:
            return
        log.info("trunk {trunk} target {target}: no answer in {t} s, trying the next one",
                 trunk=self.trunk.name, target=self.trunk.targets[self.target_index].uri_host,
                 t=self.trunk.failover_timeout, call_id=self.call_id)
        leg.cancel(None)  # sent when a provisional comes (§9.1); a late 2xx gets ACK and BYE
        leg.state = BranchState.FAILED
        self.mgr.unregister_leg(leg)
        self.target_index += 1
        self.auth_tries = 0
        if not self._fork_target():
            self.react(self.state.failed, leg, make_response(leg.invite, 408, "Request Timeout"))

    def end(self, why: str) -> None:
        self._stop_silence()
        super().end(why)

    def _binding(self, target: TrunkTarget) -> Binding:
        # the branch machinery forks to bindings: a trunk target is one we never registered
        if self.dest.number is not None:
            uri = target.request_uri(self.dest.number, self.trunk.tel_uri)
        else:  # a domain route: the trunk is the next hop towards that domain, the R-URI stays its own
            uri = _callee_text(self.dest, self.a.invite)
        return Binding(aor=self.aor, contact_uri=uri, contact=f"<{uri}>", expires_at=math.inf,
                       registered_at=self.created_at, call_id="", cseq=0,
                       received=(target.transport, target.host, target.port),
                       key=f"trunk:{self.trunk.name}#{self.target_index}")

    def more_possible(self) -> bool:
        return False  # nothing is parked or pushed: when the branch is done, so is the call

    # -- the B-leg ------------------------------------------------------------------------------

    def _new_branch(self, binding: Binding, hop: Hop, flow_id: str | None, routes: list[str]) -> BLeg:
        leg = super()._new_branch(binding, hop, flow_id, routes)  # a trunk binding has no Path: []
        req, dialog = leg.invite, leg.dialog
        target = self.trunk.targets[self.target_index]
        domain = self.trunk.from_domain or target.uri_host.rsplit(":", 1)[0]
        tag = dialog.local_tag
        retry, self._retry = self._retry, None
        if retry is not None:
            tag, seq, credentials_name, challenge = retry
            dialog.local_seq = seq
            req.set_header("CSeq", f"{seq} INVITE")
            req.add_header(credentials_name, authorization(
                challenge, "INVITE", binding.contact_uri, self.trunk.username, self.trunk.password))
        caller = self.caller_number or self.caller_user
        local = NameAddr(URI.parse(f"sip:{caller}@{domain}"), None, {"tag": tag})
        remote = NameAddr(URI.parse(binding.contact_uri))
        dialog.local, dialog.remote = local, remote
        req.set_header("From", dialog.local_text)
        req.set_header("To", dialog.remote_text)
        req.remove_header("P-Asserted-Identity")  # our user's internal identity is not the trunk's business
        if self.trunk.pai and self.caller_number:
            req.add_header("P-Asserted-Identity", f"<sip:{self.caller_number}@{domain};user=phone>")
        for name, value in self.trunk.headers:
            req.add_header(name, value)
        return leg

    def relay_provisional(self, leg: BLeg, resp: Response, leg_reliable: bool = False) -> None:
        self.ringing = True
        super().relay_provisional(leg, resp, leg_reliable)

    def branch_response(self, leg: BLeg, resp: Response) -> None:
        status = resp.status
        if self._silence is not None and leg.state == BranchState.CALLING:
            self._stop_silence()  # the target is alive, even if it only said 100 Trying
        usable = leg.state in (BranchState.CALLING, BranchState.EARLY) and not leg.cancelled \
            and not self.state.final and not self.ended
        try:
            if usable and status in _CHALLENGE and self._answer_challenge(leg, resp):
                return
            if usable and status >= 300 and self._fail_over_target(leg, resp):
                return
        except Exception:
            log.failure("trunk response {status} failed", status=status, call_id=self.call_id)
            self.fail("internal error")
            return
        super().branch_response(leg, resp)

    def _drop(self, leg: BLeg) -> None:
        leg.state = BranchState.FAILED
        self.mgr.unregister_leg(leg)
        self.branches.pop(leg.dialog.key, None)

    def _answer_challenge(self, leg: BLeg, resp: Response) -> bool:
        trunk = self.trunk
        if not trunk.has_credentials:
            log.warn("trunk {trunk} challenged us ({status}) and has no credentials", trunk=trunk.name,
                     status=resp.status, call_id=self.call_id)
            return False
        challenge_name, credentials_name = _CHALLENGE[resp.status]
        challenge = pick_challenge(resp.header_values(challenge_name), trunk.realm or None)
        if challenge is None:
            log.warn("trunk {trunk}: no challenge we may answer (realm {realm})", trunk=trunk.name,
                     realm=trunk.realm or "any", call_id=self.call_id)
            return False
        if self.auth_tries >= (2 if challenge.stale else 1):
            log.warn("trunk {trunk} refused our credentials for {user}", trunk=trunk.name,
                     user=trunk.username, call_id=self.call_id)
            return False
        self.auth_tries += 1
        self._drop(leg)
        self._retry = (leg.dialog.local_tag, leg.invite.cseq.seq + 1, credentials_name, challenge)
        self._by_key.pop(leg.binding.key, None)
        if self.fork(leg.binding):
            self._watch_silence()
        else:
            self.react(self.state.failed, leg, resp)
        return True

    def _fail_over_target(self, leg: BLeg, resp: Response) -> bool:
        failed_locally = getattr(leg.ctx, "failed_locally", False)
        if not (resp.status in _FAILOVER or failed_locally) or self.ringing:
            return False
        if self.target_index + 1 >= len(self.trunk.targets):
            return False
        log.info("trunk {trunk} target {target} failed ({status}): trying the next one",
                 trunk=self.trunk.name, target=self.trunk.targets[self.target_index].uri_host,
                 status=resp.status, call_id=self.call_id)
        self._drop(leg)
        self.target_index += 1
        self.auth_tries = 0
        if not self._fork_target():
            self.react(self.state.failed, leg, resp)
        return True


def _callee_text(dest: Destination, invite: Request) -> str:
    # what the CDR and the admin API show; a domain route keeps the dialled URI
    if dest.number is not None:
        return f"tel:{dest.number}"
    uri = invite.uri
    return f"sip:{uri.user}@{uri.host}" if uri.user else f"sip:{uri.host}"


class CallsOut:
    """The call manager's door to calls out: who may, through which trunk, and placing the call."""

    def __init__(self, destinations: Any, policy: CallOutPolicy, users: Any = None,
                 ring_timeout: float = 90.0, home_domain: str = "localhost") -> None:
        """`destinations`: routing/destinations.py `Destinations`; `users`: the users database (`get`);
        `home_domain`: the domain of the URI a local user's number is rewritten to."""
        self.destinations = destinations
        self.policy = policy
        self.users = users
        self.ring_timeout = ring_timeout
        self.home_domain = home_domain

    def classify(self, uri: URI) -> Destination | None:
        return self.destinations.classify(uri)

    def local_uri(self, user: str) -> URI:
        return URI("sip", user, self.home_domain)

    def may_dial_number(self, mgr: CallManager, ok: Any, request: Request, stx: ServerHandle,
                        dest: Destination) -> bool:
        """A user's number is dialled by one of our users or a trusted peer (a gateway): a caller
        from the internet calls our users by name, and does not learn who owns which number."""
        trust = ok if isinstance(ok, CallerTrust) else CallerTrust()
        if trust.trusted or trust.user is not None:
            return True
        refusal = REFUSALS["unauthenticated"]
        self.policy.refuse(refusal, request.call_id, False, caller=str(request.from_.uri), callee=dest.callee)
        _refuse(mgr, stx, request, refusal)
        return False

    def place(self, mgr: CallManager, ok: Any, request: Request, stx: ServerHandle, flow: Any,
              dest: Destination) -> None:
        trust = ok if isinstance(ok, CallerTrust) else CallerTrust()
        call_id = request.call_id
        fields = {"caller": str(request.from_.uri), "callee": dest.callee}
        record: Any = None
        refusal = self.policy.check_caller(trust.trusted, trust.user)
        if refusal is None and trust.user is not None:
            record = self.users.get(trust.user) if self.users is not None else None
            refusal = self.policy.check_call(record, dest.number, dest.trunk)
            fields["trunk"] = dest.trunk.name if dest.trunk is not None else "-"
        if refusal is None and dest.trunk is None:
            refusal = self.policy.check_call(None, dest.number, None)
        if refusal is not None:
            self.policy.refuse(refusal, call_id, trust.user is not None, **fields)
            _refuse(mgr, stx, request, refusal)
            return
        assert trust.user is not None and dest.trunk is not None
        number = getattr(record, "number", None)
        call = OutboundCall(mgr, request, stx, flow, trust, dest, trust.user, number)
        if mgr.sources is not None and not mgr.sources.admit(call.call_id, flow):
            mgr.refuse_parked_per_source(stx, request, flow)
            return
        mgr.admit_call(call)
        self.policy.admit(call.call_id, trust.user, dest.trunk)
        log.info("call out {user} -> {callee} via {trunk}", user=trust.user, callee=dest.callee,
                 trunk=dest.trunk.name, call_id=call.call_id)
        try:
            call.start_out(self.ring_timeout)
        except Exception:
            log.failure("call out setup failed", call_id=call.call_id)
            call.fail("internal error")

    def release(self, call: Call) -> None:
        self.policy.release(call.call_id)

    def stats(self) -> dict[str, Any]:
        """For the admin API's `stats`: calls placed, calls up per trunk, refusals by reason."""
        p = self.policy
        refused = {reason: n for reason, n in p.refused.items() if n}
        return {"placed": p.placed, "active": p.active(), "refused": refused}


def _refuse(mgr: CallManager, stx: ServerHandle, request: Request, refusal: Refusal) -> None:
    mgr.counters["rejected"] += 1
    resp = make_response(request, refusal.status, refusal.phrase)
    if refusal.status == 503:
        resp.add_header("Retry-After", str(max(1, int(mgr.settings.ring_timeout))))
    try:
        mgr.port.respond(stx, resp)
    except Exception:
        log.failure("cannot send {status}", status=refusal.status, call_id=request.call_id)

