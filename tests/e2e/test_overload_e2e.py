"""Overload control end to end (issue 11, item 13), on the real twistd process over UDP.

The overload is forced cheaply and deterministically with ``[overload] max_transactions = 1``: the
OPTIONS that proc.py sends to see the server up leaves its transaction in Completed for 64*T1, so
the work queue is "deep" from the first tick on. The test waits on the admin RPC until no new
INVITE is admitted any more, then checks with a small UA (no SIPp) that a new INVITE gets a 503
with Retry-After and no 100 Trying (no transaction: the same To tag on a retransmission), over UDP
(the transport's early path) and over TCP (the transaction layer's gate), while REGISTER and
OPTIONS still get 200 and no call was created. The heavy 2x-capacity run is
bench/overload.py, not a test.
"""

from __future__ import annotations

import socket
import urllib.request
import uuid

from tests.waiting import wait_until
from tests.e2e.proc import HOST, ServerProcess, admin_rpc, free_port
from tests.e2e.test_registrar_e2e import Reply, SipClient, parse


def invite(server: ServerProcess, port: int, branch: str, call_id: str, transport: str = "UDP") -> bytes:
    return (
        f"INVITE sip:bob@{HOST}:{server.sip_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {HOST}:{port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:caller@{HOST}:{port}>;tag=c1\r\n"
        f"To: <sip:bob@{HOST}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:caller@{HOST}:{port}>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def ack(server: ServerProcess, port: int, branch: str, call_id: str, to_tag: str) -> bytes:
    return (
        f"ACK sip:bob@{HOST}:{server.sip_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:caller@{HOST}:{port}>;tag=c1\r\n"
        f"To: <sip:bob@{HOST}>;tag={to_tag}\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 ACK\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def first_reply(sock: socket.socket) -> Reply:
    sock.settimeout(5.0)
    data, _ = sock.recvfrom(65535)
    reply = parse(data)
    assert isinstance(reply, Reply), data
    return reply


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    wait_until(predicate, timeout, what)


def test_new_invites_get_503_while_register_and_options_get_200(start_sip_server):
    admin_port = free_port(udp_too=False)
    server = start_sip_server(
        {
            "auth": {"enabled": False},
            "admin": {"listen": f"tcp:{admin_port}:interface={HOST}"},
            "overload": {"max_transactions": 1, "retry_after": 3},
        },
        tls=False,
    )
    wait_for(lambda: admin_rpc(server, "stats")["overload"]["admitted_fraction"] == 0.0,
             "overload control to admit no new INVITE")
    assert admin_rpc(server, "stats")["overload"]["state"] == "overloaded"

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        branch, call_id = "z9hG4bK" + uuid.uuid4().hex[:12], uuid.uuid4().hex
        sock.sendto(invite(server, port, branch, call_id), (HOST, server.sip_port))
        refused = first_reply(sock)  # the first answer: a stateful INVITE would get 100 Trying first
        assert refused.status == 503, refused.raw
        assert refused.first("Retry-After") == "3"
        to_tag = refused.first("To").split("tag=")[1]
        sock.sendto(invite(server, port, branch, call_id), (HOST, server.sip_port))  # retransmission
        again = first_reply(sock)
        assert again.status == 503 and again.first("To").split("tag=")[1] == to_tag
        sock.sendto(ack(server, port, branch, call_id, to_tag), (HOST, server.sip_port))

    # over TCP the refusal comes from the transaction layer's gate (the early path is UDP's)
    tcp = SipClient(server, transport="tcp")
    try:
        tcp.send(invite(server, tcp.port, "z9hG4bK" + uuid.uuid4().hex[:12], uuid.uuid4().hex, "TCP"))
        refused = tcp.receive()
        assert isinstance(refused, Reply) and refused.status == 503, refused.raw
        assert refused.first("Retry-After") == "3"
    finally:
        tcp.close()

    client = SipClient(server)
    try:
        assert client.register("alice").status == 200
        options = client._transaction(
            (f"OPTIONS sip:{HOST}:{server.sip_port} SIP/2.0\r\n"
             f"Via: SIP/2.0/UDP {HOST}:{client.port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
             f"Max-Forwards: 70\r\nFrom: <sip:probe@{HOST}>;tag=p1\r\nTo: <sip:{HOST}>\r\n"
             f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode())
        assert options.status == 200
    finally:
        client.close()

    stats = admin_rpc(server, "stats")
    assert stats["overload"]["shed"] == 3
    assert stats["calls"]["calls"] == 0 and stats["calls"].get("total_calls", 0) == 0
    assert stats["tsilo"]["stored_transactions"] == 0
    # the UDP INVITE and its ACK never went further than the early path; no INVITE reached the router
    assert stats["sip"]["requests_in"].get("INVITE", 0) == 0
    assert stats["sip"]["requests_in"].get("ACK", 0) == 0
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert "libon_tsilo_overloaded 1.0" in metrics
    assert "libon_tsilo_overload_rejected_invites_total 3.0" in metrics
    assert "overload: queue depth" in server.output()


def options(client: SipClient, server: ServerProcess) -> bytes:
    return (f"OPTIONS sip:{HOST}:{server.sip_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/{client.via_transport} {HOST}:{client.port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@{HOST}>;tag=p1\r\nTo: <sip:{HOST}>\r\n"
            f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()


def test_the_lag_timer_parks_while_idle_and_a_message_on_udp_or_tcp_restarts_it(start_sip_server):
    # the real twistd: the detector's timer stops once no message comes (the admin API is not SIP,
    # so polling it does not wake it), and one OPTIONS over UDP, then over TCP, starts it again:
    # each is seen as a park more once it stopped again
    admin_port = free_port(udp_too=False)
    server = start_sip_server({"admin": {"listen": f"tcp:{admin_port}:interface={HOST}"}}, tls=False)

    def parks() -> int:
        return admin_rpc(server, "stats")["overload"]["parks"]

    wait_for(lambda: parks() >= 1, "the overload timer to park on an idle server")
    for transport in ("udp", "tcp"):
        before = parks()
        client = SipClient(server, transport=transport)
        try:
            client.send(options(client, server))
            reply = client.receive()
            assert isinstance(reply, Reply) and reply.status == 200, reply.raw
        finally:
            client.close()
        wait_for(lambda: parks() > before, f"the timer, re-armed by a {transport} message, to park again")
    assert admin_rpc(server, "stats")["overload"]["state"] == "normal"
