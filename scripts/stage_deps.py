"""Rewrite each stage's ``src/teacher/...`` deps in dvc.yaml to the modules its script imports.

    .venv/bin/python scripts/stage_deps.py      # then review `git diff dvc.yaml`

The import closure is teacher.core.imports' (tests/test_seams.py fails when they differ); other
deps, params and outs are left as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

from teacher.core.imports import closure, module_file, stage_deps

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LEFT_OUT = {"teacher.core.params", "teacher.core.errors"}  # see the comment at the top of dvc.yaml

DEP = re.compile(r"^      - src/teacher/.*\.py$")
STAGE = re.compile(r"^  (\w+):")


def main() -> None:
    path = ROOT / "dvc.yaml"
    deps = stage_deps(ROOT)
    out, stage, lines, i = [], None, path.read_text().split("\n"), 0
    while i < len(lines):
        if (m := STAGE.match(lines[i])) and m.group(1) in deps:
            stage = m.group(1)
        if stage and DEP.match(lines[i]):
            while i < len(lines) and DEP.match(lines[i]):
                i += 1
            modules = sorted(closure(deps[stage][0], src=SRC) - LEFT_OUT)
            out += [f"      - {module_file(m, src=SRC).relative_to(ROOT)}" for m in modules]
            continue
        out.append(lines[i])
        i += 1
    path.write_text("\n".join(out))


if __name__ == "__main__":
    main()
