"""The whole TOML schema of libon-tsilo: every key, its type, its default and its checks.

`load_config(path)` reads one TOML file into frozen dataclasses and validates everything at
start-up, so that a bad file stops the server before anything listens. Every problem becomes a
`ConfigError` whose message is one line naming the key, e.g. ``sip.listen[2]: unknown transport "sctp"``.

Each section is a dataclass whose fields carry their check in ``metadata``; a small generic builder
walks the raw TOML tables, so adding a key is one line. Relative file paths are resolved against the
directory of the config file (or the working directory when there is no file).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from libon_tsilo.b2bua.capabilities import DEFAULT_ALLOWLIST
from libon_tsilo.dialplan import DialPlan
from libon_tsilo.sip.listen import ListenSpec, ListenSpecError, parse_listen_spec
from libon_tsilo.util import random_token

__all__ = [
    "ConfigError",
    "Config",
    "SipConfig",
    "ConnectionsConfig",
    "TlsConfig",
    "RegistrarConfig",
    "AuthConfig",
    "LocationConfig",
    "CallsConfig",
    "PushConfig",
    "ApnsConfig",
    "FcmConfig",
    "WebhookConfig",
    "ManholeConfig",
    "AdminConfig",
    "LimitsConfig",
    "LogConfig",
    "OpsConfig",
    "OverloadConfig",
    "ClusterConfig",
    "DialPlanConfig",
    "CallsOutConfig",
    "TrunkConfig",
    "RouteConfig",
    "GatewayConfig",
    "VoicemailConfig",
    "MessagesConfig",
    "ListenAddress",
    "parse_listen",
    "load_config",
    "config_from_dict",
    "default_config",
]


log = Logger()


class ConfigError(ValueError):
    """A config problem; ``str(err)`` is one line that starts with the dotted key."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


Check = Callable[[Any, str], Any]

# What a path field is for: "input" files must exist at start-up; "state" files are created by us.
_INPUT = "input"
_STATE = "state"


def _opt(default: Any, check: Check | None = None, path: str | None = None) -> Any:
    return field(default=default, metadata={"check": check, "path": path})


# ---------------------------------------------------------------------------------------------
# value checks: each takes (value, key) and returns the (possibly normalized) value


def _int_range(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value: int | float, key: str) -> int | float:
        if lo is not None and value < lo:
            raise ConfigError(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(key, f"must be <= {hi}, got {value}")
        return value

    return check


def _no_longer_used(check: Check, why: str) -> Check:
    """A key kept so that old config files still load: still checked, then ignored, with a warning."""

    def warn(value: Any, key: str) -> Any:
        value = check(value, key)
        log.warn("config: {key} is no longer used ({why}); remove it", key=key, why=why)
        return value

    return warn


def _positive(value: int | float, key: str) -> int | float:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")
    return value


def _one_of(*choices: str) -> Check:
    def check(value: str, key: str) -> str:
        if value not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices)
            raise ConfigError(key, f'unknown value "{value}" (expected one of {allowed})')
        return value

    return check


def _no_newline(value: str, key: str) -> str:
    # these strings end up in SIP headers; a CR/LF would let the config inject headers
    if "\r" in value or "\n" in value or "\0" in value:
        raise ConfigError(key, "must not contain line breaks")
    return value


def _non_empty_items(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    for i, item in enumerate(value):
        if not item.strip():
            raise ConfigError(f"{key}[{i}]", "must not be empty")
        _no_newline(item, f"{key}[{i}]")
    return value


_TOKEN_RE = re.compile(r"^[A-Za-z0-9!%*_+`'~.-]+$")


def _header_names(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    for i, item in enumerate(value):
        if not _TOKEN_RE.match(item):
            raise ConfigError(f"{key}[{i}]", f'"{item}" is not a valid header name')
    return value


def _cidrs(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    for i, item in enumerate(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}]", f'"{item}" is not an IP network (CIDR)') from None
    return value


_ALGORITHMS = ("SHA-256", "MD5")
# MD5 only by default: libre (baresip and the apps built on it) fails on any challenge it cannot
# answer, even when an MD5 one is also offered, and SIPp 3.6 answers only the first (MD5) one
_DEFAULT_ALGORITHMS = ("MD5",)


def _algorithms(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    if not value:
        raise ConfigError(key, "must name at least one algorithm")
    for i, item in enumerate(value):
        if item not in _ALGORITHMS:
            raise ConfigError(f"{key}[{i}]", f'unknown algorithm "{item}" (expected "SHA-256" or "MD5")')
    if len(set(value)) != len(value):
        raise ConfigError(key, "lists an algorithm twice")
    return value


def _http_url(value: str, key: str) -> str:
    if value and not re.match(r"^https?://[^\s/]+", value):
        raise ConfigError(key, f'"{value}" is not an http(s) URL')
    return value


_ENDPOINT_KINDS = ("tcp", "tcp6", "ssl", "unix")


def _endpoint(value: str, key: str) -> str:
    """A twisted server endpoint string; only kind and port are checked (full parsing needs a reactor)."""
    if not value:
        return value
    kind, _, rest = value.partition(":")
    if kind not in _ENDPOINT_KINDS or not rest:
        raise ConfigError(key, f'"{value}" is not an endpoint like "tcp:2222:interface=127.0.0.1"')
    if kind != "unix":
        port = rest.split(":", 1)[0]
        if port.startswith("port="):
            port = port[5:]
        if not port.isdigit() or int(port) > 65535:
            raise ConfigError(key, f'"{value}" has no valid port')
    return value


# ---------------------------------------------------------------------------------------------
# [sip] listen entries


ListenAddress = ListenSpec  # the name config users know


def parse_listen(spec: str, key: str = "sip.listen") -> ListenSpec:
    """The transport's own parser (sip/listen.py), its error as a ConfigError naming ``key``."""
    try:
        return parse_listen_spec(spec)
    except ListenSpecError as exc:
        raise ConfigError(key, str(exc)) from None


def _listen_list(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    if not value:
        raise ConfigError(key, "needs at least one listener")
    seen: set[tuple[str, str, int]] = set()
    for i, item in enumerate(value):
        addr = parse_listen(item, f"{key}[{i}]")
        ident = (addr.transport, addr.host, addr.port)
        if addr.port and ident in seen:
            raise ConfigError(f"{key}[{i}]", f'"{item}" is listed twice')
        seen.add(ident)
    return value


# ---------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class SipConfig:
    listen: tuple[str, ...] = _opt(("udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"), _listen_list)
    domains: tuple[str, ...] = _opt(("localhost", "127.0.0.1"), _non_empty_items)
    max_message_size: int = _opt(65535, _int_range(1500, 1 << 20))
    t1_ms: int = _opt(500, _positive)
    t2_ms: int = _opt(4000, _positive)
    t4_ms: int = _opt(5000, _positive)
    flow_idle_timeout: int = _opt(3600, _positive)
    advertised_host: str = _opt("", _no_newline)
    user_agent: str = _opt("libon-tsilo", _no_newline)
    # bytes of kernel receive buffer per UDP socket: a burst waits there instead of being dropped
    udp_receive_buffer: int = _opt(4 * 1024 * 1024, _int_range(64 * 1024, 1 << 30))

    @property
    def listen_addresses(self) -> list[ListenAddress]:
        return [parse_listen(s) for s in self.listen]

    # seconds, as the transaction layer wants them
    @property
    def t1(self) -> float:
        return self.t1_ms / 1000.0

    @property
    def t2(self) -> float:
        return self.t2_ms / 1000.0

    @property
    def t4(self) -> float:
        return self.t4_ms / 1000.0


@dataclass(frozen=True)
class ConnectionsConfig:
    # what bounds TCP/TLS connections and UDP flows (issue 11); 0 turns a cap or timeout off
    max_connections: int = _opt(10000, _int_range(0))
    max_connections_per_source: int = _opt(256, _int_range(0))
    message_timeout: float = _opt(20.0, _int_range(0))
    tls_handshake_timeout: float = _opt(10.0, _int_range(0))
    unbound_idle_timeout: float = _opt(60.0, _int_range(0))
    listen_backlog: int = _opt(1024, _int_range(1, 65535))
    max_udp_flows: int = _opt(20000, _int_range(0))
    max_buffered_bytes: int = _opt(64 * 1024 * 1024, _int_range(0))


@dataclass(frozen=True)
class TlsConfig:
    certificate: str = _opt("", path=_INPUT)
    private_key: str = _opt("", path=_INPUT)
    ca_file: str = _opt("", path=_INPUT)
    verify_client: bool = _opt(False)


@dataclass(frozen=True)
class RegistrarConfig:
    use_domain: bool = _opt(True)
    min_expires: int = _opt(60, _int_range(1))
    max_expires: int = _opt(3600, _int_range(1))
    default_expires: int = _opt(3600, _int_range(1))
    max_contacts: int = _opt(10, _int_range(1))
    on_max_contacts: str = _opt("reject", _one_of("reject", "replace_oldest"))
    pnsreg_interval: int = _opt(130, _positive)
    # RFC 5626 Flow-Timer (seconds) for outbound devices on TCP/TLS; 0: not sent
    flow_timer: int = _opt(120, _int_range(0))


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = _opt(True)
    realm: str = _opt("libon-tsilo", _no_newline)
    users_db: str = _opt("libon-tsilo-users.sqlite", path=_STATE)
    # "" in the file means: a random secret per start (load_config fills it in, so it is never empty)
    secret: str = _opt("")
    nonce_lifetime: int = _opt(300, _positive)
    trusted_sources: tuple[str, ...] = _opt((), _cidrs)
    algorithms: tuple[str, ...] = _opt(_DEFAULT_ALGORITHMS, _algorithms)
    # failed digest attempts (registrar/auth_limits.py); 0 turns a limit off
    failed_per_source: int = _opt(20, _int_range(0))
    failed_per_user: int = _opt(10, _int_range(0))
    failed_window: int = _opt(60, _positive)
    failed_block: int = _opt(300, _positive)
    known_source_ttl: int = _opt(7200, _positive)

    @property
    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(s, strict=False) for s in self.trusted_sources]


def _redis_url(value: str, key: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a bad port
    except ValueError as exc:
        raise ConfigError(key, f'"{value}" is not a Redis URL: {exc}') from None
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ConfigError(key, f'"{value}" is not a redis://, rediss:// or unix:// URL')
    if port == 0:
        raise ConfigError(key, f'"{value}" has port 0')
    return value


def _host_ports(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    for i, item in enumerate(value):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"{key}[{i}]", f'"{item}" is not "host:port"')
    return value


def _non_empty(value: str, key: str) -> str:
    if not value:
        raise ConfigError(key, "must not be empty")
    return _no_newline(value, key)


@dataclass(frozen=True)
class LocationConfig:
    backend: str = _opt("sqlite", _one_of("sqlite", "memory", "redis"))
    path: str = _opt("libon-tsilo-location.sqlite", path=_STATE)
    # group commit: the first change waits this long for others before a commit starts
    flush_interval_ms: int = _opt(2, _int_range(0, 1000))
    # backend = "redis" (a cluster: registrar/redis_store.py); username/password override the URL's
    url: str = _opt("redis://127.0.0.1:6379/0", _redis_url)
    username: str = _opt("")
    password: str = _opt("")
    key_prefix: str = _opt("libon-tsilo:", _non_empty)
    sentinels: tuple[str, ...] = _opt((), _host_ports)  # "host:port"; then url gives db and TLS only
    service_name: str = _opt("", _no_newline)  # the Sentinel master name, required with sentinels


@dataclass(frozen=True)
class CallsConfig:
    ring_timeout: float = _opt(30.0, _positive)
    # seconds an answered/cancelled call still forks to a pushed iOS device that registers late, so
    # that it gets INVITE then CANCEL and can end its CallKit call (0 = off)
    invite_cancel_grace: float = _opt(30.0, _int_range(0))
    max_branches: int = _opt(12, _int_range(1))
    max_pending_per_aor: int = _opt(8, _int_range(1))
    # RFC 4028 session timers on both legs (0 = off), the smallest interval we accept (RFC: >= 90),
    # and the most seconds an answered call may last (0 = no limit); cross-checked in _check_session_timers
    session_expires: int = _opt(1800, _int_range(0, 86_400))
    min_se: int = _opt(90, _int_range(90, 86_400))
    max_call_duration: float = _opt(14_400.0, _int_range(0))
    header_allowlist: tuple[str, ...] = _opt(DEFAULT_ALLOWLIST, _header_names)


@dataclass(frozen=True)
class ApnsConfig:
    bundle_id: str = _opt("")
    team_id: str = _opt("")
    key_id: str = _opt("")
    key_file: str = _opt("", path=_INPUT)
    cert_file: str = _opt("", path=_INPUT)
    sandbox: bool = _opt(False)
    server: str = _opt("", _http_url)  # "" = Apple's production or sandbox host
    ca_file: str = _opt("", path=_INPUT)
    timeout: float = _opt(5.0, _positive)


@dataclass(frozen=True)
class FcmConfig:
    project_id: str = _opt("")
    service_account_file: str = _opt("", path=_INPUT)
    endpoint: str = _opt("https://fcm.googleapis.com", _http_url)
    timeout: float = _opt(5.0, _positive)


@dataclass(frozen=True)
class WebhookConfig:
    name: str = _opt("webhook")
    url: str = _opt("", _http_url)
    timeout: float = _opt(5.0, _positive)


@dataclass(frozen=True)
class PushConfig:
    providers: tuple[str, ...] = _opt((), _non_empty_items)
    skip_push_if_registered_within: int = _opt(0, _int_range(0))
    refresh_before_expiry: int = _opt(0, _int_range(0))
    cancelled_ios_call: str = _opt("invite_cancel", _one_of("invite_cancel", "missed_call_push"))
    fcm_threads: int = _opt(4, _int_range(1, 64))
    apns: tuple[ApnsConfig, ...] = _opt(())
    fcm: tuple[FcmConfig, ...] = _opt(())
    webhook: tuple[WebhookConfig, ...] = _opt(())


@dataclass(frozen=True)
class ManholeConfig:
    listen: str = _opt("", _endpoint)
    authorized_keys: str = _opt("", path=_INPUT)
    passwords: str = _opt("", path=_INPUT)


@dataclass(frozen=True)
class AdminConfig:
    listen: str = _opt("", _endpoint)
    token: str = _opt("")
    metrics_public: bool = _opt(False)


@dataclass(frozen=True)
class LimitsConfig:
    # per-source request rate (Kamailio pike): a token bucket per source IP (IPv6: per /64)
    requests_per_second: float = _opt(20.0, _int_range(0))  # 0 = off
    burst: int = _opt(100, _int_range(1))
    ban_time: int = _opt(60, _int_range(1, 86400))
    max_sources: int = _opt(50_000, _int_range(1))
    # never limited (besides [auth] trusted_sources): loopback cannot come from the network
    exempt_sources: tuple[str, ...] = _opt(("127.0.0.0/8", "::1/128"), _cidrs)
    pushes_per_device_per_minute: int = _opt(10, _int_range(0))  # call pushes; 0 = off
    max_parked_per_source: int = _opt(20, _int_range(0))  # unanswered calls; 0 = off
    max_parked_total: int = _opt(20_000, _int_range(0))  # 0 = off
    login_max_failures: int = _opt(5, _int_range(1))  # manhole passwords, admin tokens per source...
    login_ban_time: int = _opt(300, _int_range(1, 86400))  # ...that fail within this many seconds


@dataclass(frozen=True)
class LogConfig:
    level: str = _opt("info", _one_of("debug", "info", "warn", "error"))
    format: str = _opt("text", _one_of("text", "json"))


def _reactor_check(value: str, key: str) -> str:
    value = _one_of("auto", "epoll", "asyncio", "uvloop")(value, key)
    if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError(key, '"uvloop" needs the uvloop package: pip install uvloop')
    return value


@dataclass(frozen=True)
class OpsConfig:
    drain_timeout: int = _opt(30, _int_range(0))
    # nothing ran on this pool: FCM has [push] fcm_threads, SQLite its own writer thread
    threadpool_size: int = _opt(8, _no_longer_used(_int_range(1, 256), "each blocking user owns its pool"))
    # speed (issue 15): "auto" = epoll (ops/reactor.py); "uvloop" = asyncio over uvloop (if installed)
    reactor: str = _opt("auto", _reactor_check)


@dataclass(frozen=True)
class OverloadConfig:
    # refuse new INVITEs (503) while the reactor lags; see libon_tsilo/sip/overload.py
    enabled: bool = _opt(True)
    enter_lag_ms: int = _opt(200, _int_range(1, 60_000))
    leave_lag_ms: int = _opt(50, _int_range(0, 60_000))
    max_transactions: int = _opt(0, _int_range(0))  # live transactions that also mean overload (0 = off)
    retry_after: int = _opt(5, _int_range(1, 3600))


def _node_id(value: str, key: str) -> str:
    # a node id goes into metric labels, Redis keys and log lines: keep it a plain token
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
        shown = value.encode("unicode_escape").decode("ascii")  # the error stays one line
        raise ConfigError(key, f'"{shown}" is not a node id (letters, digits, ".", "_", "-"; at most 63)')
    return value


def _node_address(value: str, key: str) -> str:
    # other nodes send to it: a concrete address over udp or tcp, never a wildcard
    if not value:
        return value
    addr = parse_listen(value, key)
    if addr.transport == "tls":
        raise ConfigError(key, f'"{value}": the internal listener is udp or tcp (a private network)')
    if addr.host in ("0.0.0.0", "::"):  # port 0 is fine: a Path carries the port bound
        raise ConfigError(key, f'"{value}": other nodes send here: name a concrete host')
    return value


def _node_addresses(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    for i, item in enumerate(value):
        _node_address(item, f"{key}[{i}]")
        if not item:
            raise ConfigError(f"{key}[{i}]", "must not be empty")
    return value


def _digits(value: str, key: str) -> str:
    if value and not value.isdigit():
        raise ConfigError(key, f'"{value}" must be digits only')
    return value


def _digit_items(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    for i, item in enumerate(value):
        if not item or not item.isdigit():
            raise ConfigError(f"{key}[{i}]", f'"{item}" must be digits only')
    return value


def _bool_or_auto(value: bool | str, key: str) -> bool | str:
    if not isinstance(value, bool) and value != "auto":
        raise ConfigError(key, f'expected true, false or "auto", got "{value}"')
    return value


def _host_name(value: str, key: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]*", value):
        raise ConfigError(key, f'"{value}" is not a host name (letters, digits, ".", "_", "-")')
    return value


@dataclass(frozen=True)
class ClusterConfig:
    # issue 14: several nodes (processes) share the location service; see README "Cluster"
    node_id: str = _opt("", _node_id)  # "" = single node, or derived (ops/node.py) when clustered
    reuse_port: bool = _opt(False)  # SO_REUSEPORT on [sip] listen: N workers bind the same ports
    # this node's internal SIP listener ("udp|tcp:HOST:PORT"); "" = no node-to-node relay (Path)
    node_address: str = _opt("", _node_address)
    peers: tuple[str, ...] = _opt((), _node_addresses)  # the other nodes' node_address
    # sources the internal listener accepts requests from (the peers' hosts are added)
    trusted_peers: tuple[str, ...] = _opt(("127.0.0.0/8", "::1/128"), _cidrs)
    # the key of the flow tokens in our Path entries; "" = random per start (see etc/libon-tsilo.toml)
    secret: str = _opt("")
    # how a UDP device registered on another node is reached: "auto" = straight when that node
    # shares our public UDP socket (reuse_port workers of one host), else through its Path entry;
    # true = always through it; false = always straight (see etc/libon-tsilo.toml)
    udp_via_path: bool | str = _opt("auto", _bool_or_auto)
    host: str = _opt("", _host_name)  # this host's identity for "auto" ("" = the hostname)
    # connected sockets that bring a UDP device's answers to the reuse_port worker that forked to it
    # (sip/udp_pins.py), one file descriptor each; 0 = none (the worker that gets them passes them on)
    max_udp_pins: int = _opt(4096, _int_range(0))


@dataclass(frozen=True)
class DialPlanConfig:
    # how users and gateways write numbers; everything is compared in E.164 (libon_tsilo/dialplan.py)
    country_code: str = _opt("", _digits)
    national_prefix: str = _opt("0", _digits)
    international_prefixes: tuple[str, ...] = _opt(("00",), _digit_items)


# -- calls out (issue 13): [calls_out], [[trunks]], [[routes]]; checked across keys in _check_calls_out


def _trunk_targets(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    from libon_tsilo.routing.trunks import parse_target

    for i, item in enumerate(value):
        try:
            parse_target(item)
        except ValueError as exc:
            raise ConfigError(f"{key}[{i}]", f'"{item}": {exc}') from None
    return value


# what the B2BUA itself writes on a B-leg: an extra header may not replace or double it
_OWN_HEADERS = frozenset(("via", "from", "to", "call-id", "cseq", "contact", "max-forwards", "content-length",
                          "content-type", "route", "record-route", "authorization", "proxy-authorization",
                          "p-asserted-identity"))


def _header_lines(value: tuple[str, ...], key: str) -> tuple[str, ...]:
    from libon_tsilo.sip.headers import canonical_key

    for i, item in enumerate(_non_empty_items(value, key)):
        name, colon, rest = item.partition(":")
        if not colon or not _TOKEN_RE.match(name.strip()) or not rest.strip():
            raise ConfigError(f"{key}[{i}]", f'"{item}" is not "Name: value"')
        if canonical_key(name.strip()) in _OWN_HEADERS:  # "l: 0" is Content-Length too
            raise ConfigError(f"{key}[{i}]", f'"{name.strip()}" is written by the server itself')
    return value


def _e164_prefix(value: str, key: str) -> str:
    if value and not re.fullmatch(r"\+[0-9]{1,15}", value):
        raise ConfigError(key, f'"{value}" is not an E.164 prefix ("+" and digits, e.g. "+33"; "" = any)')
    return value


@dataclass(frozen=True)
class CallsOutConfig:
    max_calls_per_user: int = _opt(2, _int_range(0))  # concurrent, for users without their own; 0 = no limit
    ring_timeout: float = _opt(120.0, _positive)  # the phone network's own no-answer timer is ~60-180 s


@dataclass(frozen=True)
class TrunkConfig:
    name: str = _opt("", _no_newline)
    targets: tuple[str, ...] = _opt((), _trunk_targets)  # "sip:host:port;transport=udp|tcp|tls", in order
    username: str = _opt("", _no_newline)
    password: str = _opt("", _no_newline)
    realm: str = _opt("", _no_newline)  # "" = answer a challenge from any realm
    from_domain: str = _opt("", _no_newline)  # "" = the target's host
    headers: tuple[str, ...] = _opt((), _header_lines)
    pai: bool = _opt(False)
    max_calls: int = _opt(0, _int_range(0))  # 0 = no limit
    failover_timeout: float = _opt(4.0, _int_range(0, 32))  # a silent target; 0 = wait for Timer B
    tel_uri: bool = _opt(False)  # R-URI and To as tel:+E164 (else sip:+E164@target;user=phone)


@dataclass(frozen=True)
class RouteConfig:
    prefix: str = _opt("", _e164_prefix)
    domain: str = _opt("", _no_newline)
    trunk: str = _opt("")


# -- issue 13: calls in from gateways, voicemail on no answer ----------------------------------


def _number_prefix(value: str, key: str) -> str:
    if value and not re.match(r"^\+?[0-9]*$", value):
        raise ConfigError(key, f'"{value}" must be digits, optionally after "+"')
    return value


def _sip_uri(value: str, key: str) -> str:
    if not value:
        return value
    from libon_tsilo.sip.errors import ParseError
    from libon_tsilo.sip.uri import URI

    try:
        uri = URI.parse(value)
    except (ParseError, ValueError):
        uri = None
    if uri is None or uri.scheme not in ("sip", "sips") or not uri.host or uri.headers:
        raise ConfigError(key, f'"{value}" is not a SIP URI like "sip:vm@192.0.2.10:5060"')
    return value


def _failure_codes(value: tuple[int, ...], key: str) -> tuple[int, ...]:
    for i, code in enumerate(value):
        if not 400 <= code <= 699:
            raise ConfigError(f"{key}[{i}]", f"{code} is not a 4xx-6xx failure code")
    return value


@dataclass(frozen=True)
class GatewayConfig:
    # a trusted peer of the phone network: no digest, identity believed, may call users' numbers
    name: str = _opt("", _no_newline)
    sources: tuple[str, ...] = _opt((), _cidrs)
    strip_prefix: str = _opt("", _number_prefix)  # taken off the dialled number first...
    add_prefix: str = _opt("", _number_prefix)  # ...then this put in front, before the dial plan


@dataclass(frozen=True)
class VoicemailConfig:
    target: str = _opt("", _sip_uri)  # "" = no voicemail
    on_busy: tuple[int, ...] = _opt((486, 600, 603), _failure_codes)  # every device declined with one
    on_no_answer: bool = _opt(True)  # ring timeout
    on_unavailable: bool = _opt(True)  # no device, every push failed, devices unreachable


def _check_gateways(gateways: tuple[GatewayConfig, ...]) -> None:
    names: set[str] = set()
    for i, gw in enumerate(gateways):
        if not gw.name:
            raise ConfigError(f"gateways[{i}].name", "is required")
        if gw.name in names:
            raise ConfigError(f"gateways[{i}].name", f'"{gw.name}" is used twice')
        names.add(gw.name)
        if not gw.sources:
            raise ConfigError(f"gateways[{i}].sources", "needs at least one network (CIDR)")


@dataclass(frozen=True)
class MessagesConfig:
    # SIP MESSAGE store-and-forward to sleeping phones (libon_tsilo/messaging/); off: MESSAGE gets 405
    enabled: bool = _opt(True)
    db: str = _opt("libon-tsilo-messages.sqlite", path=_STATE)  # [location] backend "sqlite"; redis: Redis
    ttl: int = _opt(7 * 86_400, _int_range(60, 90 * 86_400))  # seconds a message waits for a device
    max_size: int = _opt(4096, _int_range(1, 60_000))  # body bytes; over: 413
    max_per_user: int = _opt(500, _int_range(1))  # waiting messages per recipient; over: 480
    max_total: int = _opt(200_000, _int_range(1))  # waiting messages in all (memory); over: 503
    per_sender_per_minute: int = _opt(60, _int_range(0))  # 0 = off; over: 503
    max_per_sender_per_user: int = _opt(50, _int_range(0))  # waiting from one sender to one user; 0 = off
    push_preview: bool = _opt(True)  # the start of a text body in the push payload


@dataclass(frozen=True)
class Config:
    sip: SipConfig = field(default_factory=SipConfig)
    connections: ConnectionsConfig = field(default_factory=ConnectionsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    registrar: RegistrarConfig = field(default_factory=RegistrarConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    location: LocationConfig = field(default_factory=LocationConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    push: PushConfig = field(default_factory=PushConfig)
    manhole: ManholeConfig = field(default_factory=ManholeConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    overload: OverloadConfig = field(default_factory=OverloadConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dialplan: DialPlanConfig = field(default_factory=DialPlanConfig)
    calls_out: CallsOutConfig = field(default_factory=CallsOutConfig)
    trunks: tuple[TrunkConfig, ...] = field(default=())
    routes: tuple[RouteConfig, ...] = field(default=())
    gateways: tuple[GatewayConfig, ...] = _opt(())
    voicemail: VoicemailConfig = field(default_factory=VoicemailConfig)
    messages: MessagesConfig = field(default_factory=MessagesConfig)
    # where the config came from (None = built-in defaults); not a TOML key
    source: str | None = field(default=None, metadata={"internal": True})

    def dial_plan(self) -> DialPlan:
        d = self.dialplan
        return DialPlan(d.country_code, d.national_prefix, d.international_prefixes)


# ---------------------------------------------------------------------------------------------
# generic builder


def _describe(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f'{kind} "{shown}"'
    if isinstance(value, (bool, int, float)):
        return f"{kind} {str(value).lower() if isinstance(value, bool) else value}"
    return kind


def _coerce(value: Any, hint: Any, key: str, base_dir: Path) -> Any:
    """Check ``value`` against the type hint; tables and arrays of tables recurse."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected a boolean, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_describe(value)}")
        return value
    if hint == (bool | str):  # a switch with a third word ("auto"): its check says which
        if not isinstance(value, (bool, str)):
            raise ConfigError(key, f"expected a boolean or a string, got {_describe(value)}")
        return value
    if typing.get_origin(hint) is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list):
            what = "an array of tables" if is_dataclass(item_hint) else "an array"
            raise ConfigError(key, f"expected {what}, got {_describe(value)}")
        return tuple(_coerce(v, item_hint, f"{key}[{i}]", base_dir) for i, v in enumerate(value))
    if isinstance(hint, type) and is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {_describe(value)}")
        return _build(hint, value, key, base_dir)
    raise TypeError(f"config schema: unsupported type {hint!r} for {key}")  # a bug in this file


def _resolve_path(value: str, kind: str, key: str, base_dir: Path) -> str:
    if not value:
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if kind == _INPUT:
        if not path.is_file():
            raise ConfigError(key, f"file not found: {path}")
        if not os.access(path, os.R_OK):
            raise ConfigError(key, f"file not readable: {path}")
    elif kind == _STATE and not path.parent.is_dir():
        raise ConfigError(key, f"directory does not exist: {path.parent}")
    return str(path)


def _build(cls: type, raw: dict[str, Any], prefix: str, base_dir: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    for name in raw:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(where, "unknown section" if not prefix else "unknown key")
    values: dict[str, Any] = {}
    for name, f in known.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if is_dataclass(hints[name]):
                # build absent sections too, so their relative state paths resolve like present ones
                values[name] = _build(hints[name], {}, key, base_dir)
            continue  # a default; defaults are valid by construction (tests check this)
        value = _coerce(raw[name], hints[name], key, base_dir)
        if f.metadata.get("path"):
            value = _resolve_path(value, f.metadata["path"], key, base_dir)
        check = f.metadata.get("check")
        if check is not None:
            value = check(value, key)
        values[name] = value
    obj = cls(**values)
    # state paths keep their relative default until resolved here, so defaults follow the base dir too
    resolved = {}
    for name, f in known.items():
        if f.metadata.get("path") == _STATE and name not in raw:
            key = f"{prefix}.{name}" if prefix else name
            resolved[name] = _resolve_path(getattr(obj, name), _STATE, key, base_dir)
    return replace(obj, **resolved) if resolved else obj


# ---------------------------------------------------------------------------------------------
# checks across keys


def _check_sip(sip: SipConfig) -> None:
    if sip.t2_ms < sip.t1_ms:
        raise ConfigError("sip.t2_ms", f"must be >= sip.t1_ms ({sip.t1_ms}), got {sip.t2_ms}")


def _check_tls(cfg: Config) -> None:
    uses_tls = any(parse_listen(s).transport == "tls" for s in cfg.sip.listen)
    if uses_tls and not cfg.tls.certificate:
        raise ConfigError("tls.certificate", "required by the tls: listener in sip.listen")
    if uses_tls and not cfg.tls.private_key:
        raise ConfigError("tls.private_key", "required by the tls: listener in sip.listen")
    if cfg.tls.verify_client and not cfg.tls.ca_file:
        raise ConfigError("tls.ca_file", "required when tls.verify_client is true")


def _check_registrar(reg: RegistrarConfig) -> None:
    if reg.max_expires < reg.min_expires:
        raise ConfigError("registrar.max_expires", f"must be >= registrar.min_expires ({reg.min_expires})")
    if not reg.min_expires <= reg.default_expires <= reg.max_expires:
        raise ConfigError(
            "registrar.default_expires",
            f"must be between registrar.min_expires ({reg.min_expires}) and max_expires ({reg.max_expires})",
        )


def _check_flow_timer(cfg: Config) -> None:
    # a device keeps its flow alive within Flow-Timer: we must not close it as idle before that
    if cfg.registrar.flow_timer >= cfg.sip.flow_idle_timeout:
        raise ConfigError(
            "registrar.flow_timer",
            f"must be < sip.flow_idle_timeout ({cfg.sip.flow_idle_timeout}), got {cfg.registrar.flow_timer}",
        )


def _check_apns(i: int, apns: ApnsConfig) -> None:
    key = f"push.apns[{i}]"
    if not apns.bundle_id:
        raise ConfigError(f"{key}.bundle_id", "is required")
    if bool(apns.key_file) == bool(apns.cert_file):
        raise ConfigError(f"{key}.key_file", "set exactly one of key_file (token auth) or cert_file")
    if apns.key_file:
        if not apns.team_id:
            raise ConfigError(f"{key}.team_id", "is required with key_file")
        if not apns.key_id:
            raise ConfigError(f"{key}.key_id", "is required with key_file")


def _check_push(push: PushConfig) -> None:
    for i, apns in enumerate(push.apns):
        _check_apns(i, apns)
    for i, fcm in enumerate(push.fcm):
        if not fcm.project_id:
            raise ConfigError(f"push.fcm[{i}].project_id", "is required")
        if not fcm.service_account_file:
            raise ConfigError(f"push.fcm[{i}].service_account_file", "is required")
    names: set[str] = set()
    for i, hook in enumerate(push.webhook):
        if not hook.url:
            raise ConfigError(f"push.webhook[{i}].url", "is required")
        if not hook.name or hook.name in ("apns", "fcm"):
            raise ConfigError(f"push.webhook[{i}].name", f'"{hook.name}" is not a usable provider name')
        if hook.name in names:
            raise ConfigError(f"push.webhook[{i}].name", f'"{hook.name}" is used twice')
        names.add(hook.name)
    configured = {"apns": bool(push.apns), "fcm": bool(push.fcm), **{n: True for n in names}}
    for i, provider in enumerate(push.providers):
        key = f"push.providers[{i}]"
        if provider not in configured:
            raise ConfigError(key, f'unknown provider "{provider}" (expected "apns", "fcm" or a webhook)')
        if not configured[provider]:
            raise ConfigError(key, f'"{provider}" needs a [[push.{provider}]] table')
    if len(set(push.providers)) != len(push.providers):
        raise ConfigError("push.providers", "lists a provider twice")


def _check_manhole(manhole: ManholeConfig) -> None:
    if manhole.listen and not (manhole.authorized_keys or manhole.passwords):
        raise ConfigError("manhole.listen", "needs manhole.authorized_keys or manhole.passwords")


def _check_session_timers(calls: CallsConfig) -> None:
    if calls.session_expires and calls.session_expires < calls.min_se:
        raise ConfigError("calls.session_expires", f"must be 0 or >= calls.min_se ({calls.min_se}), "
                          f"got {calls.session_expires}")


def _check_overload(overload: OverloadConfig) -> None:
    if overload.leave_lag_ms >= overload.enter_lag_ms:
        raise ConfigError(
            "overload.leave_lag_ms", f"must be < overload.enter_lag_ms ({overload.enter_lag_ms})"
        )


def _check_location(cfg: Config) -> None:
    loc = cfg.location
    if loc.sentinels and not loc.service_name:
        raise ConfigError("location.service_name", "required with location.sentinels")
    if loc.backend == "redis" and cfg.ops.reactor == "epoll":
        # redis-py's asyncio client runs on the reactor's loop (registrar/asyncio_bridge.py)
        problem = 'must be "auto", "uvloop" or "asyncio" with location.backend = "redis"'
        raise ConfigError("ops.reactor", problem)


def _check_cluster(cfg: Config) -> None:
    address = cfg.cluster.node_address
    if not address:
        return
    internal = parse_listen(address)
    for i, item in enumerate(cfg.sip.listen):
        public = parse_listen(item)
        if internal.port and public.transport == internal.transport and public.port == internal.port:
            problem = f'"{address}" is also sip.listen[{i}]: give it its own port'
            raise ConfigError("cluster.node_address", problem)
    if cfg.location.backend == "redis" and not cfg.cluster.secret:
        # a random key per start makes every Path this node wrote before a restart unreadable:
        # the calls to those devices fail until each registers again
        problem = 'must be set with node_address on location.backend = "redis" (any long random string)'
        raise ConfigError("cluster.secret", problem)


def _check_reuse_port(cfg: Config) -> None:
    # workers sharing the public port get any device's REGISTER and any call: they must share the
    # bindings too (and N processes on one SQLite file would fight over it)
    if cfg.cluster.reuse_port and cfg.location.backend != "redis":
        problem = 'needs location.backend = "redis" (workers share the bindings)'
        raise ConfigError("cluster.reuse_port", problem)


def _check_calls_out(cfg: Config) -> None:
    from libon_tsilo.sip.hostnames import HostSet

    names: set[str] = set()
    for i, trunk in enumerate(cfg.trunks):
        if not trunk.name or not _TOKEN_RE.match(trunk.name):
            raise ConfigError(f"trunks[{i}].name", f'"{trunk.name}" is not a usable trunk name')
        if trunk.name in names:
            raise ConfigError(f"trunks[{i}].name", f'"{trunk.name}" is used twice')
        names.add(trunk.name)
        if not trunk.targets:
            raise ConfigError(f"trunks[{i}].targets", "needs at least one target")
        if bool(trunk.username) != bool(trunk.password):
            raise ConfigError(f"trunks[{i}].password", "username and password go together")
        if trunk.from_domain and not _plain_host(trunk.from_domain):  # else every call out fails at once
            raise ConfigError(f"trunks[{i}].from_domain", f'"{trunk.from_domain}" is not a host[:port]')
    ours = HostSet(cfg.sip.domains)
    for i, route in enumerate(cfg.routes):
        if route.trunk not in names:
            raise ConfigError(f"routes[{i}].trunk", f'unknown trunk "{route.trunk}"')
        if route.domain and route.prefix:
            raise ConfigError(f"routes[{i}].domain", "a route matches a prefix or a domain, not both")
        if route.domain and route.domain in ours:
            raise ConfigError(f"routes[{i}].domain", f'"{route.domain}" is one of sip.domains')


def _plain_host(value: str) -> bool:
    from libon_tsilo.sip.uri import URI

    try:
        uri = URI.parse(f"sip:x@{value}")
    except ValueError:  # ParseError is one
        return False
    return bool(uri.host) and not uri.params and not uri.headers


def _validate(cfg: Config) -> None:
    _check_calls_out(cfg)
    _check_sip(cfg.sip)
    _check_reuse_port(cfg)
    _check_location(cfg)
    _check_session_timers(cfg.calls)
    _check_overload(cfg.overload)
    _check_tls(cfg)
    _check_registrar(cfg.registrar)
    _check_flow_timer(cfg)
    _check_push(cfg.push)
    _check_manhole(cfg.manhole)
    _check_gateways(cfg.gateways)
    _check_cluster(cfg)


# ---------------------------------------------------------------------------------------------
# entry points


def config_from_dict(
    data: dict[str, Any], base_dir: str | os.PathLike[str] | None = None, source: str | None = None
) -> Config:
    """Build and validate a Config from already-parsed TOML (tests and tools use this)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    cfg: Config = _build(Config, data, "", base)
    _validate(cfg)
    if not cfg.auth.secret:
        cfg = replace(cfg, auth=replace(cfg.auth, secret=random_token(32)))
    return replace(cfg, source=source)


def default_config() -> Config:
    """The built-in defaults (loopback only), as used when twistd gets no --config."""
    return config_from_dict({})


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a TOML config file; ``None`` gives the defaults. Raises ConfigError."""
    if path is None:
        return default_config()
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {p}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {p}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"invalid TOML in {p}: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{p} is not UTF-8 text") from None
    return config_from_dict(data, p.resolve().parent, source=str(p.resolve()))
