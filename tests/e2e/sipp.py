"""Run SIPp scenarios (tests/e2e/scenarios/) as subprocesses against the real server.

Two roles:

- a **caller** is a SIPp UAC (`Sipp` with a caller_*.xml scenario, `-s USER` as the callee);
- a **device** (`Device`) is ONE SIPp process on its own port: its main scenario
  (device_register.xml) REGISTERs a Contact on that very port, and its out-of-call scenario
  (``-oocsf device_*.xml``) runs every INVITE the server forks there (they carry another Call-ID,
  so SIPp hands them to the out-of-call scenario). One process is needed because the server sends
  a UDP branch to the address the REGISTER came from (NAT-friendly `received`), so the REGISTER
  and the INVITEs must share the port. `Device.stop()` sends the main call a NOTIFY (its Call-ID is
  fixed with ``-cid_str``), after which the device unregisters and SIPp exits.

Every process gets its own directory with a copy of its scenarios and the log, error and message
files; `explain()` gathers them for assertion messages. `<log>` actions of the scenarios are the
way tests read what happened on the SIPp side (e.g. the Reason of a CANCEL).
"""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.e2e.proc import HOST, ServerProcess, free_port
from tests.waiting import wait_until

SCENARIOS = Path(__file__).parent / "scenarios"
SIPP = shutil.which("sipp") or "/usr/bin/sipp"

_counter = itertools.count(1)


def sipp_available() -> bool:
    return Path(SIPP).exists()


class Sipp:
    """One SIPp process running ``scenario`` (a file name in tests/e2e/scenarios/) against the server."""

    def __init__(
        self,
        server: ServerProcess | tuple[str, int],
        scenario: str,
        workdir: Path,
        *,
        name: str | None = None,
        service: str | None = None,
        calls: int = 1,
        rate: float | None = None,
        rate_period_ms: int | None = None,
        limit: int | None = None,
        pause_ms: int | None = None,
        keys: dict[str, str] | None = None,
        ooc_scenario: str | None = None,
        cid_str: str | None = None,
        transport: str = "u1",
        local_port: int | None = None,
        timeout_s: float = 30.0,
        trace_msg: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name or f"{Path(scenario).stem}-{next(_counter)}"
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        host, port = (server.host, server.sip_port) if isinstance(server, ServerProcess) else server
        self.local_port = local_port or free_port(udp_too=True)
        self.transport = transport
        main = self._copy(scenario)
        self.log_file = self.dir / "log.log"
        self.error_file = self.dir / "errors.log"
        self.message_file = self.dir / "messages.log"
        self.stat_file = self.dir / "stats.csv"
        args = [
            SIPP, f"{host}:{port}",
            "-sf", str(main),
            "-t", transport,
            "-i", HOST,
            "-p", str(self.local_port),
            "-m", str(calls),
            "-nostdin",
            "-trace_err", "-error_file", str(self.error_file),
            "-trace_logs", "-log_file", str(self.log_file),
            "-timeout", f"{int(timeout_s)}s", "-timeout_error",
            "-trace_stat", "-stf", str(self.stat_file), "-fd", "1",
        ]
        if trace_msg:
            args += ["-trace_msg", "-message_file", str(self.message_file)]
        if ooc_scenario:
            args += ["-oocsf", str(self._copy(ooc_scenario))]
        if service is not None:
            args += ["-s", service]
        if rate is not None:
            args += ["-r", str(rate)]
        if rate_period_ms is not None:
            args += ["-rp", f"{rate_period_ms}ms"]
        if limit is not None:
            args += ["-l", str(limit)]
        if pause_ms is not None:
            args += ["-d", str(pause_ms)]
        if cid_str is not None:
            args += ["-cid_str", cid_str]
        for key, value in (keys or {}).items():
            args += ["-key", key, value]
        args += list(extra_args)
        self.args = args
        self.started_at = time.monotonic()
        self._stdout = (self.dir / "stdout.txt").open("wb")
        self.proc = subprocess.Popen(
            args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=subprocess.STDOUT
        )

    def _copy(self, scenario: str) -> Path:
        src = Path(scenario) if Path(scenario).is_absolute() else SCENARIOS / scenario
        dst = self.dir / src.name
        shutil.copy(src, dst)
        return dst

    @property
    def command(self) -> str:
        return " ".join(self.args)

    # -- process -----------------------------------------------------------------------------

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for SIPp to exit; kills it (and raises) if it takes longer than ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name}: sipp still running after {timeout}s\n{self.explain()}") from None
        self._stdout.close()
        return code

    def kill(self) -> None:
        """End this SIPp process (by its pid) if it still runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._stdout.close()

    # -- what happened -------------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self) -> list[str]:
        """The lines written by the scenarios' <log> actions."""
        return [line for line in self._read(self.log_file).splitlines() if line.strip()]

    def log_lines(self, prefix: str) -> list[str]:
        return [line for line in self.logs() if line.startswith(prefix)]

    def errors(self) -> str:
        return self._read(self.error_file)

    def failures(self) -> list[str]:
        """Error-log events that mean a call failed (the out-of-call notice is not one)."""
        events = re.split(r"\n(?=\d{4}-\d\d-\d\d\t)", self.errors())
        return [e for e in events if e.strip() and "The following events occurred" not in e.split("\n")[0]
                and "using the out-of-call scenario" not in e]

    def messages(self) -> str:
        return self._read(self.message_file)

    def stdout(self) -> str:
        if not self._stdout.closed:
            self._stdout.flush()
        return self._read(self.dir / "stdout.txt")

    def stats(self) -> dict[str, str]:
        """The last row of SIPp's statistics CSV (-trace_stat), by column name."""
        lines = [line for line in self._read(self.stat_file).splitlines() if line.strip()]
        if len(lines) < 2:
            return {}
        head = lines[0].rstrip(";").split(";")
        last = lines[-1].rstrip(";").split(";")
        return dict(zip(head, last))

    def explain(self) -> str:
        return (
            f"=== sipp {self.name} (exit {self.proc.poll()}): {self.command}\n"
            f"--- stdout (tail)\n{self.stdout()[-2500:]}\n"
            f"--- errors\n{self.errors()[-4000:]}\n"
            f"--- logs\n{chr(10).join(self.logs()[-40:])}\n"
            f"--- messages (tail)\n{self.messages()[-6000:]}\n"
        )


class Device:
    """A SIP device: REGISTERs ``aor`` from its own port and runs ``answer`` for every INVITE there."""

    def __init__(
        self,
        server: ServerProcess,
        workdir: Path,
        aor: str,
        answer: str = "device_answer.xml",
        name: str | None = None,
        pause_ms: int | None = None,
        timeout_s: float = 60.0,
        transport: str = "u1",
    ) -> None:
        self.server = server
        self.aor = aor
        self.tag = f"{aor}-{uuid.uuid4().hex[:8]}"
        self.call_id = f"reg-{self.tag}-1@{HOST}"
        self.sipp = Sipp(
            server, "device_register.xml", workdir,
            name=name or f"device-{self.tag}",
            ooc_scenario=answer,
            keys={"aor": aor},
            cid_str=f"reg-{self.tag}-%u@%s",
            pause_ms=pause_ms,
            timeout_s=timeout_s,
            transport=transport,
        )

    @property
    def port(self) -> int:
        return self.sipp.local_port

    def wait_registered(self, timeout: float = 10.0) -> None:
        """Until the server's 200 to the REGISTER arrived (the scenario logs REGISTERED)."""
        wait_until(lambda: self.sipp.log_lines("REGISTERED ") or not self.sipp.running(), timeout,
                   f"device {self.aor} to register")
        if not self.sipp.log_lines("REGISTERED "):
            raise AssertionError(f"device {self.aor} did not register\n{self.sipp.explain()}\n"
                                 f"{self.server.output()[-4000:]}")

    def stop(self, timeout: float = 15.0) -> None:
        """Tell the device to unregister and quit; it must exit 0 with every call successful."""
        if self.sipp.running():
            tcp = self.sipp.transport == "t1"
            notify = (
                f"NOTIFY sip:{self.aor}@{HOST}:{self.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/{'TCP' if tcp else 'UDP'} {HOST}:9;branch=z9hG4bK{uuid.uuid4().hex[:12]}\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:test@{HOST}>;tag=stop\r\n"
                f"To: <sip:{self.aor}@{HOST}>\r\n"
                f"Call-ID: {self.call_id}\r\n"
                "CSeq: 1 NOTIFY\r\n"
                "Event: stop\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
            if tcp:
                # the connection stays open until SIPp has exited: closing it earlier could lose the
                # NOTIFY before SIPp read it
                with socket.create_connection((HOST, self.port), timeout=5) as conn:
                    conn.sendall(notify)
                    self.sipp.wait(timeout)
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.sendto(notify, (HOST, self.port))
        code = self.sipp.wait(timeout)
        assert code == 0, f"device {self.aor} exited {code}\n{self.sipp.explain()}"
        assert self.sipp.log_lines(f"UNREGISTERED {self.aor}"), self.sipp.explain()

    def assert_no_failures(self) -> None:
        failures = self.sipp.failures()
        assert not failures, f"device {self.aor} had failed calls: {failures}\n{self.sipp.explain()}"

    def kill(self) -> None:
        self.sipp.kill()


def stop_all(processes: Iterable[Sipp | Device]) -> None:
    """Teardown: kill whatever is still running (a failed test must not leave SIPp behind)."""
    for p in processes:
        p.kill()
