"""Start a fake server (`python -m tests.fakes.<name> ...`) as a process and learn its OS-picked port."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])


def spawn_fake(module: str, args: list[str], what: str, cwd: str | None = None,
               timeout: float = 10.0) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``python -m module *args`` and wait (at most ``timeout`` s) for the ``PORT n`` line it prints
    once it listens. Returns the process and the port; the caller terminates it. RuntimeError naming
    ``what`` (with the fake's stderr) when it does not start."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd or ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    # raw fd reads: a buffered read could swallow the line and leave select() waiting
    fd, line, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 64) if ready else b""
        if not chunk:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{what} did not start: {line!r} {proc.stderr.read().decode()}")
        line += chunk
    if not line.startswith(b"PORT "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not start: {line!r}")
    return proc, int(line.split()[1])
