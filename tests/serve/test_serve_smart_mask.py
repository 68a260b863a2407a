"""The smart tool's mask (teacher.serve.teachers.sam_mask) against segment-anything's own
SamPredictor: the best of three candidates for one prompt, the single mask for several."""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamPredictor

from teacher.sam.build import build_tiny_random
from teacher.sam.predictor import prepare_image
from teacher.serve.protocol import Prompts
from teacher.serve.teachers import sam_mask


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
    image[10:30, 12:40] = (220, 40, 40)
    sam = build_tiny_random().eval()
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return image, sam, prepare_image(sam, image), predictor


CASES = {
    "one click": (np.array([[20.0, 18.0]]), np.array([1]), None),
    "two clicks": (np.array([[20.0, 18.0], [50.0, 40.0]]), np.array([1, 0]), None),
    "click and box": (np.array([[20.0, 18.0]]), np.array([1]), np.array([10.0, 8.0, 42.0, 32.0])),
    "box alone": (
        np.zeros((0, 2)),
        np.zeros((0,), dtype=np.int64),
        np.array([10.0, 8.0, 42.0, 32.0]),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_smart_mask_is_sam_predictors_for_one_or_several_prompts(scene, case):
    image, _, prepared, predictor = scene
    points, labels, box = CASES[case]
    h, w = image.shape[:2]
    mask, score = sam_mask(
        scene[1],
        prepared,
        Prompts(width=w, height=h, points=points, point_labels=labels, box_xyxy=box, label=None),
    )
    single = len(points) + (box is not None) == 1
    ref, ref_scores, _ = predictor.predict(
        point_coords=points if len(points) else None,
        point_labels=labels if len(points) else None,
        box=box,
        multimask_output=single,
    )
    best = int(ref_scores.argmax())
    assert (mask != ref[best]).mean() <= 1e-3
    assert score == pytest.approx(float(ref_scores[best]), rel=1e-4, abs=1e-5)
