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


@pytest.fixture(scope="module")
def scene2():
    from teacher.sam.build import build_tiny_random_sam2

    image = np.random.default_rng(0).integers(0, 60, (48, 64, 3), dtype=np.uint8)
    image[10:30, 12:40] = (220, 40, 40)
    sam = build_tiny_random_sam2()
    return image, sam, prepare_image(sam, image)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sam2_smart_mask_is_transformers_sam2_path(scene2, case):
    """SAM 2's smart-tool mask equals Sam2Processor + Sam2Model + post_process_masks, with the
    same one-prompt (best of three) / several-prompts (single mask) rule."""
    import torch
    from transformers import Sam2ImageProcessor, Sam2Processor

    image, sam, prepared = scene2
    points, labels, box = CASES[case]
    h, w = image.shape[:2]
    mask, score = sam_mask(
        sam,
        prepared,
        Prompts(width=w, height=h, points=points, point_labels=labels, box_xyxy=box, label=None),
    )
    single = len(points) + (box is not None) == 1
    processor = Sam2Processor(Sam2ImageProcessor(size={"height": 128, "width": 128}))
    inputs = processor(
        images=image,
        input_points=[[points.tolist()]] if len(points) else None,
        input_labels=[[labels.tolist()]] if len(points) else None,
        input_boxes=[[box.tolist()]] if box is not None else None,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = sam(
            **{k: v for k, v in inputs.items() if k != "original_sizes"}, multimask_output=single
        )
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0][0]
    best = int(out.iou_scores[0, 0].argmax())
    assert (mask != masks[best].numpy()).mean() <= 1e-3
    assert score == pytest.approx(float(out.iou_scores[0, 0, best]), rel=1e-4, abs=1e-5)
