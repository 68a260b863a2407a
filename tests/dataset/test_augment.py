"""Augmentation policy from dataset facts, and boxes/masks staying aligned under transforms."""

from __future__ import annotations

import numpy as np
import pytest

from teacher.core.errors import TeacherError
from teacher.core.params import AugmentParams
from teacher.dataset.augment import build_transform, resolve_policy

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
