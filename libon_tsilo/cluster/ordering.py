"""Cross-node ordering: a relayed INVITE never overtakes the device's REGISTER 200 OK.

On one node the registrar emits a REGISTER's binding events only after its 200 OK is sent, so a
late-forked INVITE always follows the answer that woke the call. Across nodes the forking node
hears of the binding from Redis's PUBLISH, which can reach it before the edge node has read
Redis's reply to the same write and sent the 200: the INVITE it relays through the edge node could
then reach the device first. So the edge node's relay holds a new INVITE for a flow that has a
REGISTER awaiting its answer (``Registrar.when_answered``) until that answer is sent, or for at
most ``bound`` seconds (a store that does not answer must not hold a call for long: the REGISTER
then gets its 500 anyway, and the device may take the call).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

__all__ = ["HeldInvite", "hold_until_answered"]

BOUND = 1.0  # seconds a relayed INVITE waits at most for the REGISTER's answer


class HeldInvite:
    """An INVITE held until the REGISTER on its flow is answered; ``cancel()`` drops it instead
    (the caller's CANCEL came first). ``send`` and ``drop`` run at most once, and only one of them."""

    def __init__(self, clock: IReactorTime, answered: Deferred[None], bound: float,
                 send: Callable[[], None], drop: Callable[[], None]) -> None:
        self.done = False
        self._answered = answered
        self._send = send
        self._drop = drop
        self._timer = clock.callLater(bound, self._release)
        answered.addCallbacks(lambda _: self._release(), lambda _: None)  # a cancel of ours: nothing to do

    def _stop(self) -> bool:
        if self.done:
            return False
        self.done = True
        if self._timer.active():
            self._timer.cancel()
        if not self._answered.called:
            self._answered.cancel()  # leaves the registrar's waiters
        return True

    def _release(self) -> None:
        if self._stop():
            self._send()

    def cancel(self) -> None:
        if self._stop():
            self._drop()


def hold_until_answered(
    clock: IReactorTime, when_answered: Callable[[str], Deferred[None] | None], flow_id: str,
    send: Callable[[], None], drop: Callable[[], None], bound: float = BOUND,
) -> HeldInvite | None:
    """Hold ``send`` until no REGISTER over ``flow_id`` awaits its answer; None when none does
    (send at once)."""
    answered = when_answered(flow_id)
    if answered is None:
        return None
    return HeldInvite(clock, answered, bound, send, drop)
