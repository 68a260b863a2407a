"""Conformance: teacher.coco.metrics reproduces the expected numbers of reference cases R1-R10.

The cases live outside the repository, in ``../shared/realworld`` (see its README.md); the
tests skip with a visible reason when that folder is absent.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import STAT_KEYS

from teacher.coco.metrics import coco_eval

ROOT = Path(__file__).resolve().parents[2] / ".." / "shared" / "realworld"
pytestmark = pytest.mark.skipif(
    not ROOT.is_dir(), reason=f"reference cases not found at {ROOT.resolve()} (../shared/realworld)"
)
FCE_DICT_KEYS = [
    "AP_all",
    "AP_50",
    "AP_75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR_all",
    "AR_second",
    "AR_third",
    "AR_small",
    "AR_medium",
    "AR_large",
]
FCE = "faster_coco_eval/tests/dataset"


def _load(rel: str):
    path = ROOT / rel
    if not path.exists():
        pytest.skip(f"reference file {rel} missing under {ROOT.resolve()}")
    return json.loads(path.read_text())


def _stats(metrics: dict) -> np.ndarray:
    return np.array([metrics[k] for k in STAT_KEYS])


def _fce_case(name: str) -> dict:
    return _load("faster_coco_eval/extracted/expected_stats.json")["cases"][name]


@pytest.mark.parametrize(
    ("case", "kind"), [("cocoapi_fake_bbox", "bbox"), ("cocoapi_fake_segm", "segm")]
)
def test_r1_r2_cocoapi_fake_results(case, kind):
    gt = _load(f"{FCE}/cocoapi/instances_val2014_100.json")
    dt = _load(f"{FCE}/cocoapi/instances_val2014_fake{kind}100_results.json")
    m = coco_eval(gt, dt, iou_type=kind, per_class=False)
    np.testing.assert_allclose(_stats(m), _fce_case(case)["stats"], atol=1e-10)
    np.testing.assert_allclose(_stats(m), _fce_case(case)["cocoapi_txt_rounded"], atol=5e-4)


def test_r3_segm_rle_detections():
    from pycocotools import mask as mask_utils

    gt = _load(f"{FCE}/gt_dataset.json")
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    dt = []
    for d in _load(f"{FCE}/dt_dataset.json"):  # as the source test: polygons -> one RLE
        rle = mask_utils.merge(mask_utils.frPyObjects(d["segmentation"], *sizes[d["image_id"]]))
        dt.append(
            {k: d[k] for k in ("image_id", "category_id", "iscrowd", "id", "score")}
            | {"segmentation": rle}
        )
    m = coco_eval(gt, dt, iou_type="segm", per_class=False)
    expected = _fce_case("gt_dt_dataset_segm")["stats_as_dict"]
    np.testing.assert_allclose(_stats(m), [expected[k] for k in FCE_DICT_KEYS], atol=1e-10)


def test_r4_string_image_id_and_ignore_flags():
    gt = _load(f"{FCE}/gt_ignore_test.json")
    assert {type(a["image_id"]) for a in gt["annotations"]} == {str, int}  # the quirk under test
    dt = [d for d in _load(f"{FCE}/dt_ignore_test.json") if d["score"] >= 0.1]
    m = coco_eval(gt, dt, iou_type="bbox", per_class=False)
    expected = _fce_case("ignore_test_bbox")["stats_as_dict"]
    np.testing.assert_allclose(_stats(m), [expected[k] for k in FCE_DICT_KEYS], atol=1e-10)


@pytest.mark.parametrize("dets", ["cocoapi_results.json", "dets/sampled_bbox_results.json"])
def test_r5_review_object_detection_metrics(dets):
    base = "review_object_detection_metrics/tests/test_coco_eval"
    gt = _load(f"{base}/gts/sampled_gts_bbox_area.json")
    dt = _load(f"{base}/{dets}")
    dt = dt["annotations"] if isinstance(dt, dict) else dt  # a COCO dataset whose anns carry score
    expected = _load("review_object_detection_metrics/extracted/expected_stats.json")["stats"]
    m = coco_eval(gt, dt, iou_type="bbox", per_class=False)
    np.testing.assert_allclose(_stats(m), list(expected.values()), atol=1e-6)


@pytest.mark.parametrize("kind", ["bbox", "segm"])
def test_r6_detectron2_case(kind):
    case = _load("faster_coco_eval/extracted/detectron2_eval_case.json")
    m = coco_eval(case["gt_annotations"], case["detections"], iou_type=kind)
    np.testing.assert_allclose(_stats(m), case["expected_stats"][kind], atol=1e-12)
    assert m["map/bed"] == -1.0  # declared, unused


@pytest.mark.parametrize("kind", ["bbox", "segm"])
def test_r7_dummy_case_category_id_zero(kind):
    case = _load("faster_coco_eval/extracted/coco_metric_dummy_case.json")
    m = coco_eval(case["gt"], case["results"], iou_type=kind)
    np.testing.assert_allclose(_stats(m)[:6], case["expected_first6_rounded4"][kind], atol=1e-4)
    assert m["map/car"] == pytest.approx(1.0) and m["map/bicycle"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["bbox", "segm"])
def test_r8_r9_torchmetrics_class_metrics(kind):
    base = "torchmetrics/extracted"
    gt = _load(f"{base}/map_{kind}_gt_coco.json")
    dt = _load(f"{base}/map_{kind}_results_coco.json")
    expected = _load(f"{base}/map_{kind}_inputs_and_expected.json")["expected"]
    m = coco_eval(gt, dt, iou_type=kind)
    np.testing.assert_allclose(_stats(m), [expected[k] for k in STAT_KEYS], atol=1e-2)
    names = [str(c) for c in expected["classes"]]
    np.testing.assert_allclose([m[f"map/{n}"] for n in names], expected["map_per_class"], atol=1e-2)
    np.testing.assert_allclose(
        [m[f"mar_100/{n}"] for n in names], expected["mar_100_per_class"], atol=1e-2
    )


def _torchmetrics_case(name: str) -> dict:
    cases = _load("torchmetrics/extracted/map_small_cases.json")["cases"]
    return next(c for c in cases if c["name"].startswith(name))


def _xyxy_to_coco(preds: list[dict], target: list[dict]) -> tuple[dict, list[dict]]:
    """torchmetrics' per-image xyxy inputs -> a COCO gt dict and results list."""

    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    labels = sorted({lab for t in target + preds for lab in t["labels"]})
    gt = {
        "images": [{"id": i} for i in range(len(target))],
        "categories": [{"id": lab, "name": str(lab)} for lab in labels],
        "annotations": [],
    }
    for i, t in enumerate(target):
        for b, lab in zip(t["boxes"], t["labels"], strict=True):
            box = xywh(b)
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "bbox": box,
                    "category_id": lab,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    res = [
        {"image_id": i, "category_id": lab, "bbox": xywh(b), "score": s}
        for i, p in enumerate(preds)
        for b, s, lab in zip(p["boxes"], p["scores"], p["labels"], strict=True)
    ]
    return gt, res


def test_r10_torchmetrics_small_cases():
    case = _torchmetrics_case("test_for_box_format")
    gt, res = _xyxy_to_coco(case["preds"], case["target"])
    m = coco_eval(gt, res, iou_thresholds=case["iou_thresholds"])
    assert m["map"] == pytest.approx(case["expected_by_box_format"]["xyxy"]["map"], abs=1e-2)

    case = _torchmetrics_case("test_many_detection_thresholds")
    gt, res = _xyxy_to_coco(case["preds"], case["target"])
    m = coco_eval(gt, res, max_dets=case["max_detection_thresholds"])
    assert m["map"] == pytest.approx(case["expected"]["map_rounded5"], abs=1e-5)
    assert set(case["expected"]["keys_present"]) <= set(m)

    for name in ("test_missing_pred", "test_missing_gt"):
        case = _torchmetrics_case(name)
        gt, res = _xyxy_to_coco(case["preds"], case["target"])
        assert coco_eval(gt, res)["map"] < case["expected"]["map_lt"]


def test_r10_empty_masks_give_minus_one():
    from pycocotools import mask as mask_utils

    empty = mask_utils.encode(np.zeros((10, 10, 1), np.uint8, order="F"))[0]
    gt = {
        "images": [{"id": 0, "height": 10, "width": 10}],
        "annotations": [],
        "categories": [{"id": 4, "name": "4"}],
    }
    pred = [{"image_id": 0, "category_id": 4, "score": 0.5, "segmentation": empty}]
    m = coco_eval(gt, pred, iou_type="segm")
    assert all(v == -1.0 for v in m.values()) and "map/4" in m
    gt["annotations"] = [
        {
            "id": 1,
            "image_id": 0,
            "category_id": 4,
            "segmentation": empty,
            "iscrowd": 0,
            "area": 0,
            "bbox": [0, 0, 0, 0],
        }
    ]
    m = coco_eval(gt, [], iou_type="segm")
    # pycocotools keeps a GT of area 0 (COCO's ranges start at 0) and it is missed: AP 0 where
    # torchmetrics reports -1. We follow pycocotools, the reference every peer reports against.
    assert m["map"] == 0.0 and m["map_small"] == 0.0 and m["map_medium"] == -1.0


HOTCOCO = "hotcoco"
# Where teacher.coco.metrics deliberately differs from raw pycocotools (see the module docstring),
# with the values worked out by hand:
DELIBERATE = {
    # two GT annotations share an id: pycocotools' index scores one of them twice and the
    # detection matches neither; renumbered, it matches its GT (IoU 0.91: 9 of 10 thresholds).
    "duplicate_ann_ids.json": {"map_50": 0.5049504950495051, "mar_100": 0.45},
    # GT annotation id 0: pycocotools counts a match to id 0 as a miss; the detections are the
    # ground truth boxes themselves, so AP is 1 (AR@1 is 2/3: one image holds two objects).
    "zero_gt.json": {"map": 1.0, "map_50": 1.0, "mar_1": 2 / 3, "mar_100": 1.0},
}


def _hotcoco_cases() -> list[str]:
    path = ROOT / HOTCOCO / "pycocotools_stats_computed_here.json"
    return sorted(json.loads(path.read_text())["fixtures"]) if path.exists() else []


def _hotcoco_inputs(rel: str) -> tuple[dict, list[dict]]:
    if " + " in rel:  # "dir/gt.json + dt.json": a GT file and a results file beside it
        gt_rel, dt_name = rel.split(" + ")
        return _load(f"{HOTCOCO}/{gt_rel}"), _load(f"{HOTCOCO}/{Path(gt_rel).parent / dt_name}")
    doc = _load(f"{HOTCOCO}/{rel}")
    return {k: v for k, v in doc.items() if k != "detections"}, doc["detections"]


@pytest.mark.parametrize("rel", _hotcoco_cases() or ["absent"])
def test_hotcoco_adversarial_fixtures_match_pycocotools(rel):
    """77 adversarial fixtures (crowd, IoU at thresholds, ties, zero-area and outside boxes,
    unknown ids...): the same stats as pycocotools 2.0.11, or the same refusal."""
    if rel == "absent":
        pytest.skip(f"{HOTCOCO}/pycocotools_stats_computed_here.json not under {ROOT.resolve()}")
    expected = _load(f"{HOTCOCO}/pycocotools_stats_computed_here.json")["fixtures"][rel]
    gt, dt = _hotcoco_inputs(rel)
    for iou_type, stats in expected.items():
        if isinstance(stats, str):  # pycocotools refused the input: so do we, with a TeacherError
            from teacher.core.errors import TeacherError

            with pytest.raises(TeacherError):
                coco_eval(gt, dt, iou_type=iou_type)
            continue
        m = coco_eval(gt, dt, iou_type=iou_type, per_class=False)
        fixed = DELIBERATE.get(Path(rel.split(" + ")[0]).name)
        if fixed:
            assert {k: m[k] for k in fixed} == pytest.approx(fixed)
            continue
        np.testing.assert_allclose(_stats(m), stats, atol=1e-9)
