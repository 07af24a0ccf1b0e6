"""Size limits that keep every module and function readable in one sitting.

- no Python file in the installed packages, tests/ or benchmarks/ over MAX_FILE_LINES lines;
- no function (def / async def: methods and nested functions too) over MAX_FUNCTION_LINES lines, counted
  from its `def` line to its last line (decorators excluded, docstring and comments included).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKED = ("cispo", "rollout", "rewards", "sandboxes", "tests", "benchmarks")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def python_files(root: Path = REPO) -> list[Path]:
    return sorted(p for top in CHECKED if (root / top).is_dir() for p in (root / top).rglob("*.py"))


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, def line, length) of every function longer than `limit` lines."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = child.end_lineno - child.lineno + 1
                if length > limit:
                    found.append((name[:-1], child.lineno, length))
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def test_no_file_over_the_limit():
    offenders = []
    for path in python_files():
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            offenders.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not offenders, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(offenders)


def test_no_function_over_the_limit():
    offenders = []
    for path in python_files():
        for name, line, length in long_functions(path.read_text()):
            offenders.append(f"{path.relative_to(REPO)}:{line} {name}: {length} lines")
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def _body(lines: int, indent: int) -> str:
    return "".join(f"{' ' * indent}x{i} = {i}\n" for i in range(lines))


def test_long_functions_finds_methods_and_nested():
    source = (
        "class A:\n    @property\n    def m(self):\n"
        + _body(80, 8)  # 81 lines from the def: too long
        + "    def fits(self):\n"
        + _body(79, 8)  # exactly 80: allowed
        + "def outer():\n    def inner():\n"
        + _body(81, 8)
        + "    return inner\n"
        + "async def coro():\n"
        + _body(81, 4)
    )
    found = {name: length for name, _, length in long_functions(source)}
    assert found == {"A.m": 81, "outer": 84, "outer.inner": 82, "coro": 82}, found
