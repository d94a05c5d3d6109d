"""PushWaker: the RFC 8599 wake-up flow behind the call layer's Waker protocol.

For an INVITE to an AOR the call layer hands us the bindings it cannot (or should not) fork to
directly. For each we send one "call" push through the sender the PushRouter picks, with a TTL that
ends at the call's ring deadline; the device answers the push by refreshing its registration, and the
silo forks the call to it then (``append_by_contact`` on ``binding_refreshed``). The Deferred from
``wake()`` fires once every push has settled, with a result the call layer reads duck-typed
(``woken``, ``all_failed``, ``reason``; push/ never imports b2bua/).

Rules kept here:
- "awake" devices: a binding whose flow is live and that registered within
  ``[push] skip_push_if_registered_within`` seconds is forked to directly (``fork_directly``);
  the call layer asks before pushing.
- PushKit: at most one VoIP push per device per call (a second wake() for the same device is a no-op).
- At most ``pushes_per_device_per_minute`` call pushes per device (push token), whatever the calls:
  an unauthenticated caller must not be able to ring a phone hundreds of times a minute. A push over
  the limit is skipped (logged, throttled, and counted); a call whose every push was skipped gets
  ``all_failed`` so that it ends at once (480) instead of waiting for a device nobody woke.
- Dead tokens (the sender says ``dead_token``) are removed from the registrar at once, logged
  with the token redacted, and counted.
- A call that ends before a pushed iOS device registered: ``[push] cancelled_ios_call`` says how
  the device learns it. "invite_cancel": the call layer lingers and sends INVITE + CANCEL when the
  device registers (``invite_cancel_wanted`` tells it which devices). "missed_call_push": an alert
  push (kind "cancel") goes out instead, to the app's alert token, which the binding carries in the
  ``pn-alert-prid`` Contact URI parameter (APNs refuses an alert sent to a PushKit token:
  DeviceTokenNotForTopic); a binding without one gets no missed-call push (counted).
- Push-to-REGISTER latency: from a delivered push (the provider's 200) to the next REGISTER of
  that device; when the device was faster than the provider's answer, from the push's sending.

The waker is also the registrar's LocationObserver (latency, "registered since the push", and
the optional refresh pushes of refresh.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from libon_tsilo.push.base import (
    CONFIG_ERROR,
    DEAD_TOKEN,
    DELIVERED,
    OUTCOMES,
    RETRYABLE,
    PushRequest,
    PushResult,
)
from libon_tsilo.push.router import PushRouter
from libon_tsilo.push.stats import PushStats
from libon_tsilo.ratelimit import SlidingWindow, ThrottledLog
from libon_tsilo.registrar.binding import LocationObserver
from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.uri import URI
from libon_tsilo.util import redact

__all__ = [
    "PushWaker",
    "PushWakeResult",
    "INVITE_CANCEL",
    "MISSED_CALL_PUSH",
]

log = Logger()

INVITE_CANCEL = "invite_cancel"
MISSED_CALL_PUSH = "missed_call_push"
# the Contact URI parameter with the app's alert-capable token, next to pn-prid's VoIP token
ALERT_PRID_PARAM = "pn-alert-prid"
MESSAGE_PUSH_TTL = 300.0  # seconds: how long a "message" push may be retried

RemoveBinding = Callable[[Any, str], Any]


@dataclass
class PushWakeResult:
    """What wake() fires with (the call layer's WakeResult, duck-typed)."""

    woken: int = 0
    all_failed: bool = False
    reason: str = ""
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass
class _Push:
    """One "call" push of one call to one device."""

    binding: Any
    request: PushRequest
    outcome: str | None = None  # None while in flight
    delivered_at: float | None = None
    sent_at: float = 0.0
    registered: bool = False  # the device registered after the push went out
    registered_at: float | None = None  # ... while the push was still in flight
    missed_sent: bool = False


@dataclass
class _CallRecord:
    call_id: str
    aor: str
    caller_uri: str | None
    caller_name: str | None
    ring_deadline: float
    pushes: dict[str, _Push] = field(default_factory=dict)  # by binding key
    tokens: set[tuple[str, str] | None] = field(default_factory=set)  # (provider, prid) pushed
    ended: bool = False
    answered_elsewhere: bool = False

    def settled(self) -> bool:
        return all(p.outcome is not None for p in self.pushes.values())


def alert_prid(binding: Any) -> str | None:
    """The alert-capable token of a binding (``pn-alert-prid`` in its Contact URI), or None."""
    contact = getattr(binding, "contact_uri", None)
    if not contact or ALERT_PRID_PARAM not in contact:
        return None
    try:
        value = URI.parse(contact).params.get(ALERT_PRID_PARAM)
    except (ParseError, ValueError):
        return None
    return value or None


def _device_call_id(call: Any, binding: Any) -> str | None:
    """The Call-ID the call layer will put in this device's INVITE (CallInfo.device_call_id)."""
    decide = getattr(call, "device_call_id", None)
    return decide(binding) if decide is not None else None


def _prid_key(binding: Any) -> tuple[str, str] | None:
    provider, prid = getattr(binding, "pn_provider", None), getattr(binding, "pn_prid", None)
    return (provider, prid) if provider and prid else None


class PushWaker(LocationObserver):
    """Implements the b2bua Waker protocol (duck-typed) and the registrar's LocationObserver."""

    def __init__(
        self,
        clock: IReactorTime,
        router: PushRouter,
        *,
        remove_binding: RemoveBinding | None = None,
        skip_push_if_registered_within: float = 0.0,
        cancelled_ios_call: str = INVITE_CANCEL,
        invite_cancel_providers: Iterable[str] = ("apns",),
        refresh_before_expiry: float = 0.0,
        missed_call_ttl: float = 30.0,
        register_wait: float = 120.0,
        close_grace: float = 60.0,
        pushes_per_device_per_minute: int = 0,
    ) -> None:
        if cancelled_ios_call not in (INVITE_CANCEL, MISSED_CALL_PUSH):
            raise ValueError(f"cancelled_ios_call: {cancelled_ios_call!r}")
        self.clock = clock
        self.router = router
        self.remove_binding = remove_binding
        self.skip_within = float(skip_push_if_registered_within)
        self.cancelled_ios_call = cancelled_ios_call
        self.ios_providers = frozenset(invite_cancel_providers)
        self.missed_call_ttl = missed_call_ttl
        self.register_wait = register_wait  # how long a delivered push waits for its REGISTER
        self.close_grace = close_grace  # replaced senders finish their pushes before closing
        self._calls: dict[str, _CallRecord] = {}
        self._pushed_keys: dict[str, set[str]] = {}  # binding key -> call ids with a push to it
        # delivered pushes waiting for their device's REGISTER: key -> (delivered_at, provider)
        self._awaiting: dict[str, tuple[float, str]] = {}
        self._awaiting_prid: dict[tuple[str, str], str] = {}  # (provider, prid) -> key
        self._close_timers: list[Any] = []
        self._config_errors: set[str] = set()
        self.push_stats = PushStats()  # the one record of push outcomes: RPC, manhole, /metrics
        self.counters: Counter[str] = Counter()
        # call pushes per (provider, prid) over the last minute; None = no limit
        per_minute = pushes_per_device_per_minute
        self.device_limit = SlidingWindow(clock, per_minute, 60.0) if per_minute > 0 else None
        self._limit_log = ThrottledLog(clock)
        self._message_log = ThrottledLog(clock)  # iOS devices without an alert token (notify_message)
        self.refresher: Any = None
        if refresh_before_expiry > 0:
            from libon_tsilo.push.refresh import RefreshScheduler

            self.refresher = RefreshScheduler(clock, self.push, refresh_before_expiry)
        self.stopped = False

    # -- Waker protocol ------------------------------------------------------------------------

    def fork_directly(self, binding: Any) -> bool:
        """Asked by the call layer for a push-capable binding whose flow is live: is it awake?"""
        if self.skip_within <= 0:
            return False
        awake = self.clock.seconds() - float(binding.registered_at) <= self.skip_within
        if awake:
            self.counters["skipped_recently_registered"] += 1
        return awake

    def invite_cancel_wanted(self, binding: Any) -> bool:
        """Should a call that ended keep listening for this pushed device (Invite/Cancel)?"""
        provider = getattr(binding, "pn_provider", None)
        if self.cancelled_ios_call != INVITE_CANCEL or provider not in self.ios_providers:
            return False
        # a push that failed (dead token, config error, retries given up) woke nobody: no one to wait for
        records = [self._calls.get(call_id) for call_id in self._pushed_keys.get(binding.key, ())]
        pushes = [r.pushes[binding.key] for r in records if r is not None and binding.key in r.pushes]
        return not pushes or any(p.outcome in (None, DELIVERED) for p in pushes)

    def wake(self, call: Any, bindings: list[Any]) -> Deferred[PushWakeResult]:
        self._purge()
        if self.stopped:
            return succeed(PushWakeResult(reason="push service stopped"))
        now = self.clock.seconds()
        ttl = float(call.ring_deadline) - now
        rec = self._calls.get(call.call_id)
        if rec is None:
            rec = self._calls[call.call_id] = _CallRecord(
                call.call_id, call.aor, getattr(call, "caller_uri", None), getattr(call, "caller_name", None),
                float(call.ring_deadline),
            )
        waits: list[Deferred[PushResult]] = []
        limited = 0
        for b in bindings:
            if not (getattr(b, "pn_provider", None) and getattr(b, "pn_prid", None)):
                continue
            if b.key in rec.pushes or _prid_key(b) in rec.tokens:
                # PushKit: one VoIP push per device per call, whatever asks for a second one (the
                # same binding again, or another binding carrying the same token)
                self.counters["duplicates_suppressed"] += 1
                continue
            if not self._within_device_limit(b, call.call_id):
                limited += 1
                continue
            rec.tokens.add(_prid_key(b))
            req = PushRequest(
                provider=b.pn_provider, prid=b.pn_prid, param=b.pn_param, kind="call", call_id=call.call_id,
                caller_uri=rec.caller_uri, caller_name=rec.caller_name, aor=call.aor, ttl=max(0.0, ttl),
                device_call_id=_device_call_id(call, b),
            )
            push = rec.pushes[b.key] = _Push(b, req, sent_at=now)
            self._pushed_keys.setdefault(b.key, set()).add(call.call_id)
            if ttl <= 0:
                d: Deferred[PushResult] = succeed(PushResult(RETRYABLE, "ring time over"))
                push.outcome = RETRYABLE
            else:
                d = self.push(b, req)
                d.addCallback(self._call_push_done, rec, push)
            waits.append(d)
        if not waits:
            if rec.settled() and not rec.pushes:
                self._forget(rec)
            if limited:
                return succeed(PushWakeResult(all_failed=True, reason="push rate limit per device"))
            return succeed(PushWakeResult(reason="nothing to push"))
        self.counters["calls_woken"] += 1
        done = DeferredList(waits, consumeErrors=True)
        return done.addCallback(self._summarise, rec)

    def notify_message(self, binding: Any, msg: Any, preview: str | None) -> Deferred[PushResult]:
        """A push of kind "message" for a SIP MESSAGE waiting for this device (messaging/, duck-typed:
        ``msg`` has id, aor, sender, sender_name, call_id, expires_at). Never errbacks."""
        if self.stopped:
            return succeed(PushResult(RETRYABLE, "push service stopped"))
        token = binding.pn_prid
        if binding.pn_provider in self.ios_providers:
            # a message is an alert, and APNs refuses an alert sent to a PushKit VoIP token (and
            # PushKit may not carry anything but a call): the app's alert token, when it gave one
            token = alert_prid(binding)
            if token is None:
                self.counters["message_without_alert_token"] += 1
                self._message_log.emit(
                    log.warn, "message for {aor}: {token} has no {param}: no message push (a VoIP token"
                    " cannot take an alert); it gets the message when it registers",
                    aor=msg.aor, token=redact(binding.pn_prid), param=ALERT_PRID_PARAM, call_id=msg.call_id,
                )
                return succeed(PushResult(CONFIG_ERROR, f"no {ALERT_PRID_PARAM}"))
        # the retry deadline, not the message's life: a push that cannot go within minutes is moot,
        # the message still waits for the device's next registration
        ttl = max(0.0, min(float(msg.expires_at) - self.clock.seconds(), MESSAGE_PUSH_TTL))
        req = PushRequest(
            provider=binding.pn_provider, prid=token, param=binding.pn_param, kind="message",
            call_id=msg.call_id, caller_uri=msg.sender, caller_name=msg.sender_name, aor=msg.aor, ttl=ttl,
            message_id=msg.id, preview=preview,
        )
        return self.push(binding, req)

    def _within_device_limit(self, binding: Any, call_id: str) -> bool:
        if self.device_limit is None or self.device_limit.try_add(_prid_key(binding)):
            return True
        self.counters["rate_limited"] += 1
        self._limit_log.emit(
            log.warn, "push: {token} ({provider}) of {aor} had {n} call pushes within a minute: push skipped",
            token=redact(binding.pn_prid), provider=binding.pn_provider, aor=getattr(binding, "aor", "?"),
            n=self.device_limit.limit, call_id=call_id,
        )
        return False

    def limit_hits(self) -> dict[str, int]:
        return {"push_per_device": self.counters.get("rate_limited", 0)}

    def call_ended(self, call: Any, answered_elsewhere: bool) -> None:
        rec = self._calls.get(call.call_id)
        if rec is None:
            return
        rec.ended = True
        rec.answered_elsewhere = answered_elsewhere
        for p in rec.pushes.values():
            self._maybe_missed_call(rec, p)
        if rec.settled():
            self._forget(rec)

    # -- sending -------------------------------------------------------------------------------

    def push(self, binding: Any, req: PushRequest) -> Deferred[PushResult]:
        """Route and send one push; account for it; remove the binding on a dead token.

        Never errbacks. Used for call, cancel and refresh pushes alike.
        """
        start = self.clock.seconds()
        sender, why = self.router.route(req.provider, req.param)
        if sender is None:
            self._config_error_once(why, req)
            d: Deferred[PushResult] = succeed(PushResult(CONFIG_ERROR, why))
        else:
            d = maybeDeferred(sender.send, req)
            d.addErrback(self._sender_failed, req)
        d.addCallback(self._sent, binding, req, start)
        return d

    def _sender_failed(self, failure: Failure, req: PushRequest) -> PushResult:
        log.failure("push sender {provider} raised", failure, provider=req.provider, call_id=req.call_id)
        return PushResult(RETRYABLE, f"internal error: {failure.value!r}")

    def _config_error_once(self, why: str, req: PushRequest) -> None:
        if why in self._config_errors:
            return
        self._config_errors.add(why)
        log.critical(
            "push configuration error: {why}; pushes to such devices fail until the configuration is"
            " fixed (logged once)",
            why=why, call_id=req.call_id,
        )

    def _sent(self, result: PushResult, binding: Any, req: PushRequest, start: float) -> PushResult:
        outcome = result.outcome if result.outcome in OUTCOMES else RETRYABLE
        latency = self.clock.seconds() - start
        self.push_stats.record_push(req.provider, req.kind, outcome, latency)
        if outcome == DEAD_TOKEN and req.prid == getattr(binding, "pn_prid", req.prid):
            # (a dead alert token says nothing of the VoIP token the binding is for)
            self._dead_token(binding, req, result)
        return result

    def _dead_token(self, binding: Any, req: PushRequest, result: PushResult) -> None:
        self.counters["dead_tokens"] += 1
        removed = False
        if self.remove_binding is not None:
            try:
                removed = bool(self.remove_binding(binding, f"push: {result.reason}"))
            except Exception:
                log.failure("removing the binding of a dead push token failed", call_id=req.call_id)
        if removed:
            self.counters["dead_tokens_removed"] += 1
        log.warn(
            "dead push token {token} ({provider}) of {aor}: {reason}; binding {what}",
            token=redact(req.prid), provider=req.provider, aor=req.aor, reason=result.reason,
            what="removed" if removed else "already gone", call_id=req.call_id,
        )

    def _call_push_done(self, result: PushResult, rec: _CallRecord, push: _Push) -> PushResult:
        push.outcome = result.outcome
        if result.outcome == DELIVERED:
            now = self.clock.seconds()
            push.delivered_at = now
            if push.registered_at is not None:  # the device beat the provider's answer
                self._observe_push_to_register(push.registered_at - push.sent_at, push.request.provider)
            elif not push.registered:
                self._await_register(push.binding, now, push.request.provider)
        if rec.ended:
            self._maybe_missed_call(rec, push)
            if rec.settled():
                self._forget(rec)
        return result

    def _summarise(self, results: list[tuple[bool, Any]], rec: _CallRecord) -> PushWakeResult:
        outcomes: Counter[str] = Counter()
        reasons: list[str] = []
        for ok, value in results:
            if ok and isinstance(value, PushResult):
                outcomes[value.outcome] += 1
                if value.outcome != DELIVERED and value.reason and value.reason not in reasons:
                    reasons.append(value.reason)
            else:  # cannot happen (push() never errbacks), but a call must not hang on it
                outcomes[RETRYABLE] += 1
        total = sum(outcomes.values())
        woken = outcomes[DELIVERED]
        # a retryable result here comes after the sender's retries (bounded by the ring deadline):
        # no push is in flight and none is planned, so no device is coming (issue 12 item 6)
        all_failed = total > 0 and woken == 0
        if all_failed and not rec.ended:  # the call is still waiting: it ends now
            self.counters["calls_all_failed"] += 1
        summary = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
        reason = summary + (f" ({'; '.join(reasons[:3])})" if reasons else "")
        log.info("wake-up pushes settled: {reason}", reason=reason, call_id=rec.call_id)
        return PushWakeResult(woken=woken, all_failed=all_failed, reason=reason, outcomes=dict(outcomes))

    # -- the end of a call ---------------------------------------------------------------------

    def _maybe_missed_call(self, rec: _CallRecord, push: _Push) -> None:
        """missed_call_push mode: a delivered VoIP push whose device never came gets an alert."""
        if (
            self.cancelled_ios_call != MISSED_CALL_PUSH
            or push.missed_sent
            or push.outcome != DELIVERED
            or push.registered
            or push.request.provider not in self.ios_providers
            or self.stopped
        ):
            return
        push.missed_sent = True
        b = push.binding
        token = alert_prid(b)
        if token is None:
            self.counters["missed_call_without_alert_token"] += 1
            log.warn("call ended before {token} registered, but its binding has no {param}: no missed-call"
                     " push (a VoIP token cannot take an alert)", token=redact(b.pn_prid),
                     param=ALERT_PRID_PARAM, call_id=rec.call_id)
            return
        req = PushRequest(
            provider=b.pn_provider, prid=token, param=b.pn_param, kind="cancel", call_id=rec.call_id,
            caller_uri=rec.caller_uri, caller_name=rec.caller_name, aor=rec.aor, ttl=self.missed_call_ttl,
            device_call_id=push.request.device_call_id,
        )
        self.counters["missed_call_pushes"] += 1
        log.info("call ended before {token} registered: missed-call push", token=redact(b.pn_prid),
                 call_id=rec.call_id)
        self.push(b, req)

    def _forget(self, rec: _CallRecord) -> None:
        if self._calls.get(rec.call_id) is rec:
            del self._calls[rec.call_id]
        for key in rec.pushes:
            ids = self._pushed_keys.get(key)
            if ids is not None:
                ids.discard(rec.call_id)
                if not ids:
                    del self._pushed_keys[key]

    # -- LocationObserver ----------------------------------------------------------------------

    def binding_added(self, binding: Any, flow: Any = None) -> None:
        self._registered(binding)
        if self.refresher is not None:
            self.refresher.binding_added(binding, flow)

    def binding_refreshed(self, binding: Any, flow: Any = None) -> None:
        self._registered(binding)
        if self.refresher is not None:
            self.refresher.binding_refreshed(binding, flow)

    def binding_removed(self, binding: Any, reason: str) -> None:
        if self.refresher is not None:
            self.refresher.binding_removed(binding, reason)

    def _registered(self, binding: Any) -> None:
        now = self.clock.seconds()
        self._expire_awaiting(now)
        key = binding.key
        for call_id in self._pushed_keys.get(key, ()):
            rec = self._calls.get(call_id)
            push = rec.pushes.get(key) if rec is not None else None
            if push is not None and not push.registered:
                push.registered = True
                if push.outcome is None:
                    push.registered_at = now
        found = self._awaiting.pop(key, None)
        prid = _prid_key(binding)
        if found is None and prid is not None:
            other = self._awaiting_prid.get(prid)
            if other is not None:  # same token, another identity (e.g. a new +sip.instance)
                found = self._awaiting.pop(other, None)
                key = other
        if found is None:
            return
        for p, k in list(self._awaiting_prid.items()):
            if k == key:
                del self._awaiting_prid[p]
        delivered_at, provider = found
        self._observe_push_to_register(now - delivered_at, provider)

    def _observe_push_to_register(self, latency: float, provider: str) -> None:
        self.push_stats.record_push_to_register(latency)
        log.info("{provider} device registered {latency:.3f}s after its push", provider=provider,
                 latency=latency)

    def _await_register(self, binding: Any, now: float, provider: str) -> None:
        self._expire_awaiting(now)
        self._awaiting.pop(binding.key, None)  # re-insert: the dict stays in time order
        self._awaiting[binding.key] = (now, provider)
        prid = _prid_key(binding)
        if prid is not None:
            self._awaiting_prid[prid] = binding.key

    def _expire_awaiting(self, now: float) -> None:
        while self._awaiting:
            key, (at, _) = next(iter(self._awaiting.items()))
            if now - at < self.register_wait:
                break
            del self._awaiting[key]
            self.counters["pushes_without_register"] += 1
        if len(self._awaiting_prid) > len(self._awaiting):
            live = set(self._awaiting)
            for p, k in list(self._awaiting_prid.items()):
                if k not in live:
                    del self._awaiting_prid[p]

    def _purge(self) -> None:
        """Drop records of calls that never reported their end (a bug elsewhere must not leak here)."""
        now = self.clock.seconds()
        for rec in list(self._calls.values()):
            if rec.settled() and now > rec.ring_deadline + 600:
                self._forget(rec)
        self._expire_awaiting(now)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, location: Any = None) -> None:
        """Service start: refresh pushes for bindings restored from disk."""
        if self.refresher is not None and location is not None:
            self.refresher.start(location)

    def replace_senders(self, senders: Iterable[Any]) -> None:
        """Swap the senders (credential reload); the old ones close after their pushes had time."""
        old = self.router.replace(senders)
        self._config_errors.clear()
        if old:
            self._close_timers = [t for t in self._close_timers if t.active()]
            self._close_timers.append(self.clock.callLater(self.close_grace, _close_all, old))

    def stop(self) -> Deferred[Any]:
        """Cancel every timer, forget every call, close the senders (service stop)."""
        self.stopped = True
        if self.refresher is not None:
            self.refresher.stop()
        for timer in self._close_timers:
            if timer.active():
                timer.cancel()
                timer.func(*timer.args)
        self._close_timers = []
        self._calls.clear()
        self._pushed_keys.clear()
        self._awaiting.clear()
        self._awaiting_prid.clear()
        if self.device_limit is not None:
            self.device_limit.clear()
        return _close_all(self.router.senders)

    # -- inspection ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "providers": self.router.providers,
            **self.push_stats.outcomes(),
            "pending_calls": len(self._calls),
            "awaiting_register": len(self._awaiting),
            "push_latency": self.push_stats.delivered_window.summary(),
            "push_to_register": self.push_stats.push_to_register_window.summary(),
            "cancelled_ios_call": self.cancelled_ios_call,
        }
        for name in (
            "calls_woken", "calls_all_failed", "dead_tokens", "dead_tokens_removed",
            "skipped_recently_registered", "duplicates_suppressed", "missed_call_pushes",
            "missed_call_without_alert_token", "pushes_without_register", "rate_limited",
            "message_without_alert_token",
        ):
            out[name] = self.counters.get(name, 0)
        if self.refresher is not None:
            out["refresh"] = self.refresher.stats()
        return out


def _close_all(senders: Iterable[Any]) -> Deferred[Any]:
    waits = []
    for sender in senders:
        close = getattr(sender, "close", None)
        if close is None:
            continue
        d = maybeDeferred(close)
        d.addErrback(lambda f: log.failure("closing a push sender failed", f))
        waits.append(d)
    return DeferredList(waits, consumeErrors=True)
