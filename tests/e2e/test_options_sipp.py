"""SIPp (scenario tests/e2e/scenarios/options.xml) sends OPTIONS to the real twistd process over
UDP, TCP and TLS, three calls each, and every one must get a 200.

Debian's sip-tester is built without OpenSSL: when `sipp -v` shows no TLS support, the TLS case
sends the same three OPTIONS with Python's ssl client instead (verifying the server certificate
against the test CA), so TLS is always exercised.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.proc import HOST, ServerProcess, free_port, stream_options

SCENARIO = Path(__file__).parent / "scenarios" / "options.xml"


def run_sipp(server: ServerProcess, transport: str, port: int, workdir: Path, certs) -> subprocess.CompletedProcess:
    sipp = shutil.which("sipp")
    assert sipp, "sipp is missing (./scripts/test installs the sip-tester package)"
    scenario = workdir / SCENARIO.name
    shutil.copy(SCENARIO, scenario)  # SIPp writes its logs next to the scenario
    args = [
        sipp, f"{HOST}:{port}",
        "-sf", str(scenario),
        "-t", transport,
        "-i", HOST,
        "-p", str(free_port(udp_too=(transport == "u1"))),
        "-m", "3",
        "-timeout", "10s",
        "-timeout_error",
        "-trace_err",
        "-nostdin",
    ]
    if transport == "l1":
        args += ["-tls_cert", str(certs.client_cert), "-tls_key", str(certs.client_key)]
    return subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _explain(proc: subprocess.CompletedProcess, workdir: Path, server: ServerProcess) -> str:
    errors = "\n".join(p.read_text(errors="replace") for p in workdir.glob("*_errors.log"))
    return (
        f"sipp exit {proc.returncode}\n--- sipp stdout (tail)\n{proc.stdout[-3000:]}\n"
        f"--- sipp stderr\n{proc.stderr[-3000:]}\n--- sipp errors log\n{errors[-3000:]}\n"
        f"--- server log\n{server.output()[-6000:]}"
    )


def sipp_has_tls() -> bool:
    sipp = shutil.which("sipp")
    if not sipp:
        return False
    version = subprocess.run([sipp, "-v"], capture_output=True, text=True, timeout=10).stdout
    return "TLS" in version


@pytest.mark.parametrize("transport", ["u1", "t1", "l1"], ids=["udp", "tcp", "tls"])
def test_options_answered_200(sip_server, transport, tmp_path, test_certs):
    port = sip_server.tls_port if transport == "l1" else sip_server.sip_port
    if transport == "l1" and not sipp_has_tls():
        answers = stream_options(HOST, port, count=3, ca_file=str(test_certs.ca))
        for i, answer in enumerate(answers, 1):
            assert answer.startswith(b"SIP/2.0 200 "), f"{answer!r}\n{sip_server.output()[-6000:]}"
            assert f"CSeq: {i} OPTIONS".encode() in answer
        return
    workdir = tmp_path / f"sipp-{transport}"
    workdir.mkdir()
    proc = run_sipp(sip_server, transport, port, workdir, test_certs)
    assert proc.returncode == 0, _explain(proc, workdir, sip_server)
    assert sip_server.alive()
