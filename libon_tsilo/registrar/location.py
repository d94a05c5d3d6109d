"""The location store: bindings per AOR, in memory, with optional SQLite persistence.

Memory is authoritative for every lookup; the persistence (if any) is a write-behind copy restored at
start. Expiry is one timer on the earliest deadline (a heap with lazy deletion), not a periodic scan,
and bindings are indexed by flow id so a closing connection never scans the table.

Events go to observers; an observer that raises is logged and never breaks the caller (REGISTER).
Restored bindings emit no events: nothing listening at start-up waits for them. The registrar holds
back the events of a REGISTER (``hold_events``) and emits them once its 200 OK is sent, so that a
late-forked INVITE never overtakes the answer to the REGISTER that woke it; ``when_durable`` tells
it when the REGISTER's changes are committed (group commit, see sqlite_store.py).

With the Redis persistence (redis_store.py) the store is one node's replica of the cluster's
bindings: ``apply_remote``/``apply_remote_removal``/``resync`` apply what other nodes changed and
emit the same events a local REGISTER would. ``node_id`` names this node: only bindings whose flow
ends here (``Binding.node``) are indexed by flow, so a connection closing here never touches a
binding whose flow id belongs to another node's table.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from libon_tsilo.registrar.binding import Binding, LocationObserver
from libon_tsilo.util import redact_key

if TYPE_CHECKING:
    from libon_tsilo.group_commit import Waiter
    from libon_tsilo.registrar.redis_store import RedisBindingStore
    from libon_tsilo.registrar.sqlite_store import SqliteBindingStore
    from libon_tsilo.sip.flow import Flow

__all__ = ["BindingEvent", "LocationStore", "NotStored", "StoreClosed"]

log = Logger(namespace=__name__)  # compiled (mypyc), Logger() would name the importer: importlib

Ident = tuple[str, str]  # (aor, key)


class NotStored(Exception):
    """A change of an AOR's bindings could not be committed (the reason is the message)."""


class StoreClosed(NotStored):
    """The store is stopped (shutdown): nothing more is written."""


@dataclass(init=False)
class BindingEvent:
    """One change, as held for a REGISTER until its answer is sent (see the module doc). Never
    modified once made (not frozen: a frozen dataclass's __init__ sets each field through
    object.__setattr__, and compiled with mypyc the generated __init__ stays interpreted; this one
    is native)."""

    kind: Literal["added", "refreshed", "removed"]
    binding: Binding
    flow: Flow | None
    reason: str

    def __init__(
        self,
        kind: Literal["added", "refreshed", "removed"],
        binding: Binding,
        flow: Flow | None = None,
        reason: str = "",
    ) -> None:
        self.kind = kind
        self.binding = binding
        self.flow = flow
        self.reason = reason

    def deliver(self, observer: LocationObserver) -> None:
        if self.kind == "added":
            observer.binding_added(self.binding, self.flow)
        elif self.kind == "refreshed":
            observer.binding_refreshed(self.binding, self.flow)
        else:
            observer.binding_removed(self.binding, self.reason)


class LocationStore:
    def __init__(
        self,
        clock: IReactorTime,
        persistence: SqliteBindingStore | RedisBindingStore | None = None,
        node_id: str = "",
    ) -> None:
        self.clock = clock
        self.persistence = persistence
        self.node_id = node_id
        self._aors: dict[str, dict[str, Binding]] = {}
        self._by_flow: dict[str, dict[Ident, Binding]] = {}
        self._observers: list[LocationObserver] = []
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = itertools.count()
        self._timer: IDelayedCall | None = None
        self._timer_deadline = 0.0  # the heap deadline the timer was set for
        self._count = 0
        self._held: list[BindingEvent] | None = None

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> int:
        """Restore persisted bindings (with their remaining expiry); returns how many."""
        p = self.persistence
        if p is None:
            return 0
        if p.feeds_replica:
            p.start(self)  # type: ignore[call-arg]  # loads asynchronously, then resync()
            return 0
        p.start()  # type: ignore[call-arg]
        now = self.clock.seconds()
        restored = 0
        for binding in p.load(now):  # type: ignore[union-attr]
            _forget_old_flow(binding)
            self._insert(binding)
            restored += 1
        self._schedule()
        log.info("location: restored {n} bindings", n=restored)
        return restored

    def flush(self) -> defer.Deferred[None]:
        """Fires when every change so far is persisted (immediately for the memory backend)."""
        if self.persistence is None:
            return defer.succeed(None)
        return self.persistence.flush()

    def when_durable(self, aor: str) -> defer.Deferred[None] | None:
        """Fires when every change so far is committed; fails (sqlite_store.NotStored) when a change
        of ``aor`` could not be. None when there is nothing to wait for (the memory backend)."""
        if self.persistence is None:
            return None
        return self.persistence.when_committed(aor)

    def notify_durable(self, aor: str, waiter: Waiter) -> bool:
        """``when_durable`` with a waiter of the caller's (group_commit.Waiter: ``callback(None)``,
        ``errback(exc)``), cheaper than a Deferred per REGISTER; False, and ``waiter`` never called,
        when there is nothing to wait for."""
        if self.persistence is None:
            return False
        return self.persistence.notify_committed(aor, waiter)

    def persistence_stats(self) -> dict[str, int] | None:
        """Counters of the persistent copy (commits, rows written/skipped/retried, pending)."""
        p = self.persistence
        if p is None:
            return None
        return {
            "commits": p.commits,
            "rows_written": p.rows_written,
            "rows_skipped": p.rows_skipped,
            "rows_retried": p.rows_retried,
            "pending": p.pending(),
        }

    def redis_stats(self) -> dict[str, object] | None:
        """The Redis backend's state (None for the others): whether it is up, and its feed."""
        p = self.persistence
        if p is None or not p.feeds_replica:
            return None
        return {
            "node": self.node_id,
            "up": p.up,  # type: ignore[union-attr]
            "state": p.state,  # type: ignore[union-attr]
            "loads": p.loads,  # type: ignore[union-attr]
            "remote_changes_applied": p.messages_applied,  # type: ignore[union-attr]
            "write_back_pending": p.write_back_pending(),  # type: ignore[union-attr]
            "duplicate_node_id_of": p.duplicate_of,  # type: ignore[union-attr]
        }

    def stop(self) -> defer.Deferred[None]:
        """Cancel the expiry timer, then flush and close the persistence."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.persistence is None:
            return defer.succeed(None)
        return self.persistence.stop()

    # -- observers ------------------------------------------------------------------------------

    def subscribe(self, observer: LocationObserver) -> None:
        if observer not in self._observers:
            self._observers.append(observer)

    def unsubscribe(self, observer: LocationObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def hold_events(self) -> None:
        """Keep the events from now on until release_events() (one REGISTER, processed synchronously)."""
        self._held = []

    def release_events(self) -> list[BindingEvent]:
        """Stop holding; returns the held events, for emit_events() once the REGISTER is answered."""
        held, self._held = self._held, None
        return held or []

    def hold_writes(self) -> None:
        """The changes from now until release_writes() are one REGISTER's: the persistence writes
        them together, started by release_writes() (group_commit.py hold/release)."""
        p = self.persistence
        if p is not None:
            p.hold_writes()

    def release_writes(self) -> None:
        """Write what was held: at once when idle on the Redis store. Called once the REGISTER's
        answer waits on the write (notify_durable): a write that fails at once must fail it too."""
        p = self.persistence
        if p is not None:
            p.release_writes()

    def emit_events(self, events: list[BindingEvent]) -> None:
        for event in events:
            self._emit(event)

    def _emit(self, event: BindingEvent) -> None:
        if self._held is not None:
            self._held.append(event)
            return
        for observer in list(self._observers):
            try:
                event.deliver(observer)
            except Exception:
                log.failure("location observer {obs!r} failed on {kind}", obs=observer, kind=event.kind)

    # -- queries --------------------------------------------------------------------------------

    def lookup(self, aor: str) -> list[Binding]:
        """Live bindings of an AOR, best first (q descending, then the most recently registered)."""
        bindings = self._aors.get(aor)
        if not bindings:
            return []
        now = self.clock.seconds()
        out = [b for b in bindings.values() if not b.expired(now)]
        if len(out) > 1:  # most AORs have one device: no key tuple to build
            out.sort(key=lambda b: (-b.q, -b.registered_at))
        return out

    def get(self, aor: str, key: str) -> Binding | None:
        binding = self._aors.get(aor, {}).get(key)
        if binding is None or binding.expired(self.clock.seconds()):
            return None
        return binding

    def by_flow(self, flow_id: str) -> list[Binding]:
        return list(self._by_flow.get(flow_id, {}).values())

    def dump(self) -> dict[str, list[Binding]]:
        return {aor: self.lookup(aor) for aor in sorted(self._aors)}

    def all_count(self) -> int:
        return self._count

    def aor_count(self) -> int:
        return len(self._aors)

    # -- changes --------------------------------------------------------------------------------

    def add_or_update(
        self, binding: Binding, flow: Flow | None = None, replaces: Binding | None = None
    ) -> str:
        """Store ``binding``; returns "added" or "refreshed" (the event sent).

        It refreshes the binding with the same key, or ``replaces`` (a binding the registrar matched
        by another rule, e.g. RFC 8599 §5.3 pn params, whose key differs).
        """
        now = self.clock.seconds()
        old = self._aors.get(binding.aor, {}).get(binding.key)
        if replaces is not None and replaces is not old and self._is_current(replaces):
            if old is not None:
                # both the replaced binding and a same-key one exist: the latter is superseded too
                self._drop(old)
                if self.persistence is not None:
                    self.persistence.delete(old, "replaced")
            old = replaces
        if old is not None and old.expired(now):
            # it lapsed before the purge timer got to it: this is a new registration
            self._drop(old)
            if self.persistence is not None:
                self.persistence.delete(old, "expired")
            self._emit(BindingEvent("removed", old, reason="expired"))
            old = None
        if old is not None:
            self._drop(old)
            if old.key != binding.key and self.persistence is not None:
                self.persistence.delete(old, "replaced")
        self._insert(binding)
        self._push_deadline(binding)
        if self.persistence is not None:
            self.persistence.save(binding)
        kind: Literal["added", "refreshed"] = "refreshed" if old is not None else "added"
        self._emit(BindingEvent(kind, binding, flow))
        return kind

    def remove(self, binding: Binding, reason: str) -> bool:
        """Remove a binding (if it is still the current one for its key); emits binding_removed."""
        if not self._is_current(binding):
            return False
        self._drop(binding)
        if self.persistence is not None:
            self.persistence.delete(binding, reason)
        self._emit(BindingEvent("removed", binding, reason=reason))
        return True

    def remove_aor(self, aor: str, reason: str) -> list[Binding]:
        removed = list(self._aors.get(aor, {}).values())
        for binding in removed:
            self.remove(binding, reason)
        return removed

    def flow_closed(self, flow_id: str) -> list[Binding]:
        """Mark the bindings that came over this flow as no longer reachable through it.

        They stay registered (a push can wake the device, which then opens a new flow).
        """
        bindings = self._by_flow.pop(flow_id, None)
        if not bindings:
            return []
        for binding in bindings.values():
            binding.flow_live = False
        self._publish_flow_end(list(bindings.values()))
        return list(bindings.values())

    def _publish_flow_end(self, bindings: list[Binding]) -> None:
        """A cluster replica (Redis): the other nodes learn that these bindings' connection closed
        here, so they push a device rather than fork through us to a dead flow. A single node's
        store keeps it in memory: a restarted process forgets every flow anyway."""
        p = self.persistence
        if p is not None and p.feeds_replica:
            for binding in bindings:
                p.save(binding)

    # -- other nodes' changes (redis_store.py) ----------------------------------------------------

    def apply_remote(self, binding: Binding) -> None:
        """Another node stored ``binding``: take it, without writing it back; emits added/refreshed."""
        if binding.expired(self.clock.seconds()):
            return
        old = self._aors.get(binding.aor, {}).get(binding.key)
        if old is not None:
            self._drop(old)
        self._insert(binding)
        self._push_deadline(binding)
        if old is not None and _same_registration(old, binding):
            return  # its flow closed on its node (flow_live), or a write-back: no new registration
        self._emit(BindingEvent("refreshed" if old is not None else "added", binding))

    def apply_remote_removal(self, aor: str, key: str, reason: str) -> None:
        """Another node removed a binding; emits binding_removed when this replica had it."""
        binding = self._aors.get(aor, {}).get(key)
        if binding is None:
            return
        self._drop(binding)
        self._emit(BindingEvent("removed", binding, reason=reason))

    def resync(self, bindings: list[Binding], announce: bool, keep_own: bool = False) -> list[Binding]:
        """Make this replica hold exactly ``bindings`` (all of Redis, at start or after a reconnect).

        A binding this replica already has in the same registration is kept as it is (its live flow
        with it); one it has that Redis has not is removed, with its event. With ``announce`` (a
        reconnect), what was added or refreshed meanwhile emits its event too, so that calls parked
        here fork to devices that registered elsewhere. With
        ``keep_own`` (Redis lost its data), this node's own bindings missing from ``bindings``, or
        newer than Redis's copy, stay, and are returned to be written back. At the first load, so are
        this node's TCP/TLS bindings that Redis still says are live: their connections ended with
        an earlier process of this node; at any load, this node's bindings whose connection closed
        while Redis could not hear it.
        """
        now = self.clock.seconds()
        fresh: dict[Ident, Binding] = {}
        for binding in bindings:
            if not binding.expired(now):
                fresh[(binding.aor, binding.key)] = binding
        events: list[BindingEvent] = []
        refreshed: set[Ident] = set()
        kept: list[Binding] = []
        for aor, current in list(self._aors.items()):
            for key, binding in list(current.items()):
                new = fresh.get((aor, key))
                if new is not None and _same_registration(binding, new):
                    del fresh[(aor, key)]
                    if new.flow_live and not binding.flow_live and binding.node == self.node_id:
                        kept.append(binding)  # its connection closed here while Redis was away
                    continue
                if keep_own and binding.node == self.node_id \
                        and (new is None or binding.registered_at > new.registered_at):
                    # Redis lost it, or came back with an older copy (a refresh it acknowledged, lost)
                    kept.append(binding)
                    fresh.pop((aor, key), None)
                    continue
                self._drop(binding)
                if new is None:
                    events.append(BindingEvent("removed", binding, reason="resync"))
                else:
                    refreshed.add((aor, key))
        for ident, binding in fresh.items():
            if binding.node == self.node_id:
                # stored by an earlier process of this node; one killed (-9) never published that
                # its connections ended: tell the other nodes, or they fork through us to a dead flow
                if not announce and binding.flow_live and not _is_udp(binding):
                    kept.append(binding)
                _forget_old_flow(binding)
            events.append(BindingEvent("refreshed" if ident in refreshed else "added", binding))
            self._insert(binding)
        self._schedule()
        for event in events:
            # observers always hear of a binding they knew that is gone (e.g. one a REGISTER added
            # before the first load, refused 500); the rest only after a reconnect
            if announce or event.kind == "removed":
                self._emit(event)
        return kept

    # -- indexes --------------------------------------------------------------------------------

    def _is_current(self, binding: Binding) -> bool:
        return self._aors.get(binding.aor, {}).get(binding.key) is binding

    def _insert(self, binding: Binding) -> None:
        self._aors.setdefault(binding.aor, {})[binding.key] = binding
        self._count += 1
        if binding.flow_id is not None and binding.flow_live and binding.node == self.node_id:
            self._by_flow.setdefault(binding.flow_id, {})[(binding.aor, binding.key)] = binding
        heapq.heappush(self._heap, (binding.expires_at, next(self._seq), binding.aor, binding.key))

    def _drop(self, binding: Binding) -> None:
        bindings = self._aors.get(binding.aor)
        if bindings is None or bindings.get(binding.key) is not binding:
            return
        del bindings[binding.key]
        self._count -= 1
        if not bindings:
            del self._aors[binding.aor]
        if binding.flow_id is not None:
            flow_index = self._by_flow.get(binding.flow_id)
            if flow_index is not None and flow_index.get((binding.aor, binding.key)) is binding:
                del flow_index[(binding.aor, binding.key)]
                if not flow_index:
                    del self._by_flow[binding.flow_id]

    # -- expiry ---------------------------------------------------------------------------------

    def _push_deadline(self, binding: Binding) -> None:
        # refreshed bindings leave their old heap entry behind; rebuild when those dominate
        if len(self._heap) > 4 * self._count + 1024:
            self._heap = [
                (b.expires_at, next(self._seq), b.aor, b.key) for d in self._aors.values() for b in d.values()
            ]
            heapq.heapify(self._heap)
        self._schedule()

    def _schedule(self) -> None:
        if not self._heap:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        deadline = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            # compare with the deadline it was set for: its getTime() is later by the time spent
            # between seconds() and callLater(), which would re-arm the timer on every REGISTER
            if self._timer_deadline <= deadline:
                return
            self._timer.cancel()
        delay = max(0.0, deadline - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._expire)
        self._timer_deadline = deadline

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            _, _, aor, key = heapq.heappop(self._heap)
            binding = self._aors.get(aor, {}).get(key)
            if binding is not None and binding.expired(now):
                log.debug("location: binding {key} of {aor} expired", key=redact_key(key), aor=aor)
                self.remove(binding, "expired")
        self._schedule()


def _is_udp(binding: Binding) -> bool:
    return bool(binding.received and binding.received[0] == "udp")


def _forget_old_flow(binding: Binding) -> None:
    """A binding stored by an earlier process of this node: its connections are gone, and a stream
    flow id (with its per-process counter) could be reused by an unrelated connection, so forget
    it. A UDP flow id is the 5-tuple itself, the same NAT path when the device sends again: keep it."""
    if not (binding.received and binding.received[0] == "udp"):
        binding.flow_id = None
    binding.flow_live = False


def _same_registration(a: Binding, b: Binding) -> bool:
    return (a.call_id, a.cseq, a.registered_at, a.expires_at, a.contact) == (
        b.call_id, b.cseq, b.registered_at, b.expires_at, b.contact
    )
