"""twistd glue: the `libon-tsilo` command-line options and makeService.

Modelled on twisted.names.tap: options in, one service tree out. Config errors are reported as a
single line on stderr with exit status 2, before the reactor runs or any port is opened.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application.service import Service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from libon_tsilo.ops.config import Config, ConfigError, load_config
from libon_tsilo.ops.logging import make_observer, set_level

__all__ = ["Options", "makeService", "HangupReloader", "EXIT_CONFIG_ERROR"]

log = Logger()

EXIT_CONFIG_ERROR = 2


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = "Run the libon-tsilo push-aware SIP server (B2BUA, registrar, push waker)."

    optParameters = [
        ["config", "c", None, "Path to the TOML config file (default: built-in loopback defaults)."],
    ]
    optFlags = [
        ["check", None, "Validate the config file, print the verdict and exit without starting."],
    ]


def _config_error(err: ConfigError) -> NoReturn:
    print(f"libon-tsilo: config error: {err}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG_ERROR)


def load_options_config(options: Options | dict[str, Any]) -> Config:
    """The validated Config named by the options; exits with status 2 on a config error."""
    try:
        return load_config(options.get("config"))
    except ConfigError as err:
        _config_error(err)


def _log_stream(options: Any) -> Any:
    """Follow twistd's --logfile if one was given (else stdout: journald or a terminal)."""
    parent = getattr(options, "parent", None)
    logfile = parent.get("logfile") if parent is not None else None
    if logfile and logfile != "-":
        from twisted.python.logfile import LogFile

        return LogFile.fromFullPath(logfile)
    return sys.stdout


def _comparable(cfg: Config) -> Config:
    # an empty auth.secret becomes a new random one per load: not a change the operator made
    return dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, secret=""), source=None)


class HangupReloader(Service):
    """SIGHUP (``systemctl reload``) re-reads the config file.

    A bad file is logged and the running config kept. A good one applies ``[log] level`` at once
    and runs the reload hooks with it (``parts.extra["reload_push"]``: push credentials); other changed
    sections are logged as needing a restart, since ports and stores are built once at start-up.
    The users database needs no reload: it is read at every authentication.
    """

    def __init__(
        self,
        config: Config,
        observer: ILogObserver | None,
        call_from_thread: Callable[..., Any] | None = None,
        hooks: list[Callable[[Config], Any]] | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self._call_from_thread = call_from_thread
        self._previous: Any = None
        self.hooks = list(hooks or [])

    def startService(self) -> None:
        super().startService()
        if self._call_from_thread is None:
            from twisted.internet import reactor
            from twisted.internet.interfaces import IReactorFromThreads

            self._call_from_thread = IReactorFromThreads(reactor).callFromThread
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        # signal handlers interrupt arbitrary code: hand the work to the reactor loop
        assert self._call_from_thread is not None
        self._call_from_thread(self.reload)

    def reload(self) -> Config | None:
        """Re-read the config file; returns the new Config, or None when it was not applied."""
        if self.config.source is None:
            log.info("SIGHUP: running on built-in defaults, nothing to reload")
            return None
        try:
            new = load_config(self.config.source)
        except ConfigError as err:
            log.error("SIGHUP: config not reloaded, keeping the running one: {error}", error=str(err))
            return None
        old_cmp, new_cmp = _comparable(self.config), _comparable(new)
        changed = [
            f.name for f in dataclasses.fields(Config)
            if f.name != "source" and getattr(old_cmp, f.name) != getattr(new_cmp, f.name)
        ]
        if new.log.level != self.config.log.level and self.observer is not None:
            set_level(self.observer, new.log.level)
        format_changed = new.log.format != self.config.log.format
        needs_restart = [name for name in changed if name != "log" or format_changed]
        log.info(
            "SIGHUP: config reloaded from {path}; log level {new_level}; changed: {changed}; "
            "needing a restart: {restart}",
            path=new.source, new_level=new.log.level, changed=", ".join(changed) or "nothing",
            restart=", ".join(needs_restart) or "nothing",
        )
        running_log = dataclasses.replace(self.config.log, level=new.log.level)
        self.config = dataclasses.replace(self.config, log=running_log)
        for hook in self.hooks:
            try:
                hook(new)  # the Config just validated: hooks need not read the file again
            except Exception:
                log.failure("SIGHUP: reload hook {hook!r} failed", hook=hook)
        return new


def makeService(options: Options) -> Any:
    config = load_options_config(options)  # reads no reactor: [ops] reactor picks it below
    if options.get("check"):
        print(f"libon-tsilo: config ok: {config.source or '(built-in defaults)'}")
        raise SystemExit(0)
    from libon_tsilo.ops.reactor import install_reactor

    reactor_name = install_reactor(config)
    from libon_tsilo.ops.service import make_service

    observer = make_observer(config.log.level, config.log.format, _log_stream(options))
    try:
        root = make_service(config, log_observer=observer)
    except ConfigError as err:  # problems only visible when files are parsed (bad PEM, ...)
        _config_error(err)
    log.info("running on the {reactor} reactor ([ops] reactor = {setting})", reactor=reactor_name,
             setting=config.ops.reactor)
    reload_push = root.parts.extra.get("reload_push")
    reloader = HangupReloader(config, observer, hooks=[reload_push] if callable(reload_push) else [])
    reloader.setName("sighup")
    reloader.setServiceParent(root)
    from libon_tsilo.ops.gctune import FullSweepService, tune_gc

    sweep = FullSweepService()
    sweep.setName("gc-sweep")
    sweep.setServiceParent(root)
    tune_gc()  # the process's long-lived objects exist now (see ops/gctune.py)
    return root
