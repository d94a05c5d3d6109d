"""etc/libon-tsilo@.service, the template unit of one cluster worker per core: `systemd-analyze
verify` accepts it (as a template and as an instance), each instance reads its own config and state,
and it keeps every hardening setting of etc/libon-tsilo.service.

As in test_systemd_unit.py, ExecStart is pointed at this venv's twistd before verifying, since
systemd-analyze checks that the binary exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ops.test_systemd_unit import INSTALLED_TWISTD, TWISTD, _verify

ETC = Path(__file__).resolve().parents[2] / "etc"
TEMPLATE = ETC / "libon-tsilo@.service"
SINGLE = ETC / "libon-tsilo.service"
# the keys where a worker differs from the single server, on purpose
PER_WORKER = {"ExecStart", "StateDirectory", "WorkingDirectory", "SyslogIdentifier"}


def _service(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _local(tmp_path: Path, name: str) -> Path:
    unit = tmp_path / name
    unit.write_text(TEMPLATE.read_text().replace(INSTALLED_TWISTD, str(TWISTD)))
    return unit


@pytest.mark.parametrize("name", ["libon-tsilo@.service", "libon-tsilo@2.service"])
def test_template_and_instance_verify_cleanly(tmp_path, name):
    assert f"ExecStart={INSTALLED_TWISTD} " in TEMPLATE.read_text()
    proc = _verify(_local(tmp_path, name))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # unknown keys and bad values are only warnings


def test_verify_catches_a_bad_value_in_the_template(tmp_path):
    # proves the check above is real on a template too
    unit = _local(tmp_path, "libon-tsilo@.service")
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    assert "restart specifier" in _verify(unit).stderr


def test_each_worker_has_its_own_config_and_state():
    svc = _service(TEMPLATE)
    assert svc["ExecStart"] == (
        f"{INSTALLED_TWISTD} -n --pidfile= libon-tsilo --config /etc/libon-tsilo/worker-%i.toml"
    )
    assert svc["StateDirectory"] == "libon-tsilo/worker-%i"
    assert svc["WorkingDirectory"] == "/var/lib/libon-tsilo/worker-%i"


def test_workers_keep_every_setting_of_the_single_server_unit():
    single, worker = _service(SINGLE), _service(TEMPLATE)
    assert {k: v for k, v in single.items() if k not in PER_WORKER} == {
        k: v for k, v in worker.items() if k not in PER_WORKER
    }
