"""The import rules of docs/architecture.md, enforced on the source.

Every module of the installed packages is parsed with ``ast``; every ``import`` / ``from ... import``
anywhere in it (module level, inside functions, under ``if TYPE_CHECKING``) counts, relative imports are
resolved, and so do the other ways a module reaches ours lazily: ``importlib.import_module("pkg.mod")``
and a ``"pkg.module:attr"`` string (a registry's lazy built-in, or any plugin path written in the code).
Third-party imports are unrestricted.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# layer -> the packages of ours it may import (a prefix allows its submodules). Same table as the
# "Import rules" section of docs/architecture.md (test_docs_table_matches checks that).
RULES: dict[str, tuple[str, ...]] = {
    "cispo.core": ("cispo.core",),
    "cispo.algo": ("cispo.core", "cispo.algo"),
    "cispo.learner": ("cispo.core", "cispo.algo", "cispo.models", "cispo.learner"),  # models: lightning
    "sandboxes": ("cispo.core.registry", "sandboxes"),
    "rewards": ("cispo.core", "rewards", "sandboxes", "rollout"),  # rollout: the hf judge's engine
    "rollout": ("cispo.core", "cispo.algo", "cispo.models", "rollout"),  # models: MiniMax weight names
    "cispo.models": ("cispo.core", "cispo.models"),  # checkpoint layouts and loading, below the driver
    "cispo.driver": ("cispo", "rollout", "rewards", "sandboxes"),
    "cispo": ("cispo.core", "cispo.algo", "cispo.api"),  # the modules directly in cispo/ (public shims)
    "cispo.api": ("cispo", "rollout", "rewards", "sandboxes"),  # cispo.train / cispo.evaluate
    "cispo.assets": ("cispo.assets",),  # build script for the shipped tokenizer files
}
INSTALLED = ("cispo", "rollout", "rewards", "sandboxes")
OURS = (*INSTALLED, "tests", "benchmarks")

_LAZY_PATH = re.compile(rf"(?:{'|'.join(OURS)})(?:\.\w+)*:\w+(?:\.\w+)*")


@dataclass(frozen=True)
class Import:
    target: str  # dotted module name (a submodule when `from pkg import submodule` names one)
    line: int
    how: str  # "import", "lazy path", "import_module"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(path: Path, root: Path) -> str:
    """cispo/x.py -> "cispo"; cispo/sub/.../x.py -> "cispo.sub"; rollout/... -> "rollout"."""
    parts = path.relative_to(root).parts
    if parts[0] == "cispo" and len(parts) > 2:
        return f"cispo.{parts[1]}"
    if parts == ("cispo", "api.py"):
        return "cispo.api"  # the Python API: a front door like the CLI, so it may reach the driver
    return parts[0]


def _ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(source: str, module: str, is_package: bool = False, known: frozenset[str] = frozenset()):
    """Every reference of `module` to a module of ours. `known`: the modules that exist, so that
    ``from cispo.core import registry`` resolves to cispo.core.registry."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno, "import") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(sub if sub in known else base, node.lineno, "import"))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(Import(node.args[0].value, node.lineno, "import_module"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _LAZY_PATH.fullmatch(node.value):
                found.append(Import(node.value.partition(":")[0], node.lineno, "lazy path"))
    return [imp for imp in found if _ours(imp.target)]


def _allowed(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def modules(root: Path) -> list[Path]:
    return sorted(p for top in INSTALLED for p in (root / top).rglob("*.py"))


def check_tree(root: Path = REPO) -> list[str]:
    """Every violation under `root`, as "module -> imported (rule)"."""
    files = modules(root)
    known = frozenset(module_name(p, root) for p in files)
    violations = []
    for path in files:
        module, layer = module_name(path, root), layer_of(path, root)
        if layer not in RULES:
            violations.append(f"{module} -> * (layer {layer!r} has no row in RULES: add one and document it)")
            continue
        allowed = RULES[layer]
        for imp in imports_of(path.read_text(), module, path.name == "__init__.py", known):
            if not _allowed(imp.target, allowed):
                rule = f"{layer} may import {', '.join(allowed)}; line {imp.line}, {imp.how}"
                violations.append(f"{module} -> {imp.target} ({rule})")
    return violations


def test_installed_packages_follow_the_import_rules():
    violations = check_tree(REPO)
    assert not violations, "import rule violations:\n" + "\n".join(violations)


def _copy_tree(tmp_path: Path) -> Path:
    for top in INSTALLED:
        shutil.copytree(REPO / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def test_checker_reports_planted_violations(tmp_path):
    root = _copy_tree(tmp_path)
    baseline = set(check_tree(root))
    engine = root / "rollout" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom cispo.driver.loop import train\n")
    pool = root / "sandboxes" / "pool.py"
    pool.write_text(
        pool.read_text() + "\n\ndef _planted():\n    from ..rewards import scorer\n    return scorer\n"
    )
    losses = root / "cispo" / "algo" / "losses.py"
    losses.write_text(losses.read_text() + '\nPLANTED = {"x": "rollout.hf_engine:HFEngine"}\n')
    new = set(check_tree(root)) - baseline
    assert {v.split(" (")[0] for v in new} == {
        "rollout.engine -> cispo.driver.loop",
        "sandboxes.pool -> rewards.scorer",
        "cispo.algo.losses -> rollout.hf_engine",
    }, new
    assert any("rollout may import cispo.core, cispo.algo, cispo.models, rollout" in v for v in new), new


def test_checker_on_sources():
    known = frozenset({"cispo.core.registry", "cispo.core.types", "sandboxes.base", "tests.unit"})
    lazy_inside = "def f():\n    import importlib\n    return importlib.import_module('benchmarks.packing')\n"
    cases = {
        "from cispo.core import registry": ["cispo.core.registry"],
        "from . import base": ["sandboxes.base"],
        "from ..core.types import Sample": ["cispo.core.types"],
        "import tests.unit": ["tests.unit"],
        "if True:\n    from tests import unit": ["tests.unit"],
        lazy_inside: ["benchmarks.packing"],
        "X = 'rewards.math:score'": ["rewards.math"],
        "'''Docs: ``lazy={'x': 'rollout.engine:E'}``.'''": [],
        "import torch\nfrom transformers import AutoModel": [],
    }
    for source, want in cases.items():
        module = "cispo.algo.x" if "..core" in source else "sandboxes.x"
        assert [i.target for i in imports_of(source, module, known=known)] == want, source
    # a package's own relative import resolves from the package, not its parent
    assert [i.target for i in imports_of("from .base import Limits", "sandboxes", True)] == ["sandboxes.base"]


def test_unmapped_layer_is_reported(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "cispo" / "newpart").mkdir()
    (root / "cispo" / "newpart" / "__init__.py").write_text("")
    assert any(v.startswith("cispo.newpart -> * (layer 'cispo.newpart'") for v in check_tree(root))


def test_docs_table_matches():
    """The table in docs/architecture.md lists the same layers and allowances as RULES."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Import rules", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0].startswith("`"):
            table[cells[0].strip("`")] = tuple(re.findall(r"`([\w.]+)`", cells[1]))
    assert table == RULES
