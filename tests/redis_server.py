"""A real redis-server for the tests that need one (no mock of Redis anywhere).

Use the ``redis_server`` fixture (registered in tests/conftest.py, so unit and e2e tests alike can
ask for it): it starts ``redis-server`` on 127.0.0.1 with an OS-picked free port, no RDB snapshots
and no AOF (a dir in tmp_path), waits until it answers PING, and stops it after the test::

    def test_something(redis_server: RedisServer) -> None:
        url = redis_server.url            # "redis://127.0.0.1:<port>/0"
        redis_server.stop()               # "Redis down": the port is refused from now on
        redis_server.start()              # "Redis restarted" on the same port, empty
        redis_server.restart()            # both

Data does not survive stop/start (``--save ''``): a restart is a Redis that lost everything,
the hard case for a resync. ``redis_server.cli("SET", "k", "v")`` runs one command with
redis-cli-free raw RESP (no client library needed by e2e tests). ``redis_server.password`` is
set when the fixture is built with ``password=`` (see ``RedisServer``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "redis_server"]

HOST = "127.0.0.1"
READY_TIMEOUT = 10.0


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _resp(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer:
    """One redis-server process on a fixed loopback port, restartable on that port."""

    def __init__(self, directory: Path, password: str = "", port: int = 0, extra_args: tuple[str, ...] = ()) -> None:
        self.dir = directory
        self.port = port or _free_tcp_port()  # benchmarks pass a port of their own range
        self.password = password
        self.extra_args = extra_args  # more redis-server options, e.g. ("--rename-command", "HELLO", "")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def start(self) -> None:
        if self.proc is not None:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (./scripts/test installs it)")
        args = [
            binary, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--daemonize", "no", "--loglevel", "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 (kept open by the child)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if self.cli("PING") == b"+PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = (self.dir / "redis.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{output}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill it (SIGKILL: Redis down as after a crash); the port is refused until start()."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str | bytes) -> bytes:
        """Send one command, return the first reply line (e.g. b"+PONG", b":3"); raises OSError when
        the server is unreachable."""
        with socket.create_connection((HOST, self.port), timeout=2.0) as sock:
            if self.password:
                sock.sendall(_resp("AUTH", self.password))
                self._line(sock)
            sock.sendall(_resp(*args))
            return self._line(sock)

    @staticmethod
    def _line(sock: socket.socket) -> bytes:
        buf = b""
        while not buf.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("redis closed the connection")
            buf += chunk
        return buf.split(b"\r\n", 1)[0]


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server per test; see the module doc."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
