"""Epoch checkpoints: written atomically, verified by sha256, newest readable one loaded.

``save_checkpoint`` writes ``epoch-NNNN/{state.pt, meta.json}`` through a temporary folder and
``os.replace``; ``load_checkpoint`` returns the newest one whose fingerprint (params + data)
matches, falling back past damaged ones. Tensors load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from teacher.core.digest import file_sha256
from teacher.core.errors import TeacherError

CHECKPOINT_VERSION = 1


@contextmanager
def training_lock(checkpoint_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<checkpoint_dir>.lock`` (beside the folder, which training
    deletes and recreates) while training; a second training of the same stage (e.g. a new
    ``dvc repro`` after ``kill -9`` of dvc left the first one running) is refused with a
    ``TeacherError`` naming the process holding it. The lock goes with the process that holds
    it, however it ends. Without ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(f"{Path(checkpoint_dir)}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise TeacherError(
            f"{path}: cannot create the training lock ({e.strerror}); make {path.parent} writable"
        ) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise TeacherError(
                f"{checkpoint_dir}: another training of this stage is running (process "
                f"{holder}, lock {path}); wait for it to finish or stop it (kill {holder}), "
                "then re-run: training resumes from its last checkpoint"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


_EPOCH_DIR = re.compile(r"epoch-(\d{4,})")


def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    # the legacy tuple (get_state's default); the stubs union it with the dict form
    name, keys, pos, has_gauss, cached = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state()
    )
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_rng"])
    if torch.cuda.is_available() and tensors.get("cuda_rng"):
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])


def save_checkpoint(
    checkpoint_dir: Path, *, tensors: dict[str, Any], meta: dict[str, Any], keep: int = 2
) -> Path:
    """Write ``epoch-NNNN/{state.pt, meta.json}`` atomically (tmp dir + os.replace); keep ``keep``.

    ``tensors`` is torch.save'd (loaded back with weights_only=True); ``meta`` (JSON) records
    the sha256 of state.pt so a damaged file is detected.
    """
    final = checkpoint_dir / f"epoch-{meta['run']['epoch']:04d}"
    tmp = checkpoint_dir / f".{final.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(tensors, tmp / "state.pt")
        meta = {**meta, "state_sha256": file_sha256(tmp / "state.pt")}
        _write_synced(tmp / "meta.json", json.dumps(meta).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise TeacherError(
            f"{checkpoint_dir}: cannot write a checkpoint ({e}); free disk space or "
            "make the folder writable, then re-run: training resumes from the "
            "last good checkpoint"
        ) from e
    for old in _checkpoint_dirs(checkpoint_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _checkpoint_dirs(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in checkpoint_dir.iterdir()
        if (m := _EPOCH_DIR.fullmatch(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(
    checkpoint_dir: Path, *, fingerprint: str, verbose: bool = True
) -> tuple[dict, dict] | None:
    """(tensors, meta) of the newest readable checkpoint whose fingerprint matches, else None.

    A damaged checkpoint (unreadable JSON, hash mismatch, torch.load failure) is reported and
    the previous one is tried; a fingerprint mismatch (params or data changed) means none.
    """
    for path in _checkpoint_dirs(checkpoint_dir):
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("fingerprint") != fingerprint or meta.get("version") != CHECKPOINT_VERSION:
                _say(
                    verbose,
                    f"{path}: checkpoint is from other params or data; training from scratch",
                )
                return None
            if file_sha256(path / "state.pt") != meta["state_sha256"]:
                raise ValueError("state.pt does not match the sha256 recorded in meta.json")
            tensors = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            return tensors, meta
        except Exception as e:  # any damage: fall back to the previous checkpoint
            _say(
                verbose,
                f"{path}: checkpoint is damaged ({type(e).__name__}: {e}); "
                "falling back to the previous one",
            )
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        _say(verbose, f"{checkpoint_dir}: no usable checkpoint; training from scratch")
    return None


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, flush=True)


def remove_partial(checkpoint_dir: Path) -> None:
    """Delete temporary folders an interrupted ``save_checkpoint`` left behind."""
    for tmp in Path(checkpoint_dir).glob(".epoch-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
