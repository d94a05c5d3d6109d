"""A node's connections that ended without Redis hearing of it (review of issue 14).

Killed, a node never publishes that its TCP/TLS connections ended, and restarted within the
liveness TTL it never looked dead to its peers: Redis, and every other replica, still said its
devices' flows were live, and the peers forked through it to flows that are gone (430) instead of
pushing the device. The restarted node says so at its first load. Likewise a connection that
closed while Redis was down is published once Redis is back. Real redis-server.
"""

from __future__ import annotations

import pytest_twisted

from tests.redis_server import RedisServer
from tests.registrar.helpers import make_binding
from tests.registrar.test_redis_rollback import nodes  # noqa: F401 (the fixture)
from tests.registrar.test_redis_store import Node, _node, until


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_publishes_that_its_earlier_connections_are_gone(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    first = Node(redis_server, "b")  # node b's first process
    await first.start()
    a = _node(nodes, redis_server, "a")
    await a.start()
    tcp = make_binding(uri="sip:tcp@192.0.2.5;transport=tcp", expires_at=600.0, node="b",
                       flow_id="tcp:10.0.0.2:5060-192.0.2.5:4000#1", flow_live=True,
                       received=("tcp", "192.0.2.5", 4000), pn_provider="apns", pn_prid="tok")
    udp = make_binding(aor="sip:bob@example.com", uri="sip:udp@192.0.2.6", expires_at=600.0, node="b",
                       flow_id="udp:10.0.0.2:5060-192.0.2.6:5060", flow_live=True,
                       received=("udp", "192.0.2.6", 5060))
    await first.write(tcp, udp)
    await until(lambda: a.store.lookup(tcp.aor) and a.store.lookup(udp.aor), "b's bindings on a")
    assert a.store.lookup(tcp.aor)[0].flow_live
    # killed: its replica goes without a word (no flow_closed), and node b starts again
    await first.redis._close()
    again = _node(nodes, redis_server, "b")
    await again.start()
    await until(lambda: not a.store.lookup(tcp.aor)[0].flow_live, "a to hear b's connection is gone")
    assert a.events.kinds() == ["added", "added"]  # the same registration: no new event on a
    assert a.store.lookup(udp.aor)[0].flow_live  # a UDP flow is its address: nothing to say
    # in Redis too: a node that starts now loads it so
    c = _node(nodes, redis_server, "c")
    await c.start()
    assert not c.store.lookup(tcp.aor)[0].flow_live


@pytest_twisted.ensureDeferred
async def test_a_connection_that_closed_while_redis_was_down_is_published_once_it_is_back(
    redis_server: RedisServer, nodes: list[Node]  # noqa: F811
) -> None:
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    flow_id = "tcp:10.0.0.2:5060-192.0.2.5:4000#1"
    tcp = make_binding(uri="sip:tcp@192.0.2.5;transport=tcp", expires_at=600.0, node="b", flow_id=flow_id,
                       flow_live=True, received=("tcp", "192.0.2.5", 4000), pn_provider="apns", pn_prid="tok")
    await b.write(tcp)
    await until(lambda: a.store.lookup(tcp.aor), "b's binding on a")
    assert redis_server.cli("SAVE") == b"+OK"
    redis_server.stop()  # Redis restarts from its snapshot: nothing it acknowledged is lost
    await until(lambda: b.redis.state == "down", "b to see redis down")
    assert b.store.flow_closed(flow_id)  # the device's connection closes: b cannot tell Redis
    redis_server.start()
    await until(lambda: a.redis.loads == 2 and b.redis.loads == 2, "both nodes to reload")
    await until(lambda: not a.store.lookup(tcp.aor)[0].flow_live, "a to hear the connection is gone")
