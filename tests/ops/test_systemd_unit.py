"""etc/libon-tsilo.service: `systemd-analyze verify` accepts it, and it holds the hardening we promise.

systemd-analyze checks that ExecStart's binary exists, so the unit is verified as a copy whose
ExecStart points at this venv's twistd instead of /opt/libon-tsilo/.venv/bin/twistd.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from libon_tsilo.ops.config import default_config

UNIT = Path(__file__).resolve().parents[2] / "etc" / "libon-tsilo.service"
INSTALLED_TWISTD = "/opt/libon-tsilo/.venv/bin/twistd"
TWISTD = Path(sys.executable).parent / "twistd"


def _service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    systemd_analyze = shutil.which("systemd-analyze")
    assert systemd_analyze, "systemd-analyze is missing (./scripts/test installs the systemd package)"
    return subprocess.run(
        [systemd_analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, cwd=path.parent
    )


def _local_copy(tmp_path: Path, text: str) -> Path:
    unit = tmp_path / "libon-tsilo.service"
    unit.write_text(text)
    return unit


def test_unit_verifies_cleanly(tmp_path):
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_TWISTD} " in text
    proc = _verify(_local_copy(tmp_path, text.replace(INSTALLED_TWISTD, str(TWISTD))))
    assert proc.returncode == 0, proc.stderr
    # systemd-analyze only warns about unknown keys or bad values: any output is a defect
    assert proc.stderr.strip() == "", proc.stderr


def test_verify_rejects_a_missing_binary(tmp_path):
    # proves the check above is real: the pristine unit fails here, where /opt/libon-tsilo does not exist
    if Path(INSTALLED_TWISTD).exists():
        pytest.skip("libon-tsilo is installed in /opt on this machine")
    proc = _verify(_local_copy(tmp_path, UNIT.read_text()))
    assert proc.returncode != 0
    assert "not executable" in proc.stderr


def test_unit_runs_foreground_hardened_as_dedicated_user():
    svc = _service_section()
    assert svc["ExecStart"] == (
        f"{INSTALLED_TWISTD} -n --pidfile= libon-tsilo --config /etc/libon-tsilo/libon-tsilo.toml"
    )
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc.get("User") == "libon-tsilo" or svc.get("DynamicUser") == "yes"
    expected = {
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "StateDirectory": "libon-tsilo",
        "WorkingDirectory": "/var/lib/libon-tsilo",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    }
    assert {k: svc.get(k) for k in expected} == expected


def test_stop_timeout_exceeds_drain_timeout():
    timeout = _service_section()["TimeoutStopSec"]
    assert re.fullmatch(r"\d+", timeout), "TimeoutStopSec should be plain seconds"
    assert int(timeout) > default_config().ops.drain_timeout
