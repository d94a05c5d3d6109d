"""Run the real server (`twistd -n libon-tsilo`) as a subprocess for end-to-end tests.

`start_server(tmp_path, ...)` writes a TOML config with OS-picked free ports into tmp_path, starts
this venv's twistd, waits until the server answers an OPTIONS over UDP (any SIP response counts as
"ready"), and returns a `ServerProcess`. `stop()` sends SIGTERM (a clean shutdown is part of what
is tested) and keeps the combined output in tmp_path/server.log for failure messages.

Relative paths in the config (users db, location db) resolve against tmp_path, so every test gets
its own state.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TWISTD = Path(sys.executable).parent / "twistd"
HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


# --- ports ------------------------------------------------------------------------------------


def free_port(host: str = HOST, udp_too: bool = True) -> int:
    """A port free for TCP (and UDP when ``udp_too``) on ``host``, picked by the OS."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            if not udp_too:
                return port
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


# --- TOML -------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def to_toml(sections: dict[str, Any]) -> str:
    """Write {section: {key: value}} as TOML; a list of dicts becomes [[section.key]] tables."""
    lines: list[str] = []
    for name, table in sections.items():
        if _is_table_array(table):  # a top-level array of tables: [[trunks]], [[routes]]
            for item in table:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
                lines.append("")
            continue
        scalars = {k: v for k, v in table.items() if not _is_table_array(v)}
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        lines.append("")
        for key, array in table.items():
            if not _is_table_array(array):
                continue
            for item in array:
                lines.append(f"[[{name}.{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
                lines.append("")
    return "\n".join(lines)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def merge_sections(base: dict[str, Any], extra: dict[str, Any] | None) -> dict:
    """``extra`` keys override ``base`` keys section by section (sections are not replaced whole)."""
    merged = {name: dict(table) if isinstance(table, dict) else list(table) for name, table in base.items()}
    for name, table in (extra or {}).items():
        if isinstance(table, list):  # an array of tables replaces the base's whole
            merged[name] = table
            continue
        merged.setdefault(name, {}).update(table)
    return merged


# --- SIP probe --------------------------------------------------------------------------------


def options_request(host: str, port: int, local_port: int, transport: str = "UDP", cseq: int = 1) -> bytes:
    """A minimal RFC 3261 OPTIONS to the server itself (no user part)."""
    tag = uuid.uuid4().hex[:8]
    call_id = uuid.uuid4().hex
    return (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {HOST}:{local_port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@{HOST}>;tag={tag}\r\n"
        f"To: <sip:{host}:{port}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _read_message(sock: socket.socket, buf: bytearray) -> bytes:
    """One SIP message off a stream socket (headers + Content-Length body); keeps leftovers in buf."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65535)
        if not chunk:
            raise ConnectionError(f"connection closed; partial data {bytes(buf)!r}")
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-length", b"l"):
            length = int(value.strip())
    total = len(head) + 4 + length
    while len(buf) < total:
        chunk = sock.recv(65535)
        if not chunk:
            raise ConnectionError("connection closed inside a message body")
        buf += chunk
    message = bytes(buf[:total])
    del buf[:total]
    return message


def stream_options(host: str, port: int, count: int = 3, ca_file: str | None = None, timeout: float = 5.0) -> list[bytes]:
    """Send ``count`` OPTIONS over one TCP connection (TLS when ``ca_file`` is given: the server
    certificate is verified against it, hostname = the IP) and return the responses."""
    raw = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket = raw
    transport = "TCP"
    if ca_file is not None:
        ctx = ssl.create_default_context(cafile=ca_file)
        sock = ctx.wrap_socket(raw, server_hostname=host)
        transport = "TLS"
    buf = bytearray()
    answers = []
    with sock:
        local_port = sock.getsockname()[1]
        for i in range(1, count + 1):
            sock.sendall(options_request(host, port, local_port, transport, cseq=i))
            answers.append(_read_message(sock, buf))
    return answers


def udp_options(host: str, port: int, timeout: float = 0.5) -> bytes | None:
    """Send one OPTIONS over UDP and return the first datagram received back, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(timeout)
        sock.sendto(options_request(host, port, sock.getsockname()[1]), (host, port))
        try:
            data, _addr = sock.recvfrom(65535)
        except (TimeoutError, ConnectionRefusedError):
            return None
        return data


# --- the process ------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    config_path: Path
    log_path: Path
    sip_port: int  # UDP and TCP
    tls_port: int | None
    proc: subprocess.Popen[bytes]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    returncode: int | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tracebacks(self) -> list[str]:
        """Log lines that show an unhandled error; the server should never produce any."""
        marks = ("Traceback (most recent call last)", "Unhandled Error", "Unhandled error")
        return [line for line in self.output().splitlines() if any(m in line for m in marks)]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self.returncode = self.proc.returncode
                raise RuntimeError(f"server ignored SIGTERM for {timeout}s\n{self.output()}") from None
        self.returncode = self.proc.returncode
        return self.returncode


def base_sections(tmp_path: Path, sip_port: int, tls_port: int | None, certs: Any = None) -> dict:
    listen = [f"udp:{HOST}:{sip_port}", f"tcp:{HOST}:{sip_port}"]
    sections: dict[str, dict[str, Any]] = {
        "sip": {"listen": listen, "domains": ["localhost", HOST]},
        "log": {"level": "debug", "format": "text"},
        "ops": {"drain_timeout": 2},
    }
    if tls_port is not None and certs is not None:
        listen.append(f"tls:{HOST}:{tls_port}")
        sections["tls"] = {
            "certificate": str(certs.cert),
            "private_key": str(certs.key),
            "ca_file": str(certs.ca),
        }
    return sections


def start_server(
    tmp_path: Path,
    extra: dict[str, dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
    certs: Any = None,
    ready_timeout: float = READY_TIMEOUT,
    wait_ready: bool = True,
) -> ServerProcess:
    """Start `twistd -n libon-tsilo` on free loopback ports; TLS too when ``certs`` (tests.certs) is given.

    ``extra`` overrides config keys per section, e.g. ``{"auth": {"enabled": False}}``; ``env`` adds
    environment variables. With ``wait_ready`` the call returns once OPTIONS over UDP gets an answer.
    """
    sip_port = free_port()
    tls_port = free_port(udp_too=False) if certs is not None else None
    sections = merge_sections(base_sections(tmp_path, sip_port, tls_port, certs), extra)
    config_path = tmp_path / "libon-tsilo.toml"
    config_path.write_text(to_toml(sections))
    log_path = tmp_path / "server.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "libon-tsilo", "--config", str(config_path)],
            cwd=tmp_path,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(config_path, log_path, sip_port, tls_port, proc, sections)
    if wait_ready:
        try:
            wait_until_ready(server, ready_timeout)
        except Exception:
            server.stop()
            raise
    return server


def wait_until_ready(server: ServerProcess, timeout: float = READY_TIMEOUT) -> bytes:
    """Poll with OPTIONS over UDP until the server answers; returns the answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"server exited with {server.proc.returncode} before it was ready\n{server.output()}")
        answer = udp_options(HOST, server.sip_port, timeout=0.3)
        if answer is not None and answer.startswith(b"SIP/2.0 "):
            return answer
    raise RuntimeError(f"server did not answer OPTIONS on udp:{HOST}:{server.sip_port} in {timeout}s\n{server.output()}")


JSON_LOG = {"format": "json"}  # the [log] section for a server whose events a test reads with log_events


def log_events(server: ServerProcess, ns: str, **fields: Any) -> list[dict[str, Any]]:
    """The server's log events in namespace ``ns`` whose fields equal ``fields``.

    For a server started with ``[log] format = "json"`` (:data:`JSON_LOG`): each event is a JSON
    object with ``level``, ``ns``, ``msg`` and the fields the code logged, so a test asserts on those
    rather than on the wording of the message."""
    events = []
    for line in server.output().splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("ns") == ns and all(event.get(k) == v for k, v in fields.items()):
            events.append(event)
    return events


def admin_rpc(server: ServerProcess, name: str) -> Any:
    """GET /rpc/<name> on the server's admin API (its ``[admin] listen`` port; loopback: no token)."""
    port = int(server.sections["admin"]["listen"].split(":")[1])
    with urllib.request.urlopen(f"http://{HOST}:{port}/rpc/{name}", timeout=5) as resp:
        assert resp.status == 200
        return json.loads(resp.read())["result"]
