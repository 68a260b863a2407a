"""Conformance over ../shared/realworld: COCO files written by other projects (see its README).

inspect must describe every file without crashing; validate must pass the clean datasets
(image files checked where the images are there) and report each problem of the malformed
ones by rule and id. Skipped, with the reason shown, when the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from teacher.coco.io import CocoFormatError, read_json
from teacher.dataset.inspection import inspect_dataset
from teacher.dataset.splitting import split_coco
from teacher.dataset.validation.validator import validate_file

CLEAN = [  # (annotation file, image root or None when the images are not shipped)
    (
        "super-gradients/tests/data/tinycoco/annotations/instances_train2017.json",
        "super-gradients/tests/data/tinycoco/images/train2017",
    ),
    (
        "super-gradients/tests/data/tinycoco/annotations/instances_val2017.json",
        "super-gradients/tests/data/tinycoco/images/val2017",
    ),
    ("pycococreator/example_data/annotations/coco_example.json", None),
    ("review_object_detection_metrics/toyexample/gts_coco_format/toy_example_coco.JSON", None),
    (
        "review_object_detection_metrics/data/database/gts/coco_format_v1/instances_default.json",
        None,
    ),
    ("review_object_detection_metrics/data/database/gts/coco_format_v2/instances_v2.json", None),
    ("sahi/tests/data/coco_utils/terrain1_coco.json", None),
    ("sahi/tests/data/coco_utils/visdrone2019-det-train-first50image.json", None),
    ("datumaro/tests/assets/coco_dataset/coco_roboflow/train/_annotations.coco.json", None),
    ("datumaro/tests/assets/kaggle_dataset/relaxed_coco/annotations.json", None),
    ("faster_coco_eval/tests/dataset/cocoapi/instances_val2014_100.json", None),
    ("faster_coco_eval/tests/dataset/gt_dataset.json", None),
    ("faster_coco_eval/tests/dataset/gt_ignore_test.json", None),
]


def json_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() == ".json")


def image_root(path: Path, names: list) -> Path | None:
    """Where this export's file_names resolve, when the images are shipped."""
    for cand in (
        path.parent,
        path.parent / "images",
        path.parent.parent / "images",
        path.parent.parent,
    ):
        if names and all(isinstance(n, str) and (cand / n).is_file() for n in names):
            return cand
    return None


def findings(result) -> dict:
    return {f["rule"]: f["ids"] for f in result.findings}


def test_inspect_describes_every_json_file(realworld):
    described = 0
    for path in json_files(realworld):
        try:
            data = read_json(path)
        except CocoFormatError:
            continue
        facts = inspect_dataset(data, image_root=path.parent, sample=2)
        if facts["format_error"] is None:
            assert facts["counts"]["images"] == len(data["images"]), path
            assert facts["counts"]["annotations"] == len(data["annotations"]), path
            described += 1
    assert described >= 100  # 77 hotcoco fixtures + the datasets


@pytest.mark.parametrize("name, images", CLEAN, ids=[Path(c[0]).name for c in CLEAN])
def test_clean_datasets_validate(realworld, name, images):
    path = realworld / name
    names = [im.get("file_name") for im in read_json(path)["images"]]
    root = realworld / images if images else image_root(path, names)
    result = validate_file(path, images=root)
    assert result.ok, result.findings
    assert {f["severity"] for f in result.findings} <= {"fix", "warning"}
    if images:
        assert root.is_dir() and not findings(result).get("image_size_from_file")


def test_healthcheck_bad_reports_each_problem(realworld):
    r = validate_file(
        realworld / "hotcoco/crates/hotcoco/tests/fixtures/healthcheck_bad.json",
        images=None,
        on_error="drop",
    )
    f = findings(r)
    assert f["duplicate_image_id"] == [1] and f["duplicate_annotation_id"] == [1]
    assert f["invalid_image_size"] == [2] and f["unknown_image"] == [3]
    assert f["unknown_category"] == [4] and r.errors == 6
    assert [a["id"] for a in r.coco["annotations"]] == [1]
    # dropping 3 of 4 annotations (and 2 of 3 images) is more than validate.max_drop_fraction
    assert f["too_much_dropped"] == [None] and r.fatal


def test_mmdetection_wrong_format(realworld):
    r = validate_file(
        realworld / "mmdetection/tests/data/coco_wrong_format_sample.json", images=None
    )
    f = findings(r)
    assert f["duplicate_annotation_id"] == [1] and f["iscrowd_missing"] == [1] and r.errors == 1


def test_healthcheck_quality(realworld):
    r = validate_file(
        realworld / "hotcoco/crates/hotcoco/tests/fixtures/healthcheck_quality.json", images=None
    )
    f = findings(r)
    assert f["missing_geometry"] == [1] and f["bbox_clipped"] == [2, 4]


def test_quirks(realworld):
    # string image ids ("2299") become ints and references follow
    r = validate_file(realworld / "faster_coco_eval/tests/dataset/gt_ignore_test.json", images=None)
    assert r.counts["string_id"] >= 1 and all(
        isinstance(a["image_id"], int) for a in r.coco["annotations"]
    )
    # category id 0 kept as is
    toy = (
        realworld
        / "review_object_detection_metrics/toyexample/gts_coco_format/toy_example_coco.JSON"
    )
    assert [c["id"] for c in validate_file(toy, images=None).coco["categories"]] == [0]
    # sahi's area = the whole image: recomputed from the polygons
    r = validate_file(realworld / "sahi/tests/data/coco_utils/terrain1_coco.json", images=None)
    assert r.counts["area_recomputed"] > 0 and r.ok
    # evaluation files without file_name cannot be trained on: refused by rule
    r = validate_file(realworld / "torchmetrics/extracted/map_bbox_gt_coco.json", images=None)
    assert r.counts["file_name_missing"] == 4 and not r.ok
    # not a dataset (a results list): refused as not COCO
    r = validate_file(
        realworld / "cocoapi/results/instances_val2014_fakebbox100_results.json", images=None
    )
    assert r.counts["not_coco"] == 1


def test_tinycoco_split_keeps_categories_in_every_split(realworld):
    base = realworld / "super-gradients/tests/data/tinycoco"
    r = validate_file(
        base / "annotations/instances_train2017.json", images=base / "images/train2017"
    )
    splits = split_coco(r.coco, fractions={"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    per_cat: dict = {}
    for a in r.coco["annotations"]:
        per_cat.setdefault(a["category_id"], set()).add(a["image_id"])
    common = {c for c, ims in per_cat.items() if len(ims) >= 3}
    assert common
    for s in splits.values():
        assert common <= {a["category_id"] for a in s["annotations"]}
        assert len(s["categories"]) == len(r.coco["categories"])


def test_healthcheck_bad_with_image_checks_still_names_every_reference(realworld, tmp_path):
    # image 1's file is missing, so image 1 and its annotations go; annotation 4's undeclared
    # category must still be named in the same run, not only after the user fixes the image
    r = validate_file(
        realworld / "hotcoco/crates/hotcoco/tests/fixtures/healthcheck_bad.json",
        images=tmp_path,
        on_error="drop",
    )
    f = findings(r)
    assert f["unknown_category"] == [4] and f["unknown_image"] == [3]
    assert 1 in f["image_missing"]
