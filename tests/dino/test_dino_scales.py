"""Multi-scale training (teacher.dino.scales) against the references' transforms.

The reference side is transcribed here from Open-GroundingDino (``datasets/odvg.py``
``make_coco_transforms``, ``datasets/transforms.py`` ``resize`` / ``RandomSizeCrop`` / ``crop``)
and MM-Grounding-DINO's configs (``configs/mm_grounding_dino/*``, ``RandomCrop`` with
``crop_type='absolute_range'``).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from fake_adapters import write_tiny_coco

from teacher.core.params import DinoParams
from teacher.dino.data import DinoDataset, collate_dino
from teacher.dino.labels import build_label_map
from teacher.dino.model import load_dino
from teacher.dino.scales import apply_scale, crop_boxes, crop_window, train_scales

# Open-GroundingDino cfg_odvg.py / odvg.py make_coco_transforms, as written there
OGD_SCALES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
OGD_MAX_SIZE = 1333
OGD_SCALES2_RESIZE = [400, 500, 600]
OGD_SCALES2_CROP = [384, 600]


def ogd_overlap(sizes, overlap):
    """odvg.py ``data_aug_scale_overlap``: every size multiplied, truncated."""
    return [int(i * overlap) for i in sizes]


def ogd_size_with_aspect_ratio(image_size, size, max_size=None):
    """transforms.py ``resize.get_size_with_aspect_ratio``; ``image_size`` (w, h) -> (h, w)."""
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


def ogd_crop_boxes(boxes_xyxy, region):
    """transforms.py ``crop()``, its box part: ``region`` (top, left, height, width)."""
    i, j, h, w = region
    max_size = torch.as_tensor([w, h], dtype=torch.float32)
    cropped = boxes_xyxy - torch.as_tensor([j, i, j, i])
    cropped = torch.min(cropped.reshape(-1, 2, 2), max_size).clamp(min=0)
    keep = torch.all(cropped[:, 1, :] > cropped[:, 0, :], dim=1)
    return cropped.reshape(-1, 4)[keep], keep


def test_sizes_are_the_references_at_800_and_scale_as_data_aug_scale_overlap():
    at_800 = train_scales(DinoParams())
    assert at_800 is not None
    assert list(at_800.edges) == OGD_SCALES and at_800.longest_edge == OGD_MAX_SIZE
    assert list(at_800.crop_edges) == OGD_SCALES2_RESIZE
    assert list(at_800.crop_sides) == OGD_SCALES2_CROP
    assert at_800.crop == 0.5  # RandomSelect(p=0.5) / RandomChoice of two
    tiny = train_scales(DinoParams(shortest_edge=128, longest_edge=160))
    assert tiny is not None
    overlap = 128 / 800
    assert list(tiny.edges) == ogd_overlap(OGD_SCALES, overlap)  # 76 ... 128
    assert list(tiny.crop_edges) == ogd_overlap(OGD_SCALES2_RESIZE, overlap)
    assert list(tiny.crop_sides) == ogd_overlap(OGD_SCALES2_CROP, overlap)
    assert train_scales(DinoParams(train_scale_min=0.8)).edges[0] == 640
    assert train_scales(DinoParams(train_scale_min=1.0, train_crop=0.0)) is None  # one size
    assert train_scales(DinoParams(train_scale_min=1.0)).edges == (800,)  # crop only


def test_crop_boxes_equal_open_groundingdinos_crop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        xy = rng.uniform(0, 100, (10, 2))
        boxes = np.concatenate([xy, rng.uniform(0.5, 40, (10, 2))], 1).astype(np.float32)
        window = (int(rng.integers(0, 60)), int(rng.integers(0, 60)), 40, 30)  # x, y, w, h
        got, keep = crop_boxes(boxes, window)
        xyxy = torch.as_tensor(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1))
        x, y, w, h = window
        want, want_keep = ogd_crop_boxes(xyxy, (y, x, h, w))
        assert keep.tolist() == want_keep.tolist()
        np.testing.assert_allclose(got[:, :2], want[:, :2].numpy(), atol=1e-4)
        np.testing.assert_allclose(got[:, :2] + got[:, 2:], want[:, 2:].numpy(), atol=1e-4)


@pytest.mark.parametrize("shape", [(480, 640), (640, 427), (300, 1000), (200, 150)])
def test_crop_window_is_the_references_resize_then_crop_mapped_back(shape):
    """Open-GroundingDino resizes to the crop edge, cuts ``RandomSizeCrop``'s window and resizes
    again; our window, cut at the image's own resolution, holds the same part of the image
    (within a pixel of rounding) and so the same normalised boxes."""
    height, width = shape
    for seed in range(20):
        edge = OGD_SCALES2_RESIZE[seed % 3]
        window = crop_window(
            height, width, edge=edge, sides=(384, 600), rng=np.random.default_rng(seed)
        )
        # the reference, fed the same draws (sizes first, then the offset: MMDetection's order)
        rng = np.random.default_rng(seed)
        rh, rw = ogd_size_with_aspect_ratio((width, height), edge)  # RandomResize, no max_size
        ch = int(rng.integers(min(rh, 384), min(rh, 600) + 1))  # absolute_range
        cw = int(rng.integers(min(rw, 384), min(rw, 600) + 1))
        top, left = int(rng.integers(0, rh - ch + 1)), int(rng.integers(0, rw - cw + 1))
        # the window in the image's own pixels, as the share of each side it keeps
        x, y, w, h = window
        np.testing.assert_allclose(
            [x / width, y / height, (x + w) / width, (y + h) / height],
            [left / rw, top / rh, (left + cw) / rw, (top + ch) / rh],
            atol=1.0 / min(height, width) + 1e-9,
        )


def test_items_draw_their_size_reproducibly_and_batch_at_their_own_sizes(tmp_path):
    coco = write_tiny_coco(tmp_path, n_images=4, size=(48, 64))
    dino = DinoParams(model="tiny-random", shortest_edge=96, longest_edge=120, train_crop=0.5)
    scales = train_scales(dino)
    assert scales is not None
    bundle = load_dino(dino)
    lm = build_label_map(coco["categories"], tokenizer=bundle.processor.tokenizer)
    ds = DinoDataset(coco, tmp_path, label_map=lm, seed=3, scales=scales)
    again = DinoDataset(coco, tmp_path, label_map=lm, seed=3, scales=scales)
    edges = [ds[i]["shortest_edge"] for i in range(4)]
    assert edges == [again[i]["shortest_edge"] for i in range(4)]
    assert set(edges) <= set(scales.edges)
    later = []
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        later.append([ds[i]["shortest_edge"] for i in range(4)])
    assert any(e != edges for e in later)  # a new draw each epoch
    items = [ds[i] for i in range(4)]
    batch = collate_dino(items, processor=bundle.processor, label_map=lm, num_queries=64)
    for item, mask in zip(items, batch["pixel_mask"], strict=True):
        h, w = item["image"].shape[:2]
        want = ogd_size_with_aspect_ratio((w, h), item["shortest_edge"], dino.longest_edge)
        assert (int(mask.any(1).sum()), int(mask.any(0).sum())) == want
    assert batch["pixel_values"].shape[-2:] == batch["pixel_mask"].shape[-2:]


def test_the_crop_branch_runs_at_its_probability_and_sizes_are_uniform():
    scales = train_scales(DinoParams(shortest_edge=128, longest_edge=160))
    image = np.zeros((150, 200, 3), np.uint8)
    boxes = np.array([[10.0, 10.0, 50.0, 40.0], [120.0, 100.0, 60.0, 40.0]], np.float32)
    crops, edges = 0, []
    for seed in range(2000):
        out, kept, labels, edge = apply_scale(
            scales, image, boxes, np.array([0, 1]), rng=np.random.default_rng(seed)
        )
        crops += out.shape != image.shape
        edges.append(edge)
        assert len(kept) == len(labels) and (kept[:, 2:] > 0).all()
    assert 0.45 < crops / 2000 < 0.55
    counts = np.bincount([scales.edges.index(e) for e in edges], minlength=len(scales.edges))
    assert counts.min() > 2000 / len(scales.edges) * 0.7


def test_one_size_and_no_crop_is_the_processors_own_resize(tmp_path):
    coco = write_tiny_coco(tmp_path, n_images=2)
    dino = DinoParams(model="tiny-random", shortest_edge=96, longest_edge=120)
    off = dataclasses.replace(dino, train_scale_min=1.0, train_crop=0.0)
    bundle = load_dino(dino)
    lm = build_label_map(coco["categories"], tokenizer=bundle.processor.tokenizer)
    collate = partial(collate_dino, processor=bundle.processor, label_map=lm, num_queries=64)
    plain = DinoDataset(coco, tmp_path, label_map=lm, seed=0, scales=train_scales(off))
    assert "shortest_edge" not in plain[0]
    at_own = DinoDataset(coco, tmp_path, label_map=lm, seed=0, scales=train_scales(dino))
    item = {**plain[0], "shortest_edge": 96}  # the processor's size, given per item
    a, b = collate([plain[0], plain[1]]), collate([item, plain[1]])
    # the processor's batch call and its per-item call: compared with a tolerance
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert torch.equal(a["pixel_mask"], b["pixel_mask"])
    assert at_own[0]["shortest_edge"] in train_scales(dino).edges
