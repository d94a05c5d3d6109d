"""RFC 5626 outbound against the real twistd: REGISTER with Require: outbound, one INVITE per device
instance over its newest live flow, and a device whose connection is gone answered 480, not 500.

The devices are raw sockets driven by the small client of test_registrar_e2e (SipClient).
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

from tests.e2e.proc import HOST, ServerProcess, admin_rpc, free_port
from tests.e2e.test_registrar_e2e import (  # noqa: F401
    NO_AUTH,
    SDP,
    Reply,
    Request,
    SipClient,
    _respond,
)
from tests.e2e import test_registrar_e2e
from tests.waiting import wait_until

servers = test_registrar_e2e.servers  # the fixture: twistd processes stopped and checked at teardown

def config() -> dict[str, Any]:
    return {**NO_AUTH, "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"}}


INSTANCE = '+sip.instance="<urn:uuid:0c1d2e3f-0000-4000-8000-00000000f00d>"'


def ob_contact(client: SipClient, reg_id: int) -> str:
    return f"<sip:dave@{HOST}:{client.port};transport=tcp;ob>;{INSTANCE};reg-id={reg_id}"


def send_invite(caller: SipClient, server: ServerProcess, user: str) -> dict[str, str]:
    call_id = uuid.uuid4().hex
    dialog = {
        "via": f"Via: SIP/2.0/UDP {HOST}:{caller.port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport",
        "from": f"From: <sip:erin@{HOST}>;tag=callertag",
        "call_id": call_id,
        "ruri": f"sip:{user}@{HOST}:{server.sip_port}",
    }
    caller.send("\r\n".join([
        f"INVITE {dialog['ruri']} SIP/2.0", dialog["via"], "Max-Forwards: 70", dialog["from"],
        f"To: <sip:{user}@{HOST}>", f"Call-ID: {call_id}", "CSeq: 1 INVITE",
        f"Contact: <sip:erin@{HOST}:{caller.port}>", "Content-Type: application/sdp",
        f"Content-Length: {len(SDP)}", "", SDP,
    ]).encode())
    return dialog


def final_reply(caller: SipClient, timeout: float = 10.0) -> Reply:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = caller.receive(timeout=deadline - time.monotonic())
        if isinstance(message, Reply) and message.status >= 200:
            return message
    raise AssertionError("no final response")


def ack(caller: SipClient, dialog: dict[str, str], final: Reply) -> None:
    caller.send("\r\n".join([
        f"ACK {dialog['ruri']} SIP/2.0", dialog["via"], "Max-Forwards: 70", dialog["from"],
        f"To: {final.first('To')}", f"Call-ID: {dialog['call_id']}", "CSeq: 1 ACK", "Content-Length: 0", "", "",
    ]).encode())


def live_reg_ids(server: ServerProcess) -> set[int]:
    bindings = admin_rpc(server, "ul.dump")["aors"].get(f"sip:dave@{HOST}", [])
    return {b["reg_id"] for b in bindings if b["flow_live"]}


def test_require_outbound_register_gets_require_and_flow_timer(servers):
    server = servers.start(config())
    device = SipClient(server, "tcp")
    try:
        reply = device.register("dave", contact=ob_contact(device, 1),
                                extra=["Require: outbound", "Supported: outbound, path"])
        assert reply.status == 200, reply.raw  # was 420 Bad Extension
        assert reply.first("Require") == "outbound", reply.raw
        assert reply.first("Flow-Timer") == "120", reply.raw
    finally:
        device.close()


def test_device_with_two_flows_is_rung_once_over_its_newest_live_flow(servers):
    server = servers.start(config())
    flows = {reg_id: SipClient(server, "tcp") for reg_id in (1, 2, 3)}
    caller = SipClient(server, "udp")
    try:
        for reg_id, client in flows.items():
            reply = client.register("dave", contact=ob_contact(client, reg_id), extra=["Supported: outbound"])
            assert reply.status == 200, reply.raw
        # the newest flow's connection goes away: the branch takes the newest live one (reg-id 2)
        flows[3].close()
        wait_until(lambda: live_reg_ids(server) == {1, 2}, what="both flows of dave live")
        dialog = send_invite(caller, server, "dave")
        invite = flows[2].receive(timeout=5)
        assert isinstance(invite, Request) and invite.method == "INVITE", invite.raw
        flows[2].send(_respond(invite, 486, "Busy Here", "devtag"))
        # one branch only: the device's 486 is the caller's answer at once (with a second branch
        # on reg-id 1 still ringing, no final response would come)
        final = final_reply(caller)
        assert final.status == 486, final.raw
        ack(caller, dialog, final)
    finally:
        for client in flows.values():
            client.close()
        caller.close()


def test_device_whose_connection_is_gone_gets_the_caller_480(servers):
    server = servers.start(config())
    # the Contact names a port where nobody listens: the server cannot reach the device any more
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind((HOST, 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    device = SipClient(server, "tcp")
    caller = SipClient(server, "udp")
    try:
        reply = device.register("dave", contact=f"<sip:dave@{HOST}:{dead_port};transport=tcp>")
        assert reply.status == 200, reply.raw
        device.close()
        wait_until(lambda: admin_rpc(server, "ul.dump")["aors"][f"sip:dave@{HOST}"][0]["flow_live"] is False,
                   what="the server to see dave's flow closed")
        dialog = send_invite(caller, server, "dave")
        final = final_reply(caller)
        assert final.status == 480, final.raw  # was 500: a local 503 relayed as a crash
        ack(caller, dialog, final)
    finally:
        caller.close()


def test_stun_binding_request_on_the_sip_udp_port(servers):
    # RFC 5626 §4.4.2 / §8.4: the keep-alive of a UDP outbound device, multiplexed on the SIP port
    server = servers.start(config())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((HOST, 0))
        sock.settimeout(5)
        port = sock.getsockname()[1]
        tid = uuid.uuid4().bytes[:12]
        sock.sendto(bytes.fromhex("000100002112a442") + tid, (HOST, server.sip_port))
        data, _ = sock.recvfrom(2048)
        mapped = bytes([0, 1, (port >> 8) ^ 0x21, (port & 0xFF) ^ 0x12, 127 ^ 0x21, 0 ^ 0x12, 0 ^ 0xA4, 1 ^ 0x42])
        assert data == bytes.fromhex("0101000c2112a442") + tid + bytes.fromhex("00200008") + mapped
        # the server still speaks SIP on that port afterwards
        client = SipClient(server, "udp")
        try:
            assert client.register("dave").status == 200
        finally:
            client.close()
    finally:
        sock.close()


def test_flow_closing_while_ringing_moves_the_branch_to_the_other_flow(servers):
    server = servers.start(config())
    flows = {reg_id: SipClient(server, "tcp") for reg_id in (1, 2)}
    caller = SipClient(server, "udp")
    try:
        for reg_id, client in flows.items():
            reply = client.register("dave", contact=ob_contact(client, reg_id), extra=["Supported: outbound"])
            assert reply.status == 200, reply.raw
        dialog = send_invite(caller, server, "dave")
        first = flows[2].receive(timeout=5)
        assert isinstance(first, Request) and first.method == "INVITE", first.raw
        flows[2].close()  # the phone leaves Wi-Fi while it rings
        second = flows[1].receive(timeout=5)
        assert isinstance(second, Request) and second.method == "INVITE", second.raw
        assert second.first("Call-ID") != first.first("Call-ID")
        flows[1].send(_respond(second, 486, "Busy Here", "devtag"))
        final = final_reply(caller)
        assert final.status == 486, final.raw
        ack(caller, dialog, final)
        wait_until(lambda: admin_rpc(server, "stats")["calls"]["calls"] == 0, what="no call left")
        assert admin_rpc(server, "stats")["calls"]["total_flow_failovers"] == 1
    finally:
        for client in flows.values():
            client.close()
        caller.close()
