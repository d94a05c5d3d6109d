"""Calls out through a trunk, end to end (issue 13, "Calls out"), on the real twistd process.

- the trunk is a SIPp UAS (trunk_auth_answer.xml): it checks the R-URI carries the normalised
  number, challenges with 401, checks our digest answer (verifyauth), answers 200 and gets the BYE;
- the device calling out is a SIPp UAC with digest (caller_auth_spoofed_pai.xml, -au/-ap) dialling
  "+33-1-23-45-67-89" (the visual separators of RFC 3966) from alice, whose number is set with
  ``libon-tsilo-admin user set alice --number``;
- an unauthenticated caller (a From of another domain: not ours to challenge) and a trusted source
  (a gateway) get 403 and the trunk gets nothing: the trunk SIPp (-m 1) then takes the next,
  authenticated call, and its trace shows that call's INVITEs only;
- failover: the first target (trunk_503.xml) answers 503, the second one takes the call.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, admin_rpc, free_port, log_events
from tests.e2e.sipp import Sipp, sipp_available
from tests.e2e.test_calls_sipp import assert_caller_ok, assert_no_leaked_state, procs  # noqa: F401
from tests.e2e.test_registrar_e2e import ADMIN, Reply, add_user, parse

pytestmark = pytest.mark.skipif(not sipp_available(), reason="sipp is missing (package sip-tester)")

DIALLED = "+33-1-23-45-67-89"
ALICE_NUMBER = "+33611111111"


def _config(targets: list[int], trusted: list[str] | None = None, transport: str = "udp") -> dict:
    return {
        "location": {"backend": "memory"},
        "calls": {"ring_timeout": 5, "invite_cancel_grace": 0},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}", "metrics_public": True},
        "auth": {"enabled": True, "algorithms": ["MD5"], "trusted_sources": trusted or []},
        "log": JSON_LOG,
        "dialplan": {"country_code": "33"},
        "trunks": [{
            "name": "carrier", "targets": [f"sip:{HOST}:{port};transport={transport}" for port in targets],
            "username": "acct", "password": "trunk-pw", "realm": "trunk.example", "from_domain": "voip.example",
            "pai": True, "headers": ["X-Account: 42"],
        }],
        "routes": [{"prefix": "+33", "trunk": "carrier"}],
    }


def _set_number(server: ServerProcess, user: str, number: str) -> None:
    proc = subprocess.run([str(ADMIN), "--config", str(server.config_path), "user", "set", user, "--number", number],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr


def _invite_final(server: ServerProcess, ruri_user: str, from_uri: str) -> Reply:
    """One INVITE over UDP from a plain client (no credentials); its final response, ACKed."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        branch, tag, call_id = f"z9hG4bK{uuid.uuid4().hex[:12]}", uuid.uuid4().hex[:8], uuid.uuid4().hex
        ruri = f"sip:{ruri_user}@{HOST}:{server.sip_port};user=phone"
        head = [f"Via: SIP/2.0/UDP {HOST}:{port};branch={branch};rport", "Max-Forwards: 70",
                f"From: <{from_uri}>;tag={tag}"]
        invite = "\r\n".join([f"INVITE {ruri} SIP/2.0", *head, f"To: <{ruri}>", f"Call-ID: {call_id}",
                              "CSeq: 1 INVITE", f"Contact: <sip:x@{HOST}:{port}>", "Content-Length: 0", "", ""])
        deadline = time.monotonic() + 10
        sock.sendto(invite.encode(), (HOST, server.sip_port))
        while time.monotonic() < deadline:
            sock.settimeout(0.5)
            try:
                reply = parse(sock.recvfrom(65535)[0])
            except TimeoutError:
                sock.sendto(invite.encode(), (HOST, server.sip_port))
                continue
            if isinstance(reply, Reply) and reply.status >= 200:
                ack = "\r\n".join([f"ACK {ruri} SIP/2.0", *head, f"To: {reply.first('To')}", f"Call-ID: {call_id}",
                                   "CSeq: 1 ACK", "Content-Length: 0", "", ""])
                sock.sendto(ack.encode(), (HOST, server.sip_port))
                return reply
    raise AssertionError(f"no final answer to\n{invite}\n{server.output()[-4000:]}")


def _call_out(procs, server, tmp_path) -> Sipp:  # noqa: F811
    caller = Sipp(server, "caller_auth_spoofed_pai.xml", tmp_path, service=DIALLED, pause_ms=200,
                  keys={"from_user": "alice", "from_host": HOST}, extra_args=["-au", "alice", "-ap", "secret"])
    procs.append(caller)
    return caller


def _invites(trunk: Sipp) -> list[str]:
    """The INVITEs the trunk SIPp received, as traced (start line and headers)."""
    text = trunk.messages()
    out = []
    start = text.find("INVITE sip:")
    while start >= 0:
        out.append(text[start:text.find("\n\n", start)])
        start = text.find("INVITE sip:", start + 1)
    return out


def _header(message: str, name: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in message.splitlines() if line.lower().startswith(name.lower() + ":")]


def _metrics(server: ServerProcess) -> str:
    port = int(server.sections["admin"]["listen"].split(":")[1])
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_authenticated_device_calls_a_number_through_the_trunk(start_sip_server, procs, tmp_path):  # noqa: F811
    trunk_port = free_port(udp_too=True)
    server = start_sip_server(extra=_config([trunk_port]), tls=False)
    trunk = Sipp(server, "trunk_auth_answer.xml", tmp_path, calls=1, timeout_s=60.0, local_port=trunk_port)
    procs.append(trunk)
    add_user(server, "alice", "secret")
    _set_number(server, "alice", "06 11 11 11 11")  # stored in E.164 after the [dialplan]

    # refused before any trunk is tried: a caller of another domain (not ours to authenticate)...
    outsider = _invite_final(server, DIALLED, "sip:eve@evil.example")
    assert (outsider.status, outsider.reason) == (403, "Calls Out Need Authentication")
    # ... and one of ours without credentials is challenged first
    assert _invite_final(server, DIALLED, f"sip:alice@{HOST}").status == 407

    caller = _call_out(procs, server, tmp_path)
    assert_caller_ok(caller, server)
    assert trunk.wait(30) == 0, trunk.explain()
    assert [line for line in trunk.logs() if line in ("RURI-OK", "AUTH-OK", "AUTH-BAD", "HUNG-UP")] == [
        "RURI-OK", "AUTH-OK", "HUNG-UP"], trunk.explain()
    first, second = _invites(trunk)  # the refused attempts sent the trunk nothing
    assert first.startswith(f"INVITE sip:+33123456789@{HOST}:{trunk_port};user=phone SIP/2.0"), first
    assert _header(second, "Authorization") and _header(second, "CSeq") == ["2 INVITE"], second
    assert _header(first, "Call-ID") == _header(second, "Call-ID")
    assert _header(second, "P-Asserted-Identity") == [f"<sip:{ALICE_NUMBER}@voip.example;user=phone>"], second
    assert _header(second, "From")[0].startswith(f"<sip:{ALICE_NUMBER}@voip.example>;tag="), second
    assert _header(second, "X-Account") == ["42"], second
    assert "Your Bank" not in second and "bank.example" not in second, second

    [cdr] = [e for e in log_events(server, "libon_tsilo.b2bua.call") if e.get("cdr")]
    assert (cdr["trunk"], cdr["callee"], cdr["reason"]) == ("carrier", "tel:+33123456789", "BYE from the caller")
    assert cdr["answer"] is not None and cdr["duration"] >= 0
    metrics = _metrics(server)
    assert 'libon_tsilo_limit_hits_total{limit="call_out_unauthenticated"} 1.0' in metrics, metrics
    assert_no_leaked_state(server, expected_calls=1)


def test_a_trusted_gateway_cannot_call_out(start_sip_server, procs, tmp_path):  # noqa: F811
    trunk_port = free_port(udp_too=True)
    server = start_sip_server(extra=_config([trunk_port], trusted=["127.0.0.0/8"]), tls=False)
    refused = _invite_final(server, DIALLED, "sip:gw@carrier-in.example")
    assert refused.status == 403
    refused = _invite_final(server, DIALLED, f"sip:alice@{HOST}")  # even spelling one of our users
    assert refused.status == 403
    metrics = _metrics(server)
    assert 'libon_tsilo_limit_hits_total{limit="call_out_from_gateway"} 2.0' in metrics, metrics
    assert admin_rpc(server, "stats")["calls"]["total_calls"] == 0  # no call was ever placed


def test_failover_from_a_503_target_to_the_next(start_sip_server, procs, tmp_path):  # noqa: F811
    down_port, up_port = free_port(udp_too=True), free_port(udp_too=True)
    server = start_sip_server(extra=_config([down_port, up_port]), tls=False)
    down = Sipp(server, "trunk_503.xml", tmp_path, calls=1, timeout_s=60.0, local_port=down_port)
    up = Sipp(server, "trunk_auth_answer.xml", tmp_path, calls=1, timeout_s=60.0, local_port=up_port)
    procs.extend((down, up))
    add_user(server, "alice", "secret")
    caller = _call_out(procs, server, tmp_path)
    assert_caller_ok(caller, server)
    assert down.wait(30) == 0, down.explain()
    assert up.wait(30) == 0, up.explain()
    assert down.log_lines("REFUSED-503") == ["REFUSED-503"], down.explain()
    assert "AUTH-OK" in up.logs(), up.explain()
    # alice has no number: the From carries her user name
    assert _header(_invites(up)[0], "From")[0].startswith("<sip:alice@voip.example>;tag=")
    assert_no_leaked_state(server, expected_calls=1)


def test_call_out_over_a_tcp_trunk(start_sip_server, procs, tmp_path):  # noqa: F811
    trunk_port = free_port(udp_too=False)
    server = start_sip_server(extra=_config([trunk_port], transport="tcp"), tls=False)
    trunk = Sipp(server, "trunk_auth_answer.xml", tmp_path, calls=1, timeout_s=60.0, local_port=trunk_port,
                 transport="t1")
    procs.append(trunk)
    add_user(server, "alice", "secret")
    assert_caller_ok(_call_out(procs, server, tmp_path), server)
    assert trunk.wait(30) == 0, trunk.explain()
    assert "AUTH-OK" in trunk.logs() and "HUNG-UP" in trunk.logs(), trunk.explain()
    assert _invites(trunk)[0].startswith(f"INVITE sip:+33123456789@{HOST}:{trunk_port};user=phone SIP/2.0")
    assert_no_leaked_state(server, expected_calls=1)
