"""Connection limits against the real server (twistd): slowloris, a TLS client that never says hello,
the per-source cap, and UDP flows of sources that never registered. Plain sockets as clients (no
SIPp: the attacks are about bytes that never make a message); every wait ends on a socket event or
on a server counter read from the admin API (/rpc/stats), never on a fixed sleep."""

from __future__ import annotations

import select
import socket
import time
import uuid
from typing import Any

from tests.e2e.proc import HOST, admin_rpc, free_port
from tests.waiting import wait_until

AUTH_OFF = {"auth": {"enabled": False}}


def admin() -> dict[str, dict[str, Any]]:
    return {"admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"}}


def connections(server) -> dict[str, Any]:
    return admin_rpc(server, "stats")["connections"]


def register(transport: str, local_port: int, user: str, server_port: int) -> bytes:
    return (
        f"REGISTER sip:{HOST}:{server_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} {HOST}:{local_port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@{HOST}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{user}@{HOST}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{user}@{HOST}:{local_port};transport={transport}>\r\n"
        "Expires: 600\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def options(transport: str, local_port: int, server_port: int) -> bytes:
    return (
        f"OPTIONS sip:{HOST}:{server_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} {HOST}:{local_port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@{HOST}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{HOST}:{server_port}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def ask(sock: socket.socket, data: bytes, timeout: float = 5.0) -> bytes:
    """Send one request on a stream socket and return the status line of its answer."""
    sock.settimeout(timeout)
    sock.sendall(data)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65535)
        if not chunk:
            raise ConnectionError(f"server closed the connection; got {buf!r}")
        buf += chunk
    return buf.split(b"\r\n", 1)[0]


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed (or reset) the connection; never blocks."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(65535) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_slowloris_connections_are_closed_while_a_normal_client_registers(start_sip_server):
    server = start_sip_server({**AUTH_OFF, **admin(),
                               "connections": {"message_timeout": 2, "tls_handshake_timeout": 1}})
    started = time.monotonic()
    # 50 connections trickle a request, one byte at a time, that never ends
    attack = options("tcp", 5999, server.sip_port)
    slow = [socket.create_connection((HOST, server.sip_port)) for _ in range(50)]
    # and one that connects to the TLS port and never says hello
    mute_tls = socket.create_connection((HOST, server.tls_port))
    open_ = set(range(len(slow)))
    sent = 0
    registered = None
    while open_ and time.monotonic() - started < 20:
        for i in list(open_):
            if closed_by_peer(slow[i]):
                open_.discard(i)
                continue
            try:
                slow[i].send(attack[sent % (len(attack) - 4): sent % (len(attack) - 4) + 1])
            except OSError:
                open_.discard(i)
        sent += 1
        if registered is None and sent == 3:
            # meanwhile, a normal client registers over TCP and over UDP
            device = socket.create_connection((HOST, server.sip_port))
            reply = ask(device, register("tcp", device.getsockname()[1], "alice", server.sip_port))
            assert reply == b"SIP/2.0 200 OK", reply
            registered = device
        time.sleep(0.1)  # the attacker's pace: a byte per connection every 100 ms
    elapsed = time.monotonic() - started
    assert not open_, f"{len(open_)} slowloris connections still open after {elapsed:.1f} s"
    assert elapsed < 15
    wait_until(lambda: closed_by_peer(mute_tls), 10, "the TLS connection without a handshake to be closed")
    closed = connections(server)["closed"]
    assert closed.get("message_timeout") == 50, closed
    assert closed.get("tls_handshake_timeout") == 1, closed
    # the registered client's connection was never at risk, and still works
    assert ask(registered, options("tcp", registered.getsockname()[1], server.sip_port)) == b"SIP/2.0 200 OK"
    for sock in [*slow, mute_tls, registered]:
        sock.close()


def test_per_source_cap_refuses_the_extra_connection(start_sip_server):
    server = start_sip_server({**AUTH_OFF, **admin(), "connections": {"max_connections_per_source": 3}},
                              tls=False)
    kept = [socket.create_connection((HOST, server.sip_port)) for _ in range(3)]
    for sock in kept:
        assert ask(sock, options("tcp", sock.getsockname()[1], server.sip_port)) == b"SIP/2.0 200 OK"
    extra = socket.create_connection((HOST, server.sip_port))
    extra.settimeout(5)
    try:
        got = extra.recv(100)  # the server closes it at accept, without a byte
    except ConnectionResetError:
        got = b""
    assert got == b""
    stats = connections(server)
    assert stats["refused"] == {"max_connections_per_source": 1} and stats["inbound"] == 3
    # another source address is not affected
    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.connect((HOST, server.sip_port))
    assert ask(other, options("tcp", other.getsockname()[1], server.sip_port)) == b"SIP/2.0 200 OK"
    # a closed connection frees its slot
    kept.pop().close()
    wait_until(lambda: connections(server)["inbound"] == 3, 5, "the closed connection to be counted out")
    again = socket.create_connection((HOST, server.sip_port))
    assert ask(again, options("tcp", again.getsockname()[1], server.sip_port)) == b"SIP/2.0 200 OK"
    for sock in [*kept, extra, other, again]:
        sock.close()


def test_udp_sources_that_never_registered_are_forgotten_and_a_device_is_not(start_sip_server):
    server = start_sip_server({**AUTH_OFF, **admin(), "connections": {"unbound_idle_timeout": 2}}, tls=False)
    device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    device.bind((HOST, 0))
    device.settimeout(5)
    device.sendto(register("udp", device.getsockname()[1], "bob", server.sip_port), (HOST, server.sip_port))
    assert device.recv(65535).startswith(b"SIP/2.0 200 ")
    for i in range(30):  # sources that send one request and are never heard of again
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((f"127.3.0.{i + 1}", 5999))
            s.sendto(options("udp", 5999, server.sip_port), (HOST, server.sip_port))
    wait_until(lambda: connections(server)["udp_flows"] >= 31, 5, "the flows of 30 sources")
    wait_until(lambda: connections(server)["udp_flows"] == 1, 15, "unregistered UDP flows to expire")
    [binding] = admin_rpc(server, f"ul.lookup?aor=sip%3Abob%40{HOST}")["bindings"]
    assert binding["flow_live"] is True  # the device's flow is the one left
    device.close()
