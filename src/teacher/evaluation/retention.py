"""Forgetting: what fine-tuning costs the open vocabulary, measured without extra labels.

On the test images, the base model's own confident detections of class names that are not in
the dataset (:data:`COCO_CLASSES` by default) are the reference; a fine-tuned model's box AP
against them (the same decode, thresholds and NMS) is its retention: 1.0 = it still finds what
the base model found, nothing forgotten. The base model scores 1.0 against itself by
construction: the reference is the part of its own detections scoring at least the threshold.
A reference without any box is nothing to measure (``NOTHING_TO_MEASURE``, -1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from teacher.coco.detections import Detections
from teacher.coco.metrics import NOTHING_TO_MEASURE, coco_eval
from teacher.coco.vocabulary import COCO_CLASSES, retention_classes

__all__ = [
    "COCO_CLASSES",
    "retention_classes",
]  # re-exported: the names live in teacher.coco.vocabulary

KEYS = ("map", "map_50")  # what retention reports (retention/box/<key>)


def reference_ground_truth(
    images: Sequence[dict],
    base: Mapping[Any, Detections],
    *,
    threshold: float,
    category_ids: Sequence[int],
    names: Sequence[str],
) -> dict:
    """COCO ground truth made of the base model's detections scoring at least ``threshold``.

    ``images`` are the test split's records (id, file_name, width, height); ``base`` maps an
    image id to the base model's retention detections of it; categories are ``names`` with
    ``category_ids``. Boxes are COCO xywh pixels as detected.
    """
    anns: list[dict[str, Any]] = []
    for img in images:
        det = base.get(img["id"], Detections.empty())
        for box, cat in zip(
            det.boxes[det.scores >= threshold],
            det.category_ids[det.scores >= threshold],
            strict=True,
        ):
            w, h = float(box[2]), float(box[3])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img["id"],
                    "category_id": int(cat),
                    "bbox": [float(v) for v in box],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "images": [dict(img) for img in images],
        "annotations": anns,
        "categories": [{"id": int(c), "name": n} for c, n in zip(category_ids, names, strict=True)],
    }


def retention_scores(
    reference: dict, dets: Mapping[Any, Detections], *, max_detections: int
) -> dict[str, float]:
    """``map``, ``map_50`` of ``dets`` (image id -> detections) against ``reference``
    (:func:`reference_ground_truth`); ``NOTHING_TO_MEASURE`` when the reference holds no box."""
    if not reference["annotations"]:
        return dict.fromkeys(KEYS, NOTHING_TO_MEASURE)
    results = [
        {
            "image_id": image_id,
            "category_id": int(cat),
            "bbox": [float(v) for v in box],
            "score": float(score),
        }
        for image_id, det in dets.items()
        for box, score, cat in zip(det.boxes, det.scores, det.category_ids, strict=True)
    ]
    metrics = coco_eval(
        reference,
        results,
        iou_type="bbox",
        per_class=False,
        max_dets=(1, 10, max_detections),
    )
    return {k: metrics[k] for k in KEYS}


def tradeoff_rows(metrics: Mapping[str, float], scales: Sequence[float]) -> list[dict[str, float]]:
    """The plot of the trade-off: per adapter scale its task gain (``scale/<s>/box/map`` minus
    ``base/box/map``) and its retention (``scale/<s>/retention/box/map``, -1 when not measured).
    Scales whose gain cannot be measured (no base or no box AP) are left out."""
    rows = []
    base = metrics.get("base/box/map", NOTHING_TO_MEASURE)
    for s in scales:
        box = metrics.get(f"{scale_prefix(s)}/box/map", NOTHING_TO_MEASURE)
        if box < 0 or base < 0:
            continue
        rows.append(
            {
                "scale": float(s),
                "retention": metrics.get(
                    f"{scale_prefix(s)}/retention/box/map", NOTHING_TO_MEASURE
                ),
                "gain": box - base,
            }
        )
    return rows


def scale_prefix(scale: float) -> str:
    """``scale/<s>``: the key prefix of one adapter scale's metrics (``scale/0.5/box/map``)."""
    return f"scale/{scale:g}"
