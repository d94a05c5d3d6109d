"""The twistd plugin, tap options, the service tree skeleton, log observers and util helpers.

Service-tree tests run on twisted.internet.task.Clock; the two subprocess tests run the real
`twistd` of this venv to prove that the plugin is discoverable and that config errors exit 2.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.application.service import Application, IServiceMaker, IServiceCollection
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, globalLogPublisher
from twisted.plugin import getPlugins

from libon_tsilo.ops import tap
from libon_tsilo.ops.config import ConfigError, config_from_dict, default_config, load_config
from libon_tsilo.ops.logging import json_line, make_observer, set_level
from libon_tsilo.ops.service import LibonTsiloService, make_service, make_tls_context_factory
from libon_tsilo.util import random_token, redact, redact_key, redact_uri

REPO = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).parent / "twistd"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default config's SQLite files are relative to the working directory: a service built
    from it opens them in tmp_path, not in the checkout, where they would outlive the run and be
    shared by every run of the suite."""
    monkeypatch.chdir(tmp_path)


# --- plugin & options -------------------------------------------------------------------------


def test_plugin_is_discoverable():
    import twisted.plugins

    makers = {p.tapname: p for p in getPlugins(IServiceMaker, twisted.plugins)}
    maker = makers["libon-tsilo"]
    assert maker.description
    assert issubclass(maker.options, tap.Options)


def test_options_parse_config_and_describe_every_option():
    opts = tap.Options()
    opts.parseOptions(["--config", "x.toml"])
    assert opts["config"] == "x.toml"
    for name, _short, _default, doc in tap.Options.optParameters:
        assert doc and "\n" not in doc, name
    for name, _short, doc in tap.Options.optFlags:
        assert doc and "\n" not in doc, name


def test_make_service_config_error_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[sip]\nlisten = ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060", "sctp:127.0.0.1:5060"]\n')
    opts = tap.Options()
    opts.parseOptions(["--config", str(bad)])
    with pytest.raises(SystemExit) as info:
        tap.makeService(opts)
    assert info.value.code == 2
    assert capsys.readouterr().err == 'libon-tsilo: config error: sip.listen[2]: "sctp:127.0.0.1:5060": unknown transport "sctp" (expected udp|tcp|tls)\n'


def test_check_flag_validates_and_exits_0(capsys):
    opts = tap.Options()
    opts.parseOptions(["--config", str(REPO / "etc" / "libon-tsilo.toml"), "--check"])
    with pytest.raises(SystemExit) as info:
        tap.makeService(opts)
    assert info.value.code == 0
    assert "config ok" in capsys.readouterr().out


def test_make_service_without_config_uses_defaults():
    opts = tap.Options()
    opts.parseOptions([])
    svc = tap.makeService(opts)
    assert isinstance(svc, LibonTsiloService)
    assert svc.config.sip.listen == default_config().sip.listen
    assert ILogObserver.providedBy(svc.log_observer)
    assert not svc.running  # nothing listens before twistd starts the application


def _run_twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "libon-tsilo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_real_twistd_reports_config_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[registrar]\nmin_expires = -1\n")
    proc = _run_twistd("--config", str(bad), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "libon-tsilo: config error: registrar.min_expires: must be >= 1, got -1"


def test_real_twistd_help_lists_config_option(tmp_path):
    proc = _run_twistd("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--config=" in proc.stdout


def test_ops_modules_do_not_import_the_reactor():
    code = (
        "import sys, libon_tsilo.ops.config, libon_tsilo.ops.logging, libon_tsilo.ops.tap, "
        "libon_tsilo.ops.service, libon_tsilo.util\n"
        "import twisted.plugins.libon_tsilo_plugin\n"
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported at module level'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- service tree -----------------------------------------------------------------------------


LOOPBACK_ANY_PORT = {"sip": {"listen": ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"]}}


def _loopback_config(**sections):
    return config_from_dict({**LOOPBACK_ANY_PORT, **sections})


def _port_is_free(transport: str, port: int) -> bool:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest_twisted.inlineCallbacks
def test_service_tree_binds_ports_and_stopping_closes_them():
    svc = make_service(_loopback_config(), clock=Clock())
    location = svc.getServiceNamed("location")
    assert "threadpool" not in {child.name for child in svc}  # the pool nothing used is gone
    if svc.parts.transport is None:
        pytest.fail("libon_tsilo.sip.transport is not wired")
    svc.startService()
    bound = list(svc.parts.transport.bound)
    assert location.running
    assert {b[0] for b in bound} == {"udp", "tcp"}
    assert not any(_port_is_free(t, port) for t, _host, port in bound)
    yield svc.stopService()
    assert not location.running and not svc.running
    assert all(_port_is_free(t, port) for t, _host, port in bound)
    assert len(svc.parts.transactions) == 0


def test_root_service_gives_its_observer_to_the_application():
    observer = make_observer("info", "text", io.StringIO())
    svc = make_service(default_config(), clock=Clock(), log_observer=observer)
    app = Application("libon-tsilo")
    svc.setServiceParent(app)
    assert app.getComponent(ILogObserver) is observer
    assert list(IServiceCollection(app)) == [svc]


@pytest_twisted.inlineCallbacks
def test_stop_waits_for_drainers_until_they_finish():
    clock = Clock()
    svc = make_service(_loopback_config(ops={"drain_timeout": 30}), clock=clock)
    calls_done: Deferred[None] = Deferred()
    svc.drainers.append(lambda: calls_done)
    svc.startService()
    stopped = svc.stopService()
    clock.advance(10)
    assert svc.getServiceNamed("location").running  # still draining: nothing stopped yet
    calls_done.callback(None)
    yield stopped
    assert not svc.getServiceNamed("location").running
    assert clock.getDelayedCalls() == []  # the drain timer was cancelled


@pytest_twisted.inlineCallbacks
def test_stop_gives_up_draining_after_drain_timeout():
    clock = Clock()
    svc = make_service(_loopback_config(ops={"drain_timeout": 5}), clock=clock)
    svc.drainers.append(lambda: Deferred())  # never fires
    svc.startService()
    stopped = svc.stopService()
    clock.advance(4.9)
    assert svc.getServiceNamed("location").running
    clock.advance(0.2)
    yield stopped
    assert not svc.running and not svc.getServiceNamed("location").running


def test_tls_context_factory(test_certs, tmp_path):
    cfg = config_from_dict({"tls": {"certificate": str(test_certs.cert), "private_key": str(test_certs.key)}})
    assert make_tls_context_factory(cfg.tls) is not None
    assert make_tls_context_factory(default_config().tls) is None
    # a key that does not match the certificate is a config error naming the key
    cfg = config_from_dict({"tls": {"certificate": str(test_certs.cert), "private_key": str(test_certs.client_key)}})
    with pytest.raises(ConfigError) as info:
        make_tls_context_factory(cfg.tls)
    assert info.value.key == "tls.private_key"


# --- logging ----------------------------------------------------------------------------------


def _emit(observer, level: LogLevel, fmt: str, **fields) -> None:
    publisher = LogPublisher(observer)
    Logger(namespace="libon_tsilo.test", observer=publisher).emit(level, fmt, **fields)


def test_json_observer_writes_one_object_per_line():
    out = io.StringIO()
    obs = make_observer("info", "json", out)
    _emit(obs, LogLevel.warn, "call {call_id} parked", call_id="abc@h", aor="sip:alice@localhost")
    _emit(obs, LogLevel.debug, "hidden")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["level"] == "warn" and rec["ns"] == "libon_tsilo.test"
    assert rec["msg"] == "call abc@h parked"
    assert rec["call_id"] == "abc@h" and rec["aor"] == "sip:alice@localhost"
    assert rec["ts"].endswith("+00:00")


def test_json_line_includes_traceback_of_failures():
    from twisted.python.failure import Failure

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    rec = json.loads(json_line({"log_format": "boom", "log_failure": failure, "log_level": LogLevel.error}))
    assert rec["level"] == "error" and "ZeroDivisionError" in rec["traceback"]


def test_text_observer_filters_by_level():
    out = io.StringIO()
    obs = make_observer("warn", "text", out)
    _emit(obs, LogLevel.info, "quiet")
    _emit(obs, LogLevel.error, "loud {n}", n=1)
    text = out.getvalue()
    assert "quiet" not in text and "loud 1" in text


def test_make_observer_rejects_unknown_level_and_format():
    with pytest.raises(ValueError):
        make_observer("verbose", "text", io.StringIO())
    with pytest.raises(ValueError):
        make_observer("info", "xml", io.StringIO())


# --- util (libon_tsilo/util.py is owned by ops) ------------------------------------------------


def test_redact_keeps_six_chars_and_length():
    token = "abcdef0123456789"
    assert redact(token) == "abcdef…(16)"
    assert token not in redact(token)
    assert redact("") == "(empty)" and redact(None) == "(empty)"


def test_redact_uri_and_key_hide_push_tokens():
    token = "f0e1d2c3b4a5968778695a4b3c2d1e0f"
    uri = f"sip:dev@10.0.0.1:5060;transport=tcp;pn-provider=apns;pn-prid={token};pn-param=T.app.voip"
    shown = redact_uri(uri)
    assert token not in shown
    assert shown == uri.replace(token, redact(token))
    assert token not in redact_uri(f"<{uri.replace('pn-prid', 'PN-PRID')}>")
    assert redact_uri("sip:alice@example.com") == "sip:alice@example.com"
    assert redact_uri(None) == ""
    key = f"pn:apns|{token}|T.app.voip"
    assert redact_key(key) == f"pn:apns|{redact(token)}|T.app.voip"
    assert token not in redact_key(f"uri:{uri}")
    assert redact_key("instance:<urn:uuid:1>;reg-id=1") == "instance:<urn:uuid:1>;reg-id=1"
    assert redact_key(None) == ""


def test_redact_uri_hides_the_alert_token_too():
    # push/waker.py's pn-alert-prid (the app's alert token) is as secret as pn-prid
    voip, alert = "f0e1d2c3b4a5968778695a4b3c2d1e0f", "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    uri = f"sip:dev@10.0.0.1;pn-provider=apns;pn-prid={voip};pn-alert-prid={alert};pn-param=T.app.voip"
    shown = redact_uri(uri)
    assert voip not in shown and alert not in shown
    assert shown == uri.replace(voip, redact(voip)).replace(alert, redact(alert))


def test_random_token():
    a, b = random_token(24), random_token(24)
    assert len(a) == 24 and a != b
    assert all(c.isalnum() or c in "-_" for c in a)
    with pytest.raises(ValueError):
        random_token(0)


# --- SIGHUP reload ----------------------------------------------------------------------------


def _reload_setup(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    out = io.StringIO()
    config = load_config(path)
    observer = make_observer(config.log.level, "json", out)
    return path, out, observer, tap.HangupReloader(config, observer, call_from_thread=lambda f: f())


def _messages(out: io.StringIO) -> list[str]:
    return [json.loads(line)["msg"] for line in out.getvalue().splitlines()]


def test_sighup_applies_log_level_and_names_sections_needing_restart(tmp_path):
    path, out, observer, reloader = _reload_setup(tmp_path, '[log]\nlevel = "warn"\n')
    globalLogPublisher.addObserver(observer)
    try:
        path.write_text('[log]\nlevel = "debug"\n[calls]\nring_timeout = 10\n')
        new = reloader.reload()
        assert new is not None and new.calls.ring_timeout == 10
        _emit(observer, LogLevel.debug, "now visible")
    finally:
        globalLogPublisher.removeObserver(observer)
    msgs = _messages(out)
    assert any("changed: calls, log; needing a restart: calls" in m for m in msgs), msgs
    assert "now visible" in msgs
    assert reloader.config.log.level == "debug" and reloader.config.calls.ring_timeout == 30


def test_sighup_with_bad_file_keeps_running_config(tmp_path):
    path, out, observer, reloader = _reload_setup(tmp_path, '[log]\nlevel = "info"\n')
    globalLogPublisher.addObserver(observer)
    try:
        path.write_text('[log]\nlevel = "loud"\n')
        assert reloader.reload() is None
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any('config not reloaded, keeping the running one: log.level: unknown value "loud"' in m for m in _messages(out))
    assert reloader.config.log.level == "info"


def test_sighup_runs_reload_hooks_only_for_a_valid_file(tmp_path):
    path, out, observer, reloader = _reload_setup(tmp_path, '[log]\nlevel = "info"\n')
    ran = []

    def broken(cfg):
        raise RuntimeError("boom")

    reloader.hooks = [broken, lambda cfg: ran.append(cfg.log.level)]
    globalLogPublisher.addObserver(observer)
    try:
        path.write_text('[log]\nlevel = "warn"\n')
        assert reloader.reload() is not None
        path.write_text('[log]\nlevel = "loud"\n')
        assert reloader.reload() is None
    finally:
        globalLogPublisher.removeObserver(observer)
    assert ran == ["warn"]  # once, with the new Config: a failing hook does not stop the others,
    # a bad file runs none
    assert any("reload hook" in m and "failed" in m for m in _messages(out))


def test_make_service_hands_reload_push_to_the_sighup_reloader(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[location]\nbackend = "memory"\n[push]\nproviders = ["hook"]\n'
        '[[push.webhook]]\nname = "hook"\nurl = "http://127.0.0.1:9/push"\n'
    )
    opts = tap.Options()
    opts.parseOptions(["--config", str(path)])
    root = tap.makeService(opts)
    reloader = root.getServiceNamed("sighup")
    assert reloader.hooks == [root.parts.extra["reload_push"]]


def test_sighup_signal_is_handed_to_the_reactor_and_restored_on_stop(tmp_path):
    calls = []
    reloader = tap.HangupReloader(default_config(), None, call_from_thread=calls.append)
    before = signal.getsignal(signal.SIGHUP)
    reloader.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert calls == [reloader.reload]
    finally:
        reloader.stopService()
    assert signal.getsignal(signal.SIGHUP) == before
    assert reloader.reload() is None  # built-in defaults: nothing to re-read


def test_set_level_only_on_our_observers():
    out = io.StringIO()
    obs = make_observer("error", "text", out)
    assert set_level(obs, "info")
    _emit(obs, LogLevel.info, "hello")
    assert "hello" in out.getvalue()
    assert not set_level(lambda event: None, "info")
    with pytest.raises(ValueError):
        set_level(obs, "loud")


def test_unparsable_pem_is_a_config_error_before_listening(tmp_path, capsys):
    (tmp_path / "g.pem").write_text("garbage\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sip]\nlisten = ["tls:127.0.0.1:0"]\n[tls]\ncertificate = "g.pem"\nprivate_key = "g.pem"\n')
    opts = tap.Options()
    opts.parseOptions(["--config", str(cfg)])
    with pytest.raises(SystemExit) as info:
        tap.makeService(opts)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("libon-tsilo: config error: tls.certificate: ") and err.count("\n") == 1


def test_debug_enabled_follows_the_observer_level():
    from libon_tsilo import logflags

    obs = make_observer("info", "text", io.StringIO())
    assert not logflags.debug_enabled
    assert set_level(obs, "debug") and logflags.debug_enabled and logflags.info_enabled
    assert set_level(obs, "info") and not logflags.debug_enabled and logflags.info_enabled
    assert set_level(obs, "warn") and not logflags.debug_enabled and not logflags.info_enabled
