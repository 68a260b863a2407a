"""The ``label`` stage's work: the fine-tuned teachers (Grounded-SAM) label the unlabeled pool.

A batch job (:mod:`teacher.inference.job`): shards written as they finish, resumed after a crash,
shared between ``label.processes`` processes (or the ranks of ``accelerate launch`` / torchrun),
merged into ``data/teacher_labels.json`` by a streaming writer. The document is the one
``teacher predict`` writes: images with sizes, categories, and per detection ``bbox`` (xywh px),
``score``, ``area`` and, when SAM was trained, ``segmentation`` (compressed RLE);
``info.unreadable`` lists the images skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from teacher.coco.io import save_coco
from teacher.core.artifacts import SKIPPED_FILE, skipped_reason
from teacher.core.digest import code_digest, fingerprint, folder_digest
from teacher.core.errors import TeacherError
from teacher.core.params import DinoParams, LabelParams, SamParams
from teacher.inference.job import Detector, Job, run_job
from teacher.inference.predict import (
    Filter,
    Teachers,
    list_images,
    merged,
    teachers_detector,
)
from teacher.inference.shards import ordered_records, write_merged

DESCRIPTION = "teacher labels (Grounded-SAM)"


def check_trained_dino(dino_dir: Path) -> None:
    """Without a trained DINO there is nothing to label with: ``TeacherError`` naming the folder."""
    reason = skipped_reason(dino_dir)
    if reason is not None or not (Path(dino_dir) / "adapter_config.json").is_file():
        why = (
            f"{Path(dino_dir) / SKIPPED_FILE} says: {reason}"
            if reason
            else "no adapter_config.json"
        )
        raise TeacherError(
            f"{dino_dir}: no trained Grounding DINO adapter ({why}); run "
            "`dvc repro train_dino` first"
        )


def load_label_teachers(
    *,
    dino_dir: Path,
    sam_dir: Path,
    dino: DinoParams,
    sam: SamParams,
    adapter_scale: float = 1.0,
    device: Any = None,
    log: Callable[[str], None] = print,
) -> Teachers:
    """The fine-tuned teachers of the pipeline: DINO + adapter, and SAM + adapter unless skipped,
    on ``device`` (default: a GPU when there is one).

    Without a trained DINO there is nothing to label with: ``TeacherError`` naming the folder.
    A skipped SAM (box-only data) means boxes without masks. ``adapter_scale``: both adapters at
    that scale (:func:`teacher.train.lora.load_adapter`).
    """
    import torch

    from teacher.dino.model import load_dino

    check_trained_dino(dino_dir)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle = merged(load_dino(dino, adapter_dir=Path(dino_dir), adapter_scale=adapter_scale))
    bundle.model.to(device)
    segmenter = None
    reason = skipped_reason(sam_dir)
    if reason is not None:
        log(f"label: boxes only: {Path(sam_dir) / SKIPPED_FILE} says: {reason}")
    else:
        from teacher.sam.build import load_sam

        segmenter = (
            load_sam(sam, adapter_dir=Path(sam_dir), adapter_scale=adapter_scale).to(device).eval()
        )
    return Teachers(dino=bundle, sam=segmenter, label_map=bundle.label_map)


def pool_detector(
    device: Any,
    *,
    dino_dir: Path,
    sam_dir: Path,
    label: LabelParams,
    dino: DinoParams,
    sam: SamParams,
    log: Callable[[str], None] = print,
) -> Detector:
    """The fine-tuned teachers as the job's detector, loaded on ``device`` (in each process)."""
    teachers = load_label_teachers(
        dino_dir=dino_dir,
        sam_dir=sam_dir,
        dino=dino,
        sam=sam,
        adapter_scale=label.adapter_scale,
        device=device,
        log=log,
    )
    keep = Filter(
        score_threshold=label.score_threshold,
        nms_iou=label.nms_iou,
        max_detections=label.max_detections,
        agnostic_iou=label.agnostic_nms_iou,
    )
    return teachers_detector(
        teachers,
        keep=keep,
        text_threshold=dino.text_threshold,
        multimask=sam.multimask,
        description=DESCRIPTION,
    )


def label_settings(
    *, dino_dir: Path, sam_dir: Path, label: LabelParams, dino: DinoParams, sam: SamParams
) -> dict[str, Any]:
    """What makes a shard: the adapters' contents, the models, the decode, the code. A shard
    made with anything else is not reused (``label.processes`` and ``shard_size`` are not in
    it: they change who labels, not what)."""
    return {
        "dino_adapter": folder_digest(dino_dir),
        "sam_adapter": folder_digest(sam_dir),
        "dino": fingerprint(dino.model, dino.revision, dino.shortest_edge, dino.longest_edge),
        "sam": fingerprint(sam.model, sam.multimask),
        "text_threshold": dino.text_threshold,
        "score_threshold": label.score_threshold,
        "nms_iou": label.nms_iou,
        "agnostic_nms_iou": label.agnostic_nms_iou,
        "max_detections": label.max_detections,
        "adapter_scale": label.adapter_scale,
        "batch_size": label.batch_size,
        "code": code_digest(),
    }


def label_pool(
    pool: Path,
    *,
    dino_dir: Path,
    sam_dir: Path,
    label: LabelParams,
    dino: DinoParams,
    sam: SamParams,
    out: Path,
    shard_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Label every image under ``pool`` into ``out`` (COCO, ``info.pool`` = the folder), through
    shards in ``shard_dir``; returns counts and the unreadable images on the main process (None
    on the other ranks of a distributed launch).

    An empty pool gives a document without images (the student then trains on human labels).
    """
    pool = Path(pool)
    if not pool.is_dir():
        raise TeacherError(
            f"data.unlabeled {str(pool)!r}: not a folder; point it at a folder of "
            "images in params.yaml (an empty folder means: no pool)"
        )
    info = {"description": DESCRIPTION, "pool": str(pool)}
    if not list_images(pool):
        log(
            f"label: {pool} holds no images: no teacher labels, the student trains on human labels alone"
        )
        save_coco(
            {"images": [], "annotations": [], "categories": [], "info": {**info, "unreadable": []}},
            out,
        )
        return {"images": 0, "annotations": 0, "unreadable": []}
    check_trained_dino(Path(dino_dir))
    if label.adapter_scale != 1.0:
        log(f"label: teachers' adapters at scale {label.adapter_scale:g} (label.adapter_scale)")
    dino_dir, sam_dir = Path(dino_dir), Path(sam_dir)
    job = Job(
        folder=pool,
        shard_dir=Path(shard_dir),
        loader=partial(
            pool_detector, dino_dir=dino_dir, sam_dir=sam_dir, label=label, dino=dino, sam=sam
        ),
        settings=label_settings(
            dino_dir=dino_dir, sam_dir=sam_dir, label=label, dino=dino, sam=sam
        ),
        shard_size=label.shard_size,
        batch_size=label.batch_size,
        processes=label.processes,
        progress=progress,
        log=log,
    )
    done = run_job(job)
    if done is None:
        return None
    return write_merged(
        Path(out),
        lambda: ordered_records(done.shards, done.images),
        categories=[{"id": c, "name": n} for c, n in done.categories],
        info=info,
    )
