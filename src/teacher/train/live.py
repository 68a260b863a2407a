"""dvclive: one log per training run, with a resumed run's history replayed into it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from teacher.core.errors import TeacherError


def open_live(live_dir: Path, history: dict[str, list], record: Mapping[str, Any] | None) -> Any:
    """A fresh dvclive.Live in ``live_dir`` with the resumed history replayed into it."""
    from dvclive import Live

    try:
        live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    except Exception as e:  # dvclive 3.x: scmrepo's SCMError("Empty git repo") escapes it
        if "Empty git repo" not in str(e):
            raise
        raise TeacherError(
            f"{live_dir}: dvclive cannot log in a git repository without commits; commit once "
            "(`git add -A && git commit -m 'initial'`), then re-run the stage"
        ) from e
    live.summary.update(plain(record or {}))
    for entry in history["steps"]:
        log_step(live, entry)
    for entry in history["epochs"]:
        log_epoch(live, entry)
    return live


def plain(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with lists joined into text (dvc metrics shows scalars), dicts kept nested."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out[str(k)] = plain(v)
        elif isinstance(v, (list, tuple)):
            out[str(k)] = "; ".join(map(str, v))
        else:
            out[str(k)] = v
    return out


def log_step(live: Any, entry: Mapping[str, float]) -> None:
    live.step = entry["step"]
    for k, v in entry.items():
        if k != "step":
            live.log_metric(f"train/{k}", v)


def log_epoch(live: Any, entry: Mapping[str, float]) -> None:
    live.step = entry["step"]
    live.log_metric("epoch", entry["epoch"])
    for k, v in entry.items():
        if k not in ("step", "epoch"):
            live.log_metric(k, v)
    live.make_summary()
