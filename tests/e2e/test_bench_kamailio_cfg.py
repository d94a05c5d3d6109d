"""bench/kamailio/kamailio.cfg, the Kamailio side of bench/sidebyside.py, stays a config Kamailio
loads (`kamailio -c`: every module, function and parameter resolved) with the defines the
benchmark passes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.proc import free_port

CFG = Path(__file__).resolve().parents[2] / "bench" / "kamailio" / "kamailio.cfg"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"


@pytest.mark.skipif(not Path(KAMAILIO).exists(), reason="Debian's kamailio is not installed")
def test_kamailio_accepts_the_bench_config(tmp_path):
    out = subprocess.run(
        [KAMAILIO, "-c", "-f", str(CFG), "-l", f"udp:127.0.0.1:{free_port()}", "-n", "2",
         "-A", f'CTL_SOCKET="unix:{tmp_path / "ctl.sock"}"'],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0 and "config file ok" in out.stdout + out.stderr, out.stdout + out.stderr
