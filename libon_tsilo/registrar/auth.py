"""The digest authentication policy: who is challenged, how credentials are checked.

REGISTER is challenged with 401 / WWW-Authenticate, an INVITE from one of our domains with 407 /
Proxy-Authenticate; one challenge per configured algorithm, in the configured order (RFC 8760
§2.4: the preferred first), sharing one nonce; MD5 only by default (see [auth] algorithms in
etc/libon-tsilo.toml). Trusted peers (``trusted_sources``: a trunk, an SBC; ``[[gateways]]``:
registrar/peers.py) are exempt, whether digest is enabled or not: their identity is believed.

Nonces are stateless (timestamp + epoch + HMAC, see sip/digest.py). The only state is the replay
table (registrar/nonce_counts.py): the highest nonce-count seen per nonce, recorded only after a
valid response, so an attacker without a password cannot grow it. A nonce of another epoch (issued
before a restart, or by another node) is stale. Failed attempts are limited per source and per
user (registrar/auth_limits.py).

Failure answers: an unknown user, a wrong password, a forged nonce or a replayed nonce-count all
get a fresh challenge (no difference an attacker could use to enumerate users); a stale nonce with a
correct response gets ``stale=true`` so the UA retries silently (as does an INVITE or MESSAGE whose
nonce was challenged for another Request-URI: a 407 nonce is bound to the request it challenged,
Kamailio's auth_checks idea, so credentials sniffed for one call cannot place another); credentials
that are not usable Digest (missing fields, qop other than auth) get 400; a valid user who does not
own the identity (To for REGISTER, From for INVITE) gets 403; a source or user over its failure limit gets 403
without its credentials being checked. Each refusal is logged with an ``outcome`` field
(bad_nonce, unknown_user, wrong_password, replayed_nc, not_owner) that the JSON log carries.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.registrar.auth_limits import FailureLimiter, FailureLimits, source_key
from libon_tsilo.registrar.nonce_counts import MemoryNonceCounts, NonceCounts
from libon_tsilo.registrar.peers import Peer, TrustedPeers
from libon_tsilo.sip import digest
from libon_tsilo.sip.hostnames import HostSet
from libon_tsilo.sip.message import Request, Response, log_call_id, make_response, new_tag
from libon_tsilo.sip.uri import unescape

if TYPE_CHECKING:
    from libon_tsilo.sip.flow import Flow

__all__ = ["AuthPolicy", "AuthResult", "CredentialSource"]

log = Logger()

_NC_DIGITS = frozenset("0123456789abcdefABCDEF")
_REQUIRED = ("username", "nonce", "uri", "response", "qop", "nc", "cnonce")


class CredentialSource(Protocol):
    def get_ha1(self, username: str, realm: str, algorithm: str) -> str | None: ...


@dataclass
class AuthResult:
    """Either ``response`` (send it and stop) or a pass: ``user`` authenticated, or ``exempt``.

    ``identity`` is the URI we vouch for (``sip:user@<our domain as configured>``) when ``user``
    is set; ``trusted`` says the request came from ``trusted_sources`` (its identity headers may
    be believed), and ``peer`` which one (a gateway may call users' numbers). An exempt request
    that is not trusted comes from the internet unauthenticated.
    """

    user: str | None = None
    response: Response | None = None
    exempt: bool = False
    trusted: bool = False
    identity: str | None = None
    peer: Peer | None = None

    @property
    def ok(self) -> bool:
        return self.response is None


@dataclass(frozen=True)
class _Kind:
    status: int
    challenge: str
    credentials: str


_REGISTER = _Kind(401, "WWW-Authenticate", "Authorization")
_PROXY = _Kind(407, "Proxy-Authenticate", "Proxy-Authorization")


class AuthPolicy:
    def __init__(
        self,
        clock: IReactorTime,
        users: CredentialSource,
        realm: str,
        secret: str,
        nonce_lifetime: float = 300.0,
        trusted_sources: Iterable[str] = (),
        algorithms: Iterable[str] = ("MD5",),
        enabled: bool = True,
        local_domains: Iterable[str] = (),
        nonce_counts: NonceCounts | None = None,
        limits: FailureLimits | None = None,
        peers: TrustedPeers | None = None,
    ) -> None:
        """``peers`` (trusted sources and gateways) wins over ``trusted_sources`` when given."""
        self.clock = clock
        self.users = users
        self.realm = realm
        self.secret = secret
        self.nonce_lifetime = nonce_lifetime
        self.enabled = enabled
        self.algorithms = [digest.normalize_algorithm(a) for a in algorithms]
        self.local_domains = HostSet(local_domains)
        self.peers = peers if peers is not None else TrustedPeers(trusted_sources)
        self.nonce_counts: NonceCounts = (
            nonce_counts if nonce_counts is not None else MemoryNonceCounts(clock, nonce_lifetime)
        )
        self.limiter = FailureLimiter(clock, limits or FailureLimits())

    # -- public ---------------------------------------------------------------------------------

    def check(self, request: Request, flow: Flow | None, kind: str | None = None) -> AuthResult:
        """Authenticate ``request``. ``kind`` is "register" (401) or "invite"/"proxy" (407);
        by default it follows the method.

        For a proxy-style check, a request whose From is not in our domains is not ours to
        authenticate (it comes from another server): it passes with ``user`` None, and the call
        layer decides what such a caller may reach.
        """
        if kind is None:
            kind = "register" if request.method == "REGISTER" else "invite"
        spec = _REGISTER if kind == "register" else _PROXY
        peer = self.peer_of(flow)
        if peer is not None:  # before `enabled`: a gateway is one with digest off too
            return AuthResult(exempt=True, trusted=True, peer=peer)
        if not self.enabled:
            return AuthResult(exempt=True)
        identity = request.to.uri if spec is _REGISTER else request.from_.uri
        if spec is _PROXY and self.local_domains and identity.host not in self.local_domains:
            return AuthResult(exempt=True)
        source = source_key(flow.key.remote[0]) if flow is not None else None
        if self.limiter.source_blocked(source):
            return self._reject(request, 403, "Forbidden (too many failed attempts)")
        return self._verify(request, spec, identity, source)

    def peer_of(self, flow: Flow | None) -> Peer | None:
        """The trusted peer (registrar/peers.py) ``flow`` comes from, or None."""
        return self.peers.peer_of(flow.key.remote[0]) if flow is not None else None

    def is_trusted(self, flow: Flow | None) -> bool:
        return self.peer_of(flow) is not None

    def stop(self) -> None:
        self.nonce_counts.stop()
        self.limiter.stop()

    def replay_table_size(self) -> int:
        return len(self.nonce_counts)

    # -- verification ---------------------------------------------------------------------------

    def _verify(self, request: Request, spec: _Kind, identity: Any, source: str | None) -> AuthResult:
        creds = self._pick_credentials(request, spec)
        if creds is None:
            return self._challenge(request, spec, stale=False)
        call_id = log_call_id(request)
        missing = [k for k in _REQUIRED if not creds.get(k)]
        if creds.get("qop") and creds["qop"].lower() != "auth":
            self.limiter.failed(None, source, call_id)
            return self._reject(request, 400, "Unsupported digest qop (only auth)")
        if missing:
            self.limiter.failed(None, source, call_id)
            return self._reject(request, 400, f"Malformed credentials (no {missing[0]})")
        nc_text = creds["nc"]
        if len(nc_text) != 8 or not set(nc_text) <= _NC_DIGITS:
            self.limiter.failed(None, source, call_id)
            return self._reject(request, 400, "Malformed credentials (bad nc)")
        if not creds["response"].isascii():  # hmac.compare_digest raises TypeError on non-ASCII text
            self.limiter.failed(None, source, call_id)
            return self._reject(request, 400, "Malformed credentials (bad response)")
        nc = int(nc_text, 16)
        username, nonce, algorithm = creds["username"], creds["nonce"], creds["algorithm"]
        if self.limiter.user_blocked(username, source):
            return self._reject(request, 403, "Forbidden (too many failed attempts)")
        now = self.clock.seconds()
        state = digest.check_nonce(self.secret, nonce, now, self.nonce_lifetime, self.nonce_counts.epoch)
        if state == "bad":
            log.info("auth: foreign or forged nonce from {user}", user=username, outcome="bad_nonce",
                     call_id=call_id)
            return self._challenge(request, spec, stale=False)
        if state == "ok" and spec is _PROXY and not digest.nonce_bound_to(self.secret, nonce,
                                                                          request.raw_uri):
            # a nonce challenged for another destination (or a REGISTER): good credentials get a
            # fresh stale=true challenge; credentials taken off the wire cannot place another call
            state = "stale"
        ha1 = self.users.get_ha1(username, self.realm, algorithm)
        if ha1 is None:
            log.info("auth: unknown user {user}", user=username, outcome="unknown_user", call_id=call_id)
            self.limiter.failed(username, source, call_id)
            return self._challenge(request, spec, stale=False)
        expected = digest.expected_response(
            ha1, request.method, creds["uri"], nonce, nc_text, creds["cnonce"], "auth", algorithm
        )
        if not hmac.compare_digest(expected, creds["response"].lower()):
            log.info("auth: wrong password for {user}", user=username, outcome="wrong_password",
                     call_id=call_id)
            self.limiter.failed(username, source, call_id)
            return self._challenge(request, spec, stale=False)
        if state == "stale":
            return self._challenge(request, spec, stale=True)
        issued = digest.nonce_time(nonce) or now
        if not self.nonce_counts.advance(nonce, nc, issued + self.nonce_lifetime):
            log.info("auth: replayed nonce-count {nc} from {user}", nc=nc_text, user=username,
                     outcome="replayed_nc", call_id=call_id)
            self.limiter.failed(username, source, call_id)
            return self._challenge(request, spec, stale=False)
        owner = unescape(identity.user) if identity.user else None
        if owner != username:
            log.info("auth: {user} may not act as {owner}", user=username, owner=owner, outcome="not_owner",
                     call_id=call_id)
            self.limiter.failed(username, source, call_id)
            return self._reject(request, 403, "Identity Not Owned By Authenticated User")
        self.limiter.succeeded(username, source)
        domain = self.local_domains.spelling(identity.host) or identity.host
        if ":" in domain and not domain.startswith("["):
            domain = f"[{domain}]"
        return AuthResult(user=username, identity=f"sip:{identity.user}@{domain}")

    def _pick_credentials(self, request: Request, spec: _Kind) -> dict[str, str] | None:
        """The first credentials for our realm in an algorithm we offer; others are ignored
        (another scheme, another proxy's realm: RFC 4475 regaut01)."""
        for value in request.header_values(spec.credentials):
            try:
                creds = digest.parse_authorization(value)
                algorithm = digest.normalize_algorithm(creds.get("algorithm"))
            except digest.DigestError:
                continue
            if creds.get("realm") != self.realm or algorithm not in self.algorithms:
                continue
            creds["algorithm"] = algorithm
            return creds
        return None

    # -- answers --------------------------------------------------------------------------------

    def _challenge(self, request: Request, spec: _Kind, stale: bool) -> AuthResult:
        resp = make_response(request, spec.status, to_tag=new_tag())
        bound = request.raw_uri if spec is _PROXY else None  # a REGISTER's R-URI is only the domain
        nonce = digest.make_nonce(self.secret, self.clock.seconds(), self.nonce_counts.epoch, bound_to=bound)
        for algorithm in self.algorithms:
            resp.add_header(spec.challenge, digest.challenge_header(self.realm, nonce, algorithm, stale))
        return AuthResult(response=resp)

    @staticmethod
    def _reject(request: Request, status: int, reason: str) -> AuthResult:
        return AuthResult(response=make_response(request, status, reason, to_tag=new_tag()))
