"""The seams between the stages, the library and params: guarded so they cannot drift apart.

- each stage's ``dvc.yaml`` deps name exactly the ``teacher`` modules its script imports,
  transitively (``params.py`` and ``errors.py`` are left out on purpose, see dvc.yaml);
- the library has no import cycle and no upward import (a layer imports only lower layers);
- every package ``__init__.py`` is a docstring only (so leaving them out of deps is safe).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from teacher.core import imports

SRC = REPO_ROOT / "src"
LEFT_OUT = {"teacher.core.params", "teacher.core.errors"}  # see the comment at the top of dvc.yaml
# Lower layers first; a module may import its own layer's modules or lower ones only.
LAYERS = [
    {"teacher.core"},
    {"teacher.coco"},
    {"teacher.dataset"},
    {"teacher.train"},
    {"teacher.dino", "teacher.sam", "teacher.student"},
    {"teacher.inference", "teacher.proving"},
    {"teacher.serve", "teacher.evaluation"},
    {"teacher.cli"},
]


def module_file(name: str) -> Path:
    return imports.module_file(name, src=SRC)


def imports_of(path: Path) -> set[str]:
    return imports.imports_of(path, src=SRC)


def closure(path: Path) -> set[str]:
    return imports.closure(path, src=SRC)


def library_modules() -> list[str]:
    return imports.library_modules(src=SRC)


def stage_deps() -> dict[str, tuple[Path, set[str]]]:
    return imports.stage_deps(REPO_ROOT)


@pytest.mark.parametrize("stage", sorted(stage_deps()))
def test_stage_deps_equal_the_modules_its_script_imports(stage):
    script, declared = stage_deps()[stage]
    imported = closure(script) - LEFT_OUT
    missing = sorted(imported - declared)
    extra = sorted(declared - imported)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage} (fix: python scripts/stage_deps.py): add deps {[str(module_file(m).relative_to(REPO_ROOT)) for m in missing]}, "
        f"remove {[str(module_file(m).relative_to(REPO_ROOT)) for m in extra]}"
    )


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_seams.py: place it")


def test_no_upward_import_and_no_cycle():
    upward, graph = [], {}
    for mod in library_modules():
        graph[mod] = imports_of(module_file(mod))
        upward += [f"{mod} -> {dep}" for dep in graph[mod] if layer_of(dep) > layer_of(mod)]
    assert not upward, "upward imports: " + "; ".join(upward)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, node, dep])
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [])


def test_package_inits_are_docstrings_only():
    for init in SRC.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), (
            init
        )


def test_contracts_map_lists_every_module_and_stage():
    """docs/CONTRACTS.md's map matches the tree: every library module and every stage, no more."""
    text = (REPO_ROOT / "docs" / "CONTRACTS.md").read_text()
    listed = set(re.findall(r"^\| `(teacher/[\w/]+\.py)` \|", text, flags=re.M))
    actual = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    assert listed == actual, (
        f"CONTRACTS.md map: missing {sorted(actual - listed)}, extra {sorted(listed - actual)}"
    )
    for stage in stage_deps():
        assert f"| `{stage}` |" in text, f"CONTRACTS.md map: stage {stage} missing"
