"""One way for a test on real processes and sockets to wait: poll a condition, never a blind sleep.

A fixed sleep is a guess about the machine's speed: too short on a loaded machine (a flaky failure),
and as a negative check ("nothing more arrived after 1 s") it passes by accident when the server is
merely slow. `wait_until` polls what the test means (a server counter over the admin RPC, a record
file, a response) with a generous timeout, and fails naming what it waited for.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

POLL = 0.02


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               explain: Callable[[], str] | None = None) -> T:
    """Return ``predicate()``'s first truthy value; AssertionError naming ``what`` after ``timeout`` s.

    ``explain`` (e.g. the server's log tail) is called only on failure, to say why."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(POLL)  # the poll interval, not a wait for anything
