"""End to end with a SIP stack we did not write: baresip (Debian `baresip-core`, libre) transfers a
call through the real twistd process. Before REFER support its REFER got 501 and it hung up.

Three baresip processes (alice, bob, carol) register over UDP with auth off and answer
automatically; each is driven through its `ctrl_tcp` module (netstring JSON commands) and read
through its log (`-v -s`: SIP trace). A minimal local helper: the shared baresip harness
(tests/e2e/baresip.py, item 2 of issue 12) may replace it when both are merged.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_until
from tests.e2e.proc import HOST, ServerProcess, admin_rpc, free_port
from tests.e2e.test_calls_sipp import _server_config, ended_reasons

BARESIP = shutil.which("baresip")
MODULES = Path("/usr/lib/baresip/modules")

pytestmark = pytest.mark.skipif(BARESIP is None or not MODULES.is_dir(),
                                reason="baresip is missing (package baresip-core)")


_TAKEN: set[int] = set()  # ports handed out in this process: the OS may offer one again before it is bound


def _free_ports(count: int) -> int:
    """`count` consecutive free ports (baresip binds TLS on its SIP port + 1, RTP on a range)."""
    for _ in range(100):
        first = free_port()
        ports = range(first, first + count)
        if any(p in _TAKEN for p in ports):
            continue
        try:
            for port in ports[1:]:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as sock:
                        sock.bind((HOST, port))
        except OSError:
            continue
        _TAKEN.update(ports)
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


class Baresip:
    """One baresip UA registered as `user` at the server; auto-answers incoming calls."""

    def __init__(self, server: ServerProcess, workdir: Path, user: str) -> None:
        self.user = user
        self.dir = workdir / user
        self.dir.mkdir()
        self.sip_port = _free_ports(2)  # SIP on UDP and TCP, and TLS on the next port
        self.ctrl_port = _free_ports(1)
        rtp = _free_ports(2)
        (self.dir / "config").write_text(
            f"sip_listen {HOST}:{self.sip_port}\nsip_trans_def udp\n"
            f"audio_player aubridge,{user}\naudio_source aubridge,{user}\naudio_alert aubridge,{user}\n"
            f"rtp_ports {rtp}-{rtp + 1}\nmodule_path {MODULES}\n"
            "module g711.so\nmodule aubridge.so\nmodule_app account.so\nmodule_app menu.so\n"
            f"module ctrl_tcp.so\nctrl_tcp_listen {HOST}:{self.ctrl_port}\n"
        )
        (self.dir / "accounts").write_text(
            f"<sip:{user}@{server.host}>;regint=600;outbound=sip:{server.host}:{server.sip_port};"
            "answermode=auto;audio_codecs=PCMU\n"
        )
        self.log = self.dir / "baresip.log"
        self.proc = subprocess.Popen([BARESIP, "-f", str(self.dir), "-v", "-s"], stdin=subprocess.DEVNULL,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, count: int = 1, timeout: float = 10.0) -> None:
        # a baresip that exited logs nothing more: stop waiting at once
        wait_until(lambda: self.output().count(needle) >= count or self.proc.poll() is not None, timeout,
                   f"{self.user} to log {needle!r} x{count}", lambda: self.output()[-5000:])
        if self.output().count(needle) < count:
            raise AssertionError(f"{self.user} exited without logging {needle!r} x{count}\n{self.output()[-5000:]}")

    def command(self, command: str, params: str = "") -> None:
        data = json.dumps({"command": command, "params": params, "token": command}).encode()
        with socket.create_connection((HOST, self.ctrl_port), timeout=5) as conn:
            conn.sendall(str(len(data)).encode() + b":" + data + b",")
            buffer = b""
            while True:  # events (CALL_*) come on the same connection: read up to our response
                chunk = conn.recv(65536)
                assert chunk, f"{self.user}: ctrl_tcp closed before answering {command}"
                buffer += chunk
                while b":" in buffer:
                    size, _, rest = buffer.partition(b":")
                    if len(rest) < int(size) + 1:
                        break
                    message, buffer = json.loads(rest[:int(size)]), rest[int(size) + 1:]
                    if message.get("response"):
                        assert message.get("ok"), message
                        return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def server(start_sip_server) -> ServerProcess:
    return start_sip_server(extra=_server_config(), tls=False)


@pytest.fixture
def phones(server, tmp_path) -> Iterator[dict[str, Baresip]]:
    started: dict[str, Baresip] = {}
    try:
        for user in ("alice", "bob", "carol"):
            started[user] = Baresip(server, tmp_path, user)
        for ua in started.values():
            ua.wait_for("200 OK () [1 binding]")
        yield started
    finally:
        for ua in started.values():
            ua.stop()


def _wait_calls_over(server: ServerProcess, ended: int, timeout: float = 10.0) -> dict:
    def over() -> dict | None:
        stats = admin_rpc(server, "stats")["calls"]
        done = stats["calls"] == 0 and stats["dialogs"] == 0 and len(ended_reasons(server)) >= ended
        return stats if done else None

    return wait_until(over, timeout, "every call to be over", lambda: server.output()[-5000:])


@pytest.mark.parametrize("referrer", ["alice", "bob"], ids=["caller-transfers", "callee-transfers"])
def test_baresip_blind_transfer(server, phones, referrer):
    """alice calls bob; `referrer` transfers the other one to carol: baresip gets 202 and the
    NOTIFYs, the transferee and carol end up in a call, and the referrer's call ends cleanly."""
    alice, bob, carol = phones["alice"], phones["bob"], phones["carol"]
    transferee = bob if referrer == "alice" else alice
    alice.command("dial", f"sip:bob@{server.host}")
    alice.wait_for("Call established: sip:bob@")
    bob.wait_for("Call established: sip:alice@")
    phones[referrer].command("transfer", f"sip:carol@{server.host}")
    carol.wait_for(f"Call established: sip:{transferee.user}@")
    phones[referrer].wait_for("SIP/2.0 202 Accepted")
    phones[referrer].wait_for("Subscription-State: terminated;reason=noresource")
    phones[referrer].wait_for("BYE sip:")  # its call with the transferee ends (ours or its own BYE)
    assert "SIP/2.0 501" not in phones[referrer].output()
    # the transferee talks to carol now: its hang-up reaches her
    transferee.command("hangup")
    carol.wait_for("session closed: Connection reset by peer")  # baresip words for a BYE received
    stats = _wait_calls_over(server, 2)
    assert stats["total_transfers"] == 1
    assert "transferred" in ended_reasons(server)
