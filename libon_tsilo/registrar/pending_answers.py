"""REGISTERs waiting for their answer, per flow: what must not be overtaken by a call.

A REGISTER's 200 OK waits for the location store's commit (``when_durable``); meanwhile, in a
cluster, another node may already hear of the binding from Redis and fork an INVITE through this
node to the device's flow. RFC 3261 has nothing against that order, but a device (and PushKit app)
that gets the INVITE before the answer to the REGISTER that woke it may drop it. The relay asks
:meth:`PendingAnswers.when_answered` for the flow and holds the INVITE until the answer is sent.

Compiled by mypyc (setup.py): a REGISTER on the Redis store calls ``begin`` and ``done`` once each.
"""

from __future__ import annotations

from twisted.internet import defer

__all__ = ["PendingAnswers"]


class PendingAnswers:
    """How many REGISTERs per flow id wait for their answer, and who waits for them."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._waiters: dict[str, list[defer.Deferred[None]]] = {}

    def begin(self, flow_id: str) -> None:
        self._count[flow_id] = self._count.get(flow_id, 0) + 1

    def done(self, flow_id: str) -> None:
        """The answer of one REGISTER over ``flow_id`` is sent (200 or a failure)."""
        left = self._count.get(flow_id, 0) - 1
        if left > 0:
            self._count[flow_id] = left
            return
        self._count.pop(flow_id, None)
        for d in self._waiters.pop(flow_id, ()):
            d.callback(None)

    def when_answered(self, flow_id: str) -> defer.Deferred[None] | None:
        """Fires once no REGISTER over ``flow_id`` waits for its answer; None: none does now."""
        if flow_id not in self._count:
            return None
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._forget(flow_id, d))
        self._waiters.setdefault(flow_id, []).append(d)
        return d

    def _forget(self, flow_id: str, d: defer.Deferred[None]) -> None:
        waiters = self._waiters.get(flow_id)
        if waiters is not None and d in waiters:
            waiters.remove(d)
            if not waiters:
                del self._waiters[flow_id]

    def __len__(self) -> int:
        return len(self._count)
