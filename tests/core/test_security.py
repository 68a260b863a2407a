"""Nothing from params, data or checkpoints is executed as code (issue: security)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

SOURCES = sorted([*(REPO_ROOT / "src").rglob("*.py"), *(REPO_ROOT / "stages").rglob("*.py")])


def _calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if not isinstance(f, ast.Name):
        return ""  # a method of a computed value (``model.eval()``), not a module function
    parts.append(f.id)
    return ".".join(reversed(parts))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_unsafe_deserialisation_or_eval(path: Path) -> None:
    for call in _calls(path):
        name = _name(call)
        where = f"{path.relative_to(REPO_ROOT)}:{call.lineno}"
        assert name not in {
            "eval",
            "exec",
            "pickle.load",
            "pickle.loads",
            "yaml.load",
            "yaml.unsafe_load",
        }, f"{where}: {name} executes or unpickles input"
        if name == "torch.load":
            kw = {k.arg: k.value for k in call.keywords}
            assert (
                isinstance(kw.get("weights_only"), ast.Constant)
                and kw["weights_only"].value is True
            ), f"{where}: torch.load without weights_only=True"


def test_the_check_sees_an_unsafe_call(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nstate = torch.load('x.pt')\n")
    assert [_name(c) for c in _calls(bad)] == ["torch.load"]
    assert not any(k.arg == "weights_only" for k in _calls(bad)[0].keywords)
