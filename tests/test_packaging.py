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


def _imports(paths: list[Path]) -> set[str]:
    """Third-party modules imported, as their first two dotted parts (zope.interface, google.auth)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    top = {n: n.split(".")[0] for n in names}
    return {".".join(n.split(".")[:2]) for n in names if top[n] not in sys.stdlib_module_names and top[n] not in OURS}


def _distributions(modules: set[str]) -> set[str]:
    owners = packages_distributions()
    dists: set[str] = set()
    for module in modules:
        top = module.split(".")[0]
        assert top in owners, f"{module} is imported but no installed distribution provides it"
        candidates = {_norm(d) for d in owners[top]} - {"libon-tsilo"}  # twisted/plugins is ours
        if len(candidates) > 1:  # a namespace package (zope, google): its distribution is named after both parts
            candidates &= {_norm(module)}
        dists.update(candidates)
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
    imported = _distributions(_imports(list((ROOT / "libon_tsilo").rglob("*.py"))))
    missing = imported - set(runtime)
    assert not missing, f"imported by libon_tsilo/ but not in install_requires: {sorted(missing)}"
    _assert_pinned(runtime)


def test_every_import_of_the_tests_is_a_pinned_requirement() -> None:
    runtime = _requirements("options:install_requires")
    test = _requirements("options.extras_require:test")
    paths = list((ROOT / "tests").rglob("*.py"))
    imported = _distributions(_imports(paths))
    missing = imported - set(runtime) - set(test)
    assert not missing, f"imported by tests/ but not declared: {sorted(missing)}"
    _assert_pinned(test)


def test_aioapns_is_gone() -> None:
    assert "aioapns" not in _requirements("options:install_requires")
    assert not any(m.split(".")[0] == "aioapns" for m in _imports(list((ROOT / "libon_tsilo").rglob("*.py"))))


def test_mypy_strict_flags_stay_per_module() -> None:
    # mypy's "strict" in a [mypy-module] section silently turns strict mode on for every module
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    sections = [name for name in cfg.sections() if name.startswith("mypy-")]
    assert all("strict" not in cfg[name] for name in sections)
    strict = cfg["mypy-libon_tsilo.push.*,libon_tsilo.ops.config"]
    assert strict.getboolean("disallow_untyped_defs") and strict.getboolean("warn_return_any")
    # the call layer's seams (issue 10), and no b2bua module left on the ignore_errors list
    seams = cfg["mypy-libon_tsilo.b2bua.targets,libon_tsilo.b2bua.ports,libon_tsilo.b2bua.waker,"
                "libon_tsilo.b2bua.states,libon_tsilo.latency"]
    assert seams.getboolean("disallow_untyped_defs") and seams.getboolean("disallow_any_generics")
    skipped = [name for name in sections if cfg[name].getboolean("ignore_errors", fallback=False)]
    assert not any("libon_tsilo.b2bua" in name for name in skipped)


def test_the_layer_seams_are_typed_strictly_and_not_skipped() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    seams = ["libon_tsilo.silo.*", "libon_tsilo.registrar.binding", "libon_tsilo.registrar.location",
             "libon_tsilo.sip.flow", "libon_tsilo.sip.transaction", "libon_tsilo.sip.transaction_client",
             "libon_tsilo.sip.transaction_server"]
    for module in seams:
        sections = [name for name in cfg.sections() if module in name[len("mypy-"):].split(",")]
        assert any(cfg[s].getboolean("disallow_untyped_defs", fallback=False)
                   and cfg[s].getboolean("warn_return_any", fallback=False)
                   for s in sections), module
    skipped = [m for name in cfg.sections() if cfg[name].getboolean("ignore_errors", fallback=False)
               for m in name[len("mypy-"):].split(",")]
    for module in [*seams, "libon_tsilo.ops.service", "libon_tsilo.registrar.registrar", "libon_tsilo.ops.shutdown"]:
        assert module not in skipped, module
