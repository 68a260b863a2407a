"""Shared test helpers.

Stage tests run the real pipeline (``dvc repro``) in a throw-away copy of the repository:

    def test_my_stage(repo_copy):
        run_in_repo(repo_copy, "dvc", "repro", "train_sam")
        assert (repo_copy / "models/sam").is_dir()

``repo_copy`` is a fixture (a fresh git + DVC repo holding the tracked and untracked-but-not-
ignored files of this checkout, in ``tmp_path/"repo"``); ``run_in_repo(repo, *cmd)`` runs a
command there with this checkout's ``.venv/bin`` first on PATH and the copy's ``src`` first on
PYTHONPATH, so the copy's code is what runs. ``set_params(repo, {"split.train": 0.5})`` edits
the copy's params.yaml. ``REPO_ROOT`` is this checkout, ``REALWORLD`` the shared conformance
data (may be absent), ``STAT_KEYS`` the 12 COCO summary metrics' keys.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `stages` importable however pytest is started
    sys.path.insert(0, str(REPO_ROOT))
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests (.venv/bin)
REALWORLD = REPO_ROOT.parent / "shared" / "realworld"
TINY_PARAMS = REPO_ROOT / "scripts" / "tiny-params.yaml"  # tiny models over params.yaml
DEMO_PARAMS = REPO_ROOT / "scripts" / "demo-params.yaml"  # the demo's, over TINY_PARAMS
# teacher.coco.metrics' summary keys: pycocotools' 12 stats, in its order (written out here, so
# a test of the metrics does not check them against themselves)
STAT_KEYS = [
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
]

from teacher.proving.demo import copy_checkout  # noqa: E402  (tracked files, no outputs)


def make_repo_copy(dest: Path, root: Path = REPO_ROOT) -> Path:
    """Copy this checkout's files to ``dest`` and make it a git + DVC repository."""
    copy_checkout(dest, root=root)
    if not (dest / ".dvc" / "config").is_file():
        run_in_repo(dest, "dvc", "init", "-q")
    return dest


def repo_env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{repo / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "t@t",
        }
    )
    return env


def run_in_repo(
    repo: Path, *cmd: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``repo`` (text output captured); with ``check``, a non-zero exit fails
    the test showing the command's output."""
    proc = subprocess.run(
        list(cmd), cwd=repo, env=repo_env(repo), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def set_params(repo: Path, values: dict[str, Any]) -> None:
    """Set dotted keys (``"split.train"``, ``"seed"``) in ``repo/params.yaml``."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text()) or {}
    for key, value in values.items():
        *sections, leaf = key.split(".")
        node = params
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op torch thread per test: the tiny models run several times faster on a small
    shared CPU without thread contention (stage subprocesses are not affected)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A fresh git + DVC copy of this checkout in ``tmp_path / "repo"``."""
    return make_repo_copy(tmp_path / "repo")


@pytest.fixture
def realworld() -> Path:
    """The shared real-world COCO folder; skips the test (visibly) when it is absent."""
    if not REALWORLD.is_dir():
        pytest.skip(f"real-world conformance data not found at {REALWORLD} (optional)")
    return REALWORLD
