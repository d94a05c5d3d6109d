"""The hot modules run compiled by mypyc (setup.py) where the install could compile them, and the same
code runs as pure Python where it could not (no C compiler, LIBON_TSILO_PURE=1)."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# setup.py's COMPILED, as module names
COMPILED = [line.strip().strip('",').removesuffix(".py").replace("/", ".")
            for line in (REPO / "setup.py").read_text().splitlines() if line.strip().startswith('"libon_tsilo/')]

# what the pure-Python copy must do as the compiled one does: parse, read, a ParseError from a
# property (not an AttributeError), compact and read again, the same bytes back
_EXERCISE = r'''
import libon_tsilo.sip.message as m
from libon_tsilo.sip.errors import ParseError
assert m.__file__.endswith(".py"), m.__file__
data = (b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n"
        b"From: <sip:alice@example.com>;tag=a\r\nTo: <sip:bob@example.com>\r\nCall-ID: c1\r\n"
        b"CSeq: 1 INVITE\r\nExpires: x\r\nContent-Length: 2\r\n\r\nhi")
msg = m.parse_message(data)
msg.validate()
try:
    msg.expires
except ParseError:
    pass
msg.compact()
assert msg.compacted and msg.body == b"hi" and not msg.compacted
msg.compact()
assert msg.from_.tag == "a" and msg.to_bytes() == data
print("pure ok")
'''


def test_the_pure_python_modules_work_without_the_extensions(tmp_path: Path) -> None:
    shutil.copytree(REPO / "libon_tsilo", tmp_path / "libon_tsilo", ignore=shutil.ignore_patterns("*.so"))
    out = subprocess.run([sys.executable, "-c", _EXERCISE], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pure ok"


@pytest.mark.skipif(os.environ.get("LIBON_TSILO_PURE", "") not in ("", "0"), reason="pure install asked for")
def test_the_hot_modules_are_compiled_where_a_compiler_is() -> None:
    # scripts/test installs gcc and the Python headers, so the suite tests what a server runs
    if shutil.which(sysconfig.get_config_var("CC").split()[0]) is None:
        pytest.skip("no C compiler: the pure-Python install is the expected one")
    assert COMPILED, "setup.py compiles nothing?"
    for name in COMPILED:
        path = importlib.import_module(name).__file__ or ""
        assert path.endswith(".so"), f"{path}: mypyc did not compile it; `.venv/bin/pip install -e .` says why"


def test_the_compiled_modules_log_under_their_own_name() -> None:
    # Logger() finds its namespace in the calling frame; a compiled module has none of its own, so
    # its events said "importlib._bootstrap" (the "ns" of the JSON log) unless it names itself
    for name in COMPILED:
        log = getattr(importlib.import_module(name), "log", None)
        if log is not None:
            assert log.namespace == name, f"{name} logs as {log.namespace!r}"
