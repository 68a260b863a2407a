"""Label Studio's prediction format, as pure functions over the teachers' detections.

A prediction of one task is ``{"result": [region, ...], "score": float, "model_version": str}``;
a region is ``{"id", "from_name", "to_name", "type", "original_width", "original_height",
"image_rotation", "score", "value"}`` with coordinates in percent of the image:
``rectanglelabels``: ``x, y, width, height, rotation`` (top-left corner);
``brushlabels``: ``format: "rle", rle: [bytes]`` (``teacher.serve.brush``);
``polygonlabels``: ``points: [[x, y], ...]``. A rectangle and the mask of the same detection
share the region ``id`` (Label Studio then shows them as one object).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from teacher.serve.brush import mask_to_rle
from teacher.serve.label_config import PREDICTED, Control, LabelConfig, match_labels

ROUND = 4  # decimals of percent coordinates and scores


@dataclass
class Found:
    """The teachers' detections on one image (pixels, the image as decoded)."""

    width: int
    height: int
    boxes_xywh: np.ndarray  # (N, 4) COCO xywh, absolute pixels
    scores: np.ndarray  # (N,) float
    names: list[str]  # (N,) class names
    masks: np.ndarray | None = None  # (N, H, W) bool, when SAM ran


@dataclass(frozen=True)
class Prompts:
    """The clicks of Label Studio's smart tools on one image, in pixels of the original image."""

    width: int
    height: int
    points: np.ndarray  # (P, 2) x, y
    point_labels: np.ndarray  # (P,) 1 = positive, 0 = negative
    box_xyxy: np.ndarray | None  # (4,) or None
    label: str | None  # the label the annotator chose


def percent_rectangle(box_xywh: np.ndarray, *, width: int, height: int) -> dict[str, float]:
    """COCO xywh pixels -> Label Studio ``x, y, width, height`` in percent (clipped to 0..100)."""
    x, y, w, h = (float(v) for v in box_xywh)
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    return {
        "x": round(100 * x0 / width, ROUND),
        "y": round(100 * y0 / height, ROUND),
        "width": round(100 * max(0.0, x1 - x0) / width, ROUND),
        "height": round(100 * max(0.0, y1 - y0) / height, ROUND),
        "rotation": 0,
    }


def mask_polygon(mask: np.ndarray, *, tolerance: float = 1.0) -> np.ndarray | None:
    """The outline of the mask's largest connected part, (K, 2) x, y pixels; None when empty.

    Traced on the pixel grid (cv2.findContours) and simplified to ``tolerance`` pixels.
    """
    import cv2

    contours, _ = cv2.findContours(
        np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)
    outline = cv2.approxPolyDP(outline, tolerance, True)[:, 0, :]
    return outline.astype(np.float64) if len(outline) >= 3 else None


def percent_points(points_xy: np.ndarray, *, width: int, height: int) -> list[list[float]]:
    """(K, 2) pixel points -> ``[[x%, y%], ...]``."""
    return [
        [round(100 * float(x) / width, ROUND), round(100 * float(y) / height, ROUND)]
        for x, y in points_xy
    ]


def region(
    control: Control,
    *,
    value: dict,
    label: str,
    score: float,
    width: int,
    height: int,
    region_id: str,
) -> dict[str, Any]:
    """One Label Studio result of ``control`` (its label list filled with ``label``)."""
    return {
        "id": region_id,
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": round(float(score), ROUND),
        "value": {**value, control.type: [label]},
    }


def region_value(control: Control, found: Found, i: int) -> dict | None:
    """The ``value`` of detection ``i`` for ``control``; None where it cannot say (no mask)."""
    if control.type == "rectanglelabels":
        return percent_rectangle(found.boxes_xywh[i], width=found.width, height=found.height)
    if found.masks is None or not found.masks[i].any():
        return None
    if control.type == "brushlabels":
        return {"format": "rle", "rle": mask_to_rle(found.masks[i])}
    outline = mask_polygon(found.masks[i])
    if outline is None:
        return None
    return {
        "points": percent_points(outline, width=found.width, height=found.height),
        "closed": True,
    }


def image_regions(
    found: Found, controls: list[Control], *, id_prefix: str
) -> tuple[list[dict], set[str]]:
    """Regions of one image's detections for the controls on it; and the unknown class names."""
    results, unknown = [], set()
    for control in controls:
        mapping, missing = match_labels(sorted(set(found.names)), control)
        unknown |= set(missing)
        for i, name in enumerate(found.names):
            value = region_value(control, found, i) if name in mapping else None
            if value is not None:
                results.append(
                    region(
                        control,
                        value=value,
                        label=mapping[name],
                        score=found.scores[i],
                        width=found.width,
                        height=found.height,
                        region_id=f"{id_prefix}{i}",
                    )
                )
    return results, unknown


def task_prediction(
    founds: Mapping[str, Found], config: LabelConfig, *, model_version: str
) -> tuple[dict[str, Any], list[str]]:
    """One task's prediction from the detections on each of its images (by data key).

    The task score is the mean region score (0 without regions): Label Studio sorts by it.
    Returns the prediction and the class names no control has a label for (to report).
    """
    results, unknown = [], set()
    for n, (data_key, found) in enumerate(sorted(founds.items())):
        controls = [c for c in config.of_type(*PREDICTED) if c.value == data_key]
        regions, missing = image_regions(found, controls, id_prefix=f"t{n}r")
        results += regions
        unknown |= missing
    return prediction(results, model_version=model_version), sorted(unknown)


def prediction(results: list[dict], *, model_version: str) -> dict[str, Any]:
    scores = [r["score"] for r in results]
    return {
        "result": results,
        "score": round(float(np.mean(scores)), ROUND) if scores else 0.0,
        "model_version": model_version,
    }


# --- interactive (smart tools) --------------------------------------------------------------


class ContextError(ValueError):
    """A smart-tool context that cannot be read (the message says which field)."""


def context_prompts(context: Mapping[str, Any]) -> tuple[str, Prompts] | None:
    """The clicks in a ``context`` of Label Studio's smart tools: the image's ``to_name`` and the
    prompts; None when the context has no keypoint or rectangle.

    Keypoints (``keypointlabels``, ``is_positive``) become point prompts; a rectangle
    (``rectanglelabels``) a box prompt (the last one wins).
    """
    items = [
        r
        for r in (context or {}).get("result") or []
        if r.get("type") in ("keypointlabels", "rectanglelabels")
    ]
    if not items:
        return None
    to_names = {r.get("to_name") for r in items}
    if len(to_names) != 1:
        raise ContextError(f"context clicks on several images {sorted(map(str, to_names))}")
    points, labels, box, label = [], [], None, None
    try:
        width, height = int(items[0]["original_width"]), int(items[0]["original_height"])
        for r in items:
            v = r["value"]
            x, y = float(v["x"]) * width / 100, float(v["y"]) * height / 100
            label = (v.get(r["type"]) or [label])[0]
            if r["type"] == "keypointlabels":
                points.append([x, y])
                labels.append(1 if r.get("is_positive", True) else 0)
            else:
                w, h = float(v["width"]) * width / 100, float(v["height"]) * height / 100
                box = np.array([x, y, x + w, y + h])
    except (KeyError, TypeError, ValueError) as e:
        raise ContextError(
            f"context result without {e}: need original_width/height and value "
            "x, y (and width, height for a rectangle)"
        ) from e
    if width <= 0 or height <= 0:
        raise ContextError(f"context original size {width}x{height} is not positive")
    return to_names.pop(), Prompts(
        width=width,
        height=height,
        points=np.array(points, np.float64).reshape(-1, 2),
        point_labels=np.array(labels, np.int64),
        box_xyxy=box,
        label=label,
    )


def interactive_prediction(
    mask: np.ndarray,
    score: float,
    *,
    controls: list[Control],
    label: str | None,
    model_version: str,
) -> dict[str, Any]:
    """The smart tool's answer: the mask as a brush region (or polygon) with the chosen label.

    The label is the one clicked when the control offers it, else the control's first label.
    """
    height, width = mask.shape
    found = Found(
        width=width,
        height=height,
        boxes_xywh=np.zeros((1, 4)),
        scores=np.array([score]),
        names=["_"],
        masks=mask[None],
    )
    results = []
    for control in controls:
        chosen = label if label in control.labels else (control.labels or ("",))[0]
        value = region_value(control, found, 0)
        if value is not None:
            results.append(
                region(
                    control,
                    value=value,
                    label=chosen,
                    score=score,
                    width=width,
                    height=height,
                    region_id="smart0",
                )
            )
    return prediction(results, model_version=model_version)
