"""Rewrite each stage's ``src/teacher/...`` deps in dvc.yaml to the modules its script imports.

    .venv/bin/python scripts/stage_deps.py      # then review `git diff dvc.yaml`

The import closure is tests/test_seams.py's (the test that fails when they differ); other
deps, params and outs are left as they are.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_seams as seams  # noqa: E402

DEP = re.compile(r"^      - src/teacher/.*\.py$")
STAGE = re.compile(r"^  (\w+):")


def main() -> None:
    path = ROOT / "dvc.yaml"
    deps = seams.stage_deps()
    out, stage, lines, i = [], None, path.read_text().split("\n"), 0
    while i < len(lines):
        if (m := STAGE.match(lines[i])) and m.group(1) in deps:
            stage = m.group(1)
        if stage and DEP.match(lines[i]):
            while i < len(lines) and DEP.match(lines[i]):
                i += 1
            modules = sorted(seams.closure(deps[stage][0]) - seams.LEFT_OUT)
            out += [f"      - {seams.module_file(m).relative_to(ROOT)}" for m in modules]
            continue
        out.append(lines[i])
        i += 1
    path.write_text("\n".join(out))


if __name__ == "__main__":
    main()
