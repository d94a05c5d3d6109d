"""The service tree owns every timer: after stopService on a Clock, no DelayedCall is left, and the
children stop in order (the call layer before the silo and the store, the transport last)."""

from __future__ import annotations

import typing
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.service import make_service
from libon_tsilo.push.waker import PushWaker
from libon_tsilo.registrar.binding import LocationObserver
from tests.silo.test_late_fork_order import CALLER, DEVICE, INVITE, REGISTER

STOP_ORDER = ["shutdown", "calls", "silo", "location", "transactions", "transport"]


class _EndedCall:
    """An ended call the silo keeps for its grace period (as Call._release_silo hands it to Silo.linger)."""

    call_id = "ended@test"
    aor = "bob"

    def late_binding_after_end(self, binding: Any) -> bool:
        return False


def _server(clock: Clock) -> tuple[Any, Any]:
    cfg = config_from_dict({
        "sip": {"listen": ["udp:127.0.0.1:0"], "domains": ["127.0.0.1"]},
        "auth": {"enabled": False},
        "location": {"backend": "memory"},
        "calls": {"ring_timeout": 30},
        "ops": {"drain_timeout": 2},
    })
    root = make_service(cfg, clock=clock)

    class FakeSocket:
        local = ("127.0.0.1", 5060)
        v6 = False

        def send_to(self, data: bytes, addr: tuple[str, int]) -> None:
            pass

    sock = FakeSocket()
    transport = root.parts.transport
    transport.add_udp_endpoint(sock)

    def feed(data: str, addr: tuple[str, int]) -> None:
        transport.datagram_received(sock, data.encode(), addr)

    return root, feed


class _StopRecorder:
    """Stands for a child in its parent's list: notes its name when it is stopped, then stops it."""

    def __init__(self, child: Any, stopped: list[str]) -> None:
        self._child = child
        self._stopped = stopped

    def stopService(self) -> Any:
        self._stopped.append(self._child.name)
        return self._child.stopService()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._child, name)


@pytest_twisted.inlineCallbacks
def test_stop_leaves_no_timer_and_stops_the_transport_last():
    clock = Clock()
    clock.advance(1_000_000)
    root, feed = _server(clock)
    root.startService()
    stopped: list[str] = []
    # the root stops the children of its list: each stands behind a recorder there (the transport,
    # compiled, takes no stopService of a test's)
    root.services = [_StopRecorder(child, stopped) for child in root.services]

    feed(INVITE, CALLER)  # parked
    assert root.parts.silo.stats()["stored_transactions"] == 1
    feed(REGISTER, DEVICE)  # late fork: a ringing call (ring timer), a client transaction, a binding
    assert root.parts.location.all_count() == 1
    root.parts.silo.linger(_EndedCall(), 30.0)  # an ended call waiting for a pushed device
    assert root.parts.b2bua.calls and root.parts.silo.stats()["lingering"] == 1

    done = root.stopService()
    clock.advance(2.5)  # the drain gives up on the ringing call
    yield done
    assert [n for n in stopped if n in STOP_ORDER] == STOP_ORDER
    assert stopped[-1] == "transport"
    assert clock.getDelayedCalls() == []
    assert not root.parts.b2bua.calls and len(root.parts.silo) == 0


def test_every_location_observer_in_the_tree_implements_the_protocol_explicitly() -> None:
    root, _ = _server(Clock())
    observers = root.parts.location._observers
    assert root.parts.silo in observers and len(observers) >= 2  # the silo and the flow release
    for observer in observers:
        assert LocationObserver in type(observer).__mro__, type(observer)
    assert LocationObserver in PushWaker.__mro__


def test_parts_are_typed_with_the_real_classes() -> None:
    """mypy checks the wiring against these (no seam typed Any between ops and the layers)."""
    from libon_tsilo.b2bua.manager import CallManager
    from libon_tsilo.ops.service import Parts
    from libon_tsilo.registrar.location import LocationStore
    from libon_tsilo.registrar.registrar import Registrar
    from libon_tsilo.silo.silo import Silo
    from libon_tsilo.sip.flow import Flow, FlowTable
    from libon_tsilo.sip.router import Router
    from libon_tsilo.sip.tls import TLSContextFactory
    from libon_tsilo.sip.transaction import TransactionLayer
    from libon_tsilo.sip.transport import TransportLayer

    names = {c.__name__: c for c in (CallManager, LocationStore, Registrar, Silo, Flow, FlowTable, Router,
                                      TLSContextFactory, TransactionLayer, TransportLayer, PushWaker)}
    hints = typing.get_type_hints(Parts, localns=names)
    expected = {"transport": TransportLayer, "transactions": TransactionLayer, "router": Router,
                "registrar": Registrar, "location": LocationStore, "silo": Silo, "waker": PushWaker,
                "b2bua": CallManager, "tls_context_factory": TLSContextFactory}
    for name, cls in expected.items():
        assert hints[name] == cls | None, name
