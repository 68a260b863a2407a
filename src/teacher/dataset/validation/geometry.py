"""Pure geometry of a mask and a box: polygon area (shoelace) and extent, a mask's area and
bbox, and the IoU of two xywh boxes. No findings, no edits."""

from __future__ import annotations

from dataclasses import dataclass

from teacher.coco.boxes import clip_xywh_box


@dataclass(frozen=True)
class MaskGeometry:
    """Area and extent of an annotation's mask, computed without decoding it: polygons by
    their vertices (shoelace area and vertex extent, COCO's conventions), RLE by pycocotools."""

    area: float
    bbox: list[float]  # COCO xywh


def polygon_area(rings: list[list[float]]) -> float:
    """Sum of the rings' geometric (shoelace) areas: COCO's convention for polygon ``area``."""
    total = 0.0
    for r in rings:
        xs, ys = r[0::2], r[1::2]
        total += abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
    return total


def polygon_bbox(rings: list[list[float]], *, width: int, height: int) -> list[float]:
    """Vertex extent of the rings, clipped to the image, as COCO xywh."""
    xs = [v for r in rings for v in r[0::2]]
    ys = [v for r in rings for v in r[1::2]]
    return clip_xywh_box(
        [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], width=width, height=height
    )


def iou_xywh(a: list[float], b: list[float], *, slack: float = 1.0) -> float:
    """IoU of two xywh boxes, each grown by ``slack`` px per side (rasterisation of tiny boxes)."""
    a = [a[0] - slack, a[1] - slack, a[2] + 2 * slack, a[3] + 2 * slack]
    b = [b[0] - slack, b[1] - slack, b[2] + 2 * slack, b[3] + 2 * slack]
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
