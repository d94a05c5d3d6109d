"""End-to-end fixtures: the real server as a subprocess (tests/e2e/proc.py).

`sip_server` starts one server per test on free loopback ports with UDP, TCP and TLS listeners.
`start_sip_server(extra=..., env=...)` starts servers with config overrides. At teardown each
server gets SIGTERM and must exit cleanly without having logged a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.proc import ServerProcess, start_server


@pytest.fixture
def start_sip_server(tmp_path, test_certs) -> Iterator[Callable[..., ServerProcess]]:
    servers: list[ServerProcess] = []

    def start(extra: dict[str, dict[str, Any]] | None = None, env: dict[str, str] | None = None,
              tls: bool = True, **kwargs: Any) -> ServerProcess:
        directory = tmp_path / f"server{len(servers)}"
        directory.mkdir()
        server = start_server(directory, extra, env, certs=test_certs if tls else None, **kwargs)
        servers.append(server)
        return server

    yield start
    problems = []
    for server in servers:
        code = server.stop()
        # our SIGTERM handler (ops/shutdown.py) drains, then stops the reactor: exit status 0
        if code != 0:
            problems.append(f"server exited with {code} on SIGTERM")
        if server.tracebacks():
            problems.append("server logged unhandled errors")
        if problems:
            pytest.fail("; ".join(problems) + "\n" + server.output())


@pytest.fixture
def sip_server(start_sip_server) -> ServerProcess:
    return start_sip_server()
