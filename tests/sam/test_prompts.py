"""Point prompts: SAM's first click inside the mask, correction clicks from the error region,
their place in training (decoder-only included), and the click of ``mask/miou_point``, with
parity against segment-anything's own ``SamPredictor`` for click prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from test_sam import shapes  # noqa: F401  (the fixture: two images, a circle and a square each)

from teacher.core.params import LoraParams, SamParams
from teacher.sam import build as B
from teacher.sam import predictor as P
from teacher.sam import task as T
from teacher.sam.data import SamDataset, cache_sam_embeddings, collate_sam
from teacher.sam.geometry import SamGeometry
from teacher.sam.prompts import (
    NOT_A_POINT,
    choose_point_prompts,
    correction_points,
    farthest_from_boundary,
    sample_mask_points,
)
from teacher.sam.scoring import score_gt_points

DECODER_ATTN = "sam-decoder-attention"


def test_first_points_are_inside_their_masks_and_seeded():
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 4:9, 20:30] = True
    masks[1, 30:, :3] = True
    points, found = sample_mask_points(masks, rng=np.random.default_rng(0))
    assert found.tolist() == [True, True, False]  # an empty mask has no point: a box stays
    for (x, y), mask in zip(points[:2].long().tolist(), masks[:2], strict=True):
        assert mask[y, x]
    again, _ = sample_mask_points(masks, rng=np.random.default_rng(0))
    assert torch.equal(points, again)
    seen = {
        tuple(sample_mask_points(masks, rng=np.random.default_rng(s))[0][0].tolist())
        for s in range(8)
    }
    assert len(seen) > 1  # uniform over the mask, not its centre


def test_share_of_point_prompts():
    rng = np.random.default_rng(0)
    assert not choose_point_prompts(5, share=0.0, rng=rng).any()
    assert (
        rng.random() == np.random.default_rng(0).random()
    )  # share 0 draws nothing: boxes as before
    assert choose_point_prompts(5, share=1.0, rng=rng).all()
    assert 0.4 < choose_point_prompts(4000, share=0.5, rng=rng).mean() < 0.6


def test_correction_points_come_from_the_error_region():
    target = torch.zeros(4, 16, 16, dtype=torch.bool)
    pred = torch.zeros_like(target)
    target[0, 2:6, 2:6] = True  # missed entirely: a positive click on it
    pred[1, 8:12, 8:12] = True  # a false positive only: a negative click on it
    pred[1, 14:, 14:] = True  # ... and one in the padding, where no click can land
    target[2, 4:8, 4:8] = pred[2, 4:8, 4:8] = True  # right: an agreeing click inside
    for seed in range(20):
        points, labels = correction_points(
            pred, target, extent=(13, 13), scale=4.0, rng=np.random.default_rng(seed)
        )
        cells = ((points + 0.5) / 4 - 0.5).round().long()  # back to the low-res cell
        for i, ((col, row), label) in enumerate(zip(cells.tolist(), labels.tolist(), strict=True)):
            if i == 3:  # no target, no error: nothing to click
                assert label == NOT_A_POINT
                continue
            assert row < 13 and col < 13
            assert label == int(target[i, row, col])
            if i < 2:
                assert pred[i, row, col] != target[i, row, col]  # in the error region
        assert labels[:3].tolist() == [1, 0, 1]
    assert points.dtype == torch.float32 and points[0, 0] == pytest.approx(cells[0, 0] * 4 + 1.5)


def test_farthest_from_boundary_is_where_one_clicks():
    mask = np.zeros((20, 30), bool)
    mask[4:15, 5:26] = True  # 11 x 21: the centre row and column
    assert farthest_from_boundary(mask) == (15.0, 9.0)
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[6:14, 6:14] = False  # a hole: the click lands on the ring, never in the hole
    x, y = farthest_from_boundary(ring)
    assert ring[int(y), int(x)]
    edge = np.zeros((10, 10), bool)
    edge[:, :4] = True  # touches the image edge: the edge is a boundary
    assert farthest_from_boundary(edge)[0] in (1.0, 2.0)
    with pytest.raises(ValueError, match="empty"):
        farthest_from_boundary(np.zeros((4, 4), bool))


def test_dataset_point_prompts_lie_inside_their_masks_and_follow_the_seed(shapes):  # noqa: F811
    coco, root = shapes
    make = lambda seed: SamDataset(  # noqa: E731
        coco,
        root,
        geometry=SamGeometry(128),
        max_prompts=4,
        box_jitter=0.1,
        seed=seed,
        point_prompts=1.0,
    )
    item = make(0)[0]
    assert item["is_point"].all() and item["extent"] == (96, 128)
    for (x, y), mask in zip(item["points"].long().tolist(), item["masks"], strict=True):
        assert mask[y, x]
    again = make(0)[0]
    assert torch.equal(item["points"], again["points"]) and item["seed"] == again["seed"]
    assert not torch.equal(item["points"], make(1)[0]["points"])
    boxes_only = SamDataset(
        coco, root, geometry=SamGeometry(128), max_prompts=4, box_jitter=0.1, seed=0
    )
    assert not boxes_only[0]["is_point"].any()
    assert torch.equal(boxes_only[0]["boxes"], item["boxes"])  # the box jitter is unchanged


def _decoder_only(params: SamParams):
    return T.wrap_for_training(
        B.build_tiny_random(),
        sam_params=params,
        lora=LoraParams(dropout=0.0),
        activation_checkpointing=False,
    )


def test_point_prompts_train_the_decoder_on_cached_embeddings(shapes, tmp_path):  # noqa: F811
    coco, root = shapes
    params = SamParams(
        model=B.TINY_RANDOM, lora_targets=DECODER_ATTN, point_prompts=1.0, correction_points=1
    )
    model = _decoder_only(params)
    assert not T.encoder_trains(model)
    cache = cache_sam_embeddings(model, coco, root, tmp_path / "cache")
    ds = SamDataset(
        coco,
        root,
        geometry=SamGeometry(128),
        max_prompts=4,
        box_jitter=0.0,
        seed=0,
        point_prompts=1.0,
        embeddings=cache,
    )
    batch = collate_sam([ds[0], ds[1]])
    assert batch["images"] is None and all(p.all() for p in batch["is_point"])
    model.train()
    out = T.training_step(model, batch, sam_params=params)
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    lora_b = {n: g for n, g in grads.items() if "lora_B" in n}  # (A's grads are 0 while B is)
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())
    plain = SamDataset(
        coco,
        root,
        geometry=SamGeometry(128),
        max_prompts=4,
        box_jitter=0.0,
        seed=0,
        embeddings=cache,
    )
    boxes = T.training_step(model, collate_sam([plain[0], plain[1]]), sam_params=params)
    assert float(out["loss"]) != pytest.approx(float(boxes["loss"]))  # the clicks were used
    assert T.training_step(model, batch, sam_params=params)["loss"] == out["loss"]  # seeded


def test_rounds_add_a_correction_click_and_each_round_has_a_loss(shapes, monkeypatch):  # noqa: F811
    coco, root = shapes
    params = SamParams(
        model=B.TINY_RANDOM, lora_targets=DECODER_ATTN, point_prompts=0.5, correction_points=2
    )
    model = _decoder_only(params)
    items = (
        SamDataset(
            coco,
            root,
            geometry=SamGeometry(128),
            max_prompts=4,
            box_jitter=0.0,
            seed=s,
            point_prompts=0.5,
        )[0]
        for s in range(100)
    )  # the first seed whose image has both kinds of prompt
    item = next(it for it in items if 0 < int(it["is_point"].sum()) < len(it["is_point"]))
    calls = []
    real = T.decode_prompts

    def spy(sam, embedding, **kw):
        calls.append(kw)
        return real(sam, embedding, **kw)

    monkeypatch.setattr(T, "decode_prompts", spy)
    T.training_step(model, collate_sam([item]), sam_params=params)
    assert len(calls) == 2 * 3  # boxes and clicks, each: the first prompt + 2 corrections
    boxes, clicks = calls[:3], calls[3:]
    assert [c["multimask"] for c in clicks] == [True, False, False]  # SAM: 3 masks for 1 click
    assert [c["multimask"] for c in boxes] == [params.multimask, False, False]
    assert [None if c["points"] is None else c["points"].shape[1] for c in boxes] == [None, 1, 2]
    assert [c["points"].shape[1] for c in clicks] == [1, 2, 3]
    assert all(c["boxes"] is not None for c in boxes) and all(c["boxes"] is None for c in clicks)
    assert (clicks[0]["labels"] == 1).all()  # the first click is positive


@pytest.mark.parametrize("labels", [[1], [1, 0]])
def test_click_prompts_match_sam_predictor(shapes, labels):  # noqa: F811
    coco, root = shapes
    image = np.asarray(Image.open(root / "im0.png").convert("RGB"))
    sam = B.build_tiny_random()
    points = np.array([[[36.0, 40.0], [90.0, 30.0]], [[96.0, 40.0], [10.0, 10.0]]])[
        :, : len(labels)
    ]
    masks, scores = P.prepare_image(sam, image).predict_points(points, np.array([labels] * 2))
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    for k, (mask, score) in enumerate(zip(masks, scores, strict=True)):
        ref, ref_scores, _ = predictor.predict(
            point_coords=points[k], point_labels=np.array(labels), multimask_output=True
        )
        best = int(ref_scores.argmax())
        assert (mask != ref[best]).mean() <= 1e-3
        assert score == pytest.approx(ref_scores[best], rel=1e-5, abs=1e-6)


def test_score_gt_points_clicks_each_object_once(shapes, monkeypatch):  # noqa: F811
    from teacher.sam.data import sam_instances

    coco, root = shapes
    image = np.asarray(Image.open(root / "im0.png").convert("RGB"))
    prepared = P.prepare_image(B.build_tiny_random(), image)
    anns = sam_instances(coco)[1]
    seen = []
    real = P.PreparedImage.predict_points

    def spy(self, points_xy, labels, **kw):
        seen.append((points_xy, labels))
        return real(self, points_xy, labels, **kw)

    monkeypatch.setattr(P.PreparedImage, "predict_points", spy)
    ious = score_gt_points(prepared, anns)
    assert ious.shape == (2,) and ((0 <= ious) & (ious <= 1)).all()
    ((points, labels),) = seen
    assert points.shape == (2, 1, 2) and (labels == 1).all()
    assert points[0, 0].tolist() == pytest.approx([36, 40], abs=1)  # the circle's centre
