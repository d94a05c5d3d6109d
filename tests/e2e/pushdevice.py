"""A tiny SIP phone for the push end-to-end tests, and a tiny caller.

`PushDevice` registers over UDP with RFC 8599 pn params, then goes silent. A thread watches the
push fake's ``--record`` file (JSON lines): when a push for its token was answered 200 it sends a
REGISTER refresh from the same socket, like an app woken by PushKit/FCM, and then answers the
INVITE that follows (180, then 200 with SDP, or only 180 when it must not answer). CANCELs get
200 + 487, BYEs 200. Everything it sees is kept in ``events`` for the test to assert on.

`Caller` sends one INVITE (UDP) and handles what a UAC must: ACK for the final answer (in the
transaction for a failure, a new one for a 2xx), CANCEL and BYE.

The message handling is written here from RFC 3261 on purpose, not with the server's own parser,
so a server bug cannot hide behind a shared one.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.waiting import wait_until

HOST = "127.0.0.1"
_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
            "c": "content-type", "k": "supported"}
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def _branch() -> str:
    return "z9hG4bK" + uuid.uuid4().hex[:16]


def _tag() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class Msg:
    first: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def is_request(self) -> bool:
        return not self.first.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        return self.first.split(" ", 1)[0] if self.is_request else self.cseq_method

    @property
    def status(self) -> int:
        return int(self.first.split(" ", 2)[1]) if not self.is_request else 0

    @property
    def uri(self) -> str:
        return self.first.split(" ")[1]

    def get(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    @property
    def cseq_method(self) -> str:
        return (self.get("cseq") or "0 ?").split()[1]

    @property
    def cseq(self) -> int:
        return int((self.get("cseq") or "0 ?").split()[0])

    @property
    def branch(self) -> str:
        via = self.all("via")[0]
        for p in via.split(";")[1:]:
            k, _, v = p.strip().partition("=")
            if k.lower() == "branch":
                return v
        return ""

    @property
    def to_tag(self) -> str | None:
        return _tag_of(self.get("to") or "")


def _tag_of(value: str) -> str | None:
    for p in value.split(">")[-1].split(";")[1:]:
        k, _, v = p.strip().partition("=")
        if k.lower() == "tag":
            return v
    return None


def parse(data: bytes) -> Msg:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded line
            headers[-1] = (headers[-1][0], headers[-1][1] + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        name = _COMPACT.get(name, name)
        # Via is the only list header the device needs split
        if name == "via":
            headers += [(name, v.strip()) for v in value.split(",")]
        else:
            headers.append((name, value.strip()))
    return Msg(lines[0], headers, body)


def build(first: str, headers: list[tuple[str, str]], body: str = "") -> bytes:
    out = [first] + [f"{k}: {v}" for k, v in headers]
    if body:
        out.append("Content-Type: application/sdp")
    out.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(out) + "\r\n\r\n" + body).encode()


def response_to(req: Msg, status: int, reason: str, to_tag: str | None = None,
                extra: list[tuple[str, str]] | None = None, body: str = "") -> bytes:
    to = req.get("to") or ""
    if to_tag and _tag_of(to) is None:
        to += f";tag={to_tag}"
    headers = [("Via", v) for v in req.all("via")]
    headers += [("From", req.get("from") or ""), ("To", to), ("Call-ID", req.get("call-id") or ""),
                ("CSeq", req.get("cseq") or "")]
    return build(f"SIP/2.0 {status} {reason}", headers + (extra or []), body)


class Agent:
    """A UDP socket with an event log; `wait()` polls the log from the test thread."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.events: list[tuple[float, str, Any]] = []
        self.lock = threading.Lock()

    def note(self, kind: str, detail: Any = None) -> None:
        with self.lock:
            self.events.append((time.monotonic(), kind, detail))

    def seen(self, kind: str) -> list[Any]:
        with self.lock:
            return [d for _, k, d in self.events if k == kind]

    def when(self, kind: str) -> float | None:
        with self.lock:
            times = [t for t, k, _ in self.events if k == kind]
        return times[0] if times else None

    def wait(self, kind: str, timeout: float, count: int = 1) -> list[Any]:
        return wait_until(lambda: len(self.seen(kind)) >= count and self.seen(kind), timeout, f"{count} {kind!r}",
                          explain=lambda: f"events: {[k for _, k, _ in self.events]}")

    def send(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        self.sock.sendto(data, addr or self.server)

    def recv(self, timeout: float) -> tuple[Msg, tuple[str, int]] | None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data, addr = self.sock.recvfrom(65535)
        return parse(data), addr

    def close(self) -> None:
        self.sock.close()


def push_records(path: Path, provider: str) -> list[dict[str, Any]]:
    """The fake's record file as (token, status) dicts, whatever the fake (apns, fcm or webhook)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        if provider == "fcm":
            if rec.get("kind") != "send":
                continue
            out.append({"token": rec.get("target"), "status": rec.get("status"), "raw": rec})
        else:
            token = rec.get("token")
            if token is None and isinstance(rec.get("body"), dict):  # the webhook fake: the JSON it got
                token = rec["body"].get("pn_prid")
            out.append({"token": token, "status": rec.get("status"), "raw": rec})
    return out


@dataclass
class DeviceConfig:
    user: str = "bob"
    provider: str = "apns"
    prid: str = ""
    param: str = ""
    alert_prid: str = ""  # the app's alert token (pn-alert-prid), for missed-call pushes
    record: Path | None = None
    react_to_push: bool = True  # send the REGISTER refresh when a push is delivered
    answer: bool = True  # 200 the INVITE; False: ring only
    answer_after: float = 0.2
    expires: int = 600
    pnsreg: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class PushDevice(Agent):
    def __init__(self, server: tuple[str, int], cfg: DeviceConfig) -> None:
        super().__init__(server)
        self.cfg = cfg
        self.reg_call_id = uuid.uuid4().hex
        self.reg_cseq = 0
        self.from_tag = _tag()
        self.domain = server[0]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pushes_handled = 0
        self._invites: dict[str, dict[str, Any]] = {}  # by branch
        self._timers: list[tuple[float, Callable[[], None]]] = []

    @property
    def contact_uri(self) -> str:
        c = self.cfg
        return (f"sip:{c.user}@{HOST}:{self.port};pn-provider={c.provider};pn-prid={c.prid}"
                + (f";pn-param={c.param}" if c.param else "")
                + (f";pn-alert-prid={c.alert_prid}" if c.alert_prid else ""))

    def _register_msg(self) -> bytes:
        self.reg_cseq += 1
        contact = f"<{self.contact_uri}>" + (";+sip.pnsreg" if self.cfg.pnsreg else "")
        aor = f"sip:{self.cfg.user}@{self.domain}"
        return build(f"REGISTER sip:{self.domain}:{self.server[1]} SIP/2.0", [
            ("Via", f"SIP/2.0/UDP {HOST}:{self.port};branch={_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<{aor}>;tag={self.from_tag}"),
            ("To", f"<{aor}>"),
            ("Call-ID", self.reg_call_id),
            ("CSeq", f"{self.reg_cseq} REGISTER"),
            ("Contact", contact),
            ("Expires", str(self.cfg.expires)),
            ("User-Agent", "pushdevice"),
        ])

    def register(self, timeout: float = 5.0) -> Msg:
        """Before start(): REGISTER and wait for the final answer (blocking)."""
        assert self._thread is None
        self.send(self._register_msg())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(deadline - time.monotonic())
            if got is not None and not got[0].is_request and got[0].status >= 200:
                self.note("register_ok" if got[0].status < 300 else "register_failed", got[0].status)
                return got[0]
        raise AssertionError("no answer to REGISTER")

    def refresh(self) -> None:
        """Send a REGISTER refresh now (from the device thread or the test)."""
        self.note("register_sent")
        self.send(self._register_msg())

    # -- the thread ----------------------------------------------------------------------------

    def start(self) -> PushDevice:
        self._thread = threading.Thread(target=self._run, name=f"pushdevice-{self.cfg.prid[:6]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._check_pushes()
                self._run_timers()
                got = self.recv(0.02)
                if got is not None:
                    self._handle(*got)
            except OSError:
                return
            except Exception as e:  # show it in the test failure, not as a silent dead thread
                self.note("error", repr(e))

    def _check_pushes(self) -> None:
        if self.cfg.record is None:
            return
        mine = [r for r in push_records(self.cfg.record, self.cfg.provider)
                if r["token"] in (self.cfg.prid, self.cfg.alert_prid or self.cfg.prid)]
        delivered = [r for r in mine if r["status"] == 200]
        for rec in mine[len(self.seen("push_seen")):]:
            self.note("push_seen", rec["raw"])
        while self._pushes_handled < len(delivered):
            self.note("push", delivered[self._pushes_handled]["raw"])
            self._pushes_handled += 1
            if self.cfg.react_to_push:
                self.refresh()

    def _run_timers(self) -> None:
        now = time.monotonic()
        due = [t for t in self._timers if t[0] <= now]
        self._timers = [t for t in self._timers if t[0] > now]
        for _, fn in due:
            fn()

    def _handle(self, msg: Msg, addr: tuple[str, int]) -> None:
        if not msg.is_request:
            if msg.cseq_method == "REGISTER" and msg.status >= 200:
                self.note("register_ok" if msg.status < 300 else "register_failed", msg.status)
            return
        method = msg.method
        if method == "INVITE":
            self._invite(msg, addr)
        elif method == "CANCEL":
            self.note("cancel", msg.get("reason"))
            self.send(response_to(msg, 200, "OK"), addr)
            inv = self._invites.get(msg.branch)
            if inv is not None and not inv["final"]:
                inv["final"] = 487
                self.send(response_to(inv["msg"], 487, "Request Terminated", inv["tag"]), addr)
        elif method == "ACK":
            self.note("ack", msg.get("call-id"))
        elif method == "BYE":
            self.note("bye", msg.get("call-id"))
            self.send(response_to(msg, 200, "OK"), addr)
        else:
            self.send(response_to(msg, 200 if method == "OPTIONS" else 405, "OK"), addr)

    def _invite(self, msg: Msg, addr: tuple[str, int]) -> None:
        inv = self._invites.get(msg.branch)
        if inv is not None:  # a retransmission: repeat the last answer
            if inv["last"] is not None:
                self.send(inv["last"], addr)
            return
        tag = _tag()
        inv = {"msg": msg, "tag": tag, "final": None, "last": None}
        self._invites[msg.branch] = inv
        self.note("invite", {"uri": msg.uri, "call_id": msg.get("call-id"), "from": msg.get("from")})
        ringing = response_to(msg, 180, "Ringing", tag)
        inv["last"] = ringing
        self.send(ringing, addr)
        if self.cfg.answer:
            def answer() -> None:
                if inv["final"]:
                    return
                inv["final"] = 200
                ok = response_to(msg, 200, "OK", tag, [("Contact", f"<sip:{self.cfg.user}@{HOST}:{self.port}>")],
                                 SDP.format(port=40000))
                inv["last"] = ok
                self.send(ok, addr)
                self.note("answered", msg.get("call-id"))

            self._timers.append((time.monotonic() + self.cfg.answer_after, answer))


class Caller(Agent):
    """One call from alice to ``target`` (a user at the server), driven step by step by the test."""

    def __init__(self, server: tuple[str, int], target: str = "bob") -> None:
        super().__init__(server)
        self.target = target
        self.call_id = uuid.uuid4().hex
        self.from_tag = _tag()
        self.branch = _branch()
        self.ruri = f"sip:{target}@{server[0]}:{server[1]}"
        self.to_header = f"<sip:{target}@{server[0]}>"
        self.responses: list[Msg] = []
        self.final: Msg | None = None
        self.final_at: float | None = None
        self.sent_at: float | None = None

    def _headers(self, method: str, cseq: int, branch: str, to: str) -> list[tuple[str, str]]:
        return [
            ("Via", f"SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", f'"Alice" <sip:alice@{self.server[0]}>;tag={self.from_tag}'),
            ("To", to),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} {method}"),
        ]

    def invite(self) -> None:
        headers = self._headers("INVITE", 1, self.branch, self.to_header)
        headers.append(("Contact", f"<sip:alice@{HOST}:{self.port}>"))
        self.sent_at = time.monotonic()
        self.send(build(f"INVITE {self.ruri} SIP/2.0", headers, SDP.format(port=30000)))

    def wait_final(self, timeout: float) -> Msg:
        """Read responses until the final one; ACK it. Returns it."""
        deadline = time.monotonic() + timeout
        while self.final is None and time.monotonic() < deadline:
            got = self.recv(max(0.0, min(0.1, deadline - time.monotonic())))
            if got is None:
                continue
            msg = got[0]
            if msg.is_request:
                self._answer_request(msg, got[1])
                continue
            if msg.cseq_method != "INVITE":
                self.responses.append(msg)
                continue
            self.responses.append(msg)
            if msg.status >= 200:
                self.final = msg
                self.final_at = time.monotonic()
                self.ack()
        if self.final is None:
            raise AssertionError(f"no final response in {timeout}s; got {[r.status for r in self.responses]}")
        return self.final

    @property
    def elapsed(self) -> float:
        assert self.final_at is not None and self.sent_at is not None
        return self.final_at - self.sent_at

    def ack(self) -> None:
        assert self.final is not None
        to = self.final.get("to") or self.to_header
        if self.final.status < 300:
            uri = (self.final.get("contact") or self.ruri).strip("<>").split(">")[0]
            self.send(build(f"ACK {uri} SIP/2.0", self._headers("ACK", 1, _branch(), to)))
        else:  # §17.1.1.3: same branch, To with the response's tag
            self.send(build(f"ACK {self.ruri} SIP/2.0", self._headers("ACK", 1, self.branch, to)))

    def cancel(self) -> None:
        self.send(build(f"CANCEL {self.ruri} SIP/2.0", self._headers("CANCEL", 1, self.branch, self.to_header)
                        + [("Reason", 'SIP;cause=487;text="caller gave up"')]))

    def bye(self, timeout: float = 5.0) -> Msg:
        assert self.final is not None and self.final.status < 300
        to = self.final.get("to") or ""
        uri = (self.final.get("contact") or self.ruri).strip("<>").split(">")[0]
        self.send(build(f"BYE {uri} SIP/2.0", self._headers("BYE", 2, _branch(), to)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(0.1)
            if got is None:
                continue
            msg = got[0]
            if msg.is_request:
                self._answer_request(msg, got[1])
            elif msg.cseq_method == "BYE" and msg.status >= 200:
                return msg
            elif msg.cseq_method == "INVITE" and msg.status < 300 and msg.status >= 200:
                self.ack()  # our ACK crossed a 2xx retransmission
        raise AssertionError("no answer to BYE")

    def _answer_request(self, msg: Msg, addr: tuple[str, int]) -> None:
        if msg.method != "ACK":
            self.send(response_to(msg, 200, "OK"), addr)
