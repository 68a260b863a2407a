import numpy as np
from PIL import Image

from teacher.coco.io import mask_to_uncompressed_rle
from teacher.dataset.inspection import color_facts, dataset_facts, inspect_dataset


def small_coco():
    crowd = np.zeros((40, 60), bool)
    crowd[5:10, 5:10] = True
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 60, "height": 40},
            {"id": 2, "file_name": "b.png", "width": 200, "height": 100},
            {"id": 3, "file_name": "c.png"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 0,
                "bbox": [0, 0, 10, 10],
                "area": 100,
                "segmentation": [[0, 0, 10, 0, 10, 10]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 0,
                "bbox": [0, 0, 40, 30],
                "segmentation": {"size": [40, 60], "counts": "PP0"},
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 5,
                "bbox": [0, 0, 100, 100],
                "segmentation": [],
            },
            {
                "id": 4,
                "image_id": 1,
                "category_id": 0,
                "iscrowd": 1,
                "bbox": [5, 5, 5, 5],
                "segmentation": mask_to_uncompressed_rle(crowd),
            },
        ],
        "categories": [
            {"id": 0, "name": "cat"},
            {"id": 5, "name": "dog"},
            {"id": 9, "name": "bird"},
        ],
    }


def test_counts_categories_and_kinds():
    f = dataset_facts(small_coco())
    assert f["format_error"] is None
    assert f["counts"] == {
        "images": 3,
        "annotations": 4,
        "categories": 3,
        "crowd": 1,
        "images_without_annotations": 1,
    }
    assert f["categories"] == [
        {"id": 0, "name": "cat", "instances": 3, "images": 1},
        {"id": 5, "name": "dog", "instances": 1, "images": 1},
        {"id": 9, "name": "bird", "instances": 0, "images": 0},
    ]
    assert f["annotation_kinds"] == {
        "bbox": 4,
        "polygon": 1,
        "rle_compressed": 1,
        "rle_uncompressed": 1,
        "none": 1,
        "invalid": 0,
        "crowd": 1,
    }
    assert f["images_without_annotations"] == {"count": 1, "ids": [3]}


def test_sizes():
    f = dataset_facts(small_coco())
    assert f["image_size"]["missing"] == 1 and f["image_size"]["width"]["max"] == 200
    # crowd excluded; areas 100 (small), 1200 (medium, no area key: box), 10000 (large)
    assert f["object_size"]["coco"] == {"small": 1, "medium": 1, "large": 1}
    rel = f["object_size"]["relative_area"]
    assert rel["min"] == 100 / 2400 and rel["max"] == 0.5 and rel["p50"] == 1200 / 2400


def test_teachers():
    f = dataset_facts(small_coco())
    assert f["teachers"]["dino"] and f["teachers"]["sam"]
    boxes_only = small_coco()
    for a in boxes_only["annotations"]:
        a["segmentation"] = []
    t = dataset_facts(boxes_only)["teachers"]
    assert t["dino"] and not t["sam"] and "SAM needs instance masks" in t["reasons"]["sam"]
    t = dataset_facts({**boxes_only, "categories": []})["teachers"]
    assert not t["dino"] and "no categories" in t["reasons"]["dino"]


def test_never_crashes_on_malformed_input():
    for junk in (
        None,
        [],
        "x",
        {"images": "nope"},
        {"images": [1, {"id": []}], "annotations": [{"bbox": "x", "segmentation": {"counts": 1}}]},
    ):
        f = dataset_facts(junk)
        assert f["format_error"] and f["counts"]["images"] <= 2
    assert inspect_dataset([], image_root=None)["grayscale"] is None


def test_color_facts(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "g.png")
    Image.new("RGB", (8, 8), (100, 100, 100)).save(tmp_path / "g3.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "c.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    gray = [
        {"file_name": "g.png"},
        {"file_name": "g3.png"},
        {"file_name": "nope.png"},
        {"file_name": "bad.png"},
        {"file_name": "../x.png"},
    ]
    f = color_facts(gray, tmp_path)
    assert f["grayscale"] is True
    assert f["color"] == {"sampled": 2, "grayscale": 2, "missing": 2, "unreadable": 1}
    assert color_facts([*gray, {"file_name": "c.png"}], tmp_path)["grayscale"] is False
    assert color_facts(gray, None)["grayscale"] is None
