"""No module but sip/message.py reads or writes a Message's private fields (issue 10): the callers use
the public lookups (values(), headers(), header(), ...), so the speed tricks behind them can change."""

from __future__ import annotations

import ast
from pathlib import Path

from libon_tsilo.sip.message import Message, Request, Response

PACKAGE = Path(__file__).resolve().parents[2] / "libon_tsilo"
MESSAGE_MODULE = PACKAGE / "sip" / "message.py"


def _private_members() -> set[str]:
    names: set[str] = set()
    for cls in (Message, Request, Response):
        names.update(getattr(cls, "__slots__", ()))  # compiled by mypyc: none, the fields are in vars()
        names.update(vars(cls))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _accesses(tree: ast.AST) -> list[ast.Attribute]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)]


def _owned_elsewhere(trees: dict[Path, ast.AST]) -> set[str]:
    """Private names other classes use for their own fields (``self._text`` in URI, NameAddr)."""
    return {
        node.attr for tree in trees.values() for node in _accesses(tree)
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
    }


def test_no_module_but_message_touches_a_message_private_field() -> None:
    trees = {p: ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py") if p != MESSAGE_MODULE}
    watched = _private_members() - _owned_elsewhere(trees)
    assert {"_headers", "_cache", "_reindex"} <= watched  # the check has teeth
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: .{node.attr}"
        for path, tree in trees.items() for node in _accesses(tree)
        if node.attr in watched and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert not found, "Message private fields used outside sip/message.py:\n" + "\n".join(found)
