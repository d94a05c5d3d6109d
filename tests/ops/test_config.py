"""ops/config.py: defaults, the shipped etc/libon-tsilo.toml, and one test per class of error."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from libon_tsilo.ops.config import (
    Config,
    ConfigError,
    ListenAddress,
    config_from_dict,
    default_config,
    load_config,
    parse_listen,
)
from libon_tsilo.sip.listen import ListenSpecError, parse_listen_spec

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "libon-tsilo.toml"


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(data: dict, base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, base_dir)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_are_loopback_and_documented():
    cfg = default_config()
    assert cfg.sip.listen == ("udp:127.0.0.1:5060", "tcp:127.0.0.1:5060")
    assert cfg.sip.domains == ("localhost", "127.0.0.1")
    assert (cfg.sip.t1, cfg.sip.t2, cfg.sip.t4) == (0.5, 4.0, 5.0)
    assert cfg.sip.max_message_size == 65535
    assert cfg.registrar.on_max_contacts == "reject"
    assert cfg.registrar.pnsreg_interval == 130
    assert cfg.registrar.flow_timer == 120
    assert cfg.auth.algorithms == ("MD5",)  # what libre and SIPp can answer (issue 12 item 2)
    assert cfg.location.backend == "sqlite"
    assert cfg.calls.ring_timeout == 30
    assert "P-Asserted-Identity" in cfg.calls.header_allowlist
    assert cfg.push.providers == () and cfg.push.apns == ()
    assert cfg.push.cancelled_ios_call == "invite_cancel"
    assert cfg.manhole.listen == "" and cfg.admin.listen == ""
    assert (cfg.log.level, cfg.log.format) == ("info", "text")
    assert (cfg.ops.drain_timeout, cfg.ops.threadpool_size) == (30, 8)
    assert cfg.source is None


def test_load_config_none_gives_defaults():
    defaults = default_config()
    assert dataclasses.replace(load_config(None), auth=defaults.auth) == defaults


def test_empty_secret_becomes_random_per_load():
    a, b = default_config().auth.secret, default_config().auth.secret
    assert len(a) == 32 and a != b
    assert config_from_dict({"auth": {"secret": "s3cret"}}).auth.secret == "s3cret"


def test_default_state_paths_resolve_against_base_dir(tmp_path):
    cfg = config_from_dict({}, tmp_path)
    assert cfg.auth.users_db == str(tmp_path / "libon-tsilo-users.sqlite")
    assert cfg.location.path == str(tmp_path / "libon-tsilo-location.sqlite")


# --- the shipped file -------------------------------------------------------------------------


def test_shipped_config_loads_and_equals_defaults():
    cfg = load_config(SHIPPED)
    assert cfg.source == str(SHIPPED)
    expected = config_from_dict({}, SHIPPED.parent, source=str(SHIPPED))
    same_secret = dataclasses.replace(expected, auth=dataclasses.replace(expected.auth, secret=cfg.auth.secret))
    assert cfg == same_secret


def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for name, f in hints.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _schema_keys(type(default), f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_shipped_config_shows_every_key():
    text = SHIPPED.read_text()
    # [[push.apns]] & co are shown commented out (they need real credentials)
    from libon_tsilo.ops.config import ApnsConfig, FcmConfig, GatewayConfig, RouteConfig, TrunkConfig, WebhookConfig

    keys = _schema_keys(Config)
    keys += [f"trunks.{k}" for k in _schema_keys(TrunkConfig)] + [f"routes.{k}" for k in _schema_keys(RouteConfig)]
    keys += [f"push.apns.{k}" for k in _schema_keys(ApnsConfig)]
    keys += [f"push.fcm.{k}" for k in _schema_keys(FcmConfig)]
    keys += [f"push.webhook.{k}" for k in _schema_keys(WebhookConfig)]
    keys += [f"gateways.{k}" for k in _schema_keys(GatewayConfig)]
    for key in keys:
        name = key.rsplit(".", 1)[-1]
        if name in ("apns", "fcm", "webhook", "trunks", "routes", "gateways"):
            continue
        assert re.search(rf"^#? ?{name} = ", text, re.M), f"{key} is not shown in etc/libon-tsilo.toml"


# --- errors -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: file not found: .*nope\.toml$"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[sip\nlisten = 1\n"))
    assert str(info.value).startswith("config: invalid TOML in ")
    assert "\n" not in str(info.value)


def test_unknown_section_and_keys():
    assert error_of({"sipp": {}}) == "sipp: unknown section"
    assert error_of({"sip": {"listn": []}}) == "sip.listn: unknown key"
    apns = {"bundle_id": "x", "cert_file": "", "colour": "red"}
    assert error_of({"push": {"apns": [apns]}}) == "push.apns[0].colour: unknown key"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"sip": {"t1_ms": "500"}}, 'sip.t1_ms: expected an integer, got string "500"'),
        ({"sip": {"t1_ms": True}}, "sip.t1_ms: expected an integer, got boolean true"),
        ({"sip": {"listen": "udp:127.0.0.1:5060"}}, 'sip.listen: expected an array, got string "udp:127.0.0.1:5060"'),
        ({"sip": {"domains": ["a", 3]}}, "sip.domains[1]: expected a string, got integer 3"),
        ({"tls": {"verify_client": "yes"}}, 'tls.verify_client: expected a boolean, got string "yes"'),
        ({"push": {"apns": {"bundle_id": "x"}}}, "push.apns: expected an array of tables, got table"),
        ({"sip": "x"}, 'sip: expected a table, got string "x"'),
        ({"push": {"fcm": [{"timeout": "5"}]}}, 'push.fcm[0].timeout: expected a number, got string "5"'),
    ],
)
def test_wrong_types(data, expected):
    assert error_of(data) == expected


def test_float_keys_accept_integers():
    cfg = config_from_dict({"push": {"webhook": [{"url": "http://127.0.0.1:1/x", "timeout": 2}]}})
    assert cfg.push.webhook[0].timeout == 2.0 and isinstance(cfg.push.webhook[0].timeout, float)


@pytest.mark.parametrize(
    "listen, expected",
    [
        (["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060", "sctp:127.0.0.1:5060"],
         'sip.listen[2]: "sctp:127.0.0.1:5060": unknown transport "sctp" (expected udp|tcp|tls)'),
        (["udp:::1:5060"], 'sip.listen[0]: "udp:::1:5060": an IPv6 address must be in brackets, e.g. "udp:[::1]:5060"'),
        (["udp:127.0.0.1"], 'sip.listen[0]: "udp:127.0.0.1": missing port'),
        (["udp:127.0.0.1:70000"], 'sip.listen[0]: "udp:127.0.0.1:70000": "70000" is not a port (0-65535)'),
        (["udp:[::1:5060"], 'sip.listen[0]: "udp:[::1:5060": malformed "[IPv6]:PORT"'),
        (["udp:[fe80::zz]:5060"], 'sip.listen[0]: "udp:[fe80::zz]:5060": "fe80::zz" is not an IPv6 address'),
        (["udp:bad_host:5060"], 'sip.listen[0]: "udp:bad_host:5060": "bad_host" is not a valid host'),
        (["udp"], 'sip.listen[0]: "udp": expected "udp|tcp|tls:HOST:PORT"'),
        (["udp:127.0.0.1:5060", "udp:127.0.0.1:5060"], 'sip.listen[1]: "udp:127.0.0.1:5060" is listed twice'),
        ([], "sip.listen: needs at least one listener"),
    ],
)
def test_bad_listen(listen, expected):
    assert error_of({"sip": {"listen": listen}}) == expected


def test_parse_listen():
    assert parse_listen("udp:[::1]:5060") == ListenAddress("udp", "::1", 5060)
    assert parse_listen("TLS:localhost:5061") == ListenAddress("tls", "localhost", 5061)
    assert str(ListenAddress("tcp", "::1", 5)) == "tcp:[::1]:5"
    cfg = config_from_dict({"sip": {"listen": ["udp:[::1]:0", "tcp:0.0.0.0:5060"]}})
    assert [a.transport for a in cfg.sip.listen_addresses] == ["udp", "tcp"]


@pytest.mark.parametrize(
    "spec", [" udp:127.0.0.1:5060 ", "sctp:h:1", "udp:::1:5060", "udp:h", "udp:h:99999", "udp:[x]:1", "udp:a_b:1"]
)
def test_the_config_check_is_the_transport_parser(spec):
    """One parser: what the config accepts is what the transport binds, its refusal the same text."""
    try:
        expected = parse_listen_spec(spec)
    except ListenSpecError as exc:
        with pytest.raises(ConfigError) as err:
            parse_listen(spec, "sip.listen[0]")
        assert str(err.value) == f"sip.listen[0]: {exc}"
    else:
        assert parse_listen(spec) == expected


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"sip": {"t1_ms": 0}}, "sip.t1_ms: must be > 0, got 0"),
        ({"sip": {"t1_ms": 5000, "t2_ms": 4000}}, "sip.t2_ms: must be >= sip.t1_ms (5000), got 4000"),
        ({"sip": {"max_message_size": 100}}, "sip.max_message_size: must be >= 1500, got 100"),
        ({"sip": {"user_agent": "x\r\nEvil: 1"}}, "sip.user_agent: must not contain line breaks"),
        ({"sip": {"domains": [""]}}, "sip.domains[0]: must not be empty"),
        (
            {"registrar": {"on_max_contacts": "drop"}},
            'registrar.on_max_contacts: unknown value "drop" (expected one of "reject", "replace_oldest")',
        ),
        ({"registrar": {"min_expires": 600, "max_expires": 60}}, "registrar.max_expires: must be >= registrar.min_expires (600)"),
        ({"registrar": {"default_expires": 10}}, "registrar.default_expires: must be between registrar.min_expires (60) and max_expires (3600)"),
        ({"registrar": {"flow_timer": -1}}, "registrar.flow_timer: must be >= 0, got -1"),
        ({"registrar": {"flow_timer": 600}, "sip": {"flow_idle_timeout": 300}}, "registrar.flow_timer: must be < sip.flow_idle_timeout (300), got 600"),
        ({"auth": {"trusted_sources": ["10.0.0.0/8", "10.0.0.0/33"]}}, 'auth.trusted_sources[1]: "10.0.0.0/33" is not an IP network (CIDR)'),
        ({"auth": {"algorithms": ["SHA-512"]}}, 'auth.algorithms[0]: unknown algorithm "SHA-512" (expected "SHA-256" or "MD5")'),
        ({"auth": {"algorithms": []}}, "auth.algorithms: must name at least one algorithm"),
        ({"auth": {"algorithms": ["MD5", "MD5"]}}, "auth.algorithms: lists an algorithm twice"),
        ({"auth": {"failed_per_source": -1}}, "auth.failed_per_source: must be >= 0, got -1"),
        ({"auth": {"failed_per_user": -1}}, "auth.failed_per_user: must be >= 0, got -1"),
        ({"auth": {"failed_window": 0}}, "auth.failed_window: must be > 0, got 0"),
        ({"auth": {"failed_block": 0}}, "auth.failed_block: must be > 0, got 0"),
        ({"auth": {"known_source_ttl": 0}}, "auth.known_source_ttl: must be > 0, got 0"),
        ({"location": {"flush_interval_ms": 1001}}, "location.flush_interval_ms: must be <= 1000, got 1001"),
        ({"location": {"backend": "etcd"}}, 'location.backend: unknown value "etcd" (expected one of "sqlite", "memory", "redis")'),
        ({"location": {"url": "http://r:6379"}}, 'location.url: "http://r:6379" is not a redis://, rediss:// or unix:// URL'),
        ({"location": {"url": "redis://r:99999"}}, 'location.url: "redis://r:99999" is not a Redis URL: Port out of range 0-65535'),
        ({"location": {"key_prefix": ""}}, "location.key_prefix: must not be empty"),
        ({"location": {"sentinels": ["s1:26379", "s2"]}}, 'location.sentinels[1]: "s2" is not "host:port"'),
        ({"location": {"sentinels": ["s1:26379"]}}, "location.service_name: required with location.sentinels"),
        ({"location": {"backend": "redis"}, "ops": {"reactor": "epoll"}}, 'ops.reactor: must be "auto", "uvloop" or "asyncio" with location.backend = "redis"'),
        ({"cluster": {"node_id": "a\nb"}}, 'cluster.node_id: "a\\nb" is not a node id (letters, digits, ".", "_", "-"; at most 63)'),
        ({"calls": {"header_allowlist": ["Sub ject"]}}, 'calls.header_allowlist[0]: "Sub ject" is not a valid header name'),
        ({"calls": {"max_branches": 0}}, "calls.max_branches: must be >= 1, got 0"),
        ({"log": {"level": "verbose"}}, 'log.level: unknown value "verbose" (expected one of "debug", "info", "warn", "error")'),
        ({"log": {"format": "xml"}}, 'log.format: unknown value "xml" (expected one of "text", "json")'),
        ({"ops": {"threadpool_size": 0}}, "ops.threadpool_size: must be >= 1, got 0"),
        ({"ops": {"reactor": "kqueue"}},
         'ops.reactor: unknown value "kqueue" (expected one of "auto", "epoll", "asyncio", "uvloop")'),
        ({"admin": {"listen": "http:8080"}}, 'admin.listen: "http:8080" is not an endpoint like "tcp:2222:interface=127.0.0.1"'),
        ({"admin": {"listen": "tcp:port=x"}}, 'admin.listen: "tcp:port=x" has no valid port'),
    ],
)
def test_bad_values(data, expected):
    assert error_of(data) == expected


def test_reactor_uvloop_needs_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    assert error_of({"ops": {"reactor": "uvloop"}}) == (
        'ops.reactor: "uvloop" needs the uvloop package: pip install uvloop'
    )


def test_admin_endpoint_ok():
    assert config_from_dict({"admin": {"listen": "tcp:0:interface=127.0.0.1"}}).admin.listen.startswith("tcp:0")


# --- files and cross-key rules ---------------------------------------------------------------


def test_tls_listener_needs_certificate():
    assert error_of({"sip": {"listen": ["tls:127.0.0.1:5061"]}}) == (
        "tls.certificate: required by the tls: listener in sip.listen"
    )


def test_tls_listener_with_test_certs(test_certs):
    cfg = config_from_dict(
        {
            "sip": {"listen": ["tls:127.0.0.1:0"]},
            "tls": {"certificate": str(test_certs.cert), "private_key": str(test_certs.key)},
        }
    )
    assert cfg.tls.certificate == str(test_certs.cert)


def test_tls_missing_key_and_missing_file(test_certs, tmp_path):
    data = {"sip": {"listen": ["tls:127.0.0.1:0"]}, "tls": {"certificate": str(test_certs.cert)}}
    assert error_of(data) == "tls.private_key: required by the tls: listener in sip.listen"
    assert error_of({"tls": {"certificate": "absent.pem"}}, tmp_path) == (
        f"tls.certificate: file not found: {tmp_path / 'absent.pem'}"
    )
    assert error_of({"tls": {"verify_client": True}}) == "tls.ca_file: required when tls.verify_client is true"


def test_relative_paths_resolve_against_config_dir(tmp_path, test_certs):
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "s.pem").write_bytes(test_certs.cert.read_bytes())
    path = write(tmp_path, '[tls]\ncertificate = "certs/s.pem"\n[auth]\nusers_db = "u.sqlite"\n')
    cfg = load_config(path)
    assert cfg.tls.certificate == str(tmp_path / "certs" / "s.pem")
    assert cfg.auth.users_db == str(tmp_path / "u.sqlite")


def test_state_path_directory_must_exist(tmp_path):
    assert error_of({"location": {"path": "no/such/dir/loc.sqlite"}}, tmp_path) == (
        f"location.path: directory does not exist: {tmp_path / 'no/such/dir'}"
    )


def test_push_tables(tmp_path):
    key = tmp_path / "k.p8"
    key.write_text("key")
    ok = config_from_dict(
        {
            "push": {
                "providers": ["apns", "hook"],
                "apns": [{"bundle_id": "com.x", "team_id": "T", "key_id": "K", "key_file": "k.p8"}],
                "webhook": [{"name": "hook", "url": "http://127.0.0.1:9/push"}],
            }
        },
        tmp_path,
    )
    assert ok.push.apns[0].key_file == str(key)
    assert ok.push.webhook[0].name == "hook"


@pytest.mark.parametrize(
    "push, expected",
    [
        ({"providers": ["apns"]}, 'push.providers[0]: "apns" needs a [[push.apns]] table'),
        ({"providers": ["gcm"]}, 'push.providers[0]: unknown provider "gcm" (expected "apns", "fcm" or a webhook)'),
        ({"apns": [{"key_file": "k.p8"}]}, "push.apns[0].bundle_id: is required"),
        ({"apns": [{"bundle_id": "b"}]}, "push.apns[0].key_file: set exactly one of key_file (token auth) or cert_file"),
        (
            {"apns": [{"bundle_id": "b", "key_file": "k.p8", "cert_file": "k.p8"}]},
            "push.apns[0].key_file: set exactly one of key_file (token auth) or cert_file",
        ),
        ({"apns": [{"bundle_id": "b", "key_file": "k.p8", "key_id": "K"}]}, "push.apns[0].team_id: is required with key_file"),
        ({"apns": [{"bundle_id": "b", "key_file": "k.p8", "team_id": "T"}]}, "push.apns[0].key_id: is required with key_file"),
        ({"apns": [{"bundle_id": "b", "key_file": "missing.p8"}]}, "push.apns[0].key_file: file not found: {tmp}/missing.p8"),
        ({"fcm": [{"service_account_file": "k.p8"}]}, "push.fcm[0].project_id: is required"),
        ({"fcm": [{"project_id": "p"}]}, "push.fcm[0].service_account_file: is required"),
        ({"fcm": [{"project_id": "p", "service_account_file": "k.p8", "endpoint": "ftp://x"}]}, 'push.fcm[0].endpoint: "ftp://x" is not an http(s) URL'),
        ({"webhook": [{"name": "w"}]}, "push.webhook[0].url: is required"),
        ({"webhook": [{"name": "apns", "url": "http://h/"}]}, 'push.webhook[0].name: "apns" is not a usable provider name'),
        ({"webhook": [{"url": "http://h/"}, {"url": "http://h/"}]}, 'push.webhook[1].name: "webhook" is used twice'),
        (
            {"providers": ["webhook", "webhook"], "webhook": [{"url": "http://h/"}]},
            "push.providers: lists a provider twice",
        ),
        ({"cancelled_ios_call": "nothing"}, 'push.cancelled_ios_call: unknown value "nothing" (expected one of "invite_cancel", "missed_call_push")'),
    ],
)
def test_push_errors(tmp_path, push, expected):
    (tmp_path / "k.p8").write_text("key")
    assert error_of({"push": push}, tmp_path) == expected.format(tmp=tmp_path)


def test_manhole_needs_credentials(tmp_path):
    assert error_of({"manhole": {"listen": "tcp:0:interface=127.0.0.1"}}) == (
        "manhole.listen: needs manhole.authorized_keys or manhole.passwords"
    )
    (tmp_path / "pw").write_text("admin:secret\n")
    cfg = config_from_dict({"manhole": {"listen": "tcp:0:interface=127.0.0.1", "passwords": "pw"}}, tmp_path)
    assert cfg.manhole.passwords == str(tmp_path / "pw")


def test_config_is_frozen():
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sip.t1_ms = 1  # type: ignore[misc]


# --- [limits] ---------------------------------------------------------------------------------


def test_limits_defaults_suit_a_real_server():
    limits = default_config().limits
    assert (limits.requests_per_second, limits.burst, limits.ban_time) == (20.0, 100, 60)
    assert limits.exempt_sources == ("127.0.0.0/8", "::1/128")
    assert (limits.max_parked_per_source, limits.max_parked_total) == (20, 20_000)
    assert limits.pushes_per_device_per_minute == 10
    assert (limits.login_max_failures, limits.login_ban_time) == (5, 300)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"limits": {"requests_per_second": -1}}, "limits.requests_per_second: must be >= 0, got -1.0"),
        ({"limits": {"burst": 0}}, "limits.burst: must be >= 1, got 0"),
        ({"limits": {"ban_time": 0}}, "limits.ban_time: must be >= 1, got 0"),
        ({"limits": {"max_sources": 0}}, "limits.max_sources: must be >= 1, got 0"),
        ({"limits": {"exempt_sources": ["10.0.0.0/40"]}}, 'limits.exempt_sources[0]: "10.0.0.0/40" is not an IP network (CIDR)'),
        ({"limits": {"pushes_per_device_per_minute": -1}}, "limits.pushes_per_device_per_minute: must be >= 0, got -1"),
        ({"limits": {"max_parked_per_source": -1}}, "limits.max_parked_per_source: must be >= 0, got -1"),
        ({"limits": {"max_parked_total": "many"}}, 'limits.max_parked_total: expected an integer, got string "many"'),
        ({"limits": {"login_max_failures": 0}}, "limits.login_max_failures: must be >= 1, got 0"),
        ({"limits": {"login_ban_time": 0}}, "limits.login_ban_time: must be >= 1, got 0"),
    ],
)
def test_limits_bad_values(data, expected):
    assert error_of(data) == expected


# --- [calls] session timers (RFC 4028) and the maximum call duration ---------------------------


def test_calls_session_timer_defaults():
    calls = default_config().calls
    assert (calls.session_expires, calls.min_se, calls.max_call_duration) == (1800, 90, 14_400)
    off = config_from_dict({"calls": {"session_expires": 0, "max_call_duration": 0}}).calls
    assert (off.session_expires, off.max_call_duration) == (0, 0)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"calls": {"min_se": 60}}, "calls.min_se: must be >= 90, got 60"),
        ({"calls": {"session_expires": -1}}, "calls.session_expires: must be >= 0, got -1"),
        ({"calls": {"session_expires": 100_000}}, "calls.session_expires: must be <= 86400, got 100000"),
        ({"calls": {"session_expires": 120, "min_se": 300}},
         "calls.session_expires: must be 0 or >= calls.min_se (300), got 120"),
        ({"calls": {"max_call_duration": -5}}, "calls.max_call_duration: must be >= 0, got -5.0"),
        ({"calls": {"session_expires": "long"}}, 'calls.session_expires: expected an integer, got string "long"'),
    ],
)
def test_calls_session_timer_errors(data, expected):
    assert error_of(data) == expected


# --- [connections] (issue 11: connection and flow limits) --------------------------------------


def test_connections_defaults_are_for_a_real_server():
    c = default_config().connections
    assert (c.max_connections, c.max_connections_per_source, c.listen_backlog) == (10000, 256, 1024)
    assert (c.message_timeout, c.tls_handshake_timeout, c.unbound_idle_timeout) == (20.0, 10.0, 60.0)
    assert (c.max_udp_flows, c.max_buffered_bytes) == (20000, 64 * 1024 * 1024)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("max_connections", -1, "connections.max_connections: must be >= 0, got -1"),
        ("max_connections_per_source", -5, "connections.max_connections_per_source: must be >= 0, got -5"),
        ("message_timeout", -0.5, "connections.message_timeout: must be >= 0, got -0.5"),
        ("tls_handshake_timeout", -1, "connections.tls_handshake_timeout: must be >= 0, got -1.0"),
        ("unbound_idle_timeout", -1, "connections.unbound_idle_timeout: must be >= 0, got -1.0"),
        ("listen_backlog", 0, "connections.listen_backlog: must be >= 1, got 0"),
        ("listen_backlog", 100000, "connections.listen_backlog: must be <= 65535, got 100000"),
        ("max_udp_flows", -1, "connections.max_udp_flows: must be >= 0, got -1"),
        ("max_buffered_bytes", "64M", 'connections.max_buffered_bytes: expected an integer, got string "64M"'),
    ],
)
def test_connections_bad_values(key, value, expected):
    assert error_of({"connections": {key: value}}) == expected


def test_threadpool_size_is_accepted_with_a_no_longer_used_warning(tmp_path):
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        cfg = config_from_dict({"ops": {"threadpool_size": 4}}, base_dir=tmp_path)
        quiet = config_from_dict({"ops": {"drain_timeout": 5}}, base_dir=tmp_path)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warned = [e for e in events if e.get("key") == "ops.threadpool_size"]
    assert len(warned) == 1 and warned[0]["log_level"].name == "warn"
    assert (cfg.ops.drain_timeout, quiet.ops.drain_timeout) == (30, 5)  # the rest loads as usual


# --- [overload] and [sip] udp_receive_buffer (issue 11, item 13) -------------------------------


def test_overload_defaults_suit_a_real_server():
    cfg = default_config()
    assert cfg.overload.enabled
    assert (cfg.overload.enter_lag_ms, cfg.overload.leave_lag_ms) == (200, 50)
    assert (cfg.overload.max_transactions, cfg.overload.retry_after) == (0, 5)
    assert cfg.sip.udp_receive_buffer == 4 * 1024 * 1024


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"overload": {"enter_lag_ms": 0}}, "overload.enter_lag_ms: must be >= 1, got 0"),
        ({"overload": {"leave_lag_ms": -1}}, "overload.leave_lag_ms: must be >= 0, got -1"),
        ({"overload": {"leave_lag_ms": 200}}, "overload.leave_lag_ms: must be < overload.enter_lag_ms (200)"),
        ({"overload": {"retry_after": 0}}, "overload.retry_after: must be >= 1, got 0"),
        ({"overload": {"max_transactions": -5}}, "overload.max_transactions: must be >= 0, got -5"),
        ({"overload": {"enabled": "yes"}}, 'overload.enabled: expected a boolean, got string "yes"'),
        ({"overload": {"shed": 1}}, "overload.shed: unknown key"),
        ({"sip": {"udp_receive_buffer": 1000}}, "sip.udp_receive_buffer: must be >= 65536, got 1000"),
    ],
)
def test_overload_bad_values(data, expected):
    assert error_of(data) == expected


# --- [cluster]: node_id, reuse_port (workers), the internal listener and flow tokens (Path relay) --


def test_cluster_defaults_are_a_single_node():
    cfg = default_config()
    assert (cfg.cluster.node_id, cfg.cluster.reuse_port) == ("", False)
    assert (cfg.cluster.node_address, cfg.cluster.peers) == ("", ())
    assert cfg.cluster.trusted_peers == ("127.0.0.0/8", "::1/128")
    assert cfg.cluster.secret == "" and cfg.cluster.udp_via_path == "auto" and cfg.cluster.host == ""
    assert cfg.cluster.max_udp_pins == 4096  # pins: one fd per device in a call


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_cluster_udp_via_path_is_a_switch_or_auto(value):
    cfg = config_from_dict({"cluster": {"udp_via_path": value, "host": "sip-1.example.net"}})
    assert cfg.cluster.udp_via_path == value and cfg.cluster.host == "sip-1.example.net"


def test_cluster_keys_load():
    cfg = config_from_dict({"cluster": {
        "node_id": "sip-1.a_b", "reuse_port": True, "node_address": "tcp:10.0.0.1:5070",
        "peers": ["udp:10.0.0.2:5070"], "trusted_peers": ["10.0.0.0/24"], "secret": "s3cret",
    }, "location": {"backend": "redis"}})
    assert (cfg.cluster.node_id, cfg.cluster.reuse_port) == ("sip-1.a_b", True)
    assert cfg.cluster.node_address == "tcp:10.0.0.1:5070"
    assert cfg.cluster.peers == ("udp:10.0.0.2:5070",)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"cluster": {"node_id": "a b"}}, 'cluster.node_id: "a b" is not a node id'),
        ({"cluster": {"node_id": "-x"}}, 'cluster.node_id: "-x" is not a node id'),
        ({"cluster": {"node_id": "x" * 64}}, f'cluster.node_id: "{"x" * 64}" is not a node id'),
        ({"cluster": {"node_id": 3}}, "cluster.node_id: expected a string, got integer 3"),
        ({"cluster": {"reuse_port": "yes"}}, 'cluster.reuse_port: expected a boolean, got string "yes"'),
        ({"cluster": {"node_address": "sctp:10.0.0.1:5070"}},
         'cluster.node_address: "sctp:10.0.0.1:5070": unknown transport "sctp" (expected udp|tcp|tls)'),
        ({"cluster": {"node_address": "tls:10.0.0.1:5071"}},
         'cluster.node_address: "tls:10.0.0.1:5071": the internal listener is udp or tcp (a private network)'),
        ({"cluster": {"node_address": "udp:0.0.0.0:5070"}},
         'cluster.node_address: "udp:0.0.0.0:5070": other nodes send here: name a concrete host'),
        ({"cluster": {"node_address": "udp:127.0.0.1:5060"}},
         'cluster.node_address: "udp:127.0.0.1:5060" is also sip.listen[0]: give it its own port'),
        ({"cluster": {"peers": ["udp:10.0.0.2"]}}, 'cluster.peers[0]: "udp:10.0.0.2": missing port'),
        ({"cluster": {"trusted_peers": ["10.0.0.300/8"]}},
         'cluster.trusted_peers[0]: "10.0.0.300/8" is not an IP network (CIDR)'),
        ({"cluster": {"udp_via_path": "no"}}, 'cluster.udp_via_path: expected true, false or "auto", got "no"'),
        ({"cluster": {"udp_via_path": 1}}, "cluster.udp_via_path: expected a boolean or a string, got integer 1"),
        ({"cluster": {"host": "a b"}}, 'cluster.host: "a b" is not a host name'),
        ({"cluster": {"max_udp_pins": -1}}, "cluster.max_udp_pins: must be >= 0, got -1"),
        ({"cluster": {"max_udp_pins": "4k"}}, 'cluster.max_udp_pins: expected an integer, got string "4k"'),
        ({"cluster": {"node_address": "udp:10.0.0.1:5070"}, "location": {"backend": "redis"}},
         'cluster.secret: must be set with node_address on location.backend = "redis"'),
    ],
)
def test_cluster_bad_values(data, expected):
    assert error_of(data).startswith(expected)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"dialplan": {"country_code": "+33"}}, 'dialplan.country_code: "+33" must be digits only'),
        ({"dialplan": {"international_prefixes": ["00", ""]}}, 'dialplan.international_prefixes[1]: "" must be digits only'),
        ({"dialplan": {"national_prefix": "O"}}, 'dialplan.national_prefix: "O" must be digits only'),
    ],
)
def test_dialplan_keys(data, expected):
    assert error_of(data) == expected


def test_dial_plan_from_config():
    plan = config_from_dict({"dialplan": {"country_code": "33", "international_prefixes": ["00", "011"]}}).dial_plan()
    assert plan.to_e164("01 23 45 67 89") == "+33123456789"
    assert plan.to_e164("011 44 20 7946 0000") == "+442079460000"


# --- calls out: [calls_out], [[trunks]], [[routes]] -------------------------------------------

TRUNK = {"name": "carrier", "targets": ["sip:127.0.0.1:5099"]}


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"trunks": [{"name": "carrier"}]}, "trunks[0].targets: needs at least one target"),
        ({"trunks": [{"name": "a b", "targets": ["sip:h"]}]}, 'trunks[0].name: "a b" is not a usable trunk name'),
        ({"trunks": [TRUNK, TRUNK]}, 'trunks[1].name: "carrier" is used twice'),
        ({"trunks": [{**TRUNK, "targets": ["sip:h;transport=sctp"]}]},
         'trunks[0].targets[0]: "sip:h;transport=sctp": unknown transport "sctp"'),
        ({"trunks": [{**TRUNK, "targets": ["sip:user@h"]}]},
         'trunks[0].targets[0]: "sip:user@h": expected "sip:host[:port];transport=udp|tcp|tls"'),
        ({"trunks": [{**TRUNK, "username": "acct"}]}, "trunks[0].password: username and password go together"),
        ({"trunks": [{**TRUNK, "headers": ["X-Nope"]}]}, 'trunks[0].headers[0]: "X-Nope" is not "Name: value"'),
        ({"trunks": [{**TRUNK, "headers": ["Via: x"]}]}, 'trunks[0].headers[0]: "Via" is written by the server itself'),
        ({"trunks": [{**TRUNK, "headers": ["l: 0"]}]}, 'trunks[0].headers[0]: "l" is written by the server itself'),
        ({"trunks": [{**TRUNK, "headers": ["v: SIP/2.0/UDP x"]}]},
         'trunks[0].headers[0]: "v" is written by the server itself'),
        ({"trunks": [{**TRUNK, "max_calls": -1}]}, "trunks[0].max_calls: must be >= 0, got -1"),
        ({"trunks": [{**TRUNK, "from_domain": "voip.example;maddr=192.0.2.9"}]},
         'trunks[0].from_domain: "voip.example;maddr=192.0.2.9" is not a host[:port]'),
        ({"trunks": [{**TRUNK, "from_domain": "voip example"}]},
         'trunks[0].from_domain: "voip example" is not a host[:port]'),
        ({"trunks": [{**TRUNK, "failover_timeout": 60}]}, "trunks[0].failover_timeout: must be <= 32, got 60.0"),
        ({"trunks": [TRUNK], "routes": [{"prefix": "+33", "trunk": "nope"}]}, 'routes[0].trunk: unknown trunk "nope"'),
        ({"trunks": [TRUNK], "routes": [{"prefix": "33", "trunk": "carrier"}]},
         'routes[0].prefix: "33" is not an E.164 prefix ("+" and digits, e.g. "+33"; "" = any)'),
        ({"trunks": [TRUNK], "routes": [{"prefix": "+33", "domain": "x.example", "trunk": "carrier"}]},
         "routes[0].domain: a route matches a prefix or a domain, not both"),
        ({"trunks": [TRUNK], "routes": [{"domain": "localhost", "trunk": "carrier"}]},
         'routes[0].domain: "localhost" is one of sip.domains'),
        ({"calls_out": {"max_calls_per_user": -1}}, "calls_out.max_calls_per_user: must be >= 0, got -1"),
        ({"calls_out": {"ring_timeout": 0}}, "calls_out.ring_timeout: must be > 0, got 0.0"),
        ({"trunks": {"name": "x"}}, "trunks: expected an array of tables, got table"),
    ],
)
def test_calls_out_bad_values(data, expected):
    assert error_of(data) == expected


def test_calls_out_config():
    cfg = config_from_dict({"trunks": [{**TRUNK, "headers": ["X-Account: 42"], "pai": True}],
                            "routes": [{"prefix": "+33", "trunk": "carrier"}, {"trunk": "carrier"}]})
    assert cfg.trunks[0].headers == ("X-Account: 42",) and cfg.trunks[0].pai
    assert [r.prefix for r in cfg.routes] == ["+33", ""]
    assert cfg.calls_out.max_calls_per_user == 2
# --- [messages] (SIP MESSAGE store-and-forward) -------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"messages": {"ttl": 10}}, "messages.ttl: must be >= 60, got 10"),
        ({"messages": {"max_size": 0}}, "messages.max_size: must be >= 1, got 0"),
        ({"messages": {"max_size": 100_000}}, "messages.max_size: must be <= 60000, got 100000"),
        ({"messages": {"max_per_user": 0}}, "messages.max_per_user: must be >= 1, got 0"),
        ({"messages": {"max_total": 0}}, "messages.max_total: must be >= 1, got 0"),
        ({"messages": {"per_sender_per_minute": -1}}, "messages.per_sender_per_minute: must be >= 0, got -1"),
        ({"messages": {"max_per_sender_per_user": -1}},
         "messages.max_per_sender_per_user: must be >= 0, got -1"),
        ({"messages": {"push_preview": "no"}}, 'messages.push_preview: expected a boolean, got string "no"'),
        ({"messages": {"colour": 1}}, "messages.colour: unknown key"),
    ],
)
def test_bad_messages_values(data, expected):
    assert error_of(data) == expected


def test_messages_defaults(tmp_path):
    cfg = config_from_dict({}, tmp_path).messages
    assert cfg.enabled and cfg.push_preview
    assert cfg.ttl == 7 * 86_400
    assert cfg.db == str(tmp_path / "libon-tsilo-messages.sqlite")


# --- issue 13: [[gateways]], [voicemail] ------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"gateways": [{"sources": ["192.0.2.0/24"]}]}, "gateways[0].name: is required"),
        ({"gateways": [{"name": "pstn"}]}, "gateways[0].sources: needs at least one network (CIDR)"),
        ({"gateways": [{"name": "pstn", "sources": ["192.0.2.0/33"]}]},
         'gateways[0].sources[0]: "192.0.2.0/33" is not an IP network (CIDR)'),
        ({"gateways": [{"name": "a", "sources": ["192.0.2.1/32"]}, {"name": "a", "sources": ["192.0.2.2/32"]}]},
         'gateways[1].name: "a" is used twice'),
        ({"gateways": [{"name": "a", "sources": ["192.0.2.1/32"], "add_prefix": "+3x"}]},
         'gateways[0].add_prefix: "+3x" must be digits, optionally after "+"'),
        ({"gateways": {"name": "a"}}, "gateways: expected an array of tables, got table"),
        ({"gateways": [{"name": "a", "sources": ["192.0.2.1/32"], "port": 5060}]}, "gateways[0].port: unknown key"),
        ({"voicemail": {"target": "mailto:vm@example.com"}},
         'voicemail.target: "mailto:vm@example.com" is not a SIP URI like "sip:vm@192.0.2.10:5060"'),
        ({"voicemail": {"target": "sip:vm@"}}, 'voicemail.target: "sip:vm@" is not a SIP URI like "sip:vm@192.0.2.10:5060"'),
        ({"voicemail": {"on_busy": [486, 200]}}, "voicemail.on_busy[1]: 200 is not a 4xx-6xx failure code"),
        ({"voicemail": {"on_no_answer": "yes"}}, 'voicemail.on_no_answer: expected a boolean, got string "yes"'),
    ],
)
def test_gateways_and_voicemail_bad_values(data, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert str(info.value) == expected


def test_gateways_and_voicemail_defaults_and_values():
    cfg = config_from_dict({})
    assert cfg.gateways == () and cfg.voicemail.target == ""  # off unless configured
    assert cfg.voicemail.on_busy == (486, 600, 603) and cfg.voicemail.on_no_answer and cfg.voicemail.on_unavailable
    cfg = config_from_dict({
        "gateways": [{"name": "pstn", "sources": ["192.0.2.0/28"], "strip_prefix": "99", "add_prefix": "+33"}],
        "voicemail": {"target": "sip:vm@192.0.2.10:5070;transport=tcp", "on_busy": [486]},
    })
    [gw] = cfg.gateways
    assert (gw.name, gw.sources, gw.strip_prefix, gw.add_prefix) == ("pstn", ("192.0.2.0/28",), "99", "+33")
    assert cfg.voicemail.target == "sip:vm@192.0.2.10:5070;transport=tcp" and cfg.voicemail.on_busy == (486,)
