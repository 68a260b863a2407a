"""The ``label`` stage's work: the fine-tuned teachers (Grounded-SAM) label the unlabeled pool.

The document is the one ``teacher predict`` writes (:func:`teacher.inference.predict.label_folder`): images
with sizes, categories, and per detection ``bbox`` (xywh px), ``score``, ``area`` and, when SAM was
trained, ``segmentation`` (compressed RLE); ``info.unreadable`` lists the images skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from teacher.core.artifacts import SKIPPED_FILE, skipped_reason
from teacher.core.errors import TeacherError
from teacher.core.params import DinoParams, LabelParams, SamParams
from teacher.inference.predict import (
    Filter,
    Teachers,
    label_folder,
    list_images,
    merged,
)


def load_label_teachers(
    *,
    dino_dir: Path,
    sam_dir: Path,
    dino: DinoParams,
    sam: SamParams,
    adapter_scale: float = 1.0,
    log: Callable[[str], None] = print,
) -> Teachers:
    """The fine-tuned teachers of the pipeline: DINO + adapter, and SAM + adapter unless skipped.

    Without a trained DINO there is nothing to label with: ``TeacherError`` naming the folder.
    A skipped SAM (box-only data) means boxes without masks. ``adapter_scale``: both adapters at
    that scale (:func:`teacher.train.lora.load_adapter`).
    """
    import torch

    from teacher.dino.model import load_dino

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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def label_pool(
    pool: Path,
    *,
    dino_dir: Path,
    sam_dir: Path,
    label: LabelParams,
    dino: DinoParams,
    sam: SamParams,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The teachers' labels of every image under ``pool`` (COCO dict, ``info.pool`` = the folder).

    An empty pool gives a document without images (the student then trains on human labels).
    """
    pool = Path(pool)
    if not pool.is_dir():
        raise TeacherError(
            f"data.unlabeled {str(pool)!r}: not a folder; point it at a folder of "
            "images in params.yaml (an empty folder means: no pool)"
        )
    if not list_images(pool):
        log(
            f"label: {pool} holds no images: no teacher labels, the student trains on human labels alone"
        )
        return {
            "images": [],
            "annotations": [],
            "categories": [],
            "info": {
                "description": "teacher labels (Grounded-SAM)",
                "pool": str(pool),
                "unreadable": [],
            },
        }
    if label.adapter_scale != 1.0:
        log(f"label: teachers' adapters at scale {label.adapter_scale:g} (label.adapter_scale)")
    teachers = load_label_teachers(
        dino_dir=dino_dir,
        sam_dir=sam_dir,
        dino=dino,
        sam=sam,
        adapter_scale=label.adapter_scale,
        log=log,
    )
    keep = Filter(
        score_threshold=label.score_threshold,
        nms_iou=label.nms_iou,
        max_detections=label.max_detections,
    )
    doc = label_folder(
        teachers,
        pool,
        keep=keep,
        text_threshold=dino.text_threshold,
        batch_size=label.batch_size,
        multimask=sam.multimask,
        progress=progress,
    )
    doc["info"] = {
        **doc.get("info", {}),
        "description": "teacher labels (Grounded-SAM)",
        "pool": str(pool),
    }
    return doc
