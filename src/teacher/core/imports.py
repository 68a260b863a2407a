"""Which ``teacher`` modules a file imports, transitively: the seams between stages and library.

``dvc.yaml`` lists as each stage's deps the modules its script imports (``scripts/stage_deps.py``
writes them, ``tests/test_seams.py`` fails when they differ), so a code change re-runs exactly
the stages it can affect. Pure reading of source text with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml


def module_file(name: str, *, src: Path) -> Path:
    """``teacher.coco.io`` -> ``src/teacher/coco/io.py`` (a package -> its ``__init__.py``)."""
    path = src.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(path: Path, *, src: Path) -> set[str]:
    """``teacher`` modules imported anywhere in ``path`` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "teacher"
        ):
            for alias in node.names:  # `from teacher.train import loop` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_file(sub, src=src).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "teacher"}
    return {
        m
        for m in found
        if module_file(m, src=src).is_file() and module_file(m, src=src).name != "__init__.py"
    }


def closure(path: Path, *, src: Path) -> set[str]:
    """Every ``teacher`` module ``path`` imports, directly or through other modules."""
    seen: set[str] = set()
    todo = list(imports_of(path, src=src))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imports_of(module_file(name, src=src), src=src)
    return seen


def library_modules(*, src: Path) -> list[str]:
    """Dotted names of every module under ``src/teacher`` (package ``__init__``s left out)."""
    return sorted(
        ".".join(p.relative_to(src).with_suffix("").parts)
        for p in (src / "teacher").rglob("*.py")
        if p.name != "__init__.py"
    )


def stage_deps(repo: Path) -> dict[str, tuple[Path, set[str]]]:
    """stage -> (its script, the ``teacher`` modules in its ``dvc.yaml`` deps)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        deps = [d for d in stage.get("deps", []) if isinstance(d, str)]
        script = next(repo / d for d in deps if d.startswith("stages/"))
        mods = {
            ".".join(Path(d).relative_to("src").with_suffix("").parts)
            for d in deps
            if d.startswith("src/teacher/") and d.endswith(".py")
        }
        out[name] = (script, mods)
    return out
