"""The package's shape, checked: imports run one way down the stages (import-linter's contract in pyproject.toml),
no import circle, no underscore name crosses a module boundary, no function runs past 50 lines (that the command
line starts without torch: tests/cli/test_ci_output.py)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "initaudit"
LONGEST_FUNCTION = 50


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (it comes with the `test` extra)")
    return subprocess.run([exe, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root)})


def test_the_layers_contract_holds():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "ignore_imports" not in (ROOT / "pyproject.toml").read_text()


def test_an_upward_import_breaks_the_contract(tmp_path):
    """A copy of the tree with one planted upward import (measure reaching up into the CLI) fails the contract."""
    copy = tmp_path / "tree"
    shutil.copytree(PACKAGE, copy / "initaudit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    stats = copy / "initaudit" / "measure" / "stats.py"
    stats.write_text(stats.read_text() + "\nfrom initaudit.cli import main  # planted\n")
    done = lint_imports(copy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "initaudit.measure.stats -> initaudit.cli" in done.stdout


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_underscore_name_is_imported_across_modules():
    crossing = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("initaudit")):
                crossing += [f"{path.relative_to(ROOT)}:{node.lineno} {alias.name}" for alias in node.names
                             if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert crossing == []


def test_no_function_is_longer_than_fifty_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in modules() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert long == []


def test_no_module_imports_itself_back_through_others():
    """No import circle: the strongly connected parts of the module graph (grimp's, which import-linter reads)
    are single modules."""
    import grimp

    graph = grimp.build_graph("initaudit")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            part = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(part) > 1:
                circles.append(sorted(part))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert circles == []
