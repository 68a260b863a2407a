"""Augmentation policy from dataset facts, and boxes/masks staying aligned under transforms."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from teacher.core.errors import TeacherError
from teacher.core.params import AugmentParams
from teacher.dataset.augment import (
    REFERENCE_BOXES,
    VISIBLE_BOXES,
    bbox_params,
    build_transform,
    resolve_policy,
)

FACTS = {  # the shape of data/inspect.json (teacher.dataset.inspection)
    "grayscale": False,
    "object_size": {
        "coco": {"small": 10, "medium": 60, "large": 30},
        "relative_area": {"p05": 0.01, "p95": 0.3},
    },
}


def test_auto_defaults_and_explicit_override():
    p = resolve_policy(AugmentParams(), FACTS)
    assert (p["hflip"], p["scale_min"], p["scale_max"], p["color_jitter"]) == (0.5, 0.75, 1.25, 0.2)
    p = resolve_policy(AugmentParams(hflip=0.0, color_jitter=0.4), FACTS)
    assert p["hflip"] == 0.0 and p["color_jitter"] == 0.4
    assert any("hflip=0 from params" in r for r in p["reasons"])


def test_auto_follows_the_data():
    small = {"object_size": {"coco": {"small": 80, "medium": 15, "large": 5}}}
    assert resolve_policy(AugmentParams(), small)["scale_min"] == 1.0  # no downscaling
    gray = {**FACTS, "grayscale": True}
    p = resolve_policy(AugmentParams(), gray)
    assert p["color_jitter"] == 0.0 and any("grayscale" in r for r in p["reasons"])
    wide = {"object_size": {"relative_area": {"p05": 0.001, "p95": 0.5}}}
    assert (
        resolve_policy(AugmentParams(), wide)["scale_min"],
        resolve_policy(AugmentParams(), wide)["scale_max"],
    ) == (0.5, 1.5)
    # missing facts: defaults, no crash
    assert resolve_policy(AugmentParams(), {})["scale_min"] == 0.75


def test_none_and_manual():
    p = resolve_policy(AugmentParams(policy="none", hflip=1.0), FACTS)
    assert (p["hflip"], p["crop"], p["scale_min"], p["scale_max"], p["color_jitter"]) == (
        0,
        0,
        1,
        1,
        0,
    )
    p = resolve_policy(AugmentParams(policy="manual", crop=0.5), FACTS)
    assert p["crop"] == 0.5 and p["hflip"] == 0.0
    with pytest.raises(TeacherError, match="scale_min"):
        resolve_policy(AugmentParams(scale_min=2.0, scale_max=1.5), FACTS)


def scene(rng: np.random.Generator, h: int = 60, w: int = 80):
    """An image with 3 rectangles: their masks and COCO boxes (exact)."""
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    masks, boxes = [], []
    for _ in range(3):
        bw, bh = rng.integers(6, 30), rng.integers(6, 25)
        x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
        m = np.zeros((h, w), np.uint8)
        m[y : y + bh, x : x + bw] = 1
        masks.append(m)
        boxes.append([x, y, bw, bh])
    return image, masks, np.asarray(boxes, np.float64)


def mask_box(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], float)


@pytest.mark.parametrize("knob", ["hflip", "scale", "crop", "all"])
def test_boxes_and_masks_stay_aligned(knob):
    policy = {"hflip": 0.0, "scale_min": 1.0, "scale_max": 1.0, "crop": 0.0, "color_jitter": 0.0}
    policy |= {
        "hflip": {"hflip": 1.0},
        "scale": {"scale_min": 0.6, "scale_max": 1.6},
        "crop": {"crop": 1.0},
        "all": {"hflip": 0.5, "scale_min": 0.6, "scale_max": 1.6, "crop": 1.0, "color_jitter": 0.3},
    }[knob]
    t = build_transform(policy, train=True)
    rng = np.random.default_rng(0)
    dropped = 0
    for seed in range(20):
        image, masks, boxes = scene(rng)
        t.set_random_seed(seed)
        out = t(image=image, masks=masks, bboxes=boxes, labels=[7, 8, 9], ann_index=[0, 1, 2])
        assert out["image"].shape[2] == 3 and out["masks"][0].shape == out["image"].shape[:2]
        assert len(out["bboxes"]) == len(out["labels"]) == len(out["ann_index"])
        dropped += 3 - len(out["bboxes"])
        for box, label, i in zip(out["bboxes"], out["labels"], out["ann_index"], strict=True):
            i = int(i)  # label fields come back as numbers (ints may turn float): cast
            assert label == 7 + i
            np.testing.assert_allclose(mask_box(out["masks"][i]), box, atol=1.0)
    if knob == "hflip":
        assert dropped == 0


def test_cropped_away_boxes_are_dropped():
    image = np.zeros((100, 100, 3), np.uint8)
    t = build_transform(
        {"hflip": 0, "scale_min": 1.0, "scale_max": 1.0, "crop": 1.0, "color_jitter": 0}, train=True
    )
    seen_drop = False
    for seed in range(30):
        t.set_random_seed(seed)
        out = t(
            image=image,
            bboxes=np.array([[0.0, 0.0, 5.0, 5.0], [40.0, 40.0, 20.0, 20.0]]),
            labels=[0, 1],
            ann_index=[0, 1],
        )
        assert 1 in list(out["ann_index"])  # the central box always survives a 20% border crop
        seen_drop |= 0 not in list(out["ann_index"])
    assert seen_drop


def test_eval_transform_is_identity():
    image, masks, boxes = scene(np.random.default_rng(1))
    t = build_transform(resolve_policy(AugmentParams(), FACTS), train=False)
    out = t(image=image, masks=masks, bboxes=boxes, labels=[0, 1, 2], ann_index=[0, 1, 2])
    assert np.array_equal(out["image"], image)
    np.testing.assert_allclose(out["bboxes"], boxes, atol=1e-4)  # float32 round trip


def ogd_crop_boxes(boxes_xyxy: torch.Tensor, region: tuple[int, int, int, int]):
    """Open-GroundingDino ``datasets/transforms.py`` ``crop()``, its box part, transcribed:
    ``region`` = (top, left, height, width); boxes xyxy; a box is kept when its clipped area is
    positive."""
    i, j, h, w = region
    max_size = torch.as_tensor([w, h], dtype=torch.float32)
    cropped_boxes = boxes_xyxy - torch.as_tensor([j, i, j, i])
    cropped_boxes = torch.min(cropped_boxes.reshape(-1, 2, 2), max_size)
    cropped_boxes = cropped_boxes.clamp(min=0)
    keep = torch.all(cropped_boxes[:, 1, :] > cropped_boxes[:, 0, :], dim=1)
    return cropped_boxes.reshape(-1, 4)[keep], keep


def test_reference_boxes_keep_every_clipped_box_as_open_groundingdino():
    rng = np.random.default_rng(0)
    image = np.zeros((90, 120, 3), np.uint8)
    for _ in range(20):
        xy = rng.integers(-10, 110, (12, 2))
        wh = rng.integers(1, 40, (12, 2))
        boxes = np.concatenate([xy, wh], 1).astype(np.float64)
        inside = np.clip(boxes[:, :2], 0, [119, 89])  # COCO boxes start inside the image
        boxes = np.concatenate([inside, np.minimum(boxes[:, 2:], [120, 90] - inside)], 1)
        top, left = int(rng.integers(0, 40)), int(rng.integers(0, 60))
        h, w = int(rng.integers(20, 90 - top + 1)), int(rng.integers(20, 120 - left + 1))
        crop = A.Compose(
            [A.Crop(x_min=left, y_min=top, x_max=left + w, y_max=top + h)],
            bbox_params=bbox_params(REFERENCE_BOXES),
        )
        out = crop(image=image, bboxes=boxes, labels=list(range(12)), ann_index=list(range(12)))
        xyxy = torch.as_tensor(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1))
        want, keep = ogd_crop_boxes(xyxy.float(), (top, left, h, w))
        got = np.asarray(out["bboxes"], np.float64).reshape(-1, 4)
        assert [int(i) for i in out["ann_index"]] == np.flatnonzero(keep.numpy()).tolist()
        got_xyxy = np.concatenate([got[:, :2], got[:, :2] + got[:, 2:]], 1)
        np.testing.assert_allclose(got_xyxy, want.numpy(), atol=1e-3)


def test_visible_boxes_drop_a_box_mostly_cropped_away_and_reference_boxes_keep_it():
    image = np.zeros((100, 100, 3), np.uint8)
    box = np.array([[0.0, 40.0, 20.0, 20.0]])  # 10 % of it is left after the crop below
    for boxes, kept in ((VISIBLE_BOXES, 0), (REFERENCE_BOXES, 1)):
        crop = A.Compose(
            [A.Crop(x_min=18, y_min=0, x_max=100, y_max=100)], bbox_params=bbox_params(boxes)
        )
        out = crop(image=image, bboxes=box, labels=[0], ann_index=[0])
        assert len(out["bboxes"]) == kept
    default = build_transform(resolve_policy(AugmentParams(policy="none"), {}), train=True)
    assert default.processors["bboxes"].params.min_visibility == VISIBLE_BOXES.min_visibility
