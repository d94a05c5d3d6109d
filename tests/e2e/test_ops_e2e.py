"""Operations end to end, on the real twistd process: admin API, /metrics, graceful shutdown.

One scenario, with small Python SIP user agents over UDP (plus one TCP REGISTER):

- ``bob`` registers over UDP from a device socket and answers calls (a connected call);
- ``dev`` registers over TCP with RFC 8599 push parameters (webhook provider served by a local
  HTTP server) and closes its connection: a call to it is pushed and parked;
- the admin API shows both (``ul.dump``, ``ts.lookup``, ``/metrics``), and refuses a bad token;
- SIGTERM: the parked call gets 480 at once, a new INVITE during the drain gets 503 with
  Retry-After, ``/rpc/health`` answers 503 "draining", the connected call goes on until its BYE,
  and then the process exits with status 0, well before ``[ops] drain_timeout``.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, free_port, log_events
from tests.waiting import wait_until

TOKEN = "e2e-admin-token"
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


# --- a tiny SIP toolkit -----------------------------------------------------------------------


class Msg:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        self.first = lines[0]
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.append((name.strip(), value.strip()))
        parts = self.first.split(" ", 2)
        self.is_response = parts[0] == "SIP/2.0"
        self.status = int(parts[1]) if self.is_response else 0
        self.method = "" if self.is_response else parts[0]

    def get(self, name: str) -> str | None:
        compact = {"via": "v", "from": "f", "to": "t", "call-id": "i", "contact": "m", "content-length": "l"}
        for n, v in self.headers:
            if n.lower() in (name.lower(), compact.get(name.lower(), "")):
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() in (name.lower(), "v" if name.lower() == "via" else "")]

    @property
    def cseq_method(self) -> str:
        return (self.get("CSeq") or " ").split()[-1]


def build(first: str, headers: list[tuple[str, str]], body: str = "") -> bytes:
    lines = [first] + [f"{n}: {v}" for n, v in headers]
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


class UdpAgent:
    def __init__(self, server: ServerProcess, user: str) -> None:
        self.server = server
        self.user = user
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.tag = uuid.uuid4().hex[:8]

    def close(self) -> None:
        self.sock.close()

    def via(self) -> str:
        return f"SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport"

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (HOST, self.server.sip_port))

    def recv(self, want: Any, timeout: float = 5.0, answer_requests: bool = False) -> Msg:
        """The first message for which ``want(msg)`` is true; others are dropped (retransmissions,
        provisional responses). With ``answer_requests``, requests that are not wanted get a 200."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.user}: nothing wanted in {timeout}s\n{self.server.output()[-6000:]}")
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            msg = Msg(data)
            if want(msg):
                return msg
            if answer_requests and not msg.is_response and msg.method != "ACK":
                self.send(reply(msg, 200))

    def register(self, extra_params: str = "") -> Msg:
        aor = f"sip:{self.user}@{HOST}"
        self.send(build(f"REGISTER sip:{HOST} SIP/2.0", [
            ("Via", self.via()), ("Max-Forwards", "70"), ("From", f"<{aor}>;tag={self.tag}"), ("To", f"<{aor}>"),
            ("Call-ID", uuid.uuid4().hex), ("CSeq", "1 REGISTER"),
            ("Contact", f"<sip:{self.user}@{HOST}:{self.port}{extra_params}>"), ("Expires", "600"),
        ]))
        return self.recv(lambda m: m.is_response and m.status >= 200)


def reply(req: Msg, status: int, reason: str = "OK", to_tag: str | None = None, contact: str | None = None,
          body: str = "") -> bytes:
    headers = [("Via", v) for v in req.all("Via")]
    to = req.get("To") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    headers += [("From", req.get("From") or ""), ("To", to), ("Call-ID", req.get("Call-ID") or ""),
                ("CSeq", req.get("CSeq") or "")]
    if contact:
        headers.append(("Contact", contact))
    if body:
        headers.append(("Content-Type", "application/sdp"))
    return build(f"SIP/2.0 {status} {reason}", headers, body)


class Caller(UdpAgent):
    def invite(self, callee: str) -> dict[str, str]:
        call = {"call_id": uuid.uuid4().hex, "from": f"<sip:{self.user}@{HOST}>;tag={uuid.uuid4().hex[:8]}",
                "to": f"<sip:{callee}@{HOST}>", "uri": f"sip:{callee}@{HOST}", "via": self.via()}
        self.send(build(f"INVITE {call['uri']} SIP/2.0", [
            ("Via", call["via"]), ("Max-Forwards", "70"), ("From", call["from"]), ("To", call["to"]),
            ("Call-ID", call["call_id"]), ("CSeq", "1 INVITE"), ("Contact", f"<sip:{self.user}@{HOST}:{self.port}>"),
            ("Content-Type", "application/sdp"),
        ], SDP))
        return call

    def final(self, call: dict[str, str], timeout: float = 5.0) -> Msg:
        return self.recv(lambda m: m.is_response and m.get("Call-ID") == call["call_id"] and m.status >= 200
                         and m.cseq_method == "INVITE", timeout)

    def ack(self, call: dict[str, str], resp: Msg) -> None:
        """ACK a final response: a non-2xx one in the INVITE transaction, a 2xx one end to end."""
        via = call["via"] if resp.status >= 300 else self.via()
        call["to"] = resp.get("To") or call["to"]
        self.send(build(f"ACK {call['uri']} SIP/2.0", [
            ("Via", via), ("Max-Forwards", "70"), ("From", call["from"]), ("To", call["to"]),
            ("Call-ID", call["call_id"]), ("CSeq", "1 ACK"),
        ]))

    def bye(self, call: dict[str, str]) -> Msg:
        self.send(build(f"BYE {call['uri']} SIP/2.0", [
            ("Via", self.via()), ("Max-Forwards", "70"), ("From", call["from"]), ("To", call["to"]),
            ("Call-ID", call["call_id"]), ("CSeq", "2 BYE"),
        ]))
        return self.recv(lambda m: m.is_response and m.cseq_method == "BYE" and m.status >= 200)


# --- a webhook push endpoint ------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    pushes: list[Any] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        length = int(self.headers.get("Content-Length") or 0)
        type(self).pushes.append(json.loads(self.rfile.read(length) or b"null"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook():
    class Hook(_Hook):
        pushes: list[Any] = []

    httpd = ThreadingHTTPServer((HOST, 0), Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{httpd.server_address[1]}/push", Hook.pushes
    httpd.shutdown()
    httpd.server_close()


# --- admin API client -------------------------------------------------------------------------


def admin(port: int, path: str, token: str | None = TOKEN, data: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    ctype = "json" if body[:1] in (b"{", b"[") else "text"
    return status, (json.loads(body) if ctype == "json" else body.decode())


# --- the scenario -----------------------------------------------------------------------------


def test_admin_api_and_graceful_shutdown(start_sip_server, webhook):
    hook_url, pushes = webhook
    admin_port = free_port(udp_too=False)
    server = start_sip_server(
        extra={
            "auth": {"enabled": False},
            "location": {"backend": "memory"},
            "ops": {"drain_timeout": 8},
            "calls": {"ring_timeout": 60.0},
            "push": {"providers": ["hook"], "webhook": [{"name": "hook", "url": hook_url}]},
            "admin": {"listen": f"tcp:{admin_port}:interface={HOST}", "token": TOKEN},
            "log": JSON_LOG,
        },
        tls=False,
    )
    agents: list[UdpAgent] = []
    try:
        _scenario(server, admin_port, pushes, agents)
    finally:
        for agent in agents:
            agent.close()


def _scenario(server: ServerProcess, admin_port: int, pushes: list[Any], agents: list[UdpAgent]) -> None:
    bob = UdpAgent(server, "bob")
    alice, carol, dave = Caller(server, "alice"), Caller(server, "carol"), Caller(server, "dave")
    agents += [bob, alice, carol, dave]

    # bob: a reachable device (UDP); dev: a push device that went to sleep (TCP, closed)
    assert bob.register().status == 200
    tcp = socket.create_connection((HOST, server.sip_port), timeout=5)
    local = tcp.getsockname()[1]
    contact = f"<sip:dev@{HOST}:{local};transport=tcp;pn-provider=hook;pn-prid=tok-0123456789;pn-param=app>"
    tcp.sendall(build(f"REGISTER sip:{HOST} SIP/2.0", [
        ("Via", f"SIP/2.0/TCP {HOST}:{local};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport"),
        ("Max-Forwards", "70"), ("From", f"<sip:dev@{HOST}>;tag=d1"), ("To", f"<sip:dev@{HOST}>"),
        ("Call-ID", uuid.uuid4().hex), ("CSeq", "1 REGISTER"), ("Contact", contact), ("Expires", "600"),
    ]))
    answer = tcp.recv(65535)
    assert answer.startswith(b"SIP/2.0 200 "), answer
    tcp.close()
    wait_until(lambda: not admin(admin_port, "/rpc/ul.lookup?aor=sip%3Adev%40127.0.0.1")[1]["result"]["bindings"][0]["flow_live"],
             what="the server to see dev's connection closed")

    # admin API: auth and the location table
    status, body = admin(admin_port, "/rpc/ul.dump", token="wrong")
    assert status == 401 and body["error"]["code"] == 401
    status, body = admin(admin_port, "/rpc/ul.dump")
    assert status == 200 and set(body["result"]["aors"]) == {f"sip:bob@{HOST}", f"sip:dev@{HOST}"}

    # alice -> bob: answered (a call the shutdown must let finish)
    call_ab = alice.invite("bob")
    inv = bob.recv(lambda m: m.method == "INVITE")
    bob.send(reply(inv, 180, "Ringing", to_tag="b1"))
    bob.send(reply(inv, 200, "OK", to_tag="b1", contact=f"<sip:bob@{HOST}:{bob.port}>", body=SDP))
    ok = alice.final(call_ab)
    assert ok.status == 200, ok.raw
    alice.ack(call_ab, ok)

    # carol -> dev: pushed and parked
    call_cd = carol.invite("dev")
    wait_until(lambda: admin(admin_port, "/rpc/ts.lookup?aor=sip%3Adev%40127.0.0.1")[0] == 200, what="the call to dev to be parked")
    wait_until(lambda: pushes, what="the push to reach the webhook")
    status, metrics = admin(admin_port, "/metrics", token=None)
    assert status == 200
    assert 'libon_tsilo_calls{state="connected"} 1.0' in metrics, metrics
    assert "libon_tsilo_parked_calls 1.0" in metrics
    assert "libon_tsilo_bindings 2.0" in metrics
    stored = admin(admin_port, "/rpc/ts.dump")[1]["result"]["stats"]["stored_transactions"]
    assert stored >= 1 and f"libon_tsilo_tsilo_stored_transactions {float(stored)}" in metrics
    assert 'libon_tsilo_sip_requests_received_total{method="INVITE"}' in metrics
    assert 'libon_tsilo_pushes_total{outcome="delivered",provider="hook"} 1.0' in metrics
    assert admin(admin_port, "/rpc/health")[0] == 200

    # SIGTERM: the parked call gets 480, new INVITEs 503, the answered call goes on
    server.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    final = carol.final(call_cd)
    assert final.status == 480, final.raw
    carol.ack(call_cd, final)
    call_d = dave.invite("bob")
    refused = dave.final(call_d)
    assert refused.status == 503, refused.raw
    assert refused.get("Retry-After") == "8"
    dave.ack(call_d, refused)
    status, body = admin(admin_port, "/rpc/health")
    assert status == 503 and body["result"]["status"] == "draining"
    # the answered call holds the drain open: the server still counts it (and answers its BYE below)
    assert admin(admin_port, "/rpc/stats")[1]["result"]["calls"]["calls"] == 1
    assert server.alive(), "the server must wait for the answered call"

    # the answered call ends: the drain is over, the process exits 0
    def bob_answers_bye(m: Msg) -> bool:
        if m.method == "BYE":
            bob.send(reply(m, 200))
            return True
        return False

    alice_bye = threading.Thread(target=lambda: bob.recv(bob_answers_bye, timeout=5, answer_requests=False))
    alice_bye.start()
    assert alice.bye(call_ab).status == 200
    alice_bye.join(6)
    code = server.proc.wait(10)
    assert code == 0, server.output()[-6000:]
    assert time.monotonic() - sent_at < 7  # left after the BYE, not at the drain timeout
    assert [e["how"] for e in log_events(server, "libon_tsilo.ops.service") if "how" in e] == ["drained"]
    assert "tok-0123456789" not in server.output()  # push tokens are never logged whole
