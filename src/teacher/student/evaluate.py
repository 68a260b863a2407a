"""The student on the test split: COCO box (and mask) AP and latency, keys ``student/...``.

Keys: ``student/box/<k>`` and, for a segmenting student, ``student/segm/<k>`` (``<k>`` as in
:func:`teacher.coco.metrics.summarize`), scored exactly as the teachers' ``box/*`` and ``segm/*``
(the same ``evaluate.score_threshold`` and ``max_detections``; box-only objects are ignore
regions for mask AP, :func:`teacher.coco.metrics.segm_ground_truth`), and ``student/ms_per_image``: wall time of the student's
preprocessing, forward and decoding per test image (image decoding from disk excluded), the
same measure the evaluate stage takes of the teachers (``teacher/ms_per_image``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from teacher.coco.detections import Detections
from teacher.coco.images import image_path, load_image
from teacher.coco.io import mask_to_rle
from teacher.coco.metrics import category_names, coco_evaluate, segm_ground_truth, summarize
from teacher.student.model import load_student, predict


def results_of(det: Detections, *, image_id: Any) -> list[dict[str, Any]]:
    """COCO results of one image's decoded detections (RLE masks when present)."""
    out = []
    for k in range(len(det)):
        r = {
            "image_id": image_id,
            "category_id": int(det.category_ids[k]),
            "bbox": [float(v) for v in det.boxes[k]],
            "score": float(det.scores[k]),
        }
        if det.masks is not None:
            r["segmentation"] = mask_to_rle(det.masks[k])
        out.append(r)
    return out


def evaluate_student(
    gt: dict[str, Any],
    images_root: str | Path,
    *,
    student_dir: str | Path,
    score_threshold: float,
    max_detections: int,
    batch_size: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Score the trained student of ``student_dir`` on ``gt`` (flat keys, see the module doc)."""
    from tqdm import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = load_student(student_dir, device=device)
    log(f"evaluate: student ({student.info.source}) on {len(gt['images'])} test images")
    results: list[dict] = []
    seconds = 0.0
    images = gt["images"]
    for start in tqdm(range(0, len(images), batch_size), desc="evaluate (student)", unit="batch"):
        records = images[start : start + batch_size]
        arrays = [load_image(image_path(images_root, r["file_name"])) for r in records]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dets = predict(
            student, arrays, max_detections=max_detections, score_threshold=score_threshold
        )
        seconds += time.perf_counter() - t0
        for rec, det in zip(records, dets, strict=True):
            results += results_of(det, image_id=rec["id"])
    names = category_names(gt)
    dets_cap = (1, 10, max_detections)
    metrics = {
        f"student/box/{k}": v
        for k, v in summarize(
            coco_evaluate(gt, results, iou_type="bbox", max_dets=dets_cap), names=names
        ).items()
    }
    if student.info.masks:  # box-only objects are ignore regions, as in the teachers' segm/*
        metrics.update(
            {
                f"student/segm/{k}": v
                for k, v in summarize(
                    coco_evaluate(
                        segm_ground_truth(gt), results, iou_type="segm", max_dets=dets_cap
                    ),
                    names=names,
                ).items()
            }
        )
    metrics["student/ms_per_image"] = 1000.0 * seconds / max(len(images), 1)
    return metrics
