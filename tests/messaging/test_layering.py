"""messaging/ sits beside silo/: it imports registrar/ and sip/ (and the shared helpers below every
layer), never calls, silo, push, cluster or ops (push and the cluster hop reach it duck-typed)."""

from __future__ import annotations

import ast
from pathlib import Path

import libon_tsilo.messaging

ALLOWED = ("libon_tsilo.messaging", "libon_tsilo.registrar", "libon_tsilo.sip", "libon_tsilo.util",
           "libon_tsilo.ratelimit", "libon_tsilo.logflags", "libon_tsilo.group_commit")


def test_messaging_imports_downwards_only() -> None:
    for path in Path(libon_tsilo.messaging.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module is None:  # from libon_tsilo import x
                names = []
            for name in names:
                if name == "libon_tsilo":
                    continue  # `from libon_tsilo import logflags`: checked by its alias below
                if name.startswith("libon_tsilo"):
                    assert name.startswith(ALLOWED), f"{path.name} imports {name}"
            if isinstance(node, ast.ImportFrom) and node.module == "libon_tsilo":
                for alias in node.names:
                    assert f"libon_tsilo.{alias.name}".startswith(ALLOWED), f"{path.name} imports {alias.name}"
