"""The registrar end to end: the real twistd process, SIPp and small Python SIP clients.

- digest REGISTER with SIPp (`[authentication]`, -au/-ap) after creating the user with the
  `libon-tsilo-admin` console script: 401 then 200 (MD5: Debian's SIPp 3.6 only computes MD5 and
  AKAv1-MD5 and gives up on the server's first, SHA-256 challenge, so these servers offer MD5 only);
  SHA-256 (RFC 7616) with a Python client that computes the digest itself with hashlib;
- a wrong password is challenged again (401), a valid user registering another user's AOR gets 403;
- persistence across a real restart (SIGTERM, and kill -9 one second after the 200): a REGISTER
  without Contact to the new process lists the binding with its remaining expiry;
- flow reuse (RFC 5626 style) over TCP: an INVITE for an AOR registered over TCP reaches the device
  on that very connection, not on a new one to its Contact address;
- RFC 8599 over the wire: an unknown pn-provider gets 555, a capability query 200 with Feature-Caps.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, free_port, log_events, start_server, wait_until_ready
from tests.waiting import wait_until

SCENARIOS = Path(__file__).parent / "scenarios"
ADMIN = Path(sys.executable).parent / "libon-tsilo-admin"
MD5_ONLY = {"auth": {"algorithms": ["MD5"]}}
NO_AUTH = {"auth": {"enabled": False}}


# --- a small SIP client ------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw: bytes

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def first(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None


@dataclass
class Request:
    method: str
    uri: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def first(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


_COMPACT = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact", "l": "Content-Length"}


def parse(data: bytes) -> Reply | Request:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip()
        headers.append((_COMPACT.get(name.lower(), name), value.strip()))
    first = lines[0]
    if first.startswith("SIP/2.0 "):
        _, code, reason = first.split(" ", 2)
        return Reply(int(code), reason, headers, data)
    method, uri, _ = first.split(" ", 2)
    return Request(method, uri, headers, body, data)


def digest_response(algorithm: str, user: str, realm: str, password: str, method: str, uri: str,
                    nonce: str, nc: str, cnonce: str) -> str:
    """RFC 7616 §3.4.1 with qop=auth, written here with hashlib (not the server's sip/digest.py)."""
    name = {"MD5": "md5", "SHA-256": "sha256"}[algorithm]

    def h(text: str) -> str:
        return hashlib.new(name, text.encode()).hexdigest()

    return h(f"{h(f'{user}:{realm}:{password}')}:{nonce}:{nc}:{cnonce}:auth:{h(f'{method}:{uri}')}")


def challenges(reply: Reply) -> dict[str, dict[str, str]]:
    """WWW-Authenticate values by algorithm: {"SHA-256": {"realm": ..., "nonce": ...}, ...}."""
    out = {}
    for value in reply.values("WWW-Authenticate"):
        assert value.startswith("Digest "), value
        params = {k: a or b for k, a, b in re.findall(r'([\w-]+)=(?:"([^"]*)"|([^\s,]+))', value[7:])}
        out[params.get("algorithm", "MD5").upper()] = params
    return out


def contact_expires(reply: Reply) -> dict[str, int]:
    """The Contacts of a 200 OK: {uri: expires}."""
    out = {}
    for value in reply.values("Contact"):
        m = re.match(r"\s*<([^>]+)>.*;expires=(\d+)", value)
        assert m, f"Contact without <uri> or expires: {value!r}"
        out[m.group(1)] = int(m.group(2))
    return out


class SipClient:
    """One UA on 127.0.0.1 over UDP or TCP (one connection), sending REGISTERs and reading replies."""

    def __init__(self, server: ServerProcess, transport: str = "udp", port: int | None = None) -> None:
        self.server = server
        self.transport = transport
        self.buf = bytearray()
        if transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((HOST, 0))
        else:
            self.sock = socket.create_connection((HOST, port or server.sip_port), timeout=5)
        self.port = self.sock.getsockname()[1]
        self.call_id = uuid.uuid4().hex
        self.cseq = 0
        self.tag = uuid.uuid4().hex[:8]

    def close(self) -> None:
        self.sock.close()

    @property
    def via_transport(self) -> str:
        return self.transport.upper()

    def send(self, data: bytes, port: int | None = None) -> None:
        if self.transport == "udp":
            self.sock.sendto(data, (HOST, port or self.server.sip_port))
        else:
            self.sock.sendall(data)

    def receive(self, timeout: float = 5.0) -> Reply | Request:
        if self.transport == "udp":
            self.sock.settimeout(timeout)
            data, _ = self.sock.recvfrom(65535)
            return parse(data)
        self.sock.settimeout(timeout)
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end >= 0:
                m = re.search(rb"\r\n(?:Content-Length|l)\s*:\s*(\d+)", bytes(self.buf[:head_end]), re.I)
                total = head_end + 4 + (int(m.group(1)) if m else 0)
                if len(self.buf) >= total:
                    data = bytes(self.buf[:total])
                    del self.buf[:total]
                    return parse(data)
            chunk = self.sock.recv(65535)
            if not chunk:
                raise ConnectionError(f"server closed the connection; buffered {bytes(self.buf)!r}")
            self.buf += chunk

    def register(self, aor_user: str, contact: str | None = "default", expires: int | None = 600,
                 auth: tuple[str, str, str] | None = None, extra: list[str] = ()) -> Reply:
        """REGISTER To/From sip:aor_user@127.0.0.1; ``auth`` = (user, password, algorithm): answer a
        401 once with those credentials (the 401 itself is returned when ``auth`` is None)."""
        if contact == "default":
            contact = f"<sip:{aor_user}@{HOST}:{self.port};transport={self.transport}>"
        reply = self._register_once(aor_user, contact, expires, None, extra)
        if auth is None or reply.status != 401:
            return reply
        user, password, algorithm = auth
        offered = challenges(reply)
        assert algorithm in offered, f"{algorithm} not offered: {reply.values('WWW-Authenticate')}"
        ch = offered[algorithm]
        uri = f"sip:{HOST}:{self.server.sip_port}"
        cnonce, nc = uuid.uuid4().hex[:16], "00000001"
        response = digest_response(algorithm, user, ch["realm"], password, "REGISTER", uri, ch["nonce"], nc, cnonce)
        credentials = (
            f'Authorization: Digest username="{user}", realm="{ch["realm"]}", nonce="{ch["nonce"]}", '
            f'uri="{uri}", response="{response}", algorithm={algorithm}, qop=auth, nc={nc}, cnonce="{cnonce}"'
        )
        return self._register_once(aor_user, contact, expires, credentials, extra)

    def _register_once(self, aor_user: str, contact: str | None, expires: int | None,
                       credentials: str | None, extra: list[str]) -> Reply:
        self.cseq += 1
        branch = "z9hG4bK" + uuid.uuid4().hex[:16]
        lines = [
            f"REGISTER sip:{HOST}:{self.server.sip_port} SIP/2.0",
            f"Via: SIP/2.0/{self.via_transport} {HOST}:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{aor_user}@{HOST}>;tag={self.tag}",
            f"To: <sip:{aor_user}@{HOST}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} REGISTER",
        ]
        if contact is not None:
            lines.append(f"Contact: {contact}")
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if credentials is not None:
            lines.append(credentials)
        lines += list(extra)
        lines += ["Content-Length: 0", "", ""]
        data = "\r\n".join(lines).encode()
        return self._transaction(data)

    def _transaction(self, data: bytes, timeout: float = 5.0) -> Reply:
        """Send (retransmitting over UDP every 0.5 s) until a final response arrives."""
        deadline = time.monotonic() + timeout
        self.send(data)
        while time.monotonic() < deadline:
            try:
                message = self.receive(timeout=0.5 if self.transport == "udp" else deadline - time.monotonic())
            except TimeoutError:
                if self.transport == "udp":
                    self.send(data)
                continue
            if isinstance(message, Reply) and message.status >= 200:
                return message
        raise AssertionError(f"no final response in {timeout}s to\n{data.decode()}\n{self.server.output()[-4000:]}")


# --- server management -------------------------------------------------------------------------


@dataclass
class Servers:
    """Servers started by a test, possibly restarted on the same config; checked at teardown."""

    tmp_path: Path
    started: list[tuple[ServerProcess, bool]] = field(default_factory=list)

    def start(self, extra: dict[str, dict[str, Any]] | None = None) -> ServerProcess:
        directory = self.tmp_path / f"server{len(self.started)}"
        directory.mkdir()
        server = start_server(directory, extra)
        self.started.append((server, True))
        return server

    def restart(self, old: ServerProcess) -> ServerProcess:
        """Start twistd again with the old process's config file (same ports, same state files)."""
        assert not old.alive()
        run = len(self.started)
        log_path = old.config_path.parent / f"server-run{run}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "libon-tsilo",
                 "--config", str(old.config_path)],
                cwd=old.config_path.parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        server = ServerProcess(old.config_path, log_path, old.sip_port, old.tls_port, proc, old.sections)
        self.started.append((server, True))
        try:
            wait_until_ready(server)
        except Exception:
            server.stop()
            raise
        return server

    def kill9(self, server: ServerProcess) -> None:
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        server.returncode = server.proc.returncode
        self.started = [(s, clean and s is not server) for s, clean in self.started]

    def stop(self, server: ServerProcess) -> None:
        code = server.stop()
        assert code in (0, -signal.SIGTERM), f"exit {code} on SIGTERM\n{server.output()}"


@pytest.fixture
def servers(tmp_path) -> Iterator[Servers]:
    managed = Servers(tmp_path)
    yield managed
    problems = []
    for server, clean in managed.started:
        code = server.stop()
        if clean and code not in (0, -signal.SIGTERM):
            problems.append(f"server exited with {code} on SIGTERM\n{server.output()}")
        if server.tracebacks():
            problems.append(f"server logged unhandled errors\n{server.output()}")
    if problems:
        pytest.fail("\n".join(problems))


def add_user(server: ServerProcess, name: str, password: str) -> None:
    """`libon-tsilo-admin --config <the server's config> user add NAME --password P` (the console script)."""
    assert ADMIN.exists(), f"{ADMIN} missing: pip install -e . into the venv"
    proc = subprocess.run(
        [str(ADMIN), "--config", str(server.config_path), "user", "add", name, "--password", password],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"added {name}" in proc.stdout


def run_sipp(server: ServerProcess, scenario: str, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    sipp = shutil.which("sipp")
    assert sipp, "sipp is missing (./scripts/test installs the sip-tester package)"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / scenario
    shutil.copy(SCENARIOS / scenario, path)  # SIPp writes its logs next to the scenario
    cmd = [
        sipp, f"{HOST}:{server.sip_port}", "-sf", str(path), "-t", "u1", "-i", HOST,
        "-p", str(free_port()), "-m", "1", "-timeout", "10s", "-timeout_error", "-trace_err",
        "-trace_msg", "-nostdin", *args,
    ]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def explain(proc: subprocess.CompletedProcess, workdir: Path, server: ServerProcess) -> str:
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(workdir.glob("*.log")))
    return (
        f"sipp exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-2000:]}\n"
        f"--- sipp logs\n{logs}\n--- server log\n{server.output()[-5000:]}"
    )


def sipp_messages(workdir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in workdir.glob("*_messages.log"))


# --- digest ------------------------------------------------------------------------------------


def test_sipp_register_md5_digest(servers, tmp_path):
    server = servers.start(MD5_ONLY)
    add_user(server, "alice", "secret")
    workdir = tmp_path / "sipp"
    proc = run_sipp(server, "register_auth.xml", workdir, "-s", "alice", "-au", "alice", "-ap", "secret")
    assert proc.returncode == 0, explain(proc, workdir, server)
    trace = sipp_messages(workdir)
    assert "SIP/2.0 401 " in trace and "algorithm=MD5" in trace
    assert re.search(r'Authorization: Digest username="alice"', trace)
    # the binding SIPp's REGISTER created is really there (query with our own MD5 client)
    sipp_port = re.search(r"Contact: <sip:alice@127\.0\.0\.1:(\d+);transport=UDP>", trace).group(1)
    client = SipClient(server)
    try:
        reply = client.register("alice", contact=None, expires=None, auth=("alice", "secret", "MD5"))
    finally:
        client.close()
    assert reply.status == 200, reply.raw
    bindings = contact_expires(reply)
    assert list(bindings) == [f"sip:alice@127.0.0.1:{sipp_port};transport=UDP"], reply.raw
    assert 590 <= bindings[f"sip:alice@127.0.0.1:{sipp_port};transport=UDP"] <= 600


def test_sipp_wrong_password_is_challenged_again(servers, tmp_path):
    server = servers.start({**MD5_ONLY, "log": JSON_LOG})
    add_user(server, "alice", "secret")
    workdir = tmp_path / "sipp"
    proc = run_sipp(server, "register_auth_401.xml", workdir, "-s", "alice", "-au", "alice", "-ap", "wrong")
    assert proc.returncode == 0, explain(proc, workdir, server)
    assert sipp_messages(workdir).count("SIP/2.0 401 ") == 2
    refused = log_events(server, "libon_tsilo.registrar.auth", outcome="wrong_password", user="alice")
    assert len(refused) == 1, server.output()[-4000:]


def test_sipp_foreign_aor_is_403(servers, tmp_path):
    server = servers.start(MD5_ONLY)
    add_user(server, "alice", "secret")
    add_user(server, "bob", "bobsecret")
    workdir = tmp_path / "sipp"
    # alice's valid credentials on a REGISTER for bob's AOR
    proc = run_sipp(server, "register_auth_403.xml", workdir, "-s", "bob", "-au", "alice", "-ap", "secret")
    assert proc.returncode == 0, explain(proc, workdir, server)
    assert "SIP/2.0 403 " in sipp_messages(workdir)
    # and nothing was bound for bob (bob's own query lists no Contact)
    client = SipClient(server)
    try:
        reply = client.register("bob", contact=None, expires=None, auth=("bob", "bobsecret", "MD5"))
    finally:
        client.close()
    assert reply.status == 200 and reply.values("Contact") == [], reply.raw


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_python_client_digest(servers, algorithm):
    """SHA-256 one config line away: SHA-256 and MD5 challenges in one 401; either answer registers."""
    server = servers.start({"auth": {"algorithms": ["SHA-256", "MD5"]}})
    add_user(server, "alice", "secret")
    client = SipClient(server)
    try:
        first = client.register("alice")
        assert first.status == 401, first.raw
        assert list(challenges(first)) == ["SHA-256", "MD5"], first.raw
        reply = client.register("alice", auth=("alice", "secret", algorithm))
        assert reply.status == 200, reply.raw
        assert contact_expires(reply) == {f"sip:alice@{HOST}:{client.port};transport=udp": 600}
        wrong = client.register("alice", auth=("alice", "not-it", algorithm))
        assert wrong.status == 401 and challenges(wrong), wrong.raw
        foreign = client.register("bob", auth=("alice", "secret", algorithm))
        assert foreign.status == 403, foreign.raw
    finally:
        client.close()


# --- persistence -------------------------------------------------------------------------------


def _query(server: ServerProcess, aor_user: str) -> Reply:
    client = SipClient(server)
    try:
        return client.register(aor_user, contact=None, expires=None)
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_bindings_survive_sigterm_restart(servers, backend):
    """sqlite: the binding is back with its remaining expiry; memory (the control): it is gone."""
    server = servers.start({**NO_AUTH, "location": {"backend": backend}, "log": JSON_LOG})
    contact = "sip:alice@127.0.0.1:5999;transport=udp"
    client = SipClient(server)
    t_sent = time.monotonic()
    reply = client.register("alice", contact=f"<{contact}>", expires=600)
    t_ok = time.monotonic()
    client.close()
    assert reply.status == 200 and contact_expires(reply) == {contact: 600}, reply.raw
    servers.stop(server)
    time.sleep(1.2)  # the thing tested: time passes while the server is down, so the expiry is lower than 600
    again = servers.restart(server)
    t_query = time.monotonic()
    answer = _query(again, "alice")
    t_answer = time.monotonic()
    assert answer.status == 200, answer.raw
    if backend == "memory":
        assert answer.values("Contact") == [], answer.raw
        return
    assert [e["n"] for e in log_events(again, "libon_tsilo.registrar.location") if "n" in e] == [1]
    remaining = contact_expires(answer)
    assert list(remaining) == [contact], answer.raw
    # expires_at was set between t_sent and t_ok; the 200 was built between t_query and t_answer
    assert 600 - (t_answer - t_sent) <= remaining[contact] <= 600 - (t_query - t_ok) + 1, (remaining, t_answer - t_sent)
    assert remaining[contact] < 600


def _rows_on_disk(server: ServerProcess, user: str) -> int:
    """Bindings of ``user`` committed to the location file, read by another process as a restart would."""
    db = server.config_path.parent / "libon-tsilo-location.sqlite"
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return conn.execute("SELECT count(*) FROM bindings WHERE aor LIKE ?", (f"%:{user}@%",)).fetchone()[0]
    except sqlite3.OperationalError:  # the file exists but its table is not created yet
        return 0


def test_binding_survives_kill9_after_one_batch_interval(servers):
    server = servers.start({**NO_AUTH, "location": {"backend": "sqlite", "flush_interval_ms": 200}})
    contact = "sip:carol@127.0.0.1:5998;transport=udp"
    client = SipClient(server)
    t_sent = time.monotonic()
    reply = client.register("carol", contact=f"<{contact}>", expires=300)
    t_ok = time.monotonic()
    client.close()
    assert reply.status == 200, reply.raw
    # the batch writer commits within its interval; kill -9 only once the row is on disk
    wait_until(lambda: _rows_on_disk(server, "carol") == 1, 5, "carol's binding in the SQLite file")
    servers.kill9(server)
    assert server.returncode == -signal.SIGKILL
    time.sleep(1.2)  # the thing tested: the downtime counts against the expiry (it is not reset to 300)
    again = servers.restart(server)
    t_query = time.monotonic()
    answer = _query(again, "carol")
    t_answer = time.monotonic()
    assert answer.status == 200, answer.raw
    remaining = contact_expires(answer)
    assert list(remaining) == [contact], answer.raw
    # the absolute expiry was kept, not reset to 300: what is left is what the time since says
    assert 300 - (t_answer - t_sent) <= remaining[contact] <= 300 - (t_query - t_ok) + 1, remaining
    assert remaining[contact] < 300


# --- flow reuse over TCP -----------------------------------------------------------------------


def _respond(request: Request, status: int, reason: str, to_tag: str) -> bytes:
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in request.values("Via")]
    lines += [f"From: {request.first('From')}", f"To: {request.first('To')};tag={to_tag}",
              f"Call-ID: {request.first('Call-ID')}", f"CSeq: {request.first('CSeq')}", "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def test_invite_reaches_device_over_its_registered_tcp_connection(servers):
    server = servers.start(NO_AUTH)
    # a listener on the Contact's address: a server that opened a new connection would land here
    decoy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    decoy.bind((HOST, 0))
    decoy.listen(4)
    decoy.setblocking(False)
    device = SipClient(server, "tcp")
    caller = SipClient(server, "udp")
    try:
        contact = f"sip:dave@{HOST}:{decoy.getsockname()[1]};transport=tcp"
        reply = device.register("dave", contact=f"<{contact}>", expires=600)
        assert reply.status == 200, reply.raw
        call_id = uuid.uuid4().hex
        invite_branch = "z9hG4bK" + uuid.uuid4().hex[:16]
        via = f"Via: SIP/2.0/UDP {HOST}:{caller.port};branch={invite_branch};rport"
        common = [
            "Max-Forwards: 70",
            f"From: <sip:erin@{HOST}>;tag=callertag",
            f"To: <sip:dave@{HOST}>",
            f"Call-ID: {call_id}",
        ]
        invite = "\r\n".join(
            [f"INVITE sip:dave@{HOST}:{server.sip_port} SIP/2.0", via, *common, "CSeq: 1 INVITE",
             f"Contact: <sip:erin@{HOST}:{caller.port}>", "Content-Type: application/sdp",
             f"Content-Length: {len(SDP)}", "", SDP]
        ).encode()
        caller.send(invite)
        b_invite = device.receive(timeout=5)
        assert isinstance(b_invite, Request) and b_invite.method == "INVITE", b_invite.raw
        assert b_invite.uri.startswith("sip:dave@"), b_invite.uri
        assert b_invite.values("Via")[0].startswith("SIP/2.0/TCP "), b_invite.raw
        assert not select.select([decoy], [], [], 0.2)[0], "the server opened a new connection to the Contact"
        device.send(_respond(b_invite, 486, "Busy Here", "devicetag"))
        # the B2BUA ACKs the 486 on the same connection (non-2xx ACK, same branch)
        ack = device.receive(timeout=5)
        assert isinstance(ack, Request) and ack.method == "ACK", ack.raw
        # the caller gets the 486 relayed, and ACKs it
        final = None
        deadline = time.monotonic() + 5
        while final is None and time.monotonic() < deadline:
            message = caller.receive(timeout=5)
            if isinstance(message, Reply) and message.status >= 200:
                final = message
        assert final is not None and final.status == 486, final and final.raw
        to = final.first("To")
        caller.send("\r\n".join(
            [f"ACK sip:dave@{HOST}:{server.sip_port} SIP/2.0", via, *common[:2], f"To: {to}",
             f"Call-ID: {call_id}", "CSeq: 1 ACK", "Content-Length: 0", "", ""]
        ).encode())
        assert not select.select([decoy], [], [], 0)[0]
    finally:
        device.close()
        caller.close()
        decoy.close()


# --- RFC 8599 ----------------------------------------------------------------------------------

PUSH = {
    **NO_AUTH,
    "push": {"providers": ["webhook"], "webhook": [{"name": "webhook", "url": "http://127.0.0.1:9/push"}]},
}


def test_rfc8599_unknown_provider_555_and_capability_query(servers):
    server = servers.start(PUSH)
    client = SipClient(server)
    try:
        unknown = client.register(
            "frank", contact=f"<sip:frank@{HOST}:{client.port};pn-provider=apns;pn-prid=abc123;pn-param=x.y.voip>"
        )
        assert unknown.status == 555, unknown.raw
        listed = client.register("frank", contact=None, expires=None)
        assert listed.status == 200 and listed.values("Contact") == [], listed.raw  # the 555 changed nothing
        query = client.register("frank", contact=f"<sip:frank@{HOST}:{client.port};pn-provider=webhook>")
        assert query.status == 200, query.raw
        assert query.values("Feature-Caps") == ['*;+sip.pns="webhook"'], query.raw
        # a full push binding to the configured provider is accepted and listed
        bound = client.register(
            "frank", contact=f"<sip:frank@{HOST}:{client.port};pn-provider=webhook;pn-prid=tok42>;+sip.pnsreg"
        )
        assert bound.status == 200, bound.raw
        assert bound.values("Feature-Caps") == ['*;+sip.pns="webhook";+sip.pnsreg="130"'], bound.raw
        assert any("pn-prid=tok42" in c for c in bound.values("Contact")), bound.raw
    finally:
        client.close()
