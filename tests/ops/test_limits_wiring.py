"""ops/service.py wires [limits] into each layer: the edge limiter, the silo, the call layer, the waker."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.service import make_service


def _parts(tmp_path, **sections):
    cfg = config_from_dict({"location": {"backend": "memory"}, **sections}, base_dir=tmp_path)
    return make_service(cfg, clock=Clock()).parts


def test_defaults_wire_every_limit(tmp_path):
    parts = _parts(tmp_path, auth={"trusted_sources": ["192.0.2.0/24"]})
    limiter = parts.extra["source_limiter"]
    assert parts.transactions.admit == limiter.admit
    assert (limiter.rate, limiter.burst, limiter.ban_time) == (20.0, 100.0, 60.0)
    # exempt: loopback by default, and the trusted peers of [auth]
    assert "127.0.0.1" in limiter.exempt and "192.0.2.7" in limiter.exempt and "198.51.100.1" not in limiter.exempt
    assert parts.silo.max_total == 20_000
    assert parts.b2bua.sources.limit == 20 and parts.b2bua.sources.exempt is limiter.exempt
    assert parts.b2bua.user_exists is not None  # auth on: the users database answers 404 for strangers
    assert parts.b2bua in parts.extra["limits"] and limiter in parts.extra["limits"]


def test_zero_turns_limits_off(tmp_path):
    parts = _parts(
        tmp_path,
        auth={"enabled": False},
        limits={"requests_per_second": 0, "max_parked_per_source": 0, "max_parked_total": 0},
    )
    assert parts.transactions.admit is None and "source_limiter" not in parts.extra
    assert parts.b2bua.sources is None and parts.b2bua.user_exists is None
    assert not parts.silo.at_capacity()
