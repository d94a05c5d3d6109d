"""twistd glue: the `libon-tsilo` command-line options and makeService.

Modelled on twisted.names.tap: options in, one service tree out. Config errors are reported as a
single line on stderr with exit status 2, before the reactor runs or any port is opened.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.python import usage

from libon_tsilo.ops.config import Config, ConfigError, load_config
from libon_tsilo.ops.logging import make_observer

__all__ = ["Options", "makeService", "EXIT_CONFIG_ERROR"]

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


def _ensure_reactor() -> None:
    # APNs (aioapns) needs asyncio, so the asyncio reactor must be installed before anything
    # imports twisted.internet.reactor; the push layer owns how that is done.
    try:
        from libon_tsilo.push.reactor import ensure_asyncio_reactor
    except ImportError:
        return
    ensure_asyncio_reactor()


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


def makeService(options: Options) -> Any:
    _ensure_reactor()
    config = load_options_config(options)
    if options.get("check"):
        print(f"libon-tsilo: config ok: {config.source or '(built-in defaults)'}")
        raise SystemExit(0)
    from libon_tsilo.ops.service import make_service

    observer = make_observer(config.log.level, config.log.format, _log_stream(options))
    try:
        return make_service(config, log_observer=observer)
    except ConfigError as err:  # problems only visible when files are parsed (bad PEM, ...)
        _config_error(err)
