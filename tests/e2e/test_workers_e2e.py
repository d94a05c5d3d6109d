"""Two real twistd workers on one public SIP port ([cluster] reuse_port, SO_REUSEPORT).

Both bind the same UDP and TCP port; the kernel spreads UDP sources and TCP connections over them by
a hash of the 4-tuple, so requests from many source ports reach both workers. Which worker answered
is read from each worker's own counters (admin RPC ``stats``), never guessed from timing. Workers
share the bindings through a real redis-server (tests/redis_server.py): each one's ``ul.dump`` lists
every binding with the worker (``node``) its REGISTER landed on. With one worker stopped, the other
answers everything. No SIPp here: plain sockets (tests/e2e/proc.py, tests/e2e/regload.py).
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.proc import (
    HOST,
    ServerProcess,
    admin_rpc,
    free_port,
    options_request,
    start_server,
    stream_options,
)
from tests.e2e.regload import exchange, register_bytes
from tests.redis_server import RedisServer
from tests.waiting import wait_until

SOURCES = 24  # P(all on one worker) = 2 * 2**-24 with a fair hash


def _worker(tmp_path: Path, n: int, sip_port: int, redis_url: str) -> ServerProcess:
    directory = tmp_path / f"worker{n}"
    directory.mkdir()
    location = {"backend": "redis", "url": redis_url, "key_prefix": f"{tmp_path.name}:"}
    extra = {
        "sip": {"listen": [f"udp:{HOST}:{sip_port}", f"tcp:{HOST}:{sip_port}"]},
        "cluster": {"reuse_port": True, "node_id": f"w{n}"},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
        "location": location,
        "auth": {"enabled": False},
    }
    server = start_server(directory, extra, wait_ready=False)
    server.sip_port = sip_port
    deadline = time.monotonic() + 20
    while True:  # ready once its admin API answers (a SIP probe could land on the other worker)
        if not server.alive():
            raise RuntimeError(f"worker {n} exited with {server.proc.returncode}\n{server.output()}")
        try:
            admin_rpc(server, "health")
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.05)  # polling for readiness, not a negative check


@pytest.fixture
def workers(tmp_path, redis_server: RedisServer):
    # reuse_port needs the shared store: workers get any device's REGISTER and any call
    sip_port = free_port()
    started: list[ServerProcess] = []
    try:
        for n in (1, 2):
            started.append(_worker(tmp_path, n, sip_port, redis_server.url))
        for w in started:
            wait_until(lambda w=w: admin_rpc(w, "stats")["usrloc"]["redis"]["up"], 10, "the worker's redis store")
        yield started
    finally:
        for server in started:
            code = server.stop()
            assert code == 0, server.output()
            assert not server.tracebacks(), server.output()


def _requests_in(server: ServerProcess, method: str) -> int:
    return admin_rpc(server, "stats").get("sip", {}).get("requests_in", {}).get(method, 0)


def _udp_options_from_new_sources(port: int, count: int) -> None:
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((HOST, 0))
            sock.settimeout(5)
            sock.sendto(options_request(HOST, port, sock.getsockname()[1]), (HOST, port))
            answer, _ = sock.recvfrom(65535)
            assert answer.startswith(b"SIP/2.0 200 "), answer


def test_both_workers_bind_the_public_port_and_answer_udp_and_tcp(workers) -> None:
    w1, w2 = workers
    port = w1.sip_port
    assert admin_rpc(w1, "health")["listening"] == admin_rpc(w2, "health")["listening"]
    assert (admin_rpc(w1, "stats")["node"], admin_rpc(w2, "stats")["node"]) == ("w1", "w2")

    before = [_requests_in(w, "OPTIONS") for w in workers]
    _udp_options_from_new_sources(port, SOURCES)
    udp = [_requests_in(w, "OPTIONS") - b for w, b in zip(workers, before)]
    assert sum(udp) == SOURCES and min(udp) > 0, udp

    for _ in range(SOURCES):  # each connection is one 4-tuple: the kernel picks a worker per accept
        answers = stream_options(HOST, port, count=1)
        assert answers[0].startswith(b"SIP/2.0 200 "), answers
    tcp = [_requests_in(w, "OPTIONS") - b - u for w, b, u in zip(workers, before, udp)]
    assert sum(tcp) == SOURCES and min(tcp) > 0, tcp


def test_every_worker_lists_every_workers_bindings_with_their_node(workers) -> None:
    w1, w2 = workers
    port = w1.sip_port
    for i in range(SOURCES):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((HOST, 0))
            status, _ = exchange(port, register_bytes(port, sock.getsockname()[1], f"r{i}", uuid.uuid4().hex), sock)
            assert status == 200

    def both_complete() -> bool:
        return all(admin_rpc(w, "ul.dump")["binding_count"] == SOURCES for w in workers)

    wait_until(both_complete, 10, "every binding in both workers' replicas")
    dumps = [admin_rpc(w, "ul.dump") for w in workers]
    assert [d["node"] for d in dumps] == ["w1", "w2"]
    assert dumps[0]["nodes"] == dumps[1]["nodes"]
    per_node = dumps[0]["nodes"]
    # each binding names the worker its REGISTER landed on: both took some, none was lost
    assert set(per_node) == {"w1", "w2"} and sum(per_node.values()) == SOURCES, per_node
    nodes_of = {aor: [b["node"] for b in bindings] for aor, bindings in dumps[1]["aors"].items()}
    assert nodes_of == {aor: [b["node"] for b in bindings] for aor, bindings in dumps[0]["aors"].items()}


def test_the_surviving_worker_answers_everything(workers) -> None:
    w1, w2 = workers
    port = w1.sip_port
    assert w1.stop() == 0
    before = _requests_in(w2, "OPTIONS")
    _udp_options_from_new_sources(port, SOURCES)
    assert _requests_in(w2, "OPTIONS") - before == SOURCES
