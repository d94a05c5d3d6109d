"""SO_REUSEPORT on the SIP listeners ([cluster] reuse_port): N workers bind one public port.

Two TransportLayers in this process stand for two workers; real loopback sockets, OS-picked ports.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock

from libon_tsilo.sip.tls import TLSContextFactory
from libon_tsilo.sip.transport import TransportLayer
from tests.sip.tlsutil import make_pki


def _layer(listen: list[str], reuse_port: bool, tls=None) -> TransportLayer:
    shared = listen if reuse_port else ()
    return TransportLayer(listen, Clock(), 60, 4096, tls_context_factory=tls, reuse_port=shared)


@pytest.fixture
def started():
    layers: list[TransportLayer] = []

    def start(listen: list[str], reuse_port: bool, tls=None) -> TransportLayer:
        layer = _layer(listen, reuse_port, tls)
        layer.startService()
        layers.append(layer)
        return layer

    yield start
    for layer in layers:
        pytest_twisted.blockon(layer.stopService())


def _same_ports(first: TransportLayer) -> list[str]:
    return [f"{t}:{host}:{port}" for t, host, port in first.bound]


def _reuse_flag(layer: TransportLayer) -> list[int]:
    return [
        port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0 for port in layer._ports
    ]


def test_two_workers_bind_the_same_udp_and_tcp_port_with_reuse_port(started) -> None:
    a = started(["udp:127.0.0.1:0", "tcp:127.0.0.1:0"], reuse_port=True)
    b = started(_same_ports(a), reuse_port=True)
    assert b.bound == a.bound
    assert _reuse_flag(a) == _reuse_flag(b) == [True, True]


def test_tls_listener_shares_its_port_too(started, tmp_path) -> None:
    issued = make_pki(tmp_path).issue("server")
    tls = TLSContextFactory(str(issued.cert), str(issued.key))
    a = started(["tls:127.0.0.1:0"], reuse_port=True, tls=tls)
    b = started(_same_ports(a), reuse_port=True, tls=tls)
    assert b.bound == a.bound


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_without_reuse_port_the_second_worker_cannot_bind(started, transport) -> None:
    a = started([f"{transport}:127.0.0.1:0"], reuse_port=False)
    assert _reuse_flag(a) == [False]
    b = _layer(_same_ports(a), reuse_port=False)
    with pytest.raises(CannotListenError):
        b.startService()
    b.stopService()  # nothing bound: returns at once


def test_reuse_port_on_one_worker_only_is_not_enough(started) -> None:
    # the kernel wants SO_REUSEPORT on every socket sharing the port (and the same user)
    a = started(["udp:127.0.0.1:0"], reuse_port=False)
    b = _layer(_same_ports(a), reuse_port=True)
    with pytest.raises(CannotListenError):
        b.startService()
    b.stopService()  # nothing bound: returns at once



def test_only_the_listed_specs_share_their_port() -> None:
    # a worker's internal (node-to-node) address is its own: a second worker configured with the
    # same one must fail to start, not silently share it
    public = "udp:127.0.0.1:0"
    layer = TransportLayer([public, "tcp:127.0.0.1:0"], Clock(), 60, 4096, reuse_port=[public])
    layer.startService()
    try:
        assert _reuse_flag(layer) == [True, False]
    finally:
        layer.stopService()
