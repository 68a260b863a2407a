"""The committed locks: complete, inside pyproject's bounds, and what is installed."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from teacher.core.environment import (
    Pin,
    bound_violations,
    lock_mismatches,
    main,
    read_lock,
)

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[2]
MAIN_LOCK = REPO / "requirements" / "main.txt"
LS_LOCK = REPO / "requirements" / "label-studio.txt"


def pyproject_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["dev"]


def input_requirements(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_main_lock_keeps_pyproject_bounds():
    pins = read_lock(MAIN_LOCK)
    requirements = pyproject_requirements() + input_requirements(REPO / "requirements/main.in")
    assert bound_violations(requirements, pins) == []


def test_label_studio_lock_keeps_its_inputs():
    pins = read_lock(LS_LOCK)
    assert bound_violations(input_requirements(REPO / "requirements/label-studio.in"), pins) == []
    assert {p.name: p.version for p in pins}["label-studio"] == "1.23.2"


def test_every_lower_bound_is_stated():
    """A bare name would let pip pick any release, however old: each dependency says its oldest."""
    for text in pyproject_requirements():
        req = Requirement(text)
        assert any(s.operator in (">=", "==") for s in req.specifier), text


def test_bound_violations_names_the_package():
    pins = [Pin("numpy", "1.25.0", None), Pin("torch", "2.14.1", None)]
    problems = bound_violations(["numpy>=1.26", "torch>=2.13,<3", "onnx>=1.16"], pins)
    assert problems == [
        "numpy: locked 1.25.0 is outside `numpy>=1.26`",
        "onnx: required by pyproject.toml but not in the lock",
    ]


def test_lock_lines_parse_with_markers_and_hashes(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# made by make lock\n"
        "Foo_Bar==1.0 \\\n    --hash=sha256:00\n"
        "baz==2.0 ; sys_platform == 'nowhere' \\\n    --hash=sha256:11\n"
        "    # via teacher\n"
    )
    assert read_lock(lock) == [
        Pin("foo-bar", "1.0", None),
        Pin("baz", "2.0", "sys_platform == 'nowhere'"),
    ]
    tmp_path.joinpath("empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="make lock"):
        read_lock(tmp_path / "empty.txt")


def test_mismatches_skip_other_platforms():
    pins = [
        Pin("numpy", "2.4.6", None),
        Pin("torch", "2.14.1", None),
        Pin("pywin32", "312", "sys_platform == 'nowhere'"),
    ]
    assert lock_mismatches(pins, {"numpy": "2.4.6", "torch": "2.14.1"}) == []
    assert lock_mismatches(pins, {"numpy": "2.3.0"}) == [
        "numpy is 2.3.0 but the lock says 2.4.6",
        "torch is not installed (the lock says 2.14.1)",
    ]


def test_this_environment_is_the_lock():
    """What `make` checks before every command: the suite runs on exactly the lock."""
    assert main([str(MAIN_LOCK)]) == 0


def test_a_drifted_package_is_named_in_one_line(tmp_path, capsys):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==0.0.1\npytest==0.0.2\n")
    assert main([str(lock)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "numpy is " in err[0] and "the lock says 0.0.1 (and 1 more)" in err[0]
