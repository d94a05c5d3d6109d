"""Redis persistence of the location store, against a real redis-server (tests/redis_server.py).

Each LocationStore replica gets its own redis-py client, as two nodes would. Expiry of the replica
runs on a Clock; Redis and the feed run on the real (asyncio) reactor, so the tests wait on
conditions (``until``), never on a fixed sleep.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher

from libon_tsilo.registrar.location import LocationStore, NotStored
from libon_tsilo.registrar.redis_store import RedisBindingStore, binding_redis_key, make_redis_client
from tests.redis_server import RedisServer
from tests.registrar.helpers import RecordingObserver, make_binding
from tests.waiting import wait_until

PREFIX = "test:"


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)  # the poll interval, not a wait for anything


class Node:
    """One replica with its own client, clock and recorded events."""

    def __init__(self, server: RedisServer, node_id: str, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.redis = RedisBindingStore(
            make_redis_client(server.url), self.clock, node_id=node_id, key_prefix=PREFIX,
            min_backoff=0.02, max_backoff=0.1,
        )
        self.store = LocationStore(self.clock, self.redis, node_id=node_id)
        self.events = RecordingObserver()
        self.store.subscribe(self.events)

    async def start(self) -> None:
        self.store.start()
        await until(lambda: self.redis.up, "redis up")

    async def write(self, *bindings: Any) -> None:
        for b in bindings:
            self.store.add_or_update(b)
        d = self.store.when_durable(bindings[0].aor)
        assert d is not None
        await d


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        pytest_twisted.blockon(node.store.stop())


def _node(nodes: list[Node], server: RedisServer, node_id: str, clock: Clock | None = None) -> Node:
    node = Node(server, node_id, clock)
    nodes.append(node)
    return node


@pytest_twisted.ensureDeferred
async def test_every_field_round_trips_through_redis(redis_server: RedisServer, nodes: list[Node]) -> None:
    a = _node(nodes, redis_server, "a")
    await a.start()
    odd_uri = b"sip:m\xff@127.0.0.1:5062".decode("utf-8", "surrogateescape")
    odd_aor = "sip:b\udcff@example.com"
    full = make_binding(
        aor=odd_aor, uri=odd_uri, expires_at=300.0, q=0.5, instance="<urn:uuid:1>", reg_id=1,
        flow_id="tcp#7", flow_live=True, received=("tcp", "192.0.2.1", 4000), path=["<sip:p;lr>"],
        user_agent="Ph\udce9ne", pn_provider="apns", pn_prid="tok", pn_param="t.b.voip", pnsreg=True,
        node="a",
    )
    pushy = make_binding(uri="sip:p@192.0.2.2", expires_at=200.0, pn_provider="fcm", pn_prid="t2")
    await a.write(full)
    await a.write(pushy)
    # a fresh replica (another node) loads both from Redis, field for field
    b = _node(nodes, redis_server, "b")
    await b.start()
    got = {x.key: x for x in b.store.dump()[odd_aor] + b.store.dump()[pushy.aor]}
    assert got[full.key].to_dict() == full.to_dict()
    assert got[pushy.key].to_dict() == pushy.to_dict()
    assert b.events.events == []  # the first load is silent, like a restore
    # Redis forgets the binding by itself at its expiry
    ttl = int(redis_server.cli("PTTL", binding_redis_key(b"test:", odd_aor, full.key))[1:])
    assert 299_000 < ttl <= 300_000


@pytest_twisted.ensureDeferred
async def test_a_register_is_durable_only_once_redis_has_it(redis_server: RedisServer, nodes: list[Node]) -> None:
    a = _node(nodes, redis_server, "a")
    await a.start()
    b = make_binding(expires_at=60.0)
    a.store.add_or_update(b)
    key = binding_redis_key(b"test:", b.aor, b.key)
    assert redis_server.cli("EXISTS", key) == b":0"  # queued, not written yet
    d = a.store.when_durable(b.aor)
    assert d is not None
    await d
    assert redis_server.cli("EXISTS", key) == b":1"


@pytest_twisted.ensureDeferred
async def test_changes_reach_the_other_replica_as_binding_events(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    first = make_binding(expires_at=60.0, flow_id="udp:x", flow_live=True, node="a")
    await a.write(first)
    await until(lambda: b.events.events, "the add on b")
    assert [(k, x.contact_uri) for k, x, _ in b.events.events] == [("added", first.contact_uri)]
    assert b.store.lookup(first.aor)[0].to_dict() == first.to_dict()
    assert b.store.by_flow("udp:x") == []  # the flow is in a's table, not b's
    again = make_binding(expires_at=120.0, cseq=2, node="a")
    await a.write(again)
    await until(lambda: len(b.events.events) == 2, "the refresh on b")
    assert b.events.kinds() == ["added", "refreshed"] and b.store.lookup(first.aor)[0].cseq == 2
    # b changes it back: a hears it, and nobody hears their own change twice
    a.store.remove(a.store.lookup(first.aor)[0], "unregistered")
    await a.store.flush()
    await until(lambda: len(b.events.events) == 3, "the removal on b")
    assert b.events.events[-1][0] == "removed" and b.events.events[-1][2] == "unregistered"
    assert b.store.lookup(first.aor) == []
    assert a.events.kinds() == ["added", "refreshed", "removed"]


@pytest_twisted.ensureDeferred
async def test_a_flow_closing_on_its_node_reaches_the_other_replica_without_an_event(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    binding = make_binding(expires_at=60.0, flow_id="tcp:flow-1", flow_live=True, node="a",
                           received=("tcp", "192.0.2.10", 40000))
    await a.write(binding)
    await until(lambda: b.events.events, "the add on b")
    assert b.store.lookup(binding.aor)[0].flow_live
    assert a.store.flow_closed("tcp:flow-1") == [binding]
    await until(lambda: not b.store.lookup(binding.aor)[0].flow_live, "b to hear that the flow closed")
    # the same registration: nothing for a parked call to fork to
    assert b.events.kinds() == ["added"]


@pytest_twisted.ensureDeferred
async def test_expiry_is_left_to_redis_and_each_replica(redis_server: RedisServer, nodes: list[Node]) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    short = make_binding(expires_at=0.3)
    await a.write(short)
    await until(lambda: b.store.lookup(short.aor), "the add on b")
    key = binding_redis_key(b"test:", short.aor, short.key)
    await until(lambda: redis_server.cli("EXISTS", key) == b":0", "redis to expire the key")
    a.clock.advance(1)
    b.clock.advance(1)
    assert a.store.lookup(short.aor) == [] and b.store.all_count() == 0
    assert b.events.kinds() == ["added", "removed"]
    assert a.redis.pending() == 0  # the expiry wrote nothing


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_writes_serves_lookups_and_recovers(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    kept = make_binding(uri="sip:kept@192.0.2.5", expires_at=600.0, node="a")
    await a.write(kept)
    await until(lambda: b.store.lookup(kept.aor), "the add on b")

    redis_server.stop()
    await until(lambda: a.redis.state == "down" and b.redis.state == "down", "both nodes to see redis down")
    assert [x.contact_uri for x in b.store.lookup(kept.aor)] == [kept.contact_uri]  # served from the copy
    late = make_binding(aor="sip:bob@example.com", uri="sip:bob@192.0.2.9", expires_at=600.0, node="b")
    b.store.add_or_update(late)
    d = b.store.when_durable(late.aor)
    assert d is not None
    with pytest.raises(NotStored):
        await d

    # Redis comes back empty: both reconnect by themselves and write back the bindings whose flows
    # they hold (b's too: its device got 500, but it is reachable through b), and each hears the other's
    redis_server.start()
    await until(lambda: a.redis.up and b.redis.up, "both nodes to reconnect")
    for binding in (kept, late):
        key = binding_redis_key(b"test:", binding.aor, binding.key)
        await until(lambda k=key: redis_server.cli("EXISTS", k) == b":1", f"{binding.node} to write back")
    await until(lambda: a.store.lookup(late.aor), "b's binding on a")
    # b may have loaded before a wrote `kept` back (its resync then dropped it): b has it again once
    # it reads a's change message, which can come after Redis has the key
    await until(lambda: b.store.lookup(kept.aor), "a's binding on b")
    assert [x.contact_uri for x in b.store.lookup(kept.aor)] == [kept.contact_uri]
    # and the feed works again
    again = make_binding(aor="sip:carol@example.com", uri="sip:carol@192.0.2.7", expires_at=600.0, node="b")
    await b.write(again)
    await until(lambda: a.store.lookup(again.aor), "b's new binding on a")


@pytest_twisted.ensureDeferred
async def test_a_reconnect_announces_what_changed_meanwhile(redis_server: RedisServer, nodes: list[Node]) -> None:
    a = _node(nodes, redis_server, "a")
    await a.start()
    gone = make_binding(uri="sip:gone@192.0.2.6", expires_at=600.0, node="z")
    redis_server.cli("SET", binding_redis_key(b"test:", gone.aor, gone.key), json.dumps(gone.to_dict()))
    redis_server.cli("CLIENT", "KILL", "TYPE", "pubsub")  # a's feed breaks, and reconnects
    await until(lambda: a.redis.loads == 2, "a to reload")
    assert a.events.kinds() == ["added"]
    # while a could not hear it, another node replaced that device by another one
    other = make_binding(aor="sip:dave@example.com", uri="sip:dave@192.0.2.8", expires_at=600.0, node="z")
    redis_server.cli("DEL", binding_redis_key(b"test:", gone.aor, gone.key))
    redis_server.cli("SET", binding_redis_key(b"test:", other.aor, other.key), json.dumps(other.to_dict()))
    redis_server.cli("CLIENT", "KILL", "TYPE", "pubsub")
    await until(lambda: a.redis.loads == 3, "a to reload again")
    assert [(k, x.contact_uri) for k, x, _ in a.events.events] == [
        ("added", gone.contact_uri), ("removed", gone.contact_uri), ("added", other.contact_uri)
    ]
    assert a.store.lookup(other.aor)[0].to_dict() == other.to_dict()


@pytest_twisted.ensureDeferred
async def test_a_flow_closing_only_touches_this_nodes_bindings(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    theirs = make_binding(uri="sip:t@192.0.2.3;transport=tcp", expires_at=60.0, flow_id="tcp#1",
                          flow_live=True, node="a")
    await a.write(theirs)
    await until(lambda: b.store.lookup(theirs.aor), "the add on b")
    assert b.store.flow_closed("tcp#1") == []  # b's own connection tcp#1 is another device
    assert b.store.lookup(theirs.aor)[0].flow_live


@pytest_twisted.ensureDeferred
async def test_redis_down_is_logged_once_per_change_of_state(redis_server: RedisServer, nodes: list[Node]) -> None:
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") in ("libon_tsilo.registrar.redis_store", "libon_tsilo.registrar.redis_writes"):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        a = _node(nodes, redis_server, "a")
        await a.start()
        redis_server.stop()
        await until(lambda: a.redis.state == "down", "redis down")
        # several reconnection attempts fail (backoff 20 ms to 100 ms): still one warning
        await deferLater(reactor, 0.5, lambda: None)
        redis_server.start()
        await until(lambda: a.redis.up, "the reconnect")
    finally:
        globalLogPublisher.removeObserver(observer)
    texts = [formatEvent(e) for e in events]
    assert sum("unreachable" in t for t in texts) == 1, texts
    assert [t.split(",")[0] for t in texts if "bindings loaded" in t] == [
        "location redis: connected", "location redis: reconnected"
    ]


@pytest_twisted.ensureDeferred
async def test_a_password_in_the_url_logs_in(tmp_path: Path, nodes: list[Node]) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        a = _node(nodes, server, "a")
        await a.start()
        await a.write(make_binding(expires_at=60.0))
        # the epoch, the node's write counter, its claims on its node id and its change channel, and
        # the binding
        assert server.cli("DBSIZE") == b":5"
        # an ACL user restricted to the prefix, with the rights etc/libon-tsilo.toml documents
        assert server.cli("ACL", "SETUSER", "tsilo", "on", ">pw", "~test:*", "&test:*", "+@read", "+@write",
                          "+@pubsub", "+@scripting", "+@connection", "-@dangerous", "+info") == b"+OK"
        limited = _node(nodes, server, "c")
        limited.redis.client = make_redis_client(server.url, username="tsilo", password="pw")
        await limited.start()
        await limited.write(make_binding(uri="sip:acl@192.0.2.4", expires_at=60.0))
        await until(lambda: "sip:acl@192.0.2.4" in [x.contact_uri for x in a.store.lookup("sip:alice@example.com")],
                    "the limited user's change on a")
        # a wrong password: the node stays down (writes fail), it does not crash
        wrong = RedisBindingStore(make_redis_client(server.url, password="nope"), Clock(), key_prefix=PREFIX)
        store = LocationStore(Clock(), wrong)
        store.start()
        await until(lambda: wrong.state == "down", "the refused login")
        store.add_or_update(make_binding(expires_at=60.0))
        d = store.when_durable("sip:alice@example.com")
        assert d is not None
        with pytest.raises(NotStored):
            await d
        await store.stop()
    finally:
        for node in nodes:
            await node.store.stop()
        nodes.clear()
        server.stop()


@pytest.fixture
def sentinel(redis_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    """A real redis-sentinel watching the fixture's server as master "tsilo"."""
    port = RedisServer(tmp_path).port  # a free port
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor tsilo 127.0.0.1 {redis_server.port} 1\n")
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    probe = RedisServer(tmp_path, port=port)
    try:
        wait_until(lambda: _answers(probe), 10, "the sentinel")
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def _answers(server: RedisServer) -> bool:
    try:
        return server.cli("PING") == b"+PONG"
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_the_master_is_found_through_sentinel(redis_server: RedisServer, sentinel: int) -> None:
    client = make_redis_client("redis:///0", sentinels=(f"127.0.0.1:{sentinel}",), service_name="tsilo")
    store = LocationStore(Clock(), RedisBindingStore(client, Clock(), key_prefix=PREFIX))
    store.start()
    try:
        await until(lambda: store.redis_stats()["up"], "the master found through the sentinel")  # type: ignore[index]
        b = make_binding(expires_at=60.0)
        store.add_or_update(b)
        d = store.when_durable(b.aor)
        assert d is not None
        await d
        assert redis_server.cli("EXISTS", binding_redis_key(b"test:", b.aor, b.key)) == b":1"
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_message_that_does_not_parse_is_skipped(redis_server: RedisServer, nodes: list[Node]) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    other = min({0, 1, 2} - {a.redis.slot, b.redis.slot})
    for junk in (b"garbage", b"x {not json", b'x {"a": "sip:z@h", "ops": [["s", {"aor": 1}]]}',
                 b'x {"a": "sip:z@h", "ops": [["s", {"aor": "sip:z@h", "expires_at": "soon"}]]}', b"\xff\xfe"):
        assert redis_server.cli("PUBLISH", f"test:bindings:{other}", junk) == b":2"  # a third node's
    good = make_binding(expires_at=60.0)
    await a.write(good)
    await until(lambda: b.store.lookup(good.aor), "the good change after the junk")
    assert b.events.kinds() == ["added"] and b.redis.up


@pytest_twisted.ensureDeferred
async def test_a_binding_refused_before_the_first_load_is_removed_with_its_event(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    redis_server.stop()
    a = _node(nodes, redis_server, "a")
    a.store.start()
    await until(lambda: a.redis.state == "down", "redis down")
    early = make_binding(expires_at=60.0, node="a")
    a.store.add_or_update(early)
    d = a.store.when_durable(early.aor)
    assert d is not None
    with pytest.raises(NotStored):  # its REGISTER got 500
        await d
    redis_server.start()
    await until(lambda: a.redis.up, "the first load")
    assert a.store.lookup(early.aor) == []
    assert [(k, x.contact_uri, why) for k, x, why in a.events.events] == [
        ("added", early.contact_uri, None), ("removed", early.contact_uri, "resync")
    ]


@pytest_twisted.ensureDeferred
async def test_failing_writes_are_logged_once_until_they_work_again(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    # an ACL user without +@scripting: connected (reads work) but every batch is refused
    assert redis_server.cli("ACL", "SETUSER", "noscript", "on", ">pw", "~test:*", "&test:*", "+@read",
                            "+@write", "+@pubsub", "+@connection") == b"+OK"
    a = _node(nodes, redis_server, "a")
    a.redis.client = make_redis_client(redis_server.url, username="noscript", password="pw")
    events: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") in ("libon_tsilo.registrar.redis_store", "libon_tsilo.registrar.redis_writes"):
            events.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        await a.start()
        for i in range(3):
            a.store.add_or_update(make_binding(uri=f"sip:n{i}@192.0.2.1", expires_at=60.0))
            d = a.store.when_durable("sip:alice@example.com")
            assert d is not None
            with pytest.raises(NotStored):
                await d
        assert a.redis.failed_batches == 3
        assert redis_server.cli("ACL", "SETUSER", "noscript", "+@scripting") == b"+OK"
        await a.write(make_binding(uri="sip:ok@192.0.2.1", expires_at=60.0))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert sum("writes fail" in e for e in events) == 1, events
    assert sum("writes work again, after 3 failed batches" in e for e in events) == 1, events


@pytest_twisted.ensureDeferred
async def test_a_change_made_while_the_load_runs_is_not_missed(redis_server: RedisServer, nodes: list[Node]) -> None:
    b = _node(nodes, redis_server, "b")
    await b.start()
    gone = make_binding(expires_at=60.0, node="b")
    await b.write(gone)
    a = _node(nodes, redis_server, "a")
    load_all = a.redis._load_all

    async def load_then_remove() -> list[Any]:
        loaded = await load_all()  # holds `gone`...
        b.store.remove(b.store.lookup(gone.aor)[0], "unregistered")  # ...which goes before a applies it
        await b.store.flush().asFuture(a.redis.loop)  # this runs in a's asyncio feed task
        return loaded

    a.redis._load_all = load_then_remove  # type: ignore[method-assign]
    await a.start()
    # the feed was subscribed before the load: the removal is applied after it
    await until(lambda: a.redis.messages_applied == 1, "the removal on a")
    assert a.store.lookup(gone.aor) == []


@pytest_twisted.ensureDeferred
async def test_a_flushed_script_cache_costs_no_register(redis_server: RedisServer, nodes: list[Node]) -> None:
    a = _node(nodes, redis_server, "a")
    await a.start()
    await a.write(make_binding(uri="sip:one@192.0.2.1", expires_at=60.0))
    assert redis_server.cli("SCRIPT", "FLUSH") == b"+OK"  # the next EVALSHA gets NOSCRIPT
    await a.write(make_binding(uri="sip:two@192.0.2.1", expires_at=60.0))  # sent again by EVAL
    await a.write(make_binding(uri="sip:three@192.0.2.1", expires_at=60.0))
    assert a.redis.failed_batches == 0 and a.redis.commits == 3
