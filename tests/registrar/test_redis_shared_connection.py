"""The Redis store's writes and feed on one connection (RESP3), against a real redis-server: a
node reads its write's reply and its own change message in one read; a Redis without HELLO (before
6) still gets two connections and works."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import redis

from tests.redis_server import RedisServer
from tests.registrar.helpers import make_binding
from tests.registrar.test_redis_store import Node, until


def _clients(server: RedisServer, kind: str) -> list[dict[str, str]]:
    """CLIENT LIST TYPE ``kind``, each connection's fields (read with a blocking client of its own)."""
    with redis.Redis(host="127.0.0.1", port=server.port) as client:
        return [{k: str(v) for k, v in c.items()} for c in client.client_list(_type=kind)]


@pytest.fixture
def stores() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        pytest_twisted.blockon(node.store.stop())


@pytest_twisted.ensureDeferred
async def test_the_writes_go_over_the_subscribed_connection(redis_server: RedisServer, stores: list[Node]) -> None:
    a = Node(redis_server, "a")
    b = Node(redis_server, "b")
    stores += [a, b]
    await a.start()
    await b.start()
    await a.write(make_binding(aor="sip:shared@example.com", expires_at=60.0))
    # the connection that received the change is the one that wrote it: RESP3, last command the
    # batch's script (EVAL the first time on a connection, EVALSHA after)
    subscribed = _clients(redis_server, "pubsub")
    assert len(subscribed) == 2
    assert sorted(c["resp"] for c in subscribed) == ["3", "3"]
    assert {"eval", "evalsha"} & {c["cmd"] for c in subscribed}
    assert not [c for c in _clients(redis_server, "normal") if c["cmd"] in ("evalsha", "eval")]
    await until(lambda: b.store.get("sip:shared@example.com", a.store.lookup("sip:shared@example.com")[0].key),
                "b has a's binding")
    # a's own change came back on that connection, and was not applied a second time
    assert a.redis.messages_applied == 0 and b.redis.messages_applied == 1


@pytest.fixture
def redis_without_hello(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, extra_args=("--rename-command", "HELLO", ""))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_redis_without_resp3_gets_a_connection_for_the_writes(
    redis_without_hello: RedisServer, stores: list[Node],
) -> None:
    a = Node(redis_without_hello, "a")
    b = Node(redis_without_hello, "b")
    stores += [a, b]
    await a.start()
    await b.start()
    binding = make_binding(aor="sip:old@example.com", expires_at=60.0)
    await a.write(binding)
    await until(lambda: b.store.get(binding.aor, binding.key), "b has a's binding")
    assert [c["resp"] for c in _clients(redis_without_hello, "pubsub")] == ["2", "2"]
    assert not {"eval", "evalsha"} & {c["cmd"] for c in _clients(redis_without_hello, "pubsub")}
    assert b.events.events[-1][0] == "added"
