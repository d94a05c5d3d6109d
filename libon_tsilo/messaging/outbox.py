"""The messages waiting for their recipients' devices, per user, in acceptance order.

Memory answers every question; the MessageStore (store.py) is the copy restored at start. A message
enters the outbox only once the store says it is durable (the sender's 202 waits for that), and
leaves it when every device of its user got it (delivery.py decides) or when its ttl runs out: one
timer on the earliest deadline (a heap with lazy deletion), never a scan.

``max_per_user`` counts the messages stored and those being stored, so a burst of MESSAGEs to one
user cannot overshoot the limit while their commits run.
"""

from __future__ import annotations

import heapq
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from libon_tsilo.messaging.store import MessageStore, StoredMessage

__all__ = ["Outbox"]

log = Logger()


class Outbox:
    def __init__(self, clock: IReactorTime, store: MessageStore, ttl: float) -> None:
        self.clock = clock
        self.store = store
        self.ttl = float(ttl)
        self._by_aor: dict[str, list[StoredMessage]] = {}  # in seq order
        self._by_id: dict[str, StoredMessage] = {}
        self._reserved: Counter[str] = Counter()  # adds in flight per aor
        self._reserved_total = 0
        self._by_pair: Counter[tuple[str, str]] = Counter()  # (aor, sender): stored plus being stored
        self._heap: list[tuple[float, str]] = []
        self._timer: IDelayedCall | None = None
        self._seq = 0
        self.counters: Counter[str] = Counter()  # stored, expired, done, store_failed
        self.on_expired: Callable[[StoredMessage], Any] | None = None

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> int:
        """Restore the stored messages; returns how many."""
        now = self.clock.seconds()
        loaded = sorted(self.store.load(now), key=lambda m: m.seq)
        for msg in loaded:
            self._insert(msg, restored=True)
            self._seq = max(self._seq, msg.seq)
        self._schedule()
        log.info("messages: restored {n} waiting messages", n=len(loaded))
        return len(loaded)

    def stop(self) -> defer.Deferred[None]:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.store.stop()

    # -- queries --------------------------------------------------------------------------------

    def pending(self, aor: str) -> list[StoredMessage]:
        """The user's waiting messages, oldest first (the caller must not change the list)."""
        return self._by_aor.get(aor, [])

    def count(self, aor: str) -> int:
        """Stored plus being stored: what max_per_user compares with."""
        return len(self._by_aor.get(aor, ())) + self._reserved[aor]

    def count_from(self, aor: str, sender: str) -> int:
        """Stored plus being stored from `sender` to `aor`: what max_per_sender_per_user compares with."""
        return self._by_pair[(aor, sender)]

    def total(self) -> int:
        """Stored plus being stored, all users: what max_total compares with."""
        return len(self._by_id) + self._reserved_total

    def get(self, msg_id: str) -> StoredMessage | None:
        return self._by_id.get(msg_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def aors(self) -> list[str]:
        return list(self._by_aor)

    # -- changes --------------------------------------------------------------------------------

    def add(
        self, aor: str, to_uri: str, sender: str, sender_name: str | None, content_type: str, body: bytes,
        date: str, call_id: str | None = None,
    ) -> defer.Deferred[StoredMessage]:
        """Store a new message; fires with it once durable (and in the outbox), fails with NotStored."""
        now = self.clock.seconds()
        self._seq += 1
        msg = StoredMessage(
            id=uuid.uuid4().hex, aor=aor, to_uri=to_uri, sender=sender, sender_name=sender_name,
            content_type=content_type, body=body, date=date, created_at=now, expires_at=now + self.ttl,
            seq=self._seq, call_id=call_id,
        )
        self._reserved[aor] += 1
        self._reserved_total += 1
        self._by_pair[(aor, sender)] += 1  # counted from now: concurrent adds see it
        d = self.store.add(msg)

        def release(result: Any) -> Any:
            self._reserved_total -= 1
            self._reserved[aor] -= 1
            if self._reserved[aor] <= 0:
                del self._reserved[aor]
            return result

        def stored(_: object) -> StoredMessage:
            self._insert(msg)
            self._schedule()
            self.counters["stored"] += 1
            return msg

        def failed(failure: Any) -> Any:
            self.counters["store_failed"] += 1
            self._uncount(aor, sender)
            return failure

        d.addBoth(release)
        return d.addCallbacks(stored, failed)

    def mark_delivered(self, msg: StoredMessage, device: str) -> None:
        if device in msg.delivered or msg.id not in self._by_id:
            return
        msg.delivered.add(device)
        self.store.delivered(msg, device)

    def remove(self, msg: StoredMessage, why: str = "done") -> None:
        """Forget a message every device got (``done``) or whose ttl ran out (``expired``)."""
        if self._by_id.pop(msg.id, None) is None:
            return
        queue = self._by_aor.get(msg.aor)
        if queue is not None:
            queue.remove(msg)
            if not queue:
                del self._by_aor[msg.aor]
        self.store.delete(msg)
        self._uncount(msg.aor, msg.sender)
        self.counters[why] += 1

    def _uncount(self, aor: str, sender: str) -> None:
        pair = (aor, sender)
        self._by_pair[pair] -= 1
        if self._by_pair[pair] <= 0:
            del self._by_pair[pair]

    def _insert(self, msg: StoredMessage, restored: bool = False) -> None:
        self._by_id[msg.id] = msg
        if restored:  # a new one was counted by add()
            self._by_pair[(msg.aor, msg.sender)] += 1
        queue = self._by_aor.setdefault(msg.aor, [])
        if queue and queue[-1].seq > msg.seq:  # only a restore can arrive out of order
            queue.append(msg)
            queue.sort(key=lambda m: m.seq)
        else:
            queue.append(msg)
        heapq.heappush(self._heap, (msg.expires_at, msg.id))

    # -- expiry ---------------------------------------------------------------------------------

    def _schedule(self) -> None:
        heap = self._heap
        while heap and heap[0][1] not in self._by_id:
            heapq.heappop(heap)
        if not heap:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        delay = max(0.0, heap[0][0] - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if abs(self._timer.getTime() - (self.clock.seconds() + delay)) < 1e-6:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, msg_id = heapq.heappop(heap)
            msg = self._by_id.get(msg_id)
            if msg is None:
                continue
            log.info("message {id} to {aor} from {sender} expired; delivered to {n} device(s)",
                     id=msg.id, aor=msg.aor, sender=msg.sender, n=len(msg.delivered), call_id=msg.call_id)
            self.remove(msg, "expired")
            if self.on_expired is not None:
                self.on_expired(msg)
        self._schedule()

    def dump(self) -> list[dict[str, Any]]:
        """What the admin RPC shows: no body (it is the users' private text), only its size."""
        return [
            {"id": m.id, "aor": m.aor, "sender": m.sender, "content_type": m.content_type,
             "size": len(m.body),
             "created_at": m.created_at, "expires_at": m.expires_at, "delivered": sorted(m.delivered)}
            for queue in self._by_aor.values() for m in queue
        ]
