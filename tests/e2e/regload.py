"""REGISTER load over UDP for the durability tests and bench/kill9.py: which REGISTERs got a 200.

`RegisterLoad` sends `count` REGISTERs from one socket at `rate` per second, each for its own AOR
(`{prefix}{i}@127.0.0.1`, its own Call-ID and Contact), and a receiver thread records every 200 OK
by index. There are no retransmissions: a REGISTER that got no answer is simply not acknowledged.
What the server acknowledged before it was killed is then checked against what it restored.

The messages are parsed here with a regular expression, not with the server's parser.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from typing import Any

HOST = "127.0.0.1"
_STATUS = re.compile(rb"^SIP/2\.0 (\d{3}) ")
_CALL_ID = re.compile(rb"\r\n(?:Call-ID|i)\s*:\s*([^\r]*)\r\n", re.I)
_CONTACT_USER = re.compile(r"^sip:([^@;>]+)@")


def register_bytes(server_port: int, local_port: int, user: str, call_id: str, contact_user: bytes | None = None,
                   to_user: bytes | None = None, expires: int = 3600) -> bytes:
    """One REGISTER; ``contact_user`` / ``to_user`` are raw bytes (they may be invalid UTF-8)."""
    to = to_user if to_user is not None else user.encode()
    contact = contact_user if contact_user is not None else user.encode()
    return b"\r\n".join([
        f"REGISTER sip:{HOST}:{server_port} SIP/2.0".encode(),
        f"Via: SIP/2.0/UDP {HOST}:{local_port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport".encode(),
        b"Max-Forwards: 70",
        b"From: <sip:" + to + f"@{HOST}>;tag={uuid.uuid4().hex[:8]}".encode(),
        b"To: <sip:" + to + f"@{HOST}>".encode(),
        f"Call-ID: {call_id}".encode(),
        b"CSeq: 1 REGISTER",
        b"Contact: <sip:" + contact + f"@{HOST}:{local_port};transport=udp>".encode(),
        f"Expires: {expires}".encode(),
        b"Content-Length: 0",
        b"",
        b"",
    ])


def exchange(server_port: int, data: bytes, sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send one request (resent every 0.5 s, as a UA would) and return the final status and answer."""
    deadline = time.monotonic() + timeout
    sock.sendto(data, (HOST, server_port))
    while time.monotonic() < deadline:
        sock.settimeout(0.5)
        try:
            answer, _ = sock.recvfrom(65535)
        except TimeoutError:
            sock.sendto(data, (HOST, server_port))
            continue
        m = _STATUS.match(answer)
        if m and int(m.group(1)) >= 200:
            return int(m.group(1)), answer
    raise AssertionError(f"no final answer to {data[:60]!r}")


def contact_users(dump: dict[str, Any]) -> set[str]:
    """The Contact user parts of every binding in an ul.dump result."""
    users = set()
    for bindings in dump["aors"].values():
        for b in bindings:
            m = _CONTACT_USER.match(b["contact_uri"])
            if m:
                users.add(m.group(1))
    return users


class RegisterLoad:
    def __init__(self, server_port: int, count: int, rate: float, prefix: str = "u") -> None:
        self.server_port = server_port
        self.count = count
        self.rate = rate
        self.prefix = prefix
        self.token = uuid.uuid4().hex[:8]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.sent_at: list[float] = [0.0] * count  # monotonic send time per index
        self.latency: list[float] = []  # seconds from sending to the 200, per acknowledged REGISTER
        self.acked: set[int] = set()
        self.other: dict[int, int] = {}  # status -> count, for answers other than 200
        self._lock = threading.Lock()
        self._stop = threading.Event()  # sender
        self._done = threading.Event()  # receiver
        self._sender = threading.Thread(target=self._send_all, name="regload-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="regload-recv", daemon=True)

    def user(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def start(self) -> RegisterLoad:
        self._receiver.start()
        self._sender.start()
        return self

    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def wait_acked(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.acked_count() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.acked_count()} of {n} REGISTERs acknowledged in {timeout}s")
            time.sleep(0.01)

    def stop_sending(self) -> None:
        self._stop.set()
        self._sender.join(5)

    def finish(self, drain: float = 0.5) -> set[str]:
        """Stop sending, read what is still on its way for ``drain`` seconds; the acknowledged users."""
        self.stop_sending()
        time.sleep(drain)  # answers the server sent before it died are in our socket buffer by now
        self.close()
        with self._lock:
            return {self.user(i) for i in self.acked}

    def close(self) -> None:
        self._stop.set()
        self._done.set()
        if self._receiver.is_alive():
            self._receiver.join(2)
        self.sock.close()

    def _send_all(self) -> None:
        started = time.monotonic()
        for i in range(self.count):
            if self._stop.is_set():
                return
            ahead = started + i / self.rate - time.monotonic()
            if ahead > 0.001:
                time.sleep(ahead)
            call_id = f"reg-{i}-{self.token}"
            self.sent_at[i] = time.monotonic()
            self.sock.sendto(register_bytes(self.server_port, self.port, self.user(i), call_id), (HOST, self.server_port))
            self.sent = i + 1

    def _receive(self) -> None:
        self.sock.settimeout(0.1)
        prefix = b"reg-"
        suffix = f"-{self.token}".encode()
        while not self._done.is_set():
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            m, c = _STATUS.match(data), _CALL_ID.search(data)
            if m is None or c is None:
                continue
            call_id = c.group(1).strip()
            if not (call_id.startswith(prefix) and call_id.endswith(suffix)):
                continue
            index = int(call_id[len(prefix):-len(suffix)])
            status = int(m.group(1))
            with self._lock:
                if status == 200 and index not in self.acked:
                    self.acked.add(index)
                    self.latency.append(time.monotonic() - self.sent_at[index])
                elif status >= 200:
                    self.other[status] = self.other.get(status, 0) + 1
