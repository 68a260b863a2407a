"""Label Studio's prediction format, as pure functions over the teachers' detections.

A prediction of one task is ``{"result": [region, ...], "score": float, "model_version": str}``;
a region is ``{"id", "from_name", "to_name", "type", "original_width", "original_height",
"image_rotation", "score", "value"}`` with coordinates in percent of the image:
``rectanglelabels``: ``x, y, width, height, rotation`` (top-left corner);
``brushlabels``: ``format: "rle", rle: [bytes]`` (``teacher.serve.brush``);
``polygonlabels``: ``points: [[x, y], ...]``.

Every result has its own ``id``: Label Studio makes one region of the results that share an
``id`` (a region's extra results are its per-region labels), of the first result's type, so a
box and a mask under one id became one rectangle that dropped the mask's pixels and was saved as
a ``brushlabels`` result without ``rle``. The mask (or polygon) of a detection names its box in
``parentID``, Label Studio's link between regions: its region list shows the mask under its box,
and an annotation keeps the link.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from teacher.coco.images import resize_mask
from teacher.serve.brush import mask_to_rle
from teacher.serve.label_config import PREDICTED, Control, LabelConfig, match_labels

ROUND = 4  # decimals of percent coordinates and scores
CLICK_TYPES = ("keypointlabels", "rectanglelabels")  # smart-tool results that are SAM prompts
# Keypoints and rectangles in one smart-tool context. An annotator outlines one object with a
# few clicks; every point is a token of SAM's prompt encoder and decoder, and 10 000 of them
# took the server from 1.0 to 4.0 GB RSS on an 80x64 image.
MAX_CLICKS = 64
EDGE_SLACK = 0.01  # percent past the image's edge taken as the edge (Label Studio's rounding)


@dataclass
class Found:
    """The teachers' detections on one image, in pixels of the image file (its width, height:
    Label Studio's original size)."""

    width: int
    height: int
    boxes_xywh: np.ndarray  # (N, 4) COCO xywh, absolute pixels
    scores: np.ndarray  # (N,) float
    names: list[str]  # (N,) class names
    # (N, h, w) bool, when SAM ran, or a sequence of N masks made as they are read: (h, w) is
    # the file's size or, for an image decoded at the teachers' working size, smaller (a
    # brush gets the mask at the file's size, one at a time)
    masks: np.ndarray | Sequence[np.ndarray] | None = None


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
    parent_id: str | None = None,
) -> dict[str, Any]:
    """One Label Studio result of ``control`` (its label list filled with ``label``), linked to
    the region ``parent_id`` when given."""
    result = {
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
    return result if parent_id is None else {**result, "parentID": parent_id}


def region_value(control: Control, found: Found, i: int) -> dict | None:
    """The ``value`` of detection ``i`` for ``control``; None where it cannot say (no mask)."""
    if control.type == "rectanglelabels":
        return percent_rectangle(found.boxes_xywh[i], width=found.width, height=found.height)
    mask = None if found.masks is None else found.masks[i]
    if mask is None or not mask.any():
        return None
    if control.type == "brushlabels":  # Label Studio's brush is at the file's size
        return {"format": "rle", "rle": mask_to_rle(resize_mask(mask, (found.width, found.height)))}
    outline = mask_polygon(mask)  # percent of the mask's size: the same at any size
    if outline is None:
        return None
    return {
        "points": percent_points(outline, width=mask.shape[1], height=mask.shape[0]),
        "closed": True,
    }


def image_regions(
    found: Found, controls: list[Control], *, id_prefix: str
) -> tuple[list[dict], set[str]]:
    """Regions of one image's detections for the controls on it; and the unknown class names.

    Detection ``i`` gets the id ``<id_prefix><i>`` in the first control that has a region for it
    (the boxes, in the usual config) and ``<id_prefix><i>c<k>`` in the k-th control; each region
    after the first names that first one its ``parentID``.
    """
    results, unknown = [], set()
    first: dict[int, str] = {}  # detection -> the id of its first region
    for k, control in enumerate(controls):
        mapping, missing = match_labels(sorted(set(found.names)), control)
        unknown |= set(missing)
        for i, name in enumerate(found.names):
            value = region_value(control, found, i) if name in mapping else None
            if value is None:
                continue
            region_id = f"{id_prefix}{i}" if i not in first else f"{id_prefix}{i}c{k}"
            results.append(
                region(
                    control,
                    value=value,
                    label=mapping[name],
                    score=found.scores[i],
                    width=found.width,
                    height=found.height,
                    region_id=region_id,
                    parent_id=first.get(i),
                )
            )
            first.setdefault(i, region_id)
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


def context_prompts(context: Mapping[str, Any], config: LabelConfig) -> tuple[str, Prompts] | None:
    """The clicks in a ``context`` of Label Studio's smart tools: the image's ``to_name`` and the
    prompts; None when the context has no keypoint or rectangle.

    Keypoints (``keypointlabels``, ``is_positive``) become point prompts; a rectangle
    (``rectanglelabels``) a box prompt (the last one wins). ``ContextError`` for more than
    ``MAX_CLICKS`` clicks, clicks on several images, a size or coordinate that is not a finite
    number on the image, or a label that the clicked control of ``config`` does not offer.
    """
    results = (context or {}).get("result") if isinstance(context or {}, Mapping) else False
    if not isinstance(results, list | None):
        raise ContextError("expected {'result': [the smart tool's results]}")
    items = [
        (i, r)
        for i, r in enumerate(results or [])
        if isinstance(r, Mapping) and r.get("type") in CLICK_TYPES
    ]
    if not items:
        return None
    if len(items) > MAX_CLICKS:
        raise ContextError(
            f"{len(items)} keypoints and rectangles in one context; at most {MAX_CLICKS} "
            "(SAM outlines one object from a few clicks): undo some, or start a new region"
        )
    to_names = {r.get("to_name") for _, r in items}
    if len(to_names) != 1:
        raise ContextError(f"context clicks on several images {sorted(map(str, to_names))}")
    to_name = to_names.pop()
    if not isinstance(to_name, str):
        raise ContextError(f"to_name {to_name!r}: send the name of the <Image> clicked")
    clicks = [read_click(r, config, where=f"result[{i}] ({r['type']})") for i, r in items]
    sizes = {c.size for c in clicks}
    if len(sizes) != 1:
        raise ContextError(
            f"the clicks give several original sizes {sorted(sizes)} for one image; "
            "send original_width/height of the image as Label Studio shows it"
        )
    (width, height), labels = sizes.pop(), [c.label for c in clicks if c.label is not None]
    points = [c for c in clicks if c.kind == "keypointlabels"]
    boxes = [c.xyxy for c in clicks if c.kind == "rectanglelabels"]
    return to_name, Prompts(
        width=width,
        height=height,
        points=np.array([c.xyxy[:2] for c in points], np.float64).reshape(-1, 2),
        point_labels=np.array([int(c.positive) for c in points], np.int64),
        box_xyxy=np.array(boxes[-1]) if boxes else None,
        label=labels[-1] if labels else None,
    )


@dataclass(frozen=True)
class Click:
    """One smart-tool result, checked: where it is in pixels of the original image."""

    kind: str  # keypointlabels | rectanglelabels
    size: tuple[int, int]  # original width, height
    xyxy: tuple[float, ...]  # (x, y) of a keypoint, (x0, y0, x1, y1) of a rectangle; pixels
    positive: bool  # keypoints: a positive click (is_positive)
    label: str | None  # the label chosen, one of the clicked control's


def read_click(r: Mapping[str, Any], config: LabelConfig, *, where: str) -> Click:
    """A context result as a ``Click``; ``ContextError`` starting with ``where`` naming the field
    that is wrong and what to send instead."""
    size = tuple(_number(r, k, where=where) for k in ("original_width", "original_height"))
    if not all(v >= 1 and v.is_integer() for v in size):
        raise ContextError(f"{where}: original size {size} is not a positive whole number")
    value = r.get("value")
    if not isinstance(value, Mapping):
        raise ContextError(f"{where}: no value with x, y (percent of the image)")
    x, y = (_percent(value, k, where=where) for k in ("x", "y"))
    corners: tuple[float, ...] = (x, y)
    if r["type"] == "rectanglelabels":
        w, h = (_percent(value, k, where=where) for k in ("width", "height"))
        if x + w > 100 + EDGE_SLACK or y + h > 100 + EDGE_SLACK:
            raise ContextError(
                f"{where}: x + width = {x + w:g}, y + height = {y + h:g} leave the image: "
                "a rectangle's percent coordinates end at 100"
            )
        corners = (x, y, min(x + w, 100.0), min(y + h, 100.0))
    width, height = int(size[0]), int(size[1])
    scale = (width / 100, height / 100) * (len(corners) // 2)
    return Click(
        kind=r["type"],
        size=(width, height),
        xyxy=tuple(min(max(v, 0.0), 100.0) * s for v, s in zip(corners, scale, strict=True)),
        positive=bool(r.get("is_positive", True)),
        label=_click_label(r, value, config, where=where),
    )


def _number(mapping: Mapping[str, Any], key: str, *, where: str, field: str = "") -> float:
    """``mapping[key]`` as a finite float; ``ContextError`` naming ``field`` otherwise."""
    v = mapping.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ContextError(
            f"{where}: {field or key} = {v!r} is not a finite number; send it as Label Studio does"
        )
    return float(v)


def _percent(value: Mapping[str, Any], key: str, *, where: str) -> float:
    """``value[key]``, a percent coordinate or extent on the image (0..100)."""
    v = _number(value, key, where=where, field=f"value.{key}")
    if not -EDGE_SLACK <= v <= 100 + EDGE_SLACK:
        raise ContextError(
            f"{where}: value.{key} = {v:g} is off the image: coordinates are percent of the "
            "image, 0..100; click on the image"
        )
    return v


def _click_label(
    r: Mapping[str, Any], value: Mapping[str, Any], config: LabelConfig, *, where: str
) -> str | None:
    """The label the annotator chose, checked against the control ``from_name`` names; None
    when the result carries no label."""
    chosen = value.get(r["type"])
    if not chosen:
        return None
    control = next((c for c in config.of_type(r["type"]) if c.name == r.get("from_name")), None)
    names = [c.name for c in config.of_type(r["type"])]
    if control is None:
        raise ContextError(
            f"{where}: from_name {r.get('from_name')!r} names no {r['type']} control of the "
            f"labeling config ({names or 'none'}); send the config the clicks were made with"
        )
    label = chosen[0] if isinstance(chosen, list) else chosen
    if label not in control.labels:
        raise ContextError(
            f"{where}: label {label!r} is not a label of {control.name!r} "
            f"({list(control.labels)}); add it to the labeling config or pick one of those"
        )
    return label


def interactive_prediction(
    mask: np.ndarray,
    score: float,
    *,
    controls: list[Control],
    label: str | None,
    model_version: str,
    id_prefix: str,
) -> dict[str, Any]:
    """The smart tool's answer: the mask as a brush region (or polygon) with the chosen label.

    The label is the one clicked when the control offers it, else the control's first label.
    Region ids are ``<id_prefix><k>`` for the k-th control: the prefix must differ from one
    answer to the next, as Label Studio puts an accepted answer in place of the region of the
    same id (a second click would replace the first object's mask).
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
    results: list[dict[str, Any]] = []
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
                    region_id=f"{id_prefix}{len(results)}",
                )
            )
    return prediction(results, model_version=model_version)
