import json
from collections import Counter

import pytest

from teacher.coco.io import dumps_coco
from teacher.core.errors import TeacherError
from teacher.dataset.splitting import assign_images, split_coco, split_sizes

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def dataset(n_images=40, rare=3, negatives=6):
    """Common classes everywhere; category 9 on only ``rare`` images; some negatives."""
    images = [
        {"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10}
        for i in range(1, n_images + 1)
    ]
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
    assert split_sizes(4, {"train": 1.0, "val": 0.0, "test": 0.0}) == {
        "train": 4,
        "val": 0,
        "test": 0,
    }


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
    b = {
        k: dumps_coco(v)
        for k, v in split_coco(json.loads(json.dumps(data)), fractions=FRACTIONS, seed=3).items()
    }
    c = {k: dumps_coco(v) for k, v in split_coco(data, fractions=FRACTIONS, seed=4).items()}
    assert a == b and a != c


@pytest.mark.parametrize(
    "fractions", [{"train": 0.8, "val": 0.2, "test": 0.0}, {"train": 1.0, "val": 0.0, "test": 0.0}]
)
def test_zero_fraction_split_is_empty(fractions):
    splits = split_coco(dataset(), fractions=fractions, seed=0)
    assert splits["test"]["images"] == [] and splits["test"]["categories"]


def test_split_sizes_at_least_one_per_nonzero_split_when_possible():
    # plain largest remainder would leave test (3 -> 2/1/0) or val and test (2 -> 2/0/0) empty
    assert split_sizes(3, FRACTIONS, at_least_one=True) == {"train": 1, "val": 1, "test": 1}
    assert split_sizes(4, FRACTIONS, at_least_one=True) == {"train": 2, "val": 1, "test": 1}
    assert split_sizes(2, FRACTIONS, at_least_one=True) == {
        "train": 1,
        "val": 1,
        "test": 0,
    }  # refused
    assert split_sizes(3, {"train": 0.9, "val": 0.1, "test": 0.0}, at_least_one=True) == {
        "train": 2,
        "val": 1,
        "test": 0,
    }
    assert split_sizes(4, FRACTIONS) == {"train": 3, "val": 1, "test": 0}  # negatives: plain shares
    assert split_sizes(10, FRACTIONS, at_least_one=True) == split_sizes(10, FRACTIONS)


def test_three_annotated_images_fill_every_split():
    splits = split_coco(dataset(n_images=5, rare=0, negatives=2), fractions=FRACTIONS, seed=0)
    assert all(s["annotations"] for s in splits.values())


@pytest.mark.parametrize("n_images, negatives", [(1, 0), (2, 0), (4, 2), (3, 3)])
def test_too_few_annotated_images_is_an_error_naming_count_and_fix(n_images, negatives):
    with pytest.raises(TeacherError) as e:
        split_coco(
            dataset(n_images=n_images, rare=0, negatives=negatives), fractions=FRACTIONS, seed=0
        )
    msg = str(e.value)
    assert f"{n_images - negatives} image(s) with annotations ({n_images} images in all)" in msg
    assert "Add annotated images" in msg and "at least 3" in msg
    # fewer splits need fewer images
    split_coco(
        dataset(n_images=2, rare=0, negatives=0),
        fractions={"train": 0.5, "val": 0.5, "test": 0.0},
        seed=0,
    )


@pytest.mark.parametrize("seed", range(8))
def test_few_masks_reach_every_split(seed):
    """A mostly-box dataset with masks on 3 images: one in each split (SAM trains, validates
    and is scored); crowd masks do not count."""
    data = dataset()
    for ann in data["annotations"]:
        ann["segmentation"] = []
    masked = [a for a in data["annotations"] if a["category_id"] == 3][:3]
    for ann in masked:
        ann["segmentation"] = [[0, 0, 5, 0, 5, 5]]
    crowd = data["annotations"][-1]
    crowd.update(segmentation={"counts": [0, 10], "size": [10, 10]}, iscrowd=1)
    splits = split_coco(data, fractions=FRACTIONS, seed=seed)
    for s in splits.values():
        assert [a for a in s["annotations"] if a["segmentation"] and not a.get("iscrowd")]
