"""SAM instances and their score from ground-truth box prompts: one mask IoU per instance.

Which annotations SAM learns and is scored on (:func:`is_sam_instance`), their box prompts
(:func:`instance_boxes_xywh`), and the one scoring path of training's validation
(``val_miou``) and the test split's ``mask/miou``: each instance is prompted with its box (or
its mask's extent when it has none), the IoU is
:func:`teacher.coco.metrics.mask_iou` at the original image size, and a mean over no instance is
:data:`teacher.coco.metrics.NOTHING_TO_MEASURE`. Ground-truth masks are decoded and predicted
``chunk`` instances at a time, so an image with 200 objects needs the memory of ``chunk``.
:func:`score_gt_points` is the same from one click per instance (``mask/miou_point``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from teacher.coco.detections import Detections
from teacher.coco.io import annotation_mask, has_mask, has_usable_box, is_crowd
from teacher.coco.metrics import mask_iou
from teacher.sam.predictor import SAM_CHUNK, PreparedImage
from teacher.sam.prompts import farthest_from_boundary


def is_sam_instance(ann: dict[str, Any]) -> bool:
    """What SAM trains on and is scored on: a non-crowd annotation with a mask."""
    return not is_crowd(ann) and has_mask(ann)


def instance_boxes_xywh(anns: list[dict], masks: list[np.ndarray]) -> np.ndarray:
    """(N, 4) COCO xywh of each annotation: its ``bbox``, or its mask's extent when it has none."""
    out = []
    for ann, mask in zip(anns, masks, strict=True):
        if has_usable_box(ann):
            box = ann["bbox"]
        else:
            ys, xs = np.nonzero(mask)
            box = (
                [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                if len(xs)
                else [0, 0, 1, 1]
            )
        out.append([float(v) for v in box])
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def score_gt_boxes(
    prepared: PreparedImage,
    anns: Sequence[dict],
    *,
    multimask: bool,
    chunk: int = SAM_CHUNK,
    keep_masks: bool = False,
) -> tuple[np.ndarray, Detections]:
    """SAM prompted by the ground-truth boxes of one prepared image.

    anns: the image's SAM instances (non-crowd, with a mask). Returns the IoU (N,) of each
    predicted mask with its ground-truth mask, and the prompts as detections: ``boxes`` (N, 4)
    xywh, ``scores`` (N,) SAM's predicted IoU, ``category_ids`` (N,), and ``masks`` (N, H, W)
    bool only with ``keep_masks`` (a gallery image; otherwise no full-size mask outlives its chunk).
    """
    height, width = prepared.original_size
    ious, scores, boxes, kept = [], [], [], []
    for start in range(0, len(anns), chunk):
        part = anns[start : start + chunk]
        gt = np.stack([annotation_mask(a, height, width) for a in part])
        part_boxes = instance_boxes_xywh(list(part), list(gt))
        pred, part_scores = prepared.predict(part_boxes, multimask=multimask, chunk=chunk)
        ious.append(mask_iou(pred, gt))
        scores.append(part_scores)
        boxes.append(part_boxes)
        if keep_masks:
            kept.append(pred)
    det = Detections(
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        scores=np.concatenate(scores) if scores else np.zeros((0,), np.float32),
        category_ids=np.array([int(a["category_id"]) for a in anns], np.int64),
        masks=(np.concatenate(kept) if kept else np.zeros((0, height, width), bool))
        if keep_masks
        else None,
    )
    return (np.concatenate(ious) if ious else np.zeros((0,))), det


def score_gt_points(
    prepared: PreparedImage, anns: Sequence[dict], *, chunk: int = SAM_CHUNK
) -> np.ndarray:
    """SAM prompted by one positive click per instance: the IoU (N,) of each predicted mask with
    its ground-truth mask at the original size.

    The click is the pixel of the true mask farthest from its boundary
    (:func:`teacher.sam.prompts.farthest_from_boundary`), where an annotator clicks; the mask is
    the best of SAM's 3 candidates by predicted IoU, as ``teacher serve``'s smart tool answers a
    click. An instance whose mask is empty at the original size scores 0.
    """
    height, width = prepared.original_size
    ious = []
    for start in range(0, len(anns), chunk):
        gt = np.stack([annotation_mask(a, height, width) for a in anns[start : start + chunk]])
        found = np.array([m.any() for m in gt], bool)
        points = np.array([farthest_from_boundary(m) if m.any() else (0.0, 0.0) for m in gt])
        pred, _ = prepared.predict_points(points[:, None], np.ones((len(gt), 1), np.int64))
        ious.append(np.where(found, mask_iou(pred, gt), 0.0))
    return np.concatenate(ious) if ious else np.zeros((0,))
