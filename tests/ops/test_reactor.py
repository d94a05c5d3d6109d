"""ops/reactor.py and the tap: [ops] reactor picks epoll or asyncio before anything imports the reactor.

Which reactor gets installed is checked in fresh interpreters (a process installs one reactor once).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

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
    assert _served_by(tmp_path, "") == "EPollReactor"


def test_tap_installs_asyncio_when_asked(tmp_path: Path) -> None:
    assert _served_by(tmp_path, '[ops]\nreactor = "asyncio"\n') == "LeanAsyncioReactor"


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
