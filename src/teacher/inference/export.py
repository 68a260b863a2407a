"""Merge the LoRA adapters into full models, written in their native formats.

- Grounding DINO: ``<out>/dino/``, a transformers ``save_pretrained`` folder (model and
  processor, safetensors) plus the adapter's ``labels.json``; it loads with
  ``GroundingDinoForObjectDetection.from_pretrained`` or as ``dino.model: <out>/dino``.
- SAM: ``<out>/sam.pth``, a segment-anything state dict (``torch.save(sam.state_dict())``, as
  Meta's checkpoints); it loads with ``sam_model_registry[...](checkpoint=...)`` or as
  ``sam.model: <out>/sam.pth``.
Neither needs peft to load or predict. ``adapter_scale`` (``teacher export --adapter-scale``)
exports the adapters at that scale (:func:`teacher.train.lora.load_adapter`: 0 = the base models,
1 = the adapters as trained).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from teacher.core.artifacts import LABELS_FILE, SKIPPED_FILE, skipped_reason
from teacher.core.errors import TeacherError
from teacher.core.params import DinoParams, SamParams

if TYPE_CHECKING:
    from peft import PeftModel


def export_dino(
    dino: DinoParams, adapter_dir: str | Path, out_dir: str | Path, *, adapter_scale: float = 1.0
) -> Path:
    """Base DINO of ``dino`` + the adapter of ``adapter_dir`` (at ``adapter_scale``), merged,
    saved to ``out_dir``."""
    from teacher.dino.model import load_dino
    from teacher.train.lora import merge

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    bundle = load_dino(dino, adapter_dir=adapter_dir, adapter_scale=adapter_scale)
    model: Any = merge(cast("PeftModel", bundle.model))  # adapter_dir given: a PeftModel
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    bundle.processor.save_pretrained(str(out_dir))
    shutil.copyfile(adapter_dir / LABELS_FILE, out_dir / LABELS_FILE)
    return out_dir


def export_sam(
    params: SamParams, adapter_dir: str | Path, out_path: str | Path, *, adapter_scale: float = 1.0
) -> Path:
    """Base SAM of ``params`` + the adapter of ``adapter_dir`` (at ``adapter_scale``), merged, as
    a state dict file."""
    from teacher.sam.build import load_sam

    out_path = Path(out_path)
    # merged by load_sam
    sam = load_sam(params, adapter_dir=Path(adapter_dir), adapter_scale=adapter_scale)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out_path)
    return out_path


def export_all(
    adapters: str | Path,
    out: str | Path,
    *,
    dino: DinoParams,
    sam: SamParams,
    adapter_scale: float = 1.0,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Export every trained teacher under ``adapters`` (``dino/``, ``sam/``) into ``out``, its
    adapter at ``adapter_scale``.

    Skipped teachers (a ``SKIPPED`` note) are reported through ``log`` and left out.
    """
    from teacher.train.lora import check_adapter_scale

    scale = check_adapter_scale(adapter_scale)  # before any model is loaded
    adapters, out = Path(adapters), Path(out)
    jobs = {
        "dino": (
            adapters / "dino",
            lambda d: export_dino(dino, d, out / "dino", adapter_scale=scale),
        ),
        "sam": (
            adapters / "sam",
            lambda d: export_sam(sam, d, out / "sam.pth", adapter_scale=scale),
        ),
    }
    written = {}
    for name, (folder, job) in jobs.items():
        reason = skipped_reason(folder)
        if reason is not None:
            log(f"export: {name} not exported: {folder / SKIPPED_FILE} says: {reason}")
        elif (folder / "adapter_config.json").exists():
            written[name] = job(folder)
            at = f" (adapter scale {scale:g})" if scale != 1.0 else ""
            log(f"export: {name} -> {written[name]}{at}")
    if not written:
        raise TeacherError(
            f"{adapters}: no dino/ or sam/ adapter to export; run `dvc repro` "
            "first, or pass --adapters pointing at the folder holding them"
        )
    return written
