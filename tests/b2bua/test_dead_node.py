"""The call layer around a cluster node that is down (issue 14), on a Clock with a fake port: the
Path router and the liveness answer are the hooks ops sets (CallManager.path_router, peer_alive)."""

from __future__ import annotations

import dataclasses

from libon_tsilo.b2bua.waker import WakeResult
from tests.b2bua.helpers import Env, binding

NODE = ("udp", "10.9.9.9", 5071)
PATH = [f"<sip:token@{NODE[1]}:{NODE[2]};lr>"]


def _cluster_env(alive: bool) -> Env:
    env = Env()
    env.mgr.path_router = lambda path: (path, (*NODE, ("127.0.0.1", 5071)))
    env.mgr.peer_alive = lambda transport, host, port, since: alive
    return env


def _behind_node(n: int, **kw: object):
    return dataclasses.replace(binding(n, **kw), path=list(PATH))


def test_a_udp_binding_behind_a_dead_node_is_sent_to_directly_and_behind_a_live_one_through_it():
    for alive, target in ((True, NODE[1:]), (False, ("10.0.0.2", 5080))):
        env = _cluster_env(alive)
        udp = dataclasses.replace(_behind_node(1), received=("udp", "10.0.0.2", 5080))
        env.location.add(udp)
        env.invite()
        (ctx,) = env.port.invites()
        assert (ctx.hop.host, ctx.hop.port) == target
        assert bool(ctx.request.header_values("route")) == alive  # the dead node's entry is dropped


def test_a_second_push_for_a_device_behind_a_dead_node_keeps_the_call_waiting():
    """The first push fails for good while the second (a device whose node died) is in flight:
    the call waits for that one, not for nothing."""
    env = _cluster_env(alive=False)
    env.location.add(_behind_node(1, push="apns", live=False))
    _, stx = env.invite()
    assert len(env.waker.calls) == 1 and env.call().state.name == "parked"
    env.register(_behind_node(2, push="fcm"))  # its TCP flow ended with its node: pushed, not forked
    assert len(env.waker.calls) == 2 and env.port.invites() == []
    assert env.mgr.counters["dead_node_bindings"] == 1
    env.waker.calls[0][2].callback(WakeResult(all_failed=True, reason="dead token"))
    assert stx.statuses == [] and env.call().state.name == "parked"
    env.waker.calls[1][2].callback(WakeResult(woken=1))
    env.clock.advance(30)
    assert stx.statuses == [480]
