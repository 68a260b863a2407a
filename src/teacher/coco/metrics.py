"""COCO box / mask AP through pycocotools, mask IoU, per-class tables and PR curves.

Every number here comes from ``pycocotools.cocoeval.COCOeval`` (the reference implementation
peers report against); this module only prepares the inputs in memory and reads the arrays.

Inputs are plain dicts: ``gt`` a COCO dataset (``images``, ``annotations``, ``categories``),
``results`` a COCO results list (``image_id``, ``category_id``, ``score`` and ``bbox`` xywh in
absolute pixels or ``segmentation`` as RLE / polygons). Neither is modified.

Conventions, each one a known trap of raw pycocotools:
- image ids may be strings (``"2299"``) or mixed with ints: they are mapped to ints first;
- a ground-truth ``ignore: 1`` flag is honoured (pycocotools overwrites it with ``iscrowd``);
- annotation ids are renumbered 1..N (pycocotools treats a matched id 0 as "unmatched", and
  duplicate ids collide in its index);
- for ``segm`` the area of a detection is its mask area, not its box area (detectron2's and
  mmdetection's convention: a ``bbox`` key in a segm result is ignored);
- empty results give 0 where ground truth exists, never a crash; a value is -1 where there is
  no ground truth to measure (pycocotools' convention, e.g. ``map_small`` without small objects).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from teacher.coco.io import has_mask, has_usable_box
from teacher.core.errors import TeacherError

# The one "nothing to measure" value of every metric here (training validation included):
# pycocotools' -1, e.g. map_small without small objects, or a mean IoU over no instance.
NOTHING_TO_MEASURE = -1.0
AREA_NAMES = ("all", "small", "medium", "large")  # the order of COCOeval.params.areaRng
DEFAULT_MAX_DETS = (1, 10, 100)


class _Eval(COCOeval):
    """COCOeval that keeps a ground truth's own ``ignore`` flag (or-ed with ``iscrowd``)."""

    def _prepare(self) -> None:
        super()._prepare()
        for gts in self._gts.values():
            for g in gts:
                g["ignore"] = int(bool(g.get("_user_ignore", 0)) or bool(g.get("iscrowd", 0)))


def _image_id_map(images: Sequence[dict]) -> dict[str, int]:
    """str(image id) -> int id for pycocotools; ints stay themselves where possible."""
    keys = [str(img["id"]) for img in images]
    if all(k.lstrip("-").isdigit() for k in keys) and len({int(k) for k in keys}) == len(set(keys)):
        return {k: int(k) for k in keys}
    return {k: i for i, k in enumerate(dict.fromkeys(keys))}


def _segm_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """A polygon list, uncompressed RLE or compressed RLE -> one compressed RLE."""
    if isinstance(segmentation, list):
        if not segmentation:
            return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        h, w = segmentation["size"]
        return mask_utils.frPyObjects(segmentation, h, w)
    return segmentation


def _prepare_gt(gt: dict, ids: dict[str, int], iou_type: str) -> dict:
    images = [{**img, "id": ids[str(img["id"])]} for img in gt["images"]]
    sizes: dict[Any, tuple[Any, Any]] = {
        img["id"]: (img.get("height"), img.get("width")) for img in images
    }
    anns = []
    for n, ann in enumerate(gt.get("annotations", []), start=1):
        image_id = ids.get(str(ann["image_id"]))
        if image_id is None:
            raise TeacherError(
                f"ground truth annotation {ann.get('id')!r} points at image {ann['image_id']!r} "
                "which is not in 'images'; run the validate stage to drop or fix it"
            )
        a = {**ann, "id": n, "image_id": image_id, "iscrowd": int(ann.get("iscrowd", 0) or 0)}
        a["_user_ignore"] = int(bool(ann.get("ignore", 0)))
        if iou_type == "segm":
            h, w = sizes[image_id]
            a["segmentation"] = _segm_to_rle(ann.get("segmentation") or [], h, w)
        if "area" not in a:
            a["area"] = (
                float(mask_utils.area(a["segmentation"]))
                if iou_type == "segm"
                else float(a["bbox"][2] * a["bbox"][3])
            )
        anns.append(a)
    return {"images": images, "annotations": anns, "categories": list(gt.get("categories", []))}


def _prepare_results(
    results: Sequence[dict], ids: dict[str, int], gt: dict, iou_type: str
) -> list[dict]:
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in gt["images"]}
    out = []
    for n, r in enumerate(results, start=1):
        image_id = ids.get(str(r["image_id"]))
        if image_id is None:
            raise TeacherError(
                f"result {n - 1} points at image {r['image_id']!r} which is not in the ground "
                "truth; evaluate only predictions on the ground truth's images"
            )
        d = {
            "id": n,
            "image_id": image_id,
            "category_id": r["category_id"],
            "score": float(r["score"]),
            "iscrowd": 0,
        }
        if iou_type == "segm":
            if "segmentation" not in r:
                raise TeacherError(f"result {n - 1} has no 'segmentation'; segm AP needs masks")
            d["segmentation"] = _segm_to_rle(r["segmentation"], *sizes[image_id])
            d["area"] = float(mask_utils.area(d["segmentation"]))
            d["bbox"] = mask_utils.toBbox(d["segmentation"]).tolist()
        else:
            if "bbox" not in r:
                raise TeacherError(f"result {n - 1} has no 'bbox'; bbox AP needs boxes")
            d["bbox"] = [float(v) for v in r["bbox"]]
            d["area"] = d["bbox"][2] * d["bbox"][3]
        out.append(d)
    return out


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(
    gt: dict,
    results: Sequence[dict],
    *,
    iou_type: str = "bbox",
    iou_thresholds: Sequence[float] | None = None,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
) -> COCOeval:
    """Run COCOeval (evaluate + accumulate, silently) and return it.

    ``eval["precision"]`` is (T iou thresholds, R=101 recall points, K categories, A=4 areas,
    M max-dets); ``eval["recall"]`` is (T, K, A, M). Categories follow ``params.catIds``.
    """
    if iou_type not in ("bbox", "segm"):
        raise TeacherError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    ids = _image_id_map(gt.get("images", []))
    gt_ds = _prepare_gt(copy.deepcopy(gt), ids, iou_type)
    res_ds = {
        "images": gt_ds["images"],
        "categories": gt_ds["categories"],
        "annotations": _prepare_results(results, ids, gt_ds, iou_type),
    }
    evaluator = _Eval(_coco(gt_ds), _coco(res_ds), iouType=iou_type)
    if iou_thresholds is not None:
        evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=float)
    evaluator.params.maxDets = [int(m) for m in max_dets]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else NOTHING_TO_MEASURE


def _iou_index(evaluator: COCOeval, iou: float) -> int | None:
    hits = np.flatnonzero(np.isclose(evaluator.params.iouThrs, iou))
    return int(hits[0]) if hits.size else None


def category_names(gt: dict) -> dict[int, str]:
    """category id -> unique display name (``name``, or the id; duplicates get ``#id``)."""
    names: dict[int, str] = {}
    for cat in gt.get("categories", []):
        name = str(cat.get("name", cat["id"]))
        names[cat["id"]] = f"{name}#{cat['id']}" if name in names.values() else name
    return names


def summarize(
    evaluator: COCOeval, *, names: dict[int, str] | None = None, per_class: bool = True
) -> dict[str, float]:
    """Flat metrics from an accumulated COCOeval, as pycocotools' ``summarize`` defines them.

    Keys: map, map_50, map_75, map_small, map_medium, map_large (at the largest max-dets),
    mar_<m> for each max-dets m (mar_1, mar_10, mar_100 by default), mar_small/medium/large;
    with ``per_class``: ``map/<name>`` and ``mar_<M>/<name>`` per category id of the gt.
    """
    precision = evaluator.eval["precision"]  # (T, R, K, A, M)
    recall = evaluator.eval["recall"]  # (T, K, A, M)
    max_dets = evaluator.params.maxDets
    out: dict[str, float] = {"map": _mean_valid(precision[:, :, :, 0, -1])}
    for key, iou in (("map_50", 0.5), ("map_75", 0.75)):
        t = _iou_index(evaluator, iou)
        out[key] = _mean_valid(precision[t, :, :, 0, -1]) if t is not None else -1.0
    for a, area in enumerate(AREA_NAMES[1:], start=1):
        out[f"map_{area}"] = _mean_valid(precision[:, :, :, a, -1])
    for m, md in enumerate(max_dets):
        out[f"mar_{md}"] = _mean_valid(recall[:, :, 0, m])
    for a, area in enumerate(AREA_NAMES[1:], start=1):
        out[f"mar_{area}"] = _mean_valid(recall[:, :, a, -1])
    if per_class:
        names = names or {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            name = names.get(cat_id, str(cat_id))
            out[f"map/{name}"] = _mean_valid(precision[:, :, k, 0, -1])
            out[f"mar_{max_dets[-1]}/{name}"] = _mean_valid(recall[:, k, 0, -1])
    return out


def coco_eval(
    gt: dict,
    results: Sequence[dict],
    *,
    iou_type: str = "bbox",
    per_class: bool = True,
    iou_thresholds: Sequence[float] | None = None,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
) -> dict[str, float]:
    """COCO AP/AR of ``results`` against ``gt`` as a flat dict of floats (see ``summarize``)."""
    evaluator = coco_evaluate(
        gt, results, iou_type=iou_type, iou_thresholds=iou_thresholds, max_dets=max_dets
    )
    return summarize(evaluator, names=category_names(gt), per_class=per_class)


def precision_recall(
    evaluator: COCOeval, *, names: dict[int, str] | None = None, iou: float = 0.5
) -> list[dict[str, Any]]:
    """Per-class precision-recall curve at one IoU threshold (area all, largest max-dets).

    Returns rows ``{"class": name, "recall": r, "precision": p}`` on COCO's 101 recall
    points, for classes with ground truth; precision is 0 past the highest recall reached.
    """
    t = _iou_index(evaluator, iou)
    if t is None:
        raise TeacherError(f"IoU {iou} is not one of the evaluated thresholds")
    names = names or {}
    precision = evaluator.eval["precision"][t, :, :, 0, -1]  # (R, K)
    rows = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        if np.all(precision[:, k] < 0):
            continue  # no ground truth for this class
        name = names.get(cat_id, str(cat_id))
        for r, p in zip(evaluator.params.recThrs, precision[:, k], strict=True):
            rows.append(
                {"class": name, "recall": round(float(r), 4), "precision": float(max(p, 0.0))}
            )
    return rows


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of paired masks: pred, gt bool (N, H, W) -> float (N,).

    Two empty masks agree perfectly (IoU 1); an empty one against a non-empty one gives 0.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(
            f"mask_iou needs two (N, H, W) arrays of one shape, got {pred.shape} and {gt.shape}"
        )
    inter = np.logical_and(pred, gt).sum(axis=(1, 2), dtype=np.int64)
    union = np.logical_or(pred, gt).sum(axis=(1, 2), dtype=np.int64)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).astype(np.float64)


def mean_mask_iou(
    ious: np.ndarray, category_ids: Sequence[int], *, names: dict[int, str] | None = None
) -> dict[str, float]:
    """Mean of per-instance IoUs overall (``mask_miou``) and per class (``mask_miou/<name>``);
    no instance: ``NOTHING_TO_MEASURE``. The test split's ``mask/miou`` and training's
    ``val_miou`` both come from here."""
    ious = np.asarray(ious, dtype=float)
    cats = np.asarray(category_ids)
    names = names or {}
    out = {"mask_miou": float(ious.mean()) if ious.size else NOTHING_TO_MEASURE}
    for cat_id in sorted(set(cats.tolist())):
        out[f"mask_miou/{names.get(cat_id, str(cat_id))}"] = float(ious[cats == cat_id].mean())
    return out


def segm_ground_truth(gt: dict) -> dict:
    """The ground truth for mask AP: an object without a mask becomes an ignore region.

    A box-only object (no mask, not crowd) is kept as a crowd region covering its box: in
    pycocotools a detection matched to it is ignored, neither a true nor a false positive, and
    its IoU is the share of the detected mask inside the box (crowd semantics), so a correct
    mask of the object matches it. Deleting such objects instead would count every detection
    of them as a false positive. Objects with neither mask nor usable box are left out.
    """
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in gt["images"]}
    anns = []
    for a in gt["annotations"]:
        if has_mask(a):
            anns.append(a)
        elif has_usable_box(a):
            h, w = sizes[a["image_id"]]
            x, y, bw, bh = (float(v) for v in a["bbox"])
            region = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]  # the box as a polygon
            anns.append({**a, "iscrowd": 1, "segmentation": region, "area": bw * bh})
    return {**gt, "annotations": anns}
