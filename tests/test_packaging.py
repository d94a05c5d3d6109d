"""setup.cfg declares every third-party package the code imports, each pinned to a tested range."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OURS = {"libon_tsilo", "tests", "bench", "twisted_plugins"}


def _top_level_imports(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in OURS}


def _distributions(modules: set[str]) -> set[str]:
    owners = packages_distributions()
    dists: set[str] = set()
    for module in modules:
        assert module in owners, f"{module} is imported but no installed distribution provides it"
        dists.update(_norm(d) for d in owners[module] if _norm(d) != "libon-tsilo")  # twisted/plugins
    return dists


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(key: str) -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    section, option = key.split(":")
    lines = [line.split("#")[0].strip() for line in cfg[section][option].splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {_norm(r.name): r for r in reqs}


def _assert_pinned(reqs: dict[str, Requirement]) -> None:
    for name, req in reqs.items():
        ops = {spec.operator for spec in req.specifier}
        assert ops == {">=", "<"}, f"{name}: wants a tested range >=x,<next major, has {req.specifier or 'none'}"


def test_every_import_of_the_package_is_a_pinned_install_requirement() -> None:
    runtime = _requirements("options:install_requires")
    imported = _distributions(_top_level_imports(list((ROOT / "libon_tsilo").rglob("*.py"))))
    missing = imported - set(runtime)
    assert not missing, f"imported by libon_tsilo/ but not in install_requires: {sorted(missing)}"
    _assert_pinned(runtime)


def test_every_import_of_the_tests_is_a_pinned_requirement() -> None:
    runtime = _requirements("options:install_requires")
    test = _requirements("options.extras_require:test")
    paths = list((ROOT / "tests").rglob("*.py"))
    imported = _distributions(_top_level_imports(paths))
    missing = imported - set(runtime) - set(test)
    assert not missing, f"imported by tests/ but not declared: {sorted(missing)}"
    _assert_pinned(test)


def test_aioapns_is_gone() -> None:
    assert "aioapns" not in _requirements("options:install_requires")
    assert "aioapns" not in _top_level_imports(list((ROOT / "libon_tsilo").rglob("*.py")))
