"""cluster/liveness.py on a Clock with a scripted store; and the Redis heartbeat it runs on in a
cluster (registrar/redis_store.py), against a real redis-server."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from libon_tsilo.cluster.liveness import PeerLiveness
from libon_tsilo.registrar.redis_store import RedisBindingStore, make_redis_client
from tests.redis_server import RedisServer

A, B = "udp:10.0.0.1:5071", "udp:10.0.0.2:5071"


class Store:
    """Answers each beat with what the test says is alive; records who beat."""

    def __init__(self) -> None:
        self.alive: set[str] | None = {A, B}  # None: the store is down
        self.beats: list[tuple[str, float]] = []
        self.left: list[str] = []
        self.hold = False  # leave the beat unanswered (a slow store)
        self.held: list[Deferred[set[str]]] = []

    def beat(self, me: str, ttl: float) -> Deferred[set[str]]:
        self.beats.append((me, ttl))
        if self.hold:
            d: Deferred[set[str]] = Deferred()
            self.held.append(d)
            return d
        return fail(ConnectionError("down")) if self.alive is None else succeed(set(self.alive))

    def leave(self, me: str) -> Deferred[None]:
        self.left.append(me)
        return succeed(None)


def _liveness(store: Store) -> tuple[PeerLiveness, Clock]:
    clock = Clock()
    liveness = PeerLiveness(clock, lambda: A, store.beat, store.leave, interval=1.0, ttl=3.0)
    liveness.startService()
    return liveness, clock


def test_a_peer_that_stops_beating_is_dead_and_comes_back():
    store = Store()
    liveness, clock = _liveness(store)
    assert store.beats == [(A, 3.0)]  # at once, then every second
    assert liveness.alive(B)
    store.alive = {A}  # B's entry expired in the store
    clock.advance(1.0)
    assert not liveness.alive(B) and liveness.alive(A)
    store.alive = {A, B}
    clock.advance(1.0)
    assert liveness.alive(B)
    assert len(store.beats) == 3
    liveness.stopService()
    assert store.left == [A] and not clock.getDelayedCalls()


def test_every_peer_counts_as_alive_when_we_do_not_know():
    store = Store()
    store.alive = None  # the store is down from the start: nothing known yet
    liveness, clock = _liveness(store)
    assert liveness.alive(B) and liveness.beats_failed == 1
    store.alive = {A}
    clock.advance(1.0)
    assert not liveness.alive(B)
    store.alive = None  # our own link fails: the last view holds for ttl, then we do not know
    clock.pump([1.0, 1.0, 1.0])
    assert not liveness.alive(B)
    clock.advance(1.0)
    assert liveness.alive(B) and liveness.beats_failed == 4
    liveness.stopService()


def test_one_beat_at_a_time():
    store = Store()
    store.hold = True
    liveness, clock = _liveness(store)
    clock.advance(5.0)
    assert len(store.beats) == 1  # the store has not answered the first one
    store.held[0].callback({A})
    clock.advance(1.0)
    assert len(store.beats) == 2 and not liveness.alive(B)
    liveness.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_heartbeat_lists_the_nodes_alive_and_forgets_the_dead(redis_server: RedisServer):
    stores = [RedisBindingStore(make_redis_client(redis_server.url), Clock(), key_prefix="beat:") for _ in "ab"]
    a, b = stores
    try:
        assert await a.heartbeat(A, 0.3) == {A}
        assert await b.heartbeat(B, 30.0) == {A, B}
        # A stops beating: Redis's own clock expires it (the poll's interval, not a wait for anything)
        while A in await b.heartbeat(B, 30.0):
            pass
        await b.leave(B)
        assert await a.heartbeat(A, 30.0) == {A}
        assert 0 < int(redis_server.cli("PTTL", "beat:nodes")[1:]) <= 30000  # the set itself expires
    finally:
        for store in stores:
            await store.stop()


def test_a_binding_newer_than_our_view_proves_its_node_alive():
    """A node that joined after our last beat is not in our view yet: a binding it took since (or
    less than ttl - interval before that view, when a live node would have beaten since) says it is
    alive; an older one does not."""
    store = Store()
    store.alive = {A}
    liveness, clock = _liveness(store)
    clock.advance(10.0)  # our view is from t=10
    assert not liveness.alive(B) and not liveness.alive(B, since=6.0) and not liveness.alive(B, since=7.5)
    assert liveness.alive(B, since=8.5) and liveness.alive(B, since=10.2)
    liveness.stopService()


def test_a_binding_taken_after_a_killed_nodes_last_beat_does_not_keep_it_alive():
    """kill -9 of B just after it took a binding, between two of its beats: B's last beat at t=0,
    the binding at t=0.9, B's entry expires at t=3 (ttl). The first view without B must not count
    B alive for that binding (a call would go to the dead node and ring out)."""
    store = Store()
    liveness, clock = _liveness(store)  # t=0: B beat, we see it
    clock.pump([1.0, 1.0])
    assert liveness.alive(B)
    store.alive = {A}  # B's entry expired at t=3
    clock.advance(1.0)
    assert liveness.seen_at == 3.0
    assert not liveness.alive(B, since=0.9)
    liveness.stopService()
