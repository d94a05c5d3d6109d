"""Delivery of the waiting messages to every device of their user.

A device is a binding's ``+sip.instance`` when it has one, else the binding itself (its pn triple,
else its Contact). For each device, one message is in flight at a time, the oldest it has not got:
the next waits for the 2xx of the previous, which keeps the order of every conversation.

- A reachable device (no push token, or a live flow the notifier calls awake) gets the MESSAGE at
  once. A sleeping one gets a push of type "message" (once per message and device), and its
  messages when it registers again: this is a LocationObserver, like the silo.
- A 2xx marks the message delivered to that device (never sent to it again). Anything else (an
  error, a timeout) leaves it waiting for the device's next registration; a push-capable device is
  pushed for it, unless it was already.
- A message every current device of the user got is deleted; one nobody could take expires after
  ``[messages] ttl`` (outbox.py). A device whose binding lapsed (expired, dead push token) still
  counts for the messages already waiting: only a device that unregisters gives its share up.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from libon_tsilo import logflags
from libon_tsilo.messaging.outbox import Outbox
from libon_tsilo.messaging.store import StoredMessage
from libon_tsilo.messaging.uac import MessageSender
from libon_tsilo.registrar.binding import Binding, LocationObserver
from libon_tsilo.sip.message import Response
from libon_tsilo.util import redact_key

__all__ = ["MessageDelivery", "MessageNotifier", "device_key", "preview_of"]

log = Logger()

PREVIEW_CHARS = 120


class MessageNotifier(Protocol):
    """Wakes a sleeping device for a message (push/'s PushWaker, duck-typed: push/ and messaging/
    do not import each other). It may also have ``fork_directly(binding) -> bool``: is a
    push-capable device with a live flow awake?"""

    def notify_message(self, binding: Binding, msg: Any, preview: str | None) -> defer.Deferred[Any]: ...


def device_key(binding: Binding) -> str:
    instance = binding.instance
    return f"instance:{instance}" if instance else binding.key


def preview_of(msg: StoredMessage, chars: int = PREVIEW_CHARS) -> str | None:
    """The start of a text body for the push, or None for other content (an image, a receipt)."""
    if not msg.content_type.lower().startswith("text/plain"):
        return None
    text = msg.body.decode("utf-8", "replace")
    return text if len(text) <= chars else text[:chars] + "…"


class MessageDelivery(LocationObserver):
    def __init__(
        self,
        clock: IReactorTime,
        outbox: Outbox,
        location: Any,
        sender: MessageSender,
        notifier: MessageNotifier | None = None,
        push_preview: bool = True,
    ) -> None:
        self.clock = clock
        self.outbox = outbox
        self.location = location
        self.sender = sender
        self.notifier = notifier
        self.push_preview = push_preview
        self._inflight: dict[tuple[str, str], str] = {}  # (aor, device) -> id of the message sent
        self._pushed: dict[str, dict[str, set[str]]] = {}  # aor -> device -> ids pushed for
        self.counters: Counter[str] = Counter()  # delivered, failed, pushed, deleted
        self.stopped = False
        outbox.on_expired = self._forget

    # -- entry points -----------------------------------------------------------------------------

    def start(self) -> None:
        """After a restart: the devices that need no push get what waited for them (the sleeping ones
        were pushed before the restart; they get theirs when they register)."""
        for aor in self.outbox.aors():
            self._deliver_to_user(aor, push=False)

    def stop(self) -> None:
        self.stopped = True

    def message_stored(self, msg: StoredMessage) -> None:
        """A new message is durable: to every device of its user."""
        self._deliver_to_user(msg.aor, push=True)

    def binding_added(self, binding: Binding, flow: Any = None) -> None:
        # every REGISTER and every change of another node comes here, and mostly nothing waits for
        # the user: checked here, one Python call, not two
        if self.stopped or not self.outbox.pending(binding.aor):
            return
        # it just registered (after our push, or on its own): it is awake, its flow is fresh
        self._next(binding.aor, device_key(binding), binding, awake=True, push=False)

    binding_refreshed = binding_added

    def binding_removed(self, binding: Binding, reason: str) -> None:
        if reason != "unregistered":
            # expired, a dead push token...: a phone off for a while is what store-and-forward is
            # for; its messages wait for its next registration (or the ttl), as they were accepted
            return
        # the device said goodbye: the user may have no other device left that waits for a message
        for msg in list(self.outbox.pending(binding.aor)):
            self._maybe_done(msg)

    # -- per device -------------------------------------------------------------------------------

    def devices(self, aor: str) -> dict[str, Binding]:
        """The user's devices, each with the binding to reach it by: a live flow first, then the most
        recently registered."""
        best: dict[str, Binding] = {}
        for b in self.location.lookup(aor):
            key = device_key(b)
            old = best.get(key)
            if old is None or (self._flow_live(b), b.registered_at) > (self._flow_live(old),
                                                                        old.registered_at):
                best[key] = b
        return best

    def _deliver_to_user(self, aor: str, push: bool) -> None:
        if self.stopped:
            return
        for device, binding in self.devices(aor).items():
            self._next(aor, device, binding, awake=False, push=push)

    def _next(self, aor: str, device: str, binding: Binding, awake: bool, push: bool) -> None:
        if (aor, device) in self._inflight:
            return
        pending = self.outbox.pending(aor)
        if awake or self._awake(binding):
            oldest = next((m for m in pending if device not in m.delivered), None)
            if oldest is not None:
                self._send(aor, device, binding, oldest)
        elif push:  # from the end, where the new message is: no cost per message already waiting
            newest = next((m for m in reversed(pending) if device not in m.delivered), None)
            if newest is not None:
                self._push(aor, device, binding, newest)  # the newest: it is the news

    def _flow_live(self, binding: Binding) -> bool:
        return bool(binding.flow_id) and binding.flow_live and self.sender.flow_live(binding.flow_id)

    def _awake(self, binding: Binding) -> bool:
        if not binding.push_capable or self.notifier is None:
            return True  # nothing else could reach it: try
        decide = getattr(self.notifier, "fork_directly", None)
        return bool(decide is not None and self._flow_live(binding) and decide(binding))

    def _send(self, aor: str, device: str, binding: Binding, msg: StoredMessage) -> None:
        self._inflight[(aor, device)] = msg.id
        try:
            d = self.sender.send(binding, msg)
        except Exception:
            d = defer.fail(Failure())
        args = (aor, device, binding, msg)
        d.addCallbacks(self._answered, self._not_sent, callbackArgs=args, errbackArgs=args)
        d.addErrback(lambda f: log.failure("message delivery failed", f, call_id=msg.call_id))

    def _answered(self, resp: Response, aor: str, device: str, binding: Binding, msg: StoredMessage) -> None:
        self._inflight.pop((aor, device), None)
        if self.stopped:
            return
        if 200 <= resp.status < 300:
            self.outbox.mark_delivered(msg, device)
            self.counters["delivered"] += 1
            if logflags.info_enabled:  # see libon_tsilo/logflags.py: a filtered event still costs µs
                log.info("message {id} to {aor} delivered to {device}", id=msg.id, aor=aor,
                         device=redact_key(device), call_id=msg.call_id)
            self._maybe_done(msg)
            fresh = self.devices(aor).get(device)
            if fresh is not None:  # it answered: it is awake for the next one
                self._next(aor, device, fresh, awake=True, push=False)
            return
        self._failed(aor, device, binding, msg, f"{resp.status} {resp.reason}")

    def _not_sent(
        self, failure: Failure, aor: str, device: str, binding: Binding, msg: StoredMessage
    ) -> None:
        self._inflight.pop((aor, device), None)
        if self.stopped:
            return
        log.failure("message {id}: sending to {device} failed", failure, id=msg.id, device=redact_key(device),
                    call_id=msg.call_id)
        self._failed(aor, device, binding, msg, "not sent")

    def _failed(self, aor: str, device: str, binding: Binding, msg: StoredMessage, why: str) -> None:
        self.counters["failed"] += 1
        log.info("message {id} to {aor}: {device} answered {why}; it waits for the device's next"
                 " registration",
                 id=msg.id, aor=aor, device=redact_key(device), why=why, call_id=msg.call_id)
        fresh = self.devices(aor).get(device)
        if fresh is not None and fresh.registered_at > binding.registered_at:
            # it registered again while this one was failing (over its old flow): try the new one
            self._next(aor, device, fresh, awake=True, push=False)
        elif binding.push_capable:
            self._push(aor, device, binding, msg)

    def _push(self, aor: str, device: str, binding: Binding, msg: StoredMessage) -> None:
        if self.notifier is None or not binding.push_capable:
            return
        pushed = self._pushed.setdefault(aor, {}).setdefault(device, set())
        if msg.id in pushed:
            return
        pushed.add(msg.id)
        self.counters["pushed"] += 1
        preview = preview_of(msg) if self.push_preview else None
        try:
            d = defer.maybeDeferred(self.notifier.notify_message, binding, msg, preview)
        except Exception:  # maybeDeferred catches; this is for a notifier without the method
            log.failure("message push failed", call_id=msg.call_id)
            return
        d.addErrback(lambda f: log.failure("message push failed", f, call_id=msg.call_id))

    # -- the end of a message --------------------------------------------------------------------

    def _maybe_done(self, msg: StoredMessage) -> None:
        if not msg.delivered or self.outbox.get(msg.id) is None:
            return
        if set(self.devices(msg.aor)) <= msg.delivered:
            self.outbox.remove(msg, "done")
            self._forget(msg)

    def _forget(self, msg: StoredMessage) -> None:
        per_device = self._pushed.get(msg.aor)
        if per_device is None:
            return
        for device in list(per_device):
            per_device[device].discard(msg.id)
            if not per_device[device]:
                del per_device[device]
        if not per_device:
            del self._pushed[msg.aor]

    def stats(self) -> dict[str, Any]:
        return {
            "waiting": len(self.outbox),
            "in_flight": len(self._inflight),
            **{k: self.outbox.counters.get(k, 0) for k in ("stored", "expired", "done", "store_failed")},
            **{k: self.counters.get(k, 0) for k in ("delivered", "failed", "pushed")},
        }
