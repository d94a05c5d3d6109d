"""Log observers for twistd: human text or one JSON object per line, behind a level filter.

The service tree hands the observer to twistd as the application's ILogObserver component, so
twistd uses it instead of its default text observer (an explicit ``twistd --logger`` still wins).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import provider

from libon_tsilo import logflags

__all__ = ["LEVELS", "make_observer", "set_level", "json_line", "json_observer"]

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

# the event keys that twisted.logger uses internally; everything else is a field the caller chose
_RESERVED_PREFIX = "log_"
_SKIP = frozenset({"format", "message", "time", "system", "isError", "why", "failure"})


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def json_line(event: dict[str, Any]) -> str:
    """Render one twisted.logger event as a single JSON line (no trailing newline).

    Keys: ts (ISO 8601 UTC), level, ns (namespace), msg (the formatted text), the caller's own
    fields (call_id, aor, ...), and traceback when a failure is attached.
    """
    level = event.get("log_level")
    ts = event.get("log_time")
    out: dict[str, Any] = {
        "ts": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds") if ts else None,
        "level": getattr(level, "name", "info"),
        "ns": event.get("log_namespace", ""),
        "msg": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith(_RESERVED_PREFIX) or key in _SKIP or key in out:
            continue
        out[key] = _scalar(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:  # a broken Failure must not break logging
            out["traceback"] = repr(failure)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def json_observer(out: TextIO) -> ILogObserver:
    """An observer writing :func:`json_line` lines to ``out`` (flushed per line for journald/pipes)."""

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        try:
            out.write(json_line(event) + "\n")
            out.flush()
        except Exception:  # an unserializable event or a closed pipe must not kill the reactor
            pass

    return observe


def make_observer(level: str = "info", fmt: str = "text", out: TextIO | None = None) -> ILogObserver:
    """A level-filtered observer; ``fmt`` is "text" or "json", ``level`` one of :data:`LEVELS`."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    stream = out if out is not None else sys.stdout
    base: Callable[[dict[str, Any]], None]
    if fmt == "json":
        base = json_observer(stream)
    elif fmt == "text":
        base = textFileLogObserver(stream)
    else:
        raise ValueError(f"unknown log format {fmt!r}")
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    observer = FilteringLogObserver(base, [predicate])
    observer.level_predicate = predicate  # type: ignore[attr-defined]  # for set_level on SIGHUP
    logflags.follow_level(level)
    return observer


def set_level(observer: ILogObserver, level: str) -> bool:
    """Change the minimum level of an observer made by :func:`make_observer`; False if it was not."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    predicate = getattr(observer, "level_predicate", None)
    if predicate is None:
        return False
    predicate.setLogLevelForNamespace("", LEVELS[level])
    logflags.follow_level(level)
    return True
