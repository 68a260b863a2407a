"""Merge the LoRA adapters into full models, written in their native formats.

- Grounding DINO: ``<out>/dino/``, a transformers ``save_pretrained`` folder (model and
  processor, safetensors) plus the adapter's ``labels.json``; it loads with its family's class
  (``GroundingDinoForObjectDetection`` or ``MMGroundingDinoForObjectDetection``;
  ``AutoModelForZeroShotObjectDetection`` picks it) or as ``dino.model: <out>/dino``.
- SAM: ``<out>/sam.pth``, a segment-anything state dict (``torch.save(sam.state_dict())``, as
  Meta's checkpoints); it loads with ``sam_model_registry[...](checkpoint=...)`` or as
  ``sam.model: <out>/sam.pth``.
- SAM 2.1: ``<out>/sam/``, a transformers ``save_pretrained`` folder (``Sam2Model`` and
  ``Sam2Processor``, safetensors); it loads with ``Sam2Model.from_pretrained`` or as
  ``sam.model: <out>/sam``.
Neither needs peft to load or predict. ``adapter_scale`` (``teacher export --adapter-scale``)
exports the adapters at that scale (:func:`teacher.train.lora.load_adapter`: 0 = the base models,
1 = the adapters as trained).

The export is written into a new folder beside ``<out>`` and renamed to ``<out>`` once complete
(:func:`replaced_folder`): a non-empty ``<out>`` is refused unless ``force``, which replaces it
whole, never file by file.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    params: SamParams, adapter_dir: str | Path, out_dir: str | Path, *, adapter_scale: float = 1.0
) -> Path:
    """Base SAM of ``params`` + the adapter of ``adapter_dir`` (at ``adapter_scale``), merged,
    into ``out_dir``: ``sam.pth`` (a state dict) for SAM, ``sam/`` (save_pretrained) for SAM 2.
    Returns the path written."""
    from teacher.sam.build import load_sam

    out_dir = Path(out_dir)
    # merged by load_sam
    sam = load_sam(params, adapter_dir=Path(adapter_dir), adapter_scale=adapter_scale)
    if sam.sam_family == "sam2":
        return save_sam2(sam, out_dir / "sam")
    out_path = out_dir / "sam.pth"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out_path)
    return out_path


def save_sam2(model: Any, out_dir: Path) -> Path:
    """A merged ``BoxPromptSam2`` as transformers' own ``Sam2Model`` folder, with the
    ``Sam2Processor`` of its input size (what ``Sam2Model`` / ``Sam2Processor.from_pretrained``
    and ``sam.model`` read)."""
    from transformers import Sam2ImageProcessor, Sam2Processor

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    # save_pretrained names our subclass in config.json; name transformers' class instead
    model.config.architectures = ["Sam2Model"]
    model.config.save_pretrained(str(out_dir))
    side = model.geometry.size
    processor = Sam2Processor(Sam2ImageProcessor(size={"height": side, "width": side}))
    processor.save_pretrained(str(out_dir))
    return out_dir


def export_all(
    adapters: str | Path,
    out: str | Path,
    *,
    dino: DinoParams,
    sam: SamParams,
    adapter_scale: float = 1.0,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Export every trained teacher under ``adapters`` (``dino/``, ``sam/``) into ``out``, its
    adapter at ``adapter_scale``.

    Skipped teachers (a ``SKIPPED`` note) are reported through ``log`` and left out. A non-empty
    ``out`` is refused unless ``force`` (:func:`replaced_folder`).
    """
    from teacher.train.lora import check_adapter_scale

    scale = check_adapter_scale(adapter_scale)  # before any model is loaded
    adapters, out = Path(adapters), Path(out)
    with replaced_folder(out, force=force, keep=[adapters]) as new:
        jobs = {
            "dino": (
                adapters / "dino",
                lambda d: export_dino(dino, d, new / "dino", adapter_scale=scale),
            ),
            "sam": (
                adapters / "sam",
                lambda d: export_sam(sam, d, new, adapter_scale=scale),
            ),
        }
        written = {}
        for name, (folder, job) in jobs.items():
            reason = skipped_reason(folder)
            if reason is not None:
                log(f"export: {name} not exported: {folder / SKIPPED_FILE} says: {reason}")
            elif (folder / "adapter_config.json").exists():
                written[name] = out / job(folder).relative_to(new)
        if not written:
            raise TeacherError(
                f"{adapters}: no dino/ or sam/ adapter to export; run `dvc repro` "
                "first, or pass --adapters pointing at the folder holding them"
            )
    at = f" (adapter scale {scale:g})" if scale != 1.0 else ""
    for name, path in written.items():
        log(f"export: {name} -> {path}{at}")
    return written


def export_target_problem(out: Path, *, force: bool, keep: Sequence[Path] = ()) -> str | None:
    """Why ``out`` cannot take an export (what to do included); None when it can.

    A file, a folder holding what the export reads (``keep``) or the working directory, and
    (without ``force``) a non-empty folder are refused."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; name a folder"
    target = out.resolve()
    for inside in [*keep, Path.cwd()]:
        if target == inside.resolve() or target in inside.resolve().parents:
            return (
                f"--out {out} holds {inside}, which replacing it would delete; "
                "choose another folder"
            )
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not force:
        shown = ", ".join(held[:5]) + (f", ... ({len(held)} in all)" if len(held) > 5 else "")
        return (
            f"--out {out} is not empty ({shown}); choose another folder, or pass --force "
            "to replace it whole once the new export is complete"
        )
    return None


@contextmanager
def replaced_folder(
    out: str | Path, *, force: bool = False, keep: Sequence[Path] = ()
) -> Iterator[Path]:
    """A new empty folder beside ``out`` to write an export into, renamed to ``out`` when the
    block completes (an old ``out`` is moved aside first and removed after). When the block
    raises, the new folder is removed and ``out`` stays as it was.

    Raises ``TeacherError`` before anything is written when :func:`export_target_problem`
    names a problem."""
    out = Path(out)
    problem = export_target_problem(out, force=force, keep=keep)
    if problem:
        raise TeacherError(problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}"
    new, old = stem.with_name(stem.name + ".partial"), stem.with_name(stem.name + ".old")
    new.mkdir()  # the umask's mode, as out itself would get
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
    new.rename(out)
    if old.is_symlink():  # out was a link to a folder: the link is replaced, its target kept
        old.unlink()
    shutil.rmtree(old, ignore_errors=True)
