"""teacher.coco.metrics on tiny hand-made COCO dicts: the traps of raw pycocotools, one by one."""

import numpy as np
import pytest
from conftest import STAT_KEYS
from pycocotools import mask as mask_utils

from teacher.coco.metrics import (
    category_names,
    coco_eval,
    coco_evaluate,
    mask_iou,
    mean_mask_iou,
    precision_recall,
)
from teacher.core.errors import TeacherError


def _gt(image_id=1, ann_ids=(1, 2)):
    return {
        "images": [{"id": image_id, "width": 100, "height": 80, "file_name": "a.jpg"}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {
                "id": ann_ids[0],
                "image_id": image_id,
                "category_id": 3,
                "bbox": [10, 10, 40, 30],
                "area": 1200,
                "iscrowd": 0,
            },
            {
                "id": ann_ids[1],
                "image_id": image_id,
                "category_id": 7,
                "bbox": [55, 20, 40, 50],
                "area": 2000,
                "iscrowd": 0,
            },
        ],
    }


def _perfect(gt):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in gt["annotations"]
    ]


def test_perfect_detections_score_one_and_keys_are_stable():
    gt = _gt()
    m = coco_eval(gt, _perfect(gt))
    assert set(STAT_KEYS) <= set(m)
    assert m["map"] == pytest.approx(1.0) and m["map/cat"] == pytest.approx(1.0)
    assert m["map_small"] == -1.0 and m["mar_large"] == -1.0  # no small / large objects
    assert set(m) == set(STAT_KEYS) | {"map/cat", "map/dog", "mar_100/cat", "mar_100/dog"}
    assert all(isinstance(v, float) for v in m.values())


def test_empty_results_give_zeros_not_a_crash():
    m = coco_eval(_gt(), [])
    assert m["map"] == 0.0 and m["map_50"] == 0.0 and m["mar_100"] == 0.0 and m["map/dog"] == 0.0
    assert m["map_small"] == -1.0


def test_no_ground_truth_gives_minus_one():
    gt = {**_gt(), "annotations": []}
    m = coco_eval(gt, [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}])
    assert all(m[k] == -1.0 for k in STAT_KEYS)


def test_one_wrong_detection_halves_ap():
    gt = _gt()
    res = _perfect(gt)
    res[1] = {**res[1], "bbox": [0, 60, 10, 10]}  # the dog box misses
    m = coco_eval(gt, res)
    assert m["map/cat"] == pytest.approx(1.0) and m["map/dog"] == 0.0
    assert m["map"] == pytest.approx(0.5)


def test_string_image_ids_equal_int_ids():
    gt_int = _gt(image_id=2299)
    gt_str = _gt(image_id="2299")
    gt_str["annotations"][1]["image_id"] = 2299  # mixed, as in real exports
    res = _perfect(gt_int)
    res[1] = {**res[1], "bbox": [50, 20, 40, 50]}
    assert coco_eval(gt_str, res) == coco_eval(gt_int, res)
    named = _gt(image_id="frame_a")
    res_named = [{**r, "image_id": "frame_a"} for r in res]
    assert coco_eval(named, res_named) == coco_eval(gt_int, res)


def test_annotation_id_zero_and_duplicates_still_match():
    gt = _gt(ann_ids=(0, 0))  # pycocotools alone counts a match to id 0 as a miss
    assert coco_eval(gt, _perfect(gt))["map"] == pytest.approx(1.0)


def test_ignore_flag_is_honoured():
    gt = _gt()
    on_region = {"image_id": 1, "category_id": 7, "bbox": [0, 50, 20, 20], "score": 0.95}
    res = _perfect(gt) + [on_region]
    assert coco_eval(gt, res)["map/dog"] < 1.0  # a false positive ranked first
    gt["annotations"].append(
        {
            "id": 9,
            "image_id": 1,
            "category_id": 7,
            "bbox": [0, 50, 20, 20],
            "area": 400,
            "iscrowd": 0,
            "ignore": 1,
        }
    )
    assert coco_eval(gt, res)["map/dog"] == pytest.approx(1.0)  # on an ignored region: no FP
    assert coco_eval(gt, _perfect(gt)[:2])["map/dog"] == pytest.approx(1.0)  # nor a miss
    gt["annotations"][-1]["ignore"] = 0  # pycocotools alone would forget the flag like this
    assert coco_eval(gt, _perfect(gt)[:2])["map/dog"] < 1.0


def test_results_on_unknown_image_are_an_error():
    with pytest.raises(TeacherError, match="not in the ground truth"):
        coco_eval(_gt(), [{"image_id": 5, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}])


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def test_segm_polygon_gt_against_rle_results_uses_mask_area():
    gt = _gt()
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    masks = mask_utils.decode(
        mask_utils.frPyObjects([a["segmentation"][0] for a in gt["annotations"]], 80, 100)
    )
    res = [
        {
            "image_id": 1,
            "category_id": a["category_id"],
            "score": 0.8,
            "segmentation": _rle(masks[:, :, i]),
            "bbox": [0, 0, 100, 80],
        }
        for i, a in enumerate(gt["annotations"])
    ]
    m = coco_eval(gt, res, iou_type="segm")
    assert m["map"] == pytest.approx(1.0)
    assert m["map_medium"] == pytest.approx(1.0)  # the misleading whole-image bbox is not used


def test_precision_recall_rows_per_class_with_ground_truth():
    gt = _gt()
    gt["categories"].append({"id": 9, "name": "bird"})  # declared, unused: no curve
    res = _perfect(gt)
    ev = coco_evaluate(gt, res)
    rows = precision_recall(ev, names=category_names(gt))
    assert {r["class"] for r in rows} == {"cat", "dog"}
    assert len(rows) == 2 * 101
    assert all(r["precision"] == pytest.approx(1.0) for r in rows)


def test_category_names_are_unique():
    gt = {"categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}, {"id": 0}]}
    assert category_names(gt) == {1: "a", 2: "a#2", 0: "0"}


def test_mask_iou_values():
    pred = np.zeros((3, 4, 4), bool)
    gt = np.zeros((3, 4, 4), bool)
    pred[0, :2] = True
    gt[0, :1] = True  # 4 / 8
    gt[1, 0, 0] = True  # pred empty -> 0
    # pair 2: both empty -> 1
    np.testing.assert_allclose(mask_iou(pred, gt), [0.5, 0.0, 1.0])
    with pytest.raises(ValueError, match="one shape"):
        mask_iou(pred, gt[:2])


def test_mean_mask_iou_overall_and_per_class():
    m = mean_mask_iou(np.array([1.0, 0.5, 0.0]), [3, 3, 7], names={3: "cat", 7: "dog"})
    assert m == {"mask_miou": pytest.approx(0.5), "mask_miou/cat": 0.75, "mask_miou/dog": 0.0}
