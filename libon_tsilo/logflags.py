"""Whether debug and info log events can reach the configured observer.

twisted's Logger builds the whole event (a dict, the time, the namespace, our redacted fields)
before the level filter drops it, ~3.4 µs a call: the per-call paths test these flags before
calling ``log.debug`` / ``log.info``. They live here, below every layer, so that sip/, registrar/
and b2bua/ can read them without importing ops/; ``ops.logging`` keeps them in step with the
configured level (make_observer, set_level on SIGHUP). Both are True until an observer is made, so
library users and tests keep every event. (An observer given to twistd with --logger instead of ours
gets debug events only when the configured level is debug.)
"""

from __future__ import annotations

debug_enabled = True
info_enabled = True


def follow_level(level: str) -> None:
    """Set both flags for the configured minimum level ("debug", "info", "warn" or "error")."""
    global debug_enabled, info_enabled
    debug_enabled = level == "debug"
    info_enabled = level in ("debug", "info")
