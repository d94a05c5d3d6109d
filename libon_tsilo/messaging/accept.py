"""A MESSAGE outside a dialog to a local user (RFC 3428): checked, limited, stored, then 202.

Who may send one: a local user who authenticates (digest with 407, the INVITE policy: the From must
be theirs), or a peer in ``[auth] trusted_sources`` (a gateway vouches for its From). A request from
the internet in the name of a foreign domain gets 403: we relay no one's messages to our users, and
the stored sender is always an identity we verified (or a trusted peer's), never a From we were
merely told. With ``[auth] enabled = false`` the operator trusts every source, and the From is used.

Answers, in order: 404 (not one of our domains, or no such user or number owner: after digest,
so that only a local user learns who exists; a tel: URI or a local SIP URI naming a phone number
reaches the number's owner as calls do, an outsider gets the 403 first), 400 (no body, or a body
without Content-Type), 415 (an encoded body), 413 for a body over ``max_size`` (RFC 3428 §7 and
RFC 3261 §21.4.11: the body, not the transport's datagram limit that 513 is about, is what we
refuse to store), 480 "Mailbox Full" at ``max_per_user`` stored (the recipient cannot take more
until a device collects them; the sender may try later; 486 would say the user's phone is busy,
503 that our server fails), 480 "Mailbox Full For This Sender" at ``max_per_sender_per_user`` from
this sender (the same temporary state of the recipient, scoped to one sender so that one user
cannot fill another's mailbox), 503 with Retry-After at ``max_total`` waiting messages (ours is
full) and for a sender over ``per_sender_per_minute``, and 202 once the message is durable (500
with Retry-After when the store failed). Each refusal by a limit is counted (``limit_hits``) and
logged at most once per 10 s per limit.
"""

from __future__ import annotations

import email.utils
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from libon_tsilo import logflags
from libon_tsilo.messaging.delivery import MessageDelivery
from libon_tsilo.messaging.outbox import Outbox
from libon_tsilo.messaging.store import StoredMessage
from libon_tsilo.ratelimit import SlidingWindow, ThrottledLog
from libon_tsilo.registrar.auth import AuthPolicy
from libon_tsilo.sip.message import Request, log_call_id, make_response, new_tag
from libon_tsilo.sip.uri import URI

__all__ = ["MessageAcceptor"]

log = Logger()

_REASONS = {
    202: "Accepted", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 413: "Request Entity Too Large",
    415: "Unsupported Media Type", 480: "Mailbox Full", 500: "Server Internal Error",
    503: "Service Unavailable",
}
LIMITS = ("message_size", "messages_per_user", "messages_per_sender", "messages_total",
          "messages_per_sender_per_user")


class MessageAcceptor:
    def __init__(
        self,
        clock: IReactorTime,
        outbox: Outbox,
        delivery: MessageDelivery,
        is_local: Callable[[URI], bool],
        aor_key: Callable[[URI], str],
        auth: AuthPolicy | None = None,
        user_exists: Callable[[str], bool] | None = None,
        max_size: int = 4096,
        max_per_user: int = 500,
        per_sender_per_minute: int = 0,
        max_total: int = 200_000,
        max_per_sender_per_user: int = 0,
        user_of_number: Callable[[URI], str | None] | None = None,
        home_domain: str = "localhost",
    ) -> None:
        """``user_exists`` None (no users database, auth off): a user exists while it has a binding
        or waiting messages. ``user_of_number(uri)``: the user who owns the phone number a tel: URI
        or a local SIP URI names (routing/numbers.py, the calls' mapping), else None; a tel: owner is
        stored at ``home_domain``."""
        self.clock = clock
        self.outbox = outbox
        self.delivery = delivery
        self.is_local = is_local
        self.aor_key = aor_key
        self.auth = auth
        self.user_exists = user_exists
        self.max_size = max_size
        self.max_per_user = max_per_user
        self.max_total = max_total
        self.max_per_sender_per_user = max_per_sender_per_user
        self.user_of_number = user_of_number
        self.home_domain = home_domain
        self.per_sender = (
            SlidingWindow(clock, per_sender_per_minute, 60.0) if per_sender_per_minute > 0 else None
        )
        self.counters: Counter[str] = Counter()  # accepted, refused
        self.limit_counters: Counter[str] = Counter()
        self._limit_logs = {name: ThrottledLog(clock) for name in LIMITS}

    def stats(self) -> dict[str, Any]:
        """For the admin RPC and /metrics: what waits, and what happened since start."""
        return {**self.delivery.stats(), "accepted": self.counters.get("accepted", 0),
                "refused": self.counters.get("refused", 0)}

    def limit_hits(self) -> dict[str, int]:
        return {name: self.limit_counters.get(name, 0) for name in LIMITS}

    # -- the handler (sip.router) -----------------------------------------------------------------

    def handle_message(self, request: Request, stx: Any, flow: Any) -> None:
        uri = request.uri
        if not isinstance(uri, URI) or not self._may_be_ours(uri):
            self._answer(stx, request, 404)
            return
        sender_uri = request.from_.uri  # parsed now: a bad From is a 400 from the transaction guard
        sender_name = request.from_.display
        if self.auth is not None:
            result = self.auth.check(request, flow, "invite")
            if result.response is not None:
                stx.respond(result.response)
                return
            if result.user is not None and result.identity is not None:
                sender = result.identity
            elif result.trusted:
                sender = str(sender_uri)
            else:
                self._answer(stx, request, 403, "MESSAGE Only From Local Users")
                return
        else:
            sender = str(sender_uri)
        # after digest: only our users and trusted peers learn who exists or owns a number
        owner = self._recipient(uri, request)
        if owner is None:
            self._answer(stx, request, 404)
            return
        uri = owner
        aor = self.aor_key(uri)
        problem = self._check_body(request)
        if problem is not None:
            self._answer(stx, request, *problem)
            return
        if len(request.body) > self.max_size:
            self._refuse(stx, request, "message_size", 413, "{size} bytes from {sender} (max_size {n})",
                         size=len(request.body), sender=sender, n=self.max_size)
            return
        if self.outbox.count(aor) >= self.max_per_user:
            self._refuse(stx, request, "messages_per_user", 480,
                         "{aor} has {n} waiting messages (max_per_user)",
                         aor=aor, n=self.max_per_user)
            return
        if self.max_per_sender_per_user > 0 \
                and self.outbox.count_from(aor, sender) >= self.max_per_sender_per_user:
            self._refuse(stx, request, "messages_per_sender_per_user", 480,
                         "{sender} has {n} messages waiting for {aor} (max_per_sender_per_user)",
                         sender=sender, aor=aor, n=self.max_per_sender_per_user,
                         reason="Mailbox Full For This Sender")
            return
        if self.outbox.total() >= self.max_total:
            self._refuse(stx, request, "messages_total", 503, "{n} messages wait (max_total)",
                         n=self.max_total, retry_after=60)
            return
        if self.per_sender is not None and not self.per_sender.try_add(sender):
            self._refuse(stx, request, "messages_per_sender", 503,
                         "{sender} sent {n} messages within a minute",
                         sender=sender, n=self.per_sender.limit, retry_after=60)
            return
        date = request.header("Date") or email.utils.formatdate(self.clock.seconds(), usegmt=True)
        content_type = request.header("Content-Type") or "text/plain"
        d = self.outbox.add(aor, f"sip:{uri.user}@{uri.host}", sender, sender_name, content_type,
                            request.body, date, call_id=log_call_id(request))
        args = (request, stx)
        d.addCallbacks(self._stored, self._not_stored, callbackArgs=args, errbackArgs=args)

    def _stored(self, msg: StoredMessage, request: Request, stx: Any) -> None:
        self.counters["accepted"] += 1
        if logflags.info_enabled:  # see libon_tsilo/logflags.py: a filtered event still costs µs
            log.info("message {id} from {sender} to {aor} stored ({size} bytes)", id=msg.id,
                     sender=msg.sender, aor=msg.aor, size=len(msg.body), call_id=msg.call_id)
        self._answer(stx, request, 202)
        self.delivery.message_stored(msg)

    def _not_stored(self, failure: Failure, request: Request, stx: Any) -> None:
        self.counters["store_failed"] += 1
        log.error("message not stored: {why}", why=failure.getErrorMessage(), call_id=log_call_id(request))
        self._answer(stx, request, 500, retry_after=5)

    # -- checks -----------------------------------------------------------------------------------

    def _may_be_ours(self, uri: URI) -> bool:
        """Before digest: one of our domains' users, or (with a users database) a tel: number."""
        if uri.scheme == "tel":
            return self.user_of_number is not None
        return uri.scheme in ("sip", "sips") and bool(uri.user) and self.is_local(uri)

    def _recipient(self, uri: URI, request: Request) -> URI | None:
        """The user the Request-URI names: itself (a user name, even of digits), else the owner of
        the number it names; None when nobody."""
        if uri.scheme != "tel" and self._exists(self.aor_key(uri), uri, request):
            return uri
        if self.user_of_number is None:
            return None
        try:
            user = self.user_of_number(uri)
        except Exception:
            log.failure("users database: number lookup failed", call_id=log_call_id(request))
            return None
        if user is None:
            return None
        if logflags.info_enabled:
            log.info("MESSAGE to number {uri} is for {user}", uri=str(uri), user=user,
                     call_id=log_call_id(request))
        # the domain the SIP URI named (with use_domain the AOR is per domain), else (tel:) our first
        return URI("sip", user, uri.host if uri.scheme != "tel" else self.home_domain)

    def _exists(self, aor: str, uri: URI, request: Request) -> bool:
        if self.user_exists is None:
            return bool(self.delivery.location.lookup(aor)) or bool(self.outbox.pending(aor))
        try:
            return bool(self.user_exists(uri.user or ""))
        except Exception:
            log.failure("users database lookup failed", call_id=log_call_id(request))
            return True

    @staticmethod
    def _check_body(request: Request) -> tuple[int, str] | None:
        if any(e.lower() != "identity" for e in request.header_values("Content-Encoding")):
            return 415, "Unsupported Media Type"
        if not request.body:
            return 400, "MESSAGE Without Content"
        if request.header("Content-Type") is None:
            return 400, "Body Without Content-Type"
        return None

    # -- answers ----------------------------------------------------------------------------------

    def _refuse(self, stx: Any, request: Request, limit: str, status: int, why: str,
                retry_after: int | None = None, reason: str | None = None,
                **fields: Any) -> None:
        self.counters["refused"] += 1
        self.limit_counters[limit] += 1
        self._limit_logs[limit].emit(log.warn, "MESSAGE refused {status} ({limit}): " + why, status=status,
                                     limit=limit, call_id=log_call_id(request), **fields)
        self._answer(stx, request, status, reason, retry_after=retry_after)

    @staticmethod
    def _answer(stx: Any, request: Request, status: int, reason: str | None = None,
                retry_after: int | None = None) -> None:
        resp = make_response(request, status, reason or _REASONS.get(status), to_tag=new_tag())
        if retry_after is not None:
            resp.set_header("Retry-After", str(retry_after))
        stx.respond(resp)
