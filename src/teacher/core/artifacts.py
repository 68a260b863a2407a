"""The layout of an adapter folder (``models/dino``, ``models/sam``): one owner for its file names.

A trained folder holds peft's ``adapter_model.safetensors`` (LoRA and, when modules train
fully, their parameters: ``teacher.train.lora``, with :data:`TRAINED_ALIASES_FILE`) +
``adapter_config.json``, :data:`PARAMS_FILE` (the params used) and, for Grounding DINO,
:data:`LABELS_FILE` (class names ↔ prompt indexes). A folder whose teacher the data cannot train
holds only :data:`SKIPPED_FILE`, a one-line reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SKIPPED_FILE = "SKIPPED"
PARAMS_FILE = "params.json"
LABELS_FILE = "labels.json"
TRAINED_ALIASES_FILE = "trained_modules.json"  # the fully trained tensors' tied alias names
# older folders' second copy of the fully trained tensors: read, not written
TRAINED_MODULES_FILE = "trained_modules.safetensors"


def skipped_reason(model_dir: str | Path) -> str | None:
    """The reason written in ``model_dir/SKIPPED``, or None when the teacher was trained."""
    note = Path(model_dir) / SKIPPED_FILE
    if not note.is_file():
        return None
    return note.read_text(encoding="utf-8").strip() or "no reason given"


def write_skipped(model_dir: str | Path, reason: str) -> Path:
    """Replace ``model_dir`` with a folder holding only ``SKIPPED`` (the reason)."""
    model_dir = Path(model_dir)
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    note = model_dir / SKIPPED_FILE
    note.write_text(reason + "\n", encoding="utf-8")
    return note
