"""Training augmentation (albumentations) that keeps boxes and masks aligned.

:func:`resolve_policy` turns the ``augment`` params section and the dataset facts of
``data/inspect.json`` into a concrete policy (plain dict, recorded in the stage's metrics,
with the reasons for each choice). :func:`build_transform` makes the albumentations pipeline:
horizontal flip, scale jitter on a fixed canvas (zoom in / out around the centre, so it
survives the model's own resize), random crop from the borders, colour jitter. Boxes are COCO
xywh pixels, clipped to the image; which clipped boxes are kept is a :class:`BoxFilter`:
:data:`REFERENCE_BOXES` for Grounding DINO (every box with positive area, as its references),
:data:`VISIBLE_BOXES` by default (at least 30 % of the box visible, 1 px wide and high).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np

from teacher.core.errors import TeacherError
from teacher.core.params import AugmentParams

KNOBS = ("hflip", "scale_min", "scale_max", "crop", "color_jitter")
NONE = {"hflip": 0.0, "scale_min": 1.0, "scale_max": 1.0, "crop": 0.0, "color_jitter": 0.0}
AUTO = {"hflip": 0.5, "scale_min": 0.75, "scale_max": 1.25, "crop": 0.3, "color_jitter": 0.2}
WIDE_SCALE = (0.5, 1.5)  # when object sizes vary widely
SMALL_DOMINATE = 0.5  # fraction of COCO-small objects above which downscaling is off
WIDE_SPREAD = 100.0  # p95 / p05 of relative box area above which sizes "vary widely"
MIN_VISIBILITY = 0.3  # VISIBLE_BOXES: fraction of a box's area that must survive a crop
CROP_MAX = 0.2  # largest fraction of each side a crop removes
LABEL_FIELDS = ["labels", "ann_index"]


@dataclass(frozen=True)
class BoxFilter:
    """Which boxes survive a geometric step (crop, zoom): each is clipped to the image first."""

    min_visibility: float  # share of the box's area that must stay inside the image
    min_side: float  # px: narrower or shorter clipped boxes are dropped


# Grounding DINO, as both references: every clipped box with positive area is kept
# (Open-GroundingDino datasets/transforms.py crop(): x2 > x1 and y2 > y1; MMDetection RandomCrop
# keeps boxes inside the crop, then FilterAnnotations(min_gt_bbox_wh=(1e-2, 1e-2)): its 0.01 px
# here, so that a box cut to nothing goes). A detector's loss treats every unmatched query as
# background: a dropped box's visible fragment would be trained as "no object".
REFERENCE_BOXES = BoxFilter(min_visibility=0.0, min_side=1e-2)
# The default (SAM and the student): a box at least 30 % visible and 1 px wide and high. For SAM
# a dropped instance is one prompt fewer, never background (its loss is per prompt), and a
# prompt on a sliver of an object is one no labeler gives.
VISIBLE_BOXES = BoxFilter(min_visibility=MIN_VISIBILITY, min_side=1.0)


def resolve_policy(augment: AugmentParams, facts: dict[str, Any]) -> dict[str, Any]:
    """The concrete augmentation: ``{policy, hflip, scale_min, scale_max, crop, color_jitter, reasons}``.

    ``none``: nothing (explicit values ignored). ``manual``: the explicit values, unset ones off.
    ``auto``: derived from ``facts`` (``data/inspect.json``; missing keys mean "unknown" and
    keep the defaults), then every explicit (non-null) value overrides. ``reasons`` is a list
    of sentences saying why each non-default choice was made.
    """
    if augment.policy == "none":
        return {"policy": "none", **NONE, "reasons": ["augment.policy is none: no augmentation"]}
    if augment.policy == "manual":
        values, reasons = dict(NONE), ["augment.policy is manual: unset values are off"]
    else:
        values, reasons = _auto(facts)
    for knob in KNOBS:
        explicit = getattr(augment, knob)
        if explicit is not None:
            if augment.policy == "auto" and explicit != values[knob]:
                reasons.append(f"{knob}={explicit:g} from params (auto chose {values[knob]:g})")
            values[knob] = float(explicit)
    if values["scale_min"] > values["scale_max"]:
        raise TeacherError(
            f"params.yaml augment: scale_min {values['scale_min']:g} > scale_max "
            f"{values['scale_max']:g}; set scale_min <= scale_max"
        )
    return {"policy": augment.policy, **values, "reasons": reasons}


def _auto(facts: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    values, reasons = dict(AUTO), ["auto: flip 0.5, scale 0.75-1.25, crop 0.3, colour 0.2"]
    spread = _area_spread(facts)
    if spread is not None and spread > WIDE_SPREAD:
        values["scale_min"], values["scale_max"] = WIDE_SCALE
        reasons.append(
            f"object areas vary widely (p95/p05 = {spread:.0f} > {WIDE_SPREAD:g}): "
            f"scale {WIDE_SCALE[0]:g}-{WIDE_SCALE[1]:g}"
        )
    small = _small_fraction(facts)
    if small is not None and small > SMALL_DOMINATE:
        values["scale_min"] = 1.0
        reasons.append(f"small objects dominate ({small:.0%} < 32x32 px): no downscaling")
    if facts.get("grayscale") is True:
        values["color_jitter"] = 0.0
        reasons.append("images are grayscale: no colour jitter")
    return values, reasons


def _small_fraction(facts: dict[str, Any]) -> float | None:
    bins = (facts.get("object_size") or {}).get("coco") or {}
    total = sum(bins.get(k) or 0 for k in ("small", "medium", "large"))
    return (bins.get("small") or 0) / total if total else None


def _area_spread(facts: dict[str, Any]) -> float | None:
    rel = (facts.get("object_size") or {}).get("relative_area") or {}
    lo, hi = rel.get("p05"), rel.get("p95")
    return hi / lo if lo and hi and lo > 0 else None


def build_transform(
    policy: dict[str, Any], *, train: bool, boxes: BoxFilter = VISIBLE_BOXES
) -> A.Compose:
    """albumentations pipeline for ``policy`` (identity when ``train`` is False); ``boxes`` says
    which boxes a crop or zoom keeps.

    Call it as ``t(image=HxWx3 uint8, bboxes=(n, 4) COCO xywh px, labels=[...],
    ann_index=[...], masks=[HxW, ...] (optional))``; the result has ``image``, ``bboxes``
    (the surviving boxes, clipped to the image), ``labels`` / ``ann_index`` of the survivors
    (numbers: cast with int()),
    and ``masks`` (all input masks, transformed; pick survivors by ``ann_index``). Seed it per
    sample with ``t.set_random_seed(seed)``.
    """
    steps = _steps(policy) if train else []
    return A.Compose(steps or [A.NoOp()], bbox_params=bbox_params(boxes), seed=0)


def bbox_params(boxes: BoxFilter) -> A.BboxParams:
    """albumentations' box handling: COCO xywh, clipped to the image, filtered by ``boxes``."""
    return A.BboxParams(
        format="coco",
        label_fields=LABEL_FIELDS,
        min_visibility=boxes.min_visibility,
        min_width=boxes.min_side,
        min_height=boxes.min_side,
        clip=True,
        filter_invalid_bboxes=True,
    )


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: same (seed, epoch, index), same draws.

    The datasets draw each sample's augmentation seed (and SAM's prompt choice and box jitter)
    from it, so a sample's randomness does not depend on worker count or iteration order.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def _steps(policy: dict[str, Any]) -> list[A.BasicTransform]:
    steps: list[A.BasicTransform] = []
    if policy["hflip"] > 0:
        steps.append(A.HorizontalFlip(p=policy["hflip"]))
    if policy["scale_min"] != 1.0 or policy["scale_max"] != 1.0:
        steps.append(
            A.Affine(
                scale=(policy["scale_min"], policy["scale_max"]),
                keep_ratio=True,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    if policy["crop"] > 0:
        steps.append(
            A.RandomCropFromBorders(
                crop_left=CROP_MAX,
                crop_right=CROP_MAX,
                crop_top=CROP_MAX,
                crop_bottom=CROP_MAX,
                p=policy["crop"],
            )
        )
    if policy["color_jitter"] > 0:
        s = policy["color_jitter"]
        steps.append(
            A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4), p=0.8)
        )
    return steps
