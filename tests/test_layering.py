"""The layers of diapipe point one way; an import that breaks them fails here.

``core`` (errors, IDs, frames, the bundle model) imports nothing else of diapipe;
``apdb`` needs only ``core``; the stages (``tasks``) need ``core`` and the APDB's
schema module ``apdb.sdm``; ``alerts`` needs ``core``, ``apdb`` and ``tasks``;
``flows`` may use everything of the product. ``sim`` and ``bench`` sit beside:
the product never imports them, except the simulated default run of a command
line (a function named ``main`` or ``_main*``), which is where a user asks for it.
Every import is checked, the ones inside functions too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("core", "apdb", "tasks", "alerts", "flows")
PROJECT = (*PRODUCT, "sim", "bench")

#: package -> what it may import of the project (besides itself); a dotted name
#: allows only that module.
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": (),
    "apdb": ("core",),
    "tasks": ("core", "apdb.sdm"),
    "alerts": ("core", "apdb", "tasks"),
    "flows": ("core", "apdb", "tasks", "alerts"),
}
#: a command line may simulate its default input
CLI_MAY_IMPORT = ("sim",)


def _imports(path: Path):
    """(imported names, enclosing function name or '', line) for every import in ``path``.

    ``from apdb import sdm`` gives ``["apdb.sdm"]``-or-``apdb`` per name: each name is
    checked as a submodule first, then as a member of the module.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[list[tuple[str, ...]], str, int]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = func
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = func or child.name
            if isinstance(child, ast.Import):
                out.extend(([(a.name,)], func, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                m = child.module
                out.append(([(f"{m}.{a.name}", m) for a in child.names], func, child.lineno))
            visit(child, name)

    visit(tree, "")
    return out


def _allowed(package: str, module: str, func: str) -> bool:
    top = module.split(".")[0]
    if top not in PROJECT or top == package:
        return True
    if top in CLI_MAY_IMPORT and (func == "main" or func.startswith("_main")):
        return True
    return any(module == rule or module.startswith(rule + ".") for rule in ALLOWED[package])


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for names, func, line in _imports(path):
            for alternatives in names:
                if not any(_allowed(package, m, func) for m in alternatives):
                    where = f" in {func}()" if func else ""
                    bad.append(f"{path.relative_to(REPO)}:{line}{where} imports {alternatives[-1]}")
                    break

    return bad


@pytest.mark.parametrize("package", PRODUCT)
def test_package_imports_only_the_layers_below(package):
    assert violations(package) == []


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """A kernel module importing a stage, even inside a function, is reported."""
    pkg = tmp_path / "core"
    pkg.mkdir()
    (pkg / "bad.py").write_text("def f():\n    from tasks.associate import associate\n")
    (pkg / "fine.py").write_text("from core.errors import InputError\nimport numpy\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("core") == ["core/bad.py:2 in f() imports tasks.associate"]
