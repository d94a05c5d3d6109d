"""routing/ sits below b2bua/ and above sip/: it imports nothing of calls, silo, push, registrar or ops."""

from __future__ import annotations

import ast
from pathlib import Path

import libon_tsilo.routing

ALLOWED = ("libon_tsilo.routing", "libon_tsilo.sip", "libon_tsilo.dialplan", "libon_tsilo.ratelimit")


def test_routing_imports_downwards_only() -> None:
    for path in Path(libon_tsilo.routing.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("libon_tsilo"):
                    assert name.startswith(ALLOWED), f"{path.name} imports {name}"
