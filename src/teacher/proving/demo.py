"""The demo's helpers: a copy of a checkout to run the pipeline in, params overlays, the gains.

``scripts/demo.py`` (``make demo``) and the end-to-end tests run the real pipeline in a fresh
git + DVC copy of the checkout (its tracked and untracked-but-not-ignored files, less generated
outputs), with params overlaid; ``gain_table`` summarises what fine-tuning bought over seeds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import yaml

GENERATED = (
    "data/inspect.json",
    "data/validated.json",
    "data/split/",
    "data/teacher_labels.json",
    "models/",
    "checkpoints/",
    "metrics/",
    "demo/",
    "dvc_plots/",
)


def tracked_files(root: Path) -> list[str]:
    """Files git tracks plus untracked ones it does not ignore, less generated outputs."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [
        n for n in out.split("\0") if n and (root / n).is_file() and not n.startswith(GENERATED)
    ]


def merge_params(params: dict, *overlays: dict) -> dict:
    """``params`` with each overlay (section -> {key: value}, or a top-level value) applied in turn."""
    for overlay in overlays:
        for section, values in overlay.items():
            if isinstance(values, dict):
                params.setdefault(section, {}).update(values)
            else:
                params[section] = values
    return params


def overlay_params(params_path: Path, overlay: dict) -> None:
    """Merge ``overlay`` into the params.yaml at ``params_path``."""
    params = merge_params(yaml.safe_load(params_path.read_text()) or {}, overlay)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_checkout(dest: Path, *, root: Path) -> Path:
    """A fresh git repository at ``dest`` holding the files of the checkout at ``root`` (no generated outputs)."""
    if dest.exists():
        shutil.rmtree(dest)
    for name in tracked_files(root):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def make_copy(dest: Path, *, root: Path, overlays: tuple[Path | dict, ...]) -> Path:
    """``copy_checkout`` with params overlays applied (YAML files or dicts, in turn), committed
    (dvclive needs a commit)."""
    copy_checkout(dest, root=root)
    for overlay in overlays:
        values = overlay if isinstance(overlay, dict) else yaml.safe_load(overlay.read_text())
        overlay_params(dest / "params.yaml", values)
    git = ["git", "-c", "user.name=teacher demo", "-c", "user.email=demo@localhost"]
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "demo: sample data, tiny models"], cwd=dest, check=True)
    return dest


GAIN_KEYS = ("box/map_50", "mask/miou")  # what the demo reports fine-tuning bought


def gain_table(runs: dict[int, dict]) -> list[str]:
    """Lines of a table: per seed the ``gain/<key>`` of its metrics (``GAIN_KEYS``), then the
    min / median / max of each column over the seeds that have it."""
    lines = ["  seed" + "".join(f"  {'gain ' + k:>18}" for k in GAIN_KEYS)]
    for seed, m in runs.items():
        cells = [
            f"{m[f'gain/{k}']:+18.3f}" if f"gain/{k}" in m else f"{'-':>18}" for k in GAIN_KEYS
        ]
        lines.append(f"  {seed:4d}  " + "  ".join(cells))
    for name, fn in (("min", np.min), ("median", np.median), ("max", np.max)):
        cells = []
        for k in GAIN_KEYS:
            values = [m[f"gain/{k}"] for m in runs.values() if f"gain/{k}" in m]
            cells.append(f"{float(fn(values)):+18.3f}" if values else f"{'-':>18}")
        lines.append(f"  {name:>6}" + "  ".join(cells))
    return lines
