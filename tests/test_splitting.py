import json
from collections import Counter

import pytest

from teacher.coco import dumps_coco
from teacher.splitting import assign_images, split_coco, split_sizes

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def dataset(n_images=40, rare=3, negatives=6):
    """Common classes everywhere; category 9 on only ``rare`` images; some negatives."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(1, n_images + 1)]
    anns = []
    for im in images[: n_images - negatives]:
        for c in (1, 2) if im["id"] % 2 else (2, 3):
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c})
    for im in images[:rare]:
        anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": 9})
    cats = [{"id": c, "name": str(c)} for c in (1, 2, 3, 9, 42)]
    return {"images": images, "annotations": anns, "categories": cats, "info": {"v": 1}}


def test_split_sizes_largest_remainder():
    assert split_sizes(10, FRACTIONS) == {"train": 7, "val": 2, "test": 1}
    assert sum(split_sizes(73, FRACTIONS).values()) == 73
    assert split_sizes(4, {"train": 1.0, "val": 0.0, "test": 0.0}) == {"train": 4, "val": 0, "test": 0}


def test_every_image_once_every_class_everywhere_full_categories():
    data = dataset()
    splits = split_coco(data, fractions=FRACTIONS, seed=0)
    ids = [im["id"] for s in splits.values() for im in s["images"]]
    assert sorted(ids) == list(range(1, 41))
    for s in splits.values():
        assert {a["category_id"] for a in s["annotations"]} == {1, 2, 3, 9}
        assert s["categories"] == data["categories"] and s["info"] == {"v": 1}
        own = {im["id"] for im in s["images"]}
        assert all(a["image_id"] in own for a in s["annotations"])
    sizes = {k: len(v["images"]) for k, v in splits.items()}
    assert sizes["train"] in (27, 28, 29) and sum(sizes.values()) == 40


def test_negatives_spread_proportionally():
    assign = assign_images(dataset(negatives=10), fractions=FRACTIONS, seed=1)
    neg = Counter(assign[i] for i in range(31, 41))
    assert neg == {"train": 7, "val": 2, "test": 1}


def test_category_on_fewer_than_3_images_cannot_be_everywhere():
    splits = split_coco(dataset(rare=2), fractions=FRACTIONS, seed=0)
    assert sum(9 in {a["category_id"] for a in s["annotations"]} for s in splits.values()) <= 2


def test_deterministic_and_seed_dependent():
    data = dataset()
    a = {k: dumps_coco(v) for k, v in split_coco(data, fractions=FRACTIONS, seed=3).items()}
    b = {k: dumps_coco(v) for k, v in split_coco(json.loads(json.dumps(data)), fractions=FRACTIONS, seed=3).items()}
    c = {k: dumps_coco(v) for k, v in split_coco(data, fractions=FRACTIONS, seed=4).items()}
    assert a == b and a != c


@pytest.mark.parametrize("fractions", [{"train": 0.8, "val": 0.2, "test": 0.0},
                                       {"train": 1.0, "val": 0.0, "test": 0.0}])
def test_zero_fraction_split_is_empty(fractions):
    splits = split_coco(dataset(), fractions=fractions, seed=0)
    assert splits["test"]["images"] == [] and splits["test"]["categories"]
