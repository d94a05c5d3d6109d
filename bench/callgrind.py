"""Counting a command's user-space instructions under valgrind's callgrind, for the ``--icount`` benches.

Instruction counts are what the benches decide by on a shared 2-vCPU box, where wall-clock CPU moves
by 20-40 % between runs: the same command counts the same to ~0.2 %. ``PYTHONHASHSEED`` is fixed so
that dict and set layouts, and so the count, do not change from one run to the next.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["command", "count", "environment", "total"]

_COLLECTED = re.compile(r"Collected : (\d+)")


def command(args: Sequence[str], out_file: str = "/dev/null", options: Sequence[str] = ()) -> list[str]:
    """``args`` run under callgrind; ``out_file`` keeps the profile for callgrind_annotate."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed")
    return [valgrind, "--tool=callgrind", *options, f"--callgrind-out-file={out_file}", *args]


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the hash seed fixed, and ``extra`` on top."""
    return {**os.environ, "PYTHONHASHSEED": "0", **(extra or {})}


def total(stderr: str, what: str) -> int:
    """The instructions callgrind reported in ``stderr``; SystemExit naming ``what`` when it did not."""
    found = _COLLECTED.search(stderr)
    if found is None:
        raise SystemExit(f"no callgrind total for {what}:\n{stderr[-3000:]}")
    return int(found.group(1))


def count(args: Sequence[str], *, options: Sequence[str] = (), extra_env: Mapping[str, str] | None = None,
          cwd: Path | str | None = None) -> int:
    """Run ``args`` to its end under callgrind and return its instructions; SystemExit if it failed."""
    cmd = command(args, options=options)
    out = subprocess.run(cmd, capture_output=True, text=True, env=environment(extra_env), cwd=cwd)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    return total(out.stderr, " ".join(cmd))
