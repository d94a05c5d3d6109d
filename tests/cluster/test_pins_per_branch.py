"""A worker pins a sibling's UDP device (sip/udp_pins.py) for the branches it really sends, not for
every candidate binding it routes: the call layer (a Clock, a fake port) with the real ClusterNode's
``next_hop`` and ``branch_sent`` as ops wires them (CallManager.path_router, path_sent)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tests.b2bua.helpers import Env, binding
from tests.cluster.test_cluster_node import _worker
from tests.fakes.sip import FakeFlow


def _env(**settings: Any) -> tuple[Env, Any, list[tuple[str, Any]]]:
    """A forking worker whose devices a sibling took (their REGISTERs reached the sibling); the
    events list says what happened in which order: ("pin", device) and ("send", hop)."""
    taker, forker = _worker(internal_port=5071), _worker(internal_port=5072)
    events: list[tuple[str, Any]] = []
    forker.pin = lambda local, remote: events.append(("pin", remote)) or True
    env = Env(**settings)
    env.mgr.path_router = forker.next_hop
    env.mgr.path_sent = forker.branch_sent
    real_send = env.port.send_request

    def send(req: Any, hop: Any, on_response: Any) -> Any:
        events.append(("send", (hop.host, hop.port)))
        return real_send(req, hop, on_response)

    env.port.send_request = send  # type: ignore[method-assign]
    return env, taker, events


def _device(taker: Any, n: int, contact: str | None = None, received: bool = True) -> Any:
    address = (f"198.51.100.{n}", 40000 + n)
    entry = taker.path_entry(FakeFlow("udp", address, id=f"udp-dev{n}", local=("0.0.0.0", 5060)), outbound=False)
    assert entry is not None and ";sock=" in entry
    b = binding(n, contact=contact or f"sip:bob@{address[0]}:{address[1]}")
    return dataclasses.replace(b, path=[entry], flow_id=f"udp-dev{n}", instance=None,
                               received=("udp", *address) if received else None)


def _pins(events: list[tuple[str, Any]]) -> list[Any]:
    return [what for kind, what in events if kind == "pin"]


def test_a_binding_skipped_at_max_branches_is_not_pinned():
    env, taker, events = _env(max_branches=1)
    for n in (1, 2):
        env.location.add(_device(taker, n))
    env.invite()
    (sent,) = env.port.invites()
    assert env.mgr.limit_counters["max_branches"] == 1
    # the one device rung is pinned, before its INVITE leaves (its answer may come at once)
    assert events == [("pin", (sent.hop.host, sent.hop.port)), ("send", (sent.hop.host, sent.hop.port))]


def test_a_binding_without_an_address_or_already_rung_is_not_pinned_again():
    env, taker, events = _env()
    env.location.add(_device(taker, 1, contact="sip:", received=False))  # no address: no branch
    env.location.add(_device(taker, 2))
    env.invite()
    assert len(env.port.invites()) == 1
    assert _pins(events) == [("198.51.100.2", 40002)]
    # the device refreshes its binding while its branch rings: no new branch, no new pin
    env.register(_device(taker, 2), refreshed=True)
    assert len(env.port.invites()) == 1 and len(_pins(events)) == 1
