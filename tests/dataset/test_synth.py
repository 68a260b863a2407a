"""teacher.dataset.synth: the seeded synthetic world (pure functions, small images, fast)."""

import numpy as np
import pytest

from teacher.coco.io import annotation_mask, coco_format_problem
from teacher.dataset import synth


@pytest.fixture(scope="module")
def worlds():
    return {
        name: synth.make_dataset(world, n_images=24, seed=3) for name, world in synth.WORLDS.items()
    }


def test_same_seed_same_dataset():
    a, pa = synth.make_dataset(synth.FINETUNE, n_images=4, seed=7)
    b, pb = synth.make_dataset(synth.FINETUNE, n_images=4, seed=7)
    c, _ = synth.make_dataset(synth.FINETUNE, n_images=4, seed=8)
    assert a == b and all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert a != c


def test_valid_coco_with_both_mask_kinds(worlds):
    for name, (coco, pixels) in worlds.items():
        assert coco_format_problem(coco) is None, name
        kinds = {type(a["segmentation"]).__name__ for a in coco["annotations"]}
        assert kinds == {"list", "dict"}, name  # polygons (whole shapes) and RLE (occluded, rings)
        assert any(a["attributes"]["occluded"] for a in coco["annotations"])
        for info, img in zip(coco["images"], pixels, strict=True):
            assert img.shape == (info["height"], info["width"], 3) and img.dtype == np.uint8


def test_masks_match_boxes_and_areas(worlds):
    coco, _ = worlds["pretrain"]
    sizes = {i["id"]: (i["height"], i["width"]) for i in coco["images"]}
    for ann in coco["annotations"][:40]:
        mask = annotation_mask(ann, *sizes[ann["image_id"]])
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
        assert abs(xs.max() + 1 - (x + w)) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
        assert abs(mask.sum() - ann["area"]) <= 0.1 * ann["area"] + 8  # polygon vs PIL raster


def test_domains_differ_in_names_and_appearance(worlds):
    names = {n: {c["name"] for c in coco["categories"]} for n, (coco, _) in worlds.items()}
    assert not names["pretrain"] & names["finetune"]
    assert names["finetune"] == {"circle", "square", "triangle", "star"}  # the bundled sample's
    roughness = {
        n: np.mean([np.abs(np.diff(p.astype(float), axis=1)).mean() for p in px])
        for n, (_, px) in worlds.items()
    }
    assert roughness["finetune"] > 2 * roughness["pretrain"]  # noise, textures, busy backgrounds


def test_visible_masks_are_disjoint():
    rng = np.random.default_rng(0)
    objects = synth.place_objects(rng, synth.PRETRAIN, 96, 96)
    visible = synth.visible_masks(objects)
    total = np.sum([v.astype(int) for v in visible], axis=0)
    assert total.max() <= 1
    assert np.array_equal(visible[-1], objects[-1]["mask"])  # painted last: nothing covers it


def test_every_shape_draws():
    for kind in synth.SHAPES:
        mask = synth.shape_mask(kind, 32, 32, 20, 0.3, width=64, height=64)
        assert 100 < mask.sum() < 64 * 64, kind
    ring = synth.shape_mask("ring", 32, 32, 20, 0.0, width=64, height=64)
    assert not ring[32, 32]  # a hole in the middle


def test_save_dataset(tmp_path):
    coco, pixels = synth.make_dataset(synth.PRETRAIN, n_images=2, seed=0)
    path = synth.save_dataset(coco, pixels, tmp_path)
    assert path.is_file() and len(list((tmp_path / "images").glob("*.png"))) == 2
