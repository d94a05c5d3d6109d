"""Drive a real baresip (Debian `baresip-core`, libre's SIP stack) for end-to-end tests.

Each `Baresip` gets its own config dir (`baresip -f DIR`): a `config` that listens for SIP on
127.0.0.1 (UDP/TCP on an OS-picked free port; baresip also takes that port + 1 for TLS), loads no
audio device (the `ausine` tone generator is the microphone, the `aufile` module writes what it
hears to a file), and the `ctrl_tcp` module on another free loopback port; and an `accounts` file.

`ctrl_tcp` speaks netstring-framed JSON: commands ``{"command", "params", "token"}`` get a
``{"response": true, "ok", "data", "token"}``; every UA event arrives as ``{"event": true, "type":
"REGISTER_OK"|"CALL_INCOMING"|"CALL_ESTABLISHED"|"CALL_CLOSED"|..., "param", "peeruri", ...}``.
A reader thread collects both; tests wait on them (`wait_event`), never on a fixed sleep.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.proc import HOST, free_port

__all__ = ["Baresip", "baresip_available", "account_line"]

Event = dict[str, Any]

MODULE_PATH = "/usr/lib/baresip/modules"
START_TIMEOUT = 10.0


def baresip_available() -> bool:
    return shutil.which("baresip") is not None


def account_line(user: str, server_port: int, transport: str = "udp", password: str | None = None,
                 **params: str) -> str:
    """One `accounts` line for sip:user@127.0.0.1 via the server on 127.0.0.1:server_port.

    ``params`` become account parameters (``regint``, ``answermode``, ``regq``...): a value with a
    ";" is quoted, and baresip copies a quoted ``regq`` into the Contact as is, which is how a test
    makes an RFC 8599 push binding (``regq='0.5;pn-provider=...;pn-prid=...'``).
    """
    line = f"<sip:{user}@{HOST}:{server_port};transport={transport}>"
    # every request through the server (baresip would send an INVITE to sip:bob@host straight there)
    params.setdefault("outbound", f"sip:{HOST}:{server_port};transport={transport}")
    if password is not None:
        line += f";auth_pass={password}"
    for key, value in params.items():
        line += f';{key}="{value}"' if (";" in value or ":" in value) else f";{key}={value}"
    return line


class Baresip:
    """One baresip process with its config dir, and a ctrl_tcp connection to it."""

    def __init__(self, workdir: Path, accounts: list[str], ca_file: str | Path | None = None,
                 sip_port: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.accounts = accounts
        self.ca_file = ca_file
        self.sip_port = sip_port or _free_port_pair()
        self.ctrl_port = free_port(udp_too=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "baresip.log"
        self.events: list[Event] = []
        self._responses: dict[str, Event] = {}
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._tokens = itertools.count(1)

    # -- config ----------------------------------------------------------------------------------

    def write_config(self) -> None:
        lines = [
            ("poll_method", "epoll"),
            ("net_interface", HOST),  # else it picks the default route's address for its Contact
            ("dns_server", f"{HOST}:53"),  # every address is an IP literal: no real DNS query
            ("sip_listen", f"{HOST}:{self.sip_port}"),
            ("call_local_timeout", "120"),
            # no sound card: a 440 Hz tone as the microphone, what is heard goes to a file
            ("audio_player", f"aufile,{self.dir / 'heard.wav'}"),
            ("audio_source", "ausine,440"),
            ("ausrc_srate", "48000"),  # ausine makes 48 kHz stereo only
            ("ausrc_channels", "2"),
            ("audio_alert", f"aufile,{self.dir / 'alert.wav'}"),
            ("module_path", MODULE_PATH),
            ("module", "g711.so"),
            ("module", "ausine.so"),
            ("module", "aufile.so"),
            ("module_app", "account.so"),
            ("module_app", "menu.so"),
            ("module_app", "ctrl_tcp.so"),
            ("ctrl_tcp_listen", f"{HOST}:{self.ctrl_port}"),
        ]
        if self.ca_file is not None:
            lines.append(("sip_cafile", str(self.ca_file)))
        (self.dir / "config").write_text("".join(f"{k}\t\t{v}\n" for k, v in lines))
        # accounts are added over ctrl_tcp once connected (add_account), so that no REGISTER_OK
        # can happen before the test listens for it
        (self.dir / "accounts").write_text("")

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> Baresip:
        """Start the process and connect to its ctrl_tcp port (retried until it listens)."""
        self.write_config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["baresip", "-4", "-f", str(self.dir)], cwd=self.dir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"baresip exited with {self.proc.returncode}\n{self.output()}")
            try:
                self._sock = socket.create_connection((HOST, self.ctrl_port), timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"baresip ctrl_tcp never listened\n{self.output()}") from None
                time.sleep(0.02)  # polling a port that is about to open, not a negative check
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name=f"baresip-{self.sip_port}", daemon=True)
        self._reader.start()
        for line in self.accounts:
            self.add_account(line)
        return self

    def add_account(self, line: str) -> None:
        """A new user agent (``uanew``): it registers at once when its ``regint`` is not 0."""
        answer = self.command("uanew", line)
        assert answer is not None and answer.get("ok"), f"uanew {line!r}: {answer}"

    def output(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        # the menu module redraws a call's status line every few ms: noise in a failure message
        return "\n".join(line for line in text.splitlines() if "audio=" not in line)

    def quit(self, timeout: float = 5.0) -> int | None:
        """A clean exit (baresip unregisters its accounts on the way out), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return self._close()
        try:
            self.command("quit", wait=False)
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)
        return self._close()

    def kill(self) -> int | None:
        """The app dies (or the OS suspends it): no unregister, its binding stays at the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        return self._close()

    def _close(self) -> int | None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.join(2)
            self._reader = None
        return self.proc.returncode if self.proc is not None else None

    # -- ctrl_tcp --------------------------------------------------------------------------------

    def command(self, command: str, params: str = "", wait: bool = True, timeout: float = 5.0) -> Event | None:
        """Send a menu command (``dial``, ``accept``, ``hangup``, ``reginfo``, ``quit``...)."""
        assert self._sock is not None, "not started"
        token = f"t{next(self._tokens)}"
        data = json.dumps({"command": command, "params": params, "token": token}).encode()
        self._sock.sendall(str(len(data)).encode() + b":" + data + b",")
        if not wait:
            return None
        with self._cond:
            if not self._cond.wait_for(lambda: token in self._responses, timeout):
                raise AssertionError(f"baresip: no answer to {command!r} in {timeout}s\n{self.output()[-3000:]}")
            return self._responses.pop(token)

    def wait_event(self, kind: str, timeout: float = 10.0, count: int = 1,
                   where: Callable[[Event], bool] | None = None) -> list[Event]:
        """The first ``count`` events of type ``kind`` (and matching ``where``); waits for them."""

        def found() -> list[Event]:
            return [e for e in self.events if e.get("type") == kind and (where is None or where(e))]

        with self._cond:
            if not self._cond.wait_for(lambda: len(found()) >= count, timeout):
                seen = [e.get("type") for e in self.events]
                raise AssertionError(f"baresip: no {kind} x{count} in {timeout}s (saw {seen})\n"
                                     f"{self.output()[-3000:]}")
            return found()[:count]

    def seen(self, kind: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("type") == kind]

    def _read_loop(self) -> None:
        buf = b""
        sock = self._sock
        assert sock is not None
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while True:
                colon = buf.find(b":")
                if colon < 0:
                    break
                size = int(buf[:colon])
                if len(buf) < colon + 1 + size + 1:
                    break
                self._dispatch(json.loads(buf[colon + 1:colon + 1 + size]))
                buf = buf[colon + 1 + size + 1:]

    def _dispatch(self, msg: Event) -> None:
        with self._cond:
            if msg.get("event"):
                msg["at"] = time.monotonic()
                self.events.append(msg)
            elif msg.get("response"):
                self._responses[str(msg.get("token"))] = msg
            self._cond.notify_all()


def _free_port_pair() -> int:
    """A port free for UDP and TCP whose successor is free for TCP (baresip's TLS listener)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tls:
            try:
                tls.bind((HOST, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for baresip")

