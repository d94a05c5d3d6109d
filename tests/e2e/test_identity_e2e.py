"""Identity and digest end to end (issue 11 items 3, 4, 6 and the failed-digest limits of 7), on
the real twistd process.

- item 3: an INVITE whose From is one of our users, spelled ``localhost.``, ``127.1``,
  ``2130706433``, ``[::ffff:127.0.0.1]``... gets 407 (small Python UDP client), and an R-URI spelled
  that way is ours (not 404);
- item 4: a SIPp caller (caller_spoofed_pai.xml) with "Your Bank" in P-Asserted-Identity,
  Remote-Party-ID and P-Preferred-Identity: the SIPp device (device_answer.xml) sees none of them
  when the caller is not trusted, and sees them from ``[auth] trusted_sources``; an authenticated
  caller (caller_auth_spoofed_pai.xml, From spelled ``127.0.0.1.``) is challenged and the device
  (device_register_auth.xml, digest too) sees the identity we verified in PAI and From;
- item 6: an Authorization captured before a restart gets 401 stale=true after it (Python client,
  the same ``[auth] secret`` across the restart);
- item 7: wrong passwords from one source end in 403, counted in ``/metrics``.
"""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, admin_rpc, free_port, log_events
from tests.e2e.sipp import Device, Sipp, sipp_available
from tests.e2e.test_calls_sipp import assert_caller_ok, assert_no_leaked_state, procs  # noqa: F401
from tests.e2e.test_registrar_e2e import (  # noqa: F401
    Reply,
    SipClient,
    add_user,
    challenges,
    digest_response,
    parse,
    servers,
)

pytestmark = pytest.mark.skipif(not sipp_available(), reason="sipp is missing (package sip-tester)")

SPOOF = ("Your Bank", "bank.example")


def _config(auth: dict | None = None) -> dict:
    return {
        "location": {"backend": "memory"},
        "calls": {"ring_timeout": 5, "invite_cancel_grace": 0},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
        "auth": auth if auth is not None else {"enabled": False},
    }


# -- item 3: every spelling of a local domain is challenged ----------------------------------------


def _invite_final(server: ServerProcess, from_host: str, ruri_host: str = HOST) -> Reply:
    """One INVITE over UDP; the final response (which is ACKed, as a UA must for a non-2xx)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        branch, tag, call_id = f"z9hG4bK{uuid.uuid4().hex[:12]}", uuid.uuid4().hex[:8], uuid.uuid4().hex
        ruri = f"sip:bob@{ruri_host}:{server.sip_port}"
        head = [
            f"Via: SIP/2.0/UDP {HOST}:{port};branch={branch};rport",
            "Max-Forwards: 70",
            f'From: "Alice" <sip:alice@{from_host}>;tag={tag}',
        ]
        invite = "\r\n".join([f"INVITE {ruri} SIP/2.0", *head, f"To: <{ruri}>", f"Call-ID: {call_id}",
                              "CSeq: 1 INVITE", f"Contact: <sip:alice@{HOST}:{port}>",
                              "Content-Length: 0", "", ""]).encode()
        deadline = time.monotonic() + 10
        sock.sendto(invite, (HOST, server.sip_port))
        while time.monotonic() < deadline:
            sock.settimeout(0.5)
            try:
                reply = parse(sock.recvfrom(65535)[0])
            except TimeoutError:
                sock.sendto(invite, (HOST, server.sip_port))
                continue
            if isinstance(reply, Reply) and reply.status >= 200:
                ack = "\r\n".join([f"ACK {ruri} SIP/2.0", *head, f"To: {reply.first('To')}",
                                   f"Call-ID: {call_id}", "CSeq: 1 ACK", "Content-Length: 0", "", ""])
                sock.sendto(ack.encode(), (HOST, server.sip_port))
                return reply
    raise AssertionError(f"no final answer to\n{invite.decode()}\n{server.output()[-4000:]}")


def test_every_spelling_of_a_local_from_is_challenged(start_sip_server):
    server = start_sip_server(extra=_config({"enabled": True}), tls=False)
    add_user(server, "alice", "secret")
    for host in ("localhost", "localhost.", "LOCALHOST", "127.0.0.1.", "127.1", "2130706433", "0x7f.1",
                 "[::ffff:127.0.0.1]"):
        reply = _invite_final(server, host)
        assert reply.status == 407, f"From alice@{host}: {reply.status} {reply.reason}"
    # the R-URI's domain is decided the same way: bob@127.1 is ours (challenged, not 404)
    assert _invite_final(server, "127.0.0.1", ruri_host="127.1").status == 407
    # another domain is not ours to authenticate: no challenge (bob has no device: 480)
    assert _invite_final(server, "elsewhere.example").status != 407


# -- item 4: identity headers -----------------------------------------------------------------------


class AuthDevice(Device):
    """A Device whose REGISTERs answer a digest challenge (device_register_auth.xml, -au/-ap)."""

    def __init__(self, server: ServerProcess, workdir: Path, aor: str, password: str) -> None:
        self.server = server
        self.aor = aor
        self.tag = f"{aor}-{uuid.uuid4().hex[:8]}"
        self.call_id = f"reg-{self.tag}-1@{HOST}"
        self.sipp = Sipp(
            server, "device_register_auth.xml", workdir, name=f"device-{self.tag}",
            ooc_scenario="device_answer.xml", keys={"aor": aor}, cid_str=f"reg-{self.tag}-%u@%s",
            timeout_s=60.0, extra_args=["-au", aor, "-ap", password],
        )


def _invite_seen_by(device: Device) -> str:
    """The INVITE the device received, as SIPp traced it."""
    text = device.sipp.messages()
    start = text.find("INVITE sip:")
    assert start >= 0, device.sipp.explain()
    return text[start:text.find("\n\n", start)]


def _call(procs, server, tmp_path, device, scenario: str, from_user: str, from_host: str,  # noqa: F811
          *extra: str) -> str:
    procs.append(device)
    device.wait_registered()
    caller = Sipp(server, scenario, tmp_path, service="bob", keys={"from_user": from_user, "from_host": from_host},
                  extra_args=list(extra))
    procs.append(caller)
    assert_caller_ok(caller, server)
    invite = _invite_seen_by(device)
    device.stop()
    assert_no_leaked_state(server, expected_calls=1)
    return invite


def test_spoofed_identity_headers_never_reach_the_device(start_sip_server, procs, tmp_path):  # noqa: F811
    server = start_sip_server(extra=_config(), tls=False)
    invite = _call(procs, server, tmp_path, Device(server, tmp_path, "bob"), "caller_spoofed_pai.xml",
                   "eve", "evil.example")
    for name in ("P-Asserted-Identity", "Remote-Party-ID", "P-Preferred-Identity"):
        assert name.lower() not in invite.lower(), invite
    assert SPOOF[1] not in invite, invite
    assert "Subject: e2e" in invite  # the rest of the allow-list passes


def test_identity_headers_from_a_trusted_source_reach_the_device(start_sip_server, procs, tmp_path):  # noqa: F811
    server = start_sip_server(extra=_config({"enabled": True, "trusted_sources": ["127.0.0.0/8"]}), tls=False)
    invite = _call(procs, server, tmp_path, Device(server, tmp_path, "bob"), "caller_spoofed_pai.xml",
                   "gw", "trunk.example")
    assert f'P-Asserted-Identity: "{SPOOF[0]}" <sip:bank@{SPOOF[1]}>' in invite, invite
    assert "P-Preferred-Identity" not in invite, invite


def test_authenticated_caller_is_asserted_not_its_claims(start_sip_server, procs, tmp_path):  # noqa: F811
    server = start_sip_server(extra=_config({"enabled": True, "algorithms": ["MD5"]}), tls=False)
    add_user(server, "alice", "secret")
    add_user(server, "bob", "bobsecret")
    device = AuthDevice(server, tmp_path, "bob", "bobsecret")
    # From spelled with the root dot: challenged all the same, then asserted as we spell the domain
    invite = _call(procs, server, tmp_path, device, "caller_auth_spoofed_pai.xml", "alice", f"{HOST}.",
                   "-au", "alice", "-ap", "secret")
    assert invite.count("P-Asserted-Identity:") == 1, invite
    assert f"P-Asserted-Identity: <sip:alice@{HOST}>" in invite, invite
    assert SPOOF[0] not in invite and SPOOF[1] not in invite, invite
    from_line = next(line for line in invite.splitlines() if line.startswith("From:"))
    assert from_line.startswith(f"From: <sip:alice@{HOST}>;tag="), from_line


# -- item 6: no replay after a restart ---------------------------------------------------------------


def _credentials(reply: Reply, server: ServerProcess, user: str, password: str) -> str:
    ch = challenges(reply)["MD5"]
    uri = f"sip:{HOST}:{server.sip_port}"
    cnonce, nc = uuid.uuid4().hex[:16], "00000001"
    response = digest_response("MD5", user, ch["realm"], password, "REGISTER", uri, ch["nonce"], nc, cnonce)
    return (f'Authorization: Digest username="{user}", realm="{ch["realm"]}", nonce="{ch["nonce"]}", '
            f'uri="{uri}", response="{response}", algorithm=MD5, qop=auth, nc={nc}, cnonce="{cnonce}"')


def test_authorization_captured_before_a_restart_is_stale_after_it(servers):  # noqa: F811
    server = servers.start({"auth": {"secret": "one-secret-for-both-runs", "algorithms": ["MD5"]},
                            "location": {"backend": "memory"}})
    add_user(server, "alice", "secret")
    client = SipClient(server)
    contact = f"<sip:alice@{HOST}:{client.port}>"
    challenge = client._register_once("alice", contact, 600, None, [])
    assert challenge.status == 401
    captured = _credentials(challenge, server, "alice", "secret")
    assert client._register_once("alice", contact, 600, captured, []).status == 200
    client.close()

    servers.stop(server)
    restarted = servers.restart(server)
    attacker = SipClient(restarted)  # a new Call-ID and CSeq: only the Authorization is replayed
    reply = attacker._register_once("alice", f"<sip:alice@{HOST}:9>", 600, captured, [])
    assert reply.status == 401, restarted.output()[-3000:]
    assert all(c.get("stale") == "true" for c in challenges(reply).values()), reply.values("WWW-Authenticate")
    attacker.close()
    # the real owner answers the fresh challenge and gets in
    owner = SipClient(restarted)
    assert owner.register("alice", auth=("alice", "secret", "MD5")).status == 200
    owner.close()


# -- item 7: failed digest attempts per source ----------------------------------------------------


def test_wrong_passwords_from_one_source_end_in_403(start_sip_server):
    extra = _config({"enabled": True, "failed_per_source": 3, "failed_block": 60})
    server = start_sip_server(extra={**extra, "log": JSON_LOG}, tls=False)
    add_user(server, "alice", "secret")
    client = SipClient(server)
    for _ in range(3):
        assert client.register("alice", auth=("alice", "wrong", "MD5")).status == 401
    # blocked: the right password is not even checked
    assert client.register("alice", auth=("alice", "secret", "MD5")).status == 403
    client.close()
    blocked = log_events(server, "libon_tsilo.registrar.auth_limits", source="127.0.0.1")
    assert [(e["level"], e["n"], e["block"]) for e in blocked] == [("warn", 3, 60)], blocked
    port = int(server.sections["admin"]["listen"].split(":")[1])
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'libon_tsilo_auth_limited_total{limit="source"} 1.0' in metrics, metrics
    assert "libon_tsilo_auth_failures_total 3.0" in metrics, metrics
    assert admin_rpc(server, "stats") is not None


class _ClientFrom(SipClient):
    """A SipClient on another loopback address (127.0.0.0/8 is all ours on Linux)."""

    def __init__(self, server: ServerProcess, address: str) -> None:
        self.server = server
        self.transport = "udp"
        self.buf = bytearray()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.port = self.sock.getsockname()[1]
        self.call_id = uuid.uuid4().hex
        self.cseq = 0
        self.tag = uuid.uuid4().hex[:8]


def test_a_guessed_user_is_throttled_for_new_addresses_only(start_sip_server):
    extra = _config({"enabled": True, "failed_per_source": 100, "failed_per_user": 4, "failed_block": 60})
    server = start_sip_server(extra={**extra, "log": JSON_LOG}, tls=False)
    add_user(server, "alice", "secret")
    phone = _ClientFrom(server, "127.0.0.1")
    assert phone.register("alice", auth=("alice", "secret", "MD5")).status == 200
    for i in range(4):  # a distributed guesser: one wrong password per address
        guesser = _ClientFrom(server, f"127.0.0.{i + 2}")
        assert guesser.register("alice", auth=("alice", "wrong", "MD5")).status == 401
        guesser.close()
    newcomer = _ClientFrom(server, "127.0.0.20")
    assert newcomer.register("alice", auth=("alice", "secret", "MD5")).status == 403
    newcomer.close()
    # alice's phone, known from before, is not locked out
    assert phone.register("alice", auth=("alice", "secret", "MD5")).status == 200
    phone.close()
    throttled = log_events(server, "libon_tsilo.registrar.auth_limits", user="alice")
    assert [(e["level"], e["n"], e["block"]) for e in throttled] == [("warn", 4, 60)], throttled
    port = int(server.sections["admin"]["listen"].split(":")[1])
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'libon_tsilo_auth_limited_total{limit="user"} 1.0' in metrics, metrics
