"""Which nodes of the cluster are alive (issue 14, node failure).

Every node beats: each ``interval`` it tells the shared store "I am alive for ``ttl`` more" and gets
back every node alive now (``registrar/redis_store.py: RedisBindingStore.heartbeat``, one round trip
per beat). A node killed with -9 stops beating and drops out of every view ``ttl`` after its last
beat; a node that stops cleanly leaves at once.

A node missing from our view is still alive for a binding it took less than ``ttl - interval``
before that view (``alive(name, since)``): a live node beats within ``interval`` of anything it
does, so one missing from our view took it just before that view (it started, or beat just after
our beat). A dead node's entry stays in the store ``ttl`` after its last beat, but the node may have
worked for up to ``interval`` after that beat (a binding taken just before a kill -9): what it did
is older than ``ttl - interval`` before the first view without it.

What "alive" means when we do not know: before the first answer, or when our own beats have failed
for longer than ``ttl`` (Redis down), every peer counts as alive: the call layer then behaves as it
did without liveness (sends to the peer, fails over on its timeout) rather than giving up on bindings
because our own link is down.

Members are the nodes' internal addresses as ``transport:host:port`` (:func:`member`), which is what
a binding's Path names.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from libon_tsilo.sip.listen import format_hostport

__all__ = ["PeerLiveness", "member"]

log = Logger()

INTERVAL = 1.0  # seconds between beats
TTL = 3.0  # a node missing three beats in a row is dead


def member(transport: str, host: str, port: int) -> str:
    """A node's name in the liveness set: its internal address (the host unbracketed or not)."""
    return f"{transport.lower()}:{format_hostport(host.strip('[]'), port)}"


class PeerLiveness(Service):
    """Beats for this node and keeps the set of live peers (see the module doc).

    ``beat(me, ttl)`` returns a Deferred firing with the members alive now; ``leave(me)`` (optional)
    removes us on a clean stop; ``me()`` is our own member name, read at each beat (the internal
    listener's port may be OS-picked).
    """

    def __init__(
        self,
        clock: IReactorTime,
        me: Callable[[], str],
        beat: Callable[[str, float], Deferred[set[str]]],
        leave: Callable[[str], Deferred[None]] | None = None,
        interval: float = INTERVAL,
        ttl: float = TTL,
    ) -> None:
        self.clock = clock
        self.me = me
        self._beat = beat
        self._leave = leave
        self.interval = interval
        self.ttl = ttl
        self.view: set[str] | None = None  # the members alive at our last successful beat
        # every member ever in a view: the cluster's nodes, dead ones included (ClusterNode.is_node)
        self.known: set[str] = set()
        self.seen_at = 0.0  # when that beat was answered
        self.beats_failed = 0
        self._timer: IDelayedCall | None = None
        self._in_flight = False

    # -- the question the call layer asks --------------------------------------------------------

    def alive(self, name: str, since: float | None = None) -> bool:
        """Is the node ``name`` (a :func:`member`) alive? True when we do not know (module doc), and
        when it did something at ``since`` (took a binding) that our last view cannot rule out."""
        view = self.view
        if view is None or name in view:
            return True
        seen_at = self.seen_at
        if self.clock.seconds() - seen_at > self.ttl:
            return True
        # a node that joined after our last beat, or beat just after it, is missing from our view:
        # what it did less than ttl - interval before that view proves it was alive (a dead node's
        # entry lasts ttl after its last beat, and it worked at most interval past that beat)
        return since is not None and since > seen_at - self.ttl + self.interval

    def stats(self) -> dict[str, object]:
        return {"alive": sorted(self.view or ()), "known": self.view is not None and
                self.clock.seconds() - self.seen_at <= self.ttl, "beats_failed": self.beats_failed}

    # -- the beat --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._tick()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._leave is None:
            return None
        try:
            d = self._leave(self.me())
        except Exception:
            log.failure("cluster liveness: leaving failed")
            return None
        d.addErrback(lambda f: log.info("cluster liveness: could not leave: {err}", err=f.getErrorMessage()))
        return d

    def _tick(self) -> None:
        self._timer = self.clock.callLater(self.interval, self._tick)
        if self._in_flight:
            return  # a store slower than our interval: one beat at a time
        try:
            d = self._beat(self.me(), self.ttl)
        except Exception:
            log.failure("cluster liveness: beat failed")
            return
        self._in_flight = True
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, alive: set[str]) -> None:
        self._in_flight = False
        before, self.view = self.view, set(alive)
        self.known |= self.view
        self.seen_at = self.clock.seconds()
        if self.beats_failed:
            log.info("cluster liveness: beats work again after {n} failures", n=self.beats_failed)
            self.beats_failed = 0
        if before is not None:
            for name in sorted(before - self.view):
                log.warn("cluster: node {node} is down (no beat for {ttl} s)", node=name, ttl=self.ttl)
            for name in sorted(self.view - before):
                log.info("cluster: node {node} is up", node=name)

    def _failed(self, failure: object) -> None:
        self._in_flight = False
        if not self.beats_failed:  # once per outage: a Redis down is logged by the store as well
            log.warn("cluster liveness: beat failed ({err}); peers count as alive after {ttl} s",
                     err=getattr(failure, "getErrorMessage", lambda: str(failure))(), ttl=self.ttl)
        self.beats_failed += 1
