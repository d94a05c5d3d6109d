"""ops/reactor.py and the tap: [ops] reactor picks epoll or asyncio before anything imports the reactor.

Which reactor gets installed is checked in fresh interpreters (a process installs one reactor once).
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import DatagramProtocol
from twisted.python import log as twisted_log

from libon_tsilo.ops.config import ApnsConfig, Config, config_from_dict, default_config
from libon_tsilo.ops.reactor import reactor_for

REPO = Path(__file__).resolve().parents[2]


def with_apns(cfg: Config) -> Config:
    apns = ApnsConfig(bundle_id="com.example", key_file="k.p8", team_id="T", key_id="K")
    return dataclasses.replace(cfg, push=dataclasses.replace(cfg.push, apns=(apns,)))


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_auto_is_epoll_apns_included() -> None:
    assert default_config().ops.reactor == "auto"
    assert reactor_for(default_config()) == "epoll"
    assert reactor_for(with_apns(default_config())) == "epoll"  # APNs is h2 on Twisted: no asyncio
    assert reactor_for(config_from_dict({"ops": {"reactor": "asyncio"}})) == "asyncio"
    assert reactor_for(config_from_dict({"ops": {"reactor": "epoll"}})) == "epoll"
    assert reactor_for(config_from_dict({"ops": {"reactor": "uvloop"}})) == "uvloop"


def test_auto_is_uvloop_with_the_redis_location_backend() -> None:
    # redis-py's asyncio client runs on the reactor's own loop (registrar/asyncio_bridge.py)
    assert reactor_for(config_from_dict({"location": {"backend": "redis"}})) == "uvloop"
    assert reactor_for(config_from_dict({"location": {"backend": "redis"}, "ops": {"reactor": "asyncio"}})) == "asyncio"


def _served_by(tmp_path: Path, toml: str, more: str = "") -> str:
    """The reactor a fresh interpreter runs after the tap built the service tree from this config."""
    config = tmp_path / "c.toml"
    config.write_text('[sip]\nlisten = ["udp:127.0.0.1:0"]\n[location]\nbackend = "memory"\n' + toml)
    return _run(
        "from libon_tsilo.ops import tap\n"
        "opts = tap.Options()\n"
        f"opts.parseOptions(['--config', {str(config)!r}])\n"
        "tap.makeService(opts)\n"
        "from twisted.internet import reactor\n"
        "print(type(reactor).__name__)\n" + more
    )


def test_tap_installs_epoll_by_default(tmp_path: Path) -> None:
    # Twisted's epoll reactor, whose readable events on our UDP ports (and pins) skip the log context (issue 15)
    assert _served_by(tmp_path, "", "print(isinstance(reactor, __import__('twisted.internet.epollreactor')"
                                    ".internet.epollreactor.EPollReactor))\n"
                                    "from libon_tsilo.ops.reactor import running_reactor\n"
                                    "print(running_reactor())\n"
                                    "print(sorted(t.__name__ for t in reactor.lean_readers))\n"
                      ) == "LeanEPollReactor\nTrue\nepoll\n['PinReader', 'UDPPort']"


def test_tap_installs_asyncio_when_asked(tmp_path: Path) -> None:
    # our UDP port's readable events skip Twisted's per-event wrapping there too (ops/lean_asyncio.py)
    assert _served_by(tmp_path, '[ops]\nreactor = "asyncio"\n',
                      "print(sorted(t.__name__ for t in reactor.lean_readers))\n"
                      ) == "LeanAsyncioReactor\n['PinReader', 'UDPPort']"


def test_tap_installs_asyncio_over_uvloop_when_asked(tmp_path: Path) -> None:
    # the asyncio reactor, its loop uvloop's: what running_reactor() logs at start-up
    assert _served_by(tmp_path, '[ops]\nreactor = "uvloop"\n',
                      "print(type(reactor._asyncioEventloop).__module__.split('.')[0])\n"
                      "from libon_tsilo.ops.reactor import running_reactor\n"
                      "print(running_reactor())\n") == "LeanAsyncioReactor\nuvloop\nuvloop"


def test_a_reactor_from_the_command_line_is_kept() -> None:
    # `twistd -r asyncio` installs its reactor before the tap runs: the config does not swap it
    assert _run(
        "from twisted.internet import asyncioreactor; asyncioreactor.install()\n"
        "from libon_tsilo.ops.config import default_config\n"
        "from libon_tsilo.ops.reactor import install_reactor\n"
        "print(install_reactor(default_config()))\n"
    ) == "asyncio"


# -- ops/lean_epoll.py: the reactor's per-event path for our UDP port ----------------------------------


class _Received(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


def _lean_reactor_with_port(proto: DatagramProtocol, lean: bool = True) -> tuple[Any, Any]:
    from libon_tsilo.ops.lean_epoll import LeanEPollReactor
    from libon_tsilo.sip.twisted_io import UDPPort

    reactor = LeanEPollReactor()  # not installed: only its doPoll is driven
    if lean:
        reactor.lean_readers = frozenset({UDPPort})
    port = UDPPort(0, proto, "127.0.0.1", 65535, reactor)
    port.startListening()
    return reactor, port


def _poll_until(reactor: Any, done: Any) -> None:
    for _ in range(50):  # each doPoll waits (up to 1 s) for the datagram sent on loopback
        if done():
            return
        reactor.doPoll(1.0)
    raise AssertionError("the datagram never arrived")


def _send_to(port: Any, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, ("127.0.0.1", port.getHost().port))


@pytest.mark.parametrize("lean", [True, False])
def test_lean_epoll_reads_our_udp_port_without_the_log_context(monkeypatch: Any, lean: bool) -> None:
    wrapped: list[Any] = []
    real = twisted_log.callWithLogger
    monkeypatch.setattr(twisted_log, "callWithLogger", lambda s, *a, **k: (wrapped.append(s), real(s, *a, **k))[1])
    proto = _Received()
    reactor, port = _lean_reactor_with_port(proto, lean)
    try:
        _send_to(port, b"ping")
        _poll_until(reactor, lambda: proto.got)
        assert proto.got == [b"ping"]
        # our port's readable event skips callWithLogger; any other selectable keeps Twisted's path
        assert [s for s in wrapped if s is port] == ([] if lean else [port])
    finally:
        port.stopListening()
        reactor._poller.close()


def test_lean_epoll_disconnects_a_port_whose_read_fails_as_twisted_does(monkeypatch: Any) -> None:
    logged: list[Any] = []
    monkeypatch.setattr(twisted_log, "err", lambda *a, **k: logged.append(sys.exc_info()[1]))
    proto = _Received()
    reactor, port = _lean_reactor_with_port(proto)
    lost: list[Any] = []

    def broken() -> None:
        raise RuntimeError("bug in doRead")

    port.doRead = broken
    port.connectionLost = lambda reason=None: lost.append(reason)
    try:
        _send_to(port, b"ping")
        _poll_until(reactor, lambda: lost)
        assert [type(e) for e in logged] == [RuntimeError]
        assert lost[0].check(RuntimeError)  # _disconnectSelectable: the failure reaches connectionLost
    finally:
        reactor._poller.close()
        port.socket.close()
