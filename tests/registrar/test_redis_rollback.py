"""A Redis that comes back older than what it acknowledged (review of issue 14).

Redis acknowledges a write before it is on disk (RDB snapshots, AOF fsync each second) or on a
replica (asynchronous replication): restarted from its last snapshot, or failed over to a replica
that lagged, it holds the epoch key and the bindings of before, but not the last ones it answered.
A REGISTER's 200 promised those bindings: the node that holds them writes them back. Real
redis-server (tests/redis_server.py): ``SAVE`` takes the snapshot, ``restart()`` kills Redis (-9)
and starts it again from that snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted

from libon_tsilo.registrar.redis_store import binding_redis_key
from tests.redis_server import RedisServer
from tests.registrar.helpers import make_binding
from tests.registrar.test_redis_store import Node, _node, until


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        pytest_twisted.blockon(node.store.stop())


def _in_redis(server: RedisServer, binding: object) -> bool:
    return server.cli("EXISTS", binding_redis_key(b"test:", binding.aor, binding.key)) == b":1"  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_bindings_acknowledged_after_the_snapshot_are_written_back(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    early = make_binding(uri="sip:early@192.0.2.5", expires_at=600.0, node="a")
    await a.write(early)
    assert redis_server.cli("SAVE") == b"+OK"
    late = make_binding(aor="sip:bob@example.com", uri="sip:late@192.0.2.6", expires_at=600.0,
                        registered_at=1.0, node="a")
    await a.write(late)  # acknowledged: its REGISTER got its 200
    # a refresh of the early binding (same registration, later CSeq and expiry), acknowledged too
    refreshed = make_binding(uri="sip:early@192.0.2.5", expires_at=900.0, registered_at=2.0, cseq=2, node="a")
    await a.write(refreshed)
    await until(lambda: b.store.lookup(late.aor), "the late binding on b")

    redis_server.restart()  # from the snapshot: the epoch is there, the late binding is not
    await until(lambda: a.redis.loads == 2 and b.redis.loads == 2, "both nodes to reload")
    await until(lambda: _in_redis(redis_server, late), "a to write its late binding back")
    assert [x.to_dict() for x in a.store.lookup(late.aor)] == [late.to_dict()]
    await until(lambda: b.store.lookup(late.aor), "the late binding on b again")
    # and the refresh wins over the older copy Redis came back with
    await until(lambda: b.store.lookup(early.aor) and b.store.lookup(early.aor)[0].expires_at == 900.0,
                "the refresh on b")
    assert a.store.lookup(early.aor)[0].expires_at == 900.0
    pttl = int(redis_server.cli("PTTL", binding_redis_key(b"test:", early.aor, early.key))[1:])
    assert pttl > 600_000
