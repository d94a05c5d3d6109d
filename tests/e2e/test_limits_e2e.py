"""[limits] end to end: the real twistd server, and Python UDP clients on chosen loopback addresses
(127.0.0.2, 127.0.0.3... are distinct sources to the server; loopback is made non-exempt here).

- a source flooding OPTIONS gets one 503 + Retry-After, then silence, while another source still
  gets 200 (the server's own counters, read on /metrics, say when every datagram was handled);
- unanswered calls per source: the third INVITE from one source gets 503, another source still parks;
- with the users database on: an INVITE to a user that does not exist gets 404 at once, a known user
  with no binding (and no push configured) 480 at once; nothing is parked;
- push spam: INVITE + CANCEL repeated to one phone pushes it only ``pushes_per_device_per_minute``
  times; the next call gets 480 at once (APNs fake, tests/e2e/pushdevice.py);
- the admin API: the issue's cross-site form POST to /rpc/ul.rm is refused and the binding stays.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.proc import HOST, JSON_LOG, ServerProcess, admin_rpc, free_port, log_events
from tests.e2e.pushdevice import Msg, PushDevice, build, parse
from tests.e2e.test_push_e2e import call, device, devices, fakes  # noqa: F401 (fixtures)
from tests.waiting import wait_until

ADMIN_CLI = Path(sys.executable).parent / "libon-tsilo-admin"
NOT_EXEMPT = {"exempt_sources": []}


class Source:
    """A UDP socket bound to one loopback address: one SIP source as the server sees it."""

    def __init__(self, server: ServerProcess, ip: str) -> None:
        self.server = server
        self.ip = ip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, ruri: str, call_id: str | None = None, to: str | None = None,
             extra: list[tuple[str, str]] | None = None) -> str:
        call_id = call_id or uuid.uuid4().hex
        headers = [
            ("Via", f"SIP/2.0/UDP {self.ip}:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:spammer@example.org>;tag={uuid.uuid4().hex[:8]}"),
            ("To", to or f"<{ruri}>"),
            ("Call-ID", call_id),
            ("CSeq", f"1 {method}"),
            ("Contact", f"<sip:spammer@{self.ip}:{self.port}>"),
            *(extra or []),
        ]
        self.sock.sendto(build(f"{method} {ruri} SIP/2.0", headers), (HOST, self.server.sip_port))
        return call_id

    def responses(self, timeout: float = 0.0) -> list[Msg]:
        """What arrived so far (waiting at most ``timeout`` for the first datagram)."""
        out = []
        while True:
            ready, _, _ = select.select([self.sock], [], [], timeout if not out else 0)
            if not ready:
                return out
            out.append(parse(self.sock.recvfrom(65535)[0]))

    def final(self, call_id: str, timeout: float = 5.0) -> Msg:
        """The first final response for ``call_id``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.responses(0.1):
                if msg.get("call-id") == call_id and msg.status >= 200:
                    return msg
        raise AssertionError(f"no final response for {call_id}\n{self.server.output()[-3000:]}")


@pytest.fixture
def sources() -> Iterator[list[Source]]:
    made: list[Source] = []
    yield made
    for s in made:
        s.close()


def source(server: ServerProcess, made: list[Source], ip: str) -> Source:
    s = Source(server, ip)
    made.append(s)
    return s


def admin_port(server: ServerProcess) -> int:
    return int(server.sections["admin"]["listen"].split(":")[1])


def metrics(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{HOST}:{admin_port(server)}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def options_received(server: ServerProcess) -> float:
    return metrics(server).get(("libon_tsilo_sip_requests_received_total", (("method", "OPTIONS"),)), 0.0)


def limit_hits(server: ServerProcess, limit: str) -> float:
    return metrics(server).get(("libon_tsilo_limit_hits_total", (("limit", limit),)), 0.0)


def wait_for(what: Any, value: float, timeout: float = 10.0) -> None:
    """Until the counter ``what()`` reaches ``value``."""
    wait_until(lambda: what() >= value, timeout, f"a counter to reach {value}")


def admin_section() -> dict[str, Any]:
    return {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"}


# -- per-source request rate ----------------------------------------------------------------------


def test_a_flooding_source_gets_one_503_then_silence_while_another_is_served(start_sip_server, sources):
    server = start_sip_server(extra={
        "limits": {**NOT_EXEMPT, "requests_per_second": 1, "burst": 10, "ban_time": 60},
        "admin": admin_section(),
        "log": JSON_LOG,
    }, tls=False)
    flood = source(server, sources, "127.0.0.2")
    before = options_received(server)
    for _ in range(100):
        flood.send("OPTIONS", f"sip:{HOST}")
    wait_for(lambda: options_received(server), before + 100)  # the server has handled every one
    got = flood.responses(1.0)
    statuses = [m.status for m in got]
    assert statuses.count(503) == 1 and set(statuses) <= {200, 503}, statuses
    assert 10 <= statuses.count(200) <= 20  # the burst, plus what refilled while the server read them
    (busy,) = [m for m in got if m.status == 503]
    assert busy.get("retry-after") == "60"
    assert limit_hits(server, "source_rate_dropped") == 100 - len(got)
    # another source is served as usual
    other = source(server, sources, "127.0.0.3")
    other.send("OPTIONS", f"sip:{HOST}")
    assert [m.status for m in other.responses(5.0)] == [200]
    # the flooder stays banned: its next request is counted as dropped and gets no answer
    dropped = limit_hits(server, "source_rate_dropped")
    flood.send("OPTIONS", f"sip:{HOST}")
    wait_for(lambda: limit_hits(server, "source_rate_dropped"), dropped + 1)
    assert flood.responses(0.2) == []
    assert metrics(server)[("libon_tsilo_limit_banned_sources", ())] == 1
    (banned,) = log_events(server, "libon_tsilo.sip.limits", source="127.0.0.2")  # logged once when it bit
    assert banned["level"] == "warn" and banned["rate"] == 1, banned


# -- unanswered calls per source, unknown users ---------------------------------------------------


def test_unanswered_calls_per_source_and_unknown_users(start_sip_server, sources):
    server = start_sip_server(extra={
        "limits": {**NOT_EXEMPT, "max_parked_per_source": 2},
        "auth": {"enabled": True},
        "calls": {"ring_timeout": 30},
        "admin": admin_section(),
    }, tls=False)
    add = subprocess.run([str(ADMIN_CLI), "--config", str(server.config_path), "user", "add", "bob",
                          "--password", "pw"], capture_output=True, text=True, timeout=30)
    assert add.returncode == 0, add.stderr
    caller = source(server, sources, "127.0.0.2")
    # a user that does not exist: 404 at once, nothing parks
    started = time.monotonic()
    assert caller.final(caller.send("INVITE", f"sip:nobody@{HOST}")).status == 404
    # a known user without any device, and no push configured: nothing can wake bob, 480 at once
    assert caller.final(caller.send("INVITE", f"sip:bob@{HOST}")).status == 480
    assert time.monotonic() - started < 2.0
    assert admin_rpc(server, "ts.dump")["stats"]["stored_transactions"] == 0
    # bob registers (digest), then goes away: his calls park until the ring timeout
    register_with_digest(server, "bob", "pw")
    ids = [caller.send("INVITE", f"sip:bob@{HOST}") for _ in range(2)]
    wait_for(lambda: admin_rpc(server, "ts.dump")["stats"]["stored_transactions"], 2)
    third = caller.send("INVITE", f"sip:bob@{HOST}")
    refused = caller.final(third)
    assert refused.status == 503 and refused.get("retry-after") == "30"
    other = source(server, sources, "127.0.0.3")
    other_id = other.send("INVITE", f"sip:bob@{HOST}")
    wait_for(lambda: admin_rpc(server, "ts.dump")["stats"]["stored_transactions"], 3)
    assert limit_hits(server, "parked_per_source") == 1 and limit_hits(server, "unknown_user") == 1
    assert {c["call_id"] for c in admin_rpc(server, f"ts.lookup?aor=sip:bob@{HOST}")["calls"]} == {*ids, other_id}


def register_with_digest(server: ServerProcess, user: str, password: str) -> None:
    """REGISTER bob from 127.0.0.4 with MD5 digest (the device then never answers: it is asleep)."""
    import hashlib
    import re

    sock = Source(server, "127.0.0.4")
    try:
        aor = f"sip:{user}@{HOST}"
        call_id = uuid.uuid4().hex
        sock.send("REGISTER", f"sip:{HOST}", call_id=call_id, to=f"<{aor}>", extra=[("Expires", "600")])
        (challenge,) = [m for m in sock.responses(5.0) if m.status == 401]
        header = challenge.get("www-authenticate") or ""
        offers = [h for h in challenge.all("www-authenticate") if "MD5" in h] or [header]
        nonce = re.search(r'nonce="([^"]+)"', offers[0]).group(1)  # type: ignore[union-attr]
        realm = re.search(r'realm="([^"]+)"', offers[0]).group(1)  # type: ignore[union-attr]
        uri = f"sip:{HOST}"
        ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
        ha2 = hashlib.md5(f"REGISTER:{uri}".encode()).hexdigest()
        response = hashlib.md5(f"{ha1}:{nonce}:00000001:abc:auth:{ha2}".encode()).hexdigest()
        auth = (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5, '
                f'response="{response}", qop=auth, nc=00000001, cnonce="abc"')
        sock.send("REGISTER", uri, call_id=call_id, to=f"<{aor}>",
                  extra=[("Expires", "600"), ("Authorization", auth)])
        assert [m.status for m in sock.responses(5.0)] == [200]
    finally:
        sock.close()


# -- push spam --------------------------------------------------------------------------------------


def test_invite_cancel_spam_pushes_a_phone_only_n_times_a_minute(fakes, start_sip_server,  # noqa: F811
                                                                 devices: list[PushDevice]) -> None:  # noqa: F811
    fake = fakes("apns")
    server = start_sip_server(extra={
        "auth": {"enabled": False},
        "calls": {"ring_timeout": 10, "invite_cancel_grace": 0},
        "push": fake.config,
        "admin": admin_section(),
        "limits": {"pushes_per_device_per_minute": 2},
    }, tls=False)
    dev = device(server, fake, devices, react_to_push=False, answer=False)
    for n in range(2):
        caller = call(server)
        dev.wait("push", 5, count=n + 1)
        caller.cancel()
        assert caller.wait_final(5).status == 487
    caller = call(server)
    final = caller.wait_final(5)
    assert final.status == 480 and caller.elapsed < 2.0  # not the 10 s ring timeout
    assert len(fake.records()) == 2
    stats = admin_rpc(server, "stats")["push"]
    assert stats["rate_limited"] == 1


# -- the admin API ----------------------------------------------------------------------------------


def test_cross_site_form_post_does_not_remove_a_binding(start_sip_server, sources):
    server = start_sip_server(extra={"auth": {"enabled": False}, "admin": admin_section(), "log": JSON_LOG},
                              tls=False)
    phone = source(server, sources, "127.0.0.1")
    phone.send("REGISTER", f"sip:{HOST}", to=f"<sip:alice@{HOST}>", extra=[("Expires", "600")])
    assert [m.status for m in phone.responses(5.0)] == [200]
    url = f"http://{HOST}:{admin_port(server)}/rpc/ul.rm"
    form = urllib.request.Request(url, data=f"aor=sip:alice@{HOST}".encode(), method="POST", headers={
        "Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(form, timeout=5)
    assert refused.value.code == 403
    assert json.loads(refused.value.read())["error"]["message"] == "cross-site request refused"
    assert len(admin_rpc(server, f"ul.lookup?aor=sip:alice@{HOST}")["bindings"]) == 1
    # the operator's own tool still works
    own = urllib.request.Request(url, data=json.dumps({"aor": f"sip:alice@{HOST}"}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(own, timeout=5) as resp:
        assert resp.status == 200
    assert len(log_events(server, "libon_tsilo.ops.admin", client="127.0.0.1", level="warn")) == 1  # the refusal
