"""The evaluate stage's work: teachers on the test split -> flat metrics, PR curves, gallery.

Metric keys (flat, stable; class names from the test split's categories):
- ``box/<k>``: Grounding DINO (with its adapter) COCO bbox metrics, ``<k>`` as in
  :func:`teacher.coco.metrics.summarize` (``map``, ``map_50``, ..., ``map/<class>``), detections
  decoded as Open-GroundingDino's COCO evaluation (:func:`teacher.dino.detect.score`: mean
  token probability per class, top 300 pairs, no threshold, no NMS), comparable with papers;
- ``mask/miou``, ``mask/miou/<class>``: SAM (with its adapter) prompted by the ground-truth
  boxes, mean mask IoU against the ground-truth masks;
- ``segm/<k>``: Grounded-SAM end to end (DINO's boxes -> SAM's masks), COCO segm metrics, with
  the labeling decode of ``teacher predict`` (thresholds, per-class NMS, cap), as the gallery;
- ``base/<key>``: the same for the pretrained models without adapters;
- ``gain/<key>``: ``<key> - base/<key>`` where both are measured (not -1);
- ``retention/box/map``, ``retention/box/map_50``: the forgetting guard (:mod:`teacher.evaluation.retention`):
  the fine-tuned DINO's box AP against the base model's confident detections of other classes
  (``evaluate.retention_classes``) on the test images, 1.0 = nothing forgotten;
  ``retention/reference_boxes`` counts those detections;
- ``retention/true/box/<k>`` (``map``, ``map_50``) and ``base/retention/true/box/<k>``: true box AP on
  the labelled retention set ``evaluate.retention_data``, when one is given;
- ``scale/<s>/<key>`` for each adapter scale s of ``evaluate.adapter_scales`` (both teachers'
  adapters scaled, :func:`teacher.train.lora.load_adapter`): ``box/map``, ``segm/map``, ``mask/miou``,
  ``retention/box/map`` (and ``retention/true/box/map``). Scale 1 is the adapted models' pass
  and scale 0 the base models' (equal outputs, pinned by the tests); other scales get a pass each.
A teacher whose folder holds only ``SKIPPED`` contributes no keys (and no ``segm``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from teacher.coco.detections import Detections
from teacher.coco.images import load_image, load_image_and_size
from teacher.coco.io import annotation_mask, has_mask, has_usable_box
from teacher.coco.metrics import (
    category_names,
    coco_eval,
    coco_evaluate,
    mean_mask_iou,
    precision_recall,
    summarize,
)
from teacher.core.artifacts import LABELS_FILE, SKIPPED_FILE, skipped_reason
from teacher.core.errors import TeacherError
from teacher.dino.labels import LabelMap
from teacher.evaluation.retention import KEYS as RETENTION_KEYS
from teacher.evaluation.retention import (
    reference_ground_truth,
    retention_classes,
    retention_scores,
    scale_prefix,
    tradeoff_rows,
)
from teacher.inference.predict import (
    Filter,
    Teachers,
    merged,
    predict_images,
    segment_detections,
    to_annotations,
)
from teacher.sam.model import prepare_image
from teacher.sam.scoring import is_sam_instance, score_gt_boxes


@dataclass
class VariantOutput:
    """What one pass (adapted or base models) over the test split produced."""

    metrics: dict[str, float] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)  # PR rows at IoU 0.5 (boxes)
    shown: dict[Any, Detections] = field(default_factory=dict)  # gallery image -> detections
    seconds: float = (
        0.0  # wall time of Grounded-SAM (predict_images) over the split, decoding excluded
    )
    # image id -> DINO's detections of the retention classes (labeling decode), when asked
    retention: dict[Any, Detections] | None = None


def _by_image(gt: dict) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann)
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


def run_variant(
    gt: dict,
    images_root: Path,
    teachers: Teachers,
    *,
    keep: Filter,
    text_threshold: float,
    multimask: bool,
    batch_size: int,
    gallery_ids: Sequence[Any],
    desc: str = "evaluate",
    retention: LabelMap | None = None,
) -> VariantOutput:
    """Run the loaded teachers over every test image and score them (keys without prefix).

    With ``retention`` (a label map of other classes) DINO also detects those classes in every
    image (the labeling decode with ``keep``): ``out.retention``, scored later against the base
    model's (:mod:`teacher.evaluation.retention`).
    """
    from tqdm import tqdm

    names = category_names(gt)
    anns_of = _by_image(gt)
    results: list[dict] = []  # labeling decode (Grounded-SAM, gallery)
    box_results: list[dict] = []  # reference protocol (box/*)
    ious, cats = [], []
    out = VariantOutput()
    images = gt["images"]
    boxes_only = Teachers(dino=teachers.dino, sam=None, label_map=teachers.label_map)
    others = None
    if retention is not None and teachers.dino is not None:
        others = Teachers(dino=teachers.dino, sam=None, label_map=retention)
        out.retention = {}
    bar = tqdm(total=len(images), desc=desc, unit="img")
    for start in range(0, len(images), batch_size):
        records = images[start : start + batch_size]
        arrays = [load_image(images_root / r["file_name"]) for r in records]
        dets: list[Detections | None] = [None] * len(records)
        if teachers.dino is not None:  # box/*: the reference protocol; Grounded-SAM: below
            from teacher.dino.detect import score

            for rec, scored in zip(
                records, score(teachers.dino, arrays, teachers.label_map), strict=True
            ):
                box_results += to_annotations(
                    scored, image_id=rec["id"], first_id=len(box_results) + 1
                )
            started = time.perf_counter()  # DINO's labeling decode on the batch; SAM per image
            dets = list(
                predict_images(boxes_only, arrays, keep=keep, text_threshold=text_threshold)
            )
            out.seconds += time.perf_counter() - started
        if others is not None and out.retention is not None:  # the forgetting guard
            found = predict_images(others, arrays, keep=keep, text_threshold=text_threshold)
            out.retention.update(zip((r["id"] for r in records), found, strict=True))
        for rec, image, det in zip(records, arrays, dets, strict=True):
            shown = rec["id"] in gallery_ids
            instances = [a for a in anns_of[rec["id"]] if is_sam_instance(a)]
            started = time.perf_counter()
            prepared = None  # one encoder pass, shared by Grounded-SAM and the true-box mIoU
            if teachers.sam is not None and (instances or (det is not None and len(det))):
                prepared = prepare_image(teachers.sam, image)
            encoder = time.perf_counter() - started
            if det is not None:
                started = time.perf_counter()
                if teachers.sam is not None:
                    det = segment_detections(
                        teachers.sam, image, det, multimask=multimask, prepared=prepared
                    )
                out.seconds += time.perf_counter() - started + (encoder if len(det) else 0.0)
                results += to_annotations(det, image_id=rec["id"], first_id=len(results) + 1)
                if shown:
                    out.shown[rec["id"]] = det
            if prepared is not None and instances:
                iou, truth = score_gt_boxes(
                    prepared,
                    instances,
                    multimask=multimask,
                    keep_masks=shown and teachers.dino is None,
                )
                ious.append(iou)
                cats += truth.category_ids.tolist()
                if shown and teachers.dino is None:
                    out.shown[rec["id"]] = truth
        bar.update(len(records))
    bar.close()
    if teachers.dino is not None:
        evaluator = coco_evaluate(
            gt, box_results, iou_type="bbox", max_dets=(1, 10, keep.max_detections)
        )
        out.metrics.update({f"box/{k}": v for k, v in summarize(evaluator, names=names).items()})
        out.curves = precision_recall(evaluator, names=names, iou=0.5)
        if teachers.sam is not None:
            evaluator = coco_evaluate(
                segm_ground_truth(gt),
                results,
                iou_type="segm",
                max_dets=(1, 10, keep.max_detections),
            )
            out.metrics.update(
                {f"segm/{k}": v for k, v in summarize(evaluator, names=names).items()}
            )
    if teachers.sam is not None:
        all_ious = np.concatenate(ious) if ious else np.zeros((0,))
        mm = mean_mask_iou(all_ious, cats, names=names)
        out.metrics.update({f"mask/{k.removeprefix('mask_')}": v for k, v in mm.items()})
    return out


def gains(adapted: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """``gain/<key>`` = adapted - base for every key measured in both (neither -1)."""
    return {
        f"gain/{k}": adapted[k] - base[k]
        for k in adapted
        if k in base and adapted[k] >= 0 and base[k] >= 0
    }


def label_map_of(dino_dir: Path | None, gt: dict) -> LabelMap:
    """The DINO adapter's label map (``labels.json``), or one from the test split's categories."""
    from teacher.dino.labels import load_labels

    if dino_dir is not None and (dino_dir / LABELS_FILE).exists():
        return load_labels(dino_dir / LABELS_FILE)
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    if not cats:
        raise TeacherError("the test split has no categories; check data/split/test.json")
    from teacher.dino.labels import clean_name

    names = tuple(clean_name(str(c["name"])) for c in cats)
    return LabelMap(
        category_ids=tuple(int(c["id"]) for c in cats),
        names=names,
        chunks=(tuple(range(len(cats))),),
    )


# --- the stage's whole run -----------------------------------------------------------------


@dataclass
class Report:
    """Everything the evaluate stage writes."""

    metrics: dict[str, float]  # flat keys, see the module docstring
    curves: dict[str, list[dict[str, float]]]  # class name -> PR points (adapted DINO, IoU 0.5)
    panels: dict[str, np.ndarray]  # file stem -> HxWx3 gallery image
    # per adapter scale {scale, retention, gain} (plots/tradeoff.json: teacher.evaluation.retention)
    tradeoff: list[dict[str, float]] = field(default_factory=list)


def load_teachers(
    gt: dict,
    *,
    dino_dir: Path | None,
    sam_dir: Path | None,
    dino_params: Any,
    sam_params: Any,
    adapter_scale: float | None,
) -> Teachers:
    """DINO and SAM for one pass: with their adapters merged at ``adapter_scale``, or (None)
    the base models.

    A None directory means that teacher is absent (skipped) and is not loaded.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dino = sam = None
    scale = 1.0 if adapter_scale is None else adapter_scale
    if dino_dir is not None:
        from teacher.dino.model import load_dino

        adapter = dino_dir if adapter_scale is not None else None
        dino = merged(load_dino(dino_params, adapter_dir=adapter, adapter_scale=scale))
        dino.model.to(device)
    if sam_dir is not None:
        from teacher.sam.model import load_sam

        adapter = sam_dir if adapter_scale is not None else None
        sam = load_sam(sam_params, adapter_dir=adapter, adapter_scale=scale).to(device).eval()
    return Teachers(dino=dino, sam=sam, label_map=label_map_of(dino_dir, gt))


GALLERY_MIN_SIDE = 320  # px; smaller test images are enlarged (nearest) so labels stay legible


def gallery_panel(
    image: np.ndarray,
    gt_anns: Sequence[dict],
    det: Detections | None,
    *,
    names: dict[int, str],
    order: dict[int, int],
    title: str,
) -> np.ndarray:
    """Ground truth (boxes + masks) on the left, the teachers' prediction on the right."""
    from teacher.evaluation.gallery import colour, draw_instances, side_by_side

    h, w = image.shape[:2]
    f = max(1, -(-GALLERY_MIN_SIDE // min(h, w)))
    has_masks = bool(gt_anns) and all(has_mask(a) for a in gt_anns)
    truth = Detections(
        boxes=np.array([a["bbox"] for a in gt_anns], float),
        scores=np.ones(len(gt_anns)),
        category_ids=np.array([int(a["category_id"]) for a in gt_anns], np.int64),
        masks=np.stack([annotation_mask(a, h, w) for a in gt_anns]) if has_masks else None,
    ).scaled(f)
    det = (det if det is not None else Detections.empty()).scaled(f)
    big = image.repeat(f, axis=0).repeat(f, axis=1)
    panels = []
    for d, show_score in ((truth, False), (det, True)):
        cats = [int(c) for c in d.category_ids]
        labels = [
            names.get(c, str(c)) + (f" {s:.2f}" if show_score else "")
            for c, s in zip(cats, d.scores, strict=True)
        ]
        panels.append(
            draw_instances(
                big, d.boxes, labels, [colour(order.get(c, 0)) for c in cats], masks=d.masks
            )
        )
    return side_by_side(panels[0], panels[1], titles=("ground truth", title))


def passes(params: Any) -> dict[str, float | None]:
    """The passes over the test split: name -> adapter scale (None: the base models).

    ``adapted`` (scale 1), ``base`` (with ``evaluate.base``), and ``scale/<s>`` for every other
    scale of ``evaluate.adapter_scales``: scale 1 reuses the adapted pass and scale 0 the base
    pass, whose outputs are the same (tests/test_forgetting.py pins it).
    """
    out: dict[str, float | None] = {"adapted": 1.0}
    if params.base:
        out["base"] = None
    for scale in params.adapter_scales:
        if scale != 1.0 and not (scale == 0.0 and params.base):
            out[scale_prefix(scale)] = scale
    return out


def pass_of(scale: float, runs: dict[str, VariantOutput]) -> str | None:
    """The name of the pass that scored adapter scale ``scale`` (:func:`passes`)."""
    if scale == 1.0:
        name = "adapted"
    elif scale == 0.0 and "base" in runs:
        name = "base"
    else:
        name = scale_prefix(scale)
    return name if name in runs else None


def retention_label_map(
    params: Any, *, dataset_names: Sequence[str], tokenizer: Any, log: Callable[[str], None]
) -> LabelMap | None:
    """The label map of the retention classes (ids 1..K; long lists chunked), or None (logged)
    when there is nothing to run: no base pass, or no class left."""
    if not params.base:
        log(
            "evaluate: no retention/... keys: they need the base models' detections (evaluate.base)"
        )
        return None
    names, dropped = retention_classes(params.retention_classes, dataset_names)
    if dropped:
        log(f"evaluate: evaluate.retention_classes {dropped} are dataset classes: left out")
    if not names:
        log("evaluate: no retention classes left (evaluate.retention_classes): no retention/box")
        return None
    from teacher.dino.labels import build_label_map

    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    return build_label_map(cats, tokenizer=tokenizer)


def load_retention_set(params: Any) -> tuple[dict, Path] | None:
    """``evaluate.retention_data`` (COCO json) and its image folder, or None when not set."""
    if params.retention_data is None:
        return None
    from teacher.coco.io import load_coco

    path = Path(params.retention_data)
    if not path.is_file():
        raise TeacherError(
            f"evaluate.retention_data: {path} is not a file; point it at a COCO json of "
            "labelled images of other classes than the dataset's, or set it to null"
        )
    gt = load_coco(path)
    if not gt["images"] or not gt["categories"]:
        raise TeacherError(
            f"evaluate.retention_data: {path} has no images or no categories; a retention set "
            "needs labelled images of classes to retain"
        )
    return gt, Path(params.retention_images) if params.retention_images else path.parent


def true_retention(
    bundle: Any, retention_set: tuple[dict, Path], *, max_detections: int, desc: str
) -> dict[str, float]:
    """``retention/true/box/<k>``: DINO's box AP on the labelled retention set, decoded as
    ``box/*`` (:func:`teacher.dino.detect.score`)."""
    from tqdm import tqdm

    from teacher.dino.detect import score
    from teacher.dino.labels import build_label_map

    gt, root = retention_set
    label_map = build_label_map(gt["categories"], tokenizer=bundle.processor.tokenizer)
    results: list[dict] = []
    images = gt["images"]
    bar = tqdm(total=len(images), desc=desc, unit="img")
    for start in range(0, len(images), 2):
        records = images[start : start + 2]
        loaded = [load_image_and_size(root / r["file_name"]) for r in records]
        found = score(bundle, [pixels for pixels, _ in loaded], label_map)
        for rec, (pixels, size), det in zip(records, loaded, found, strict=True):
            results += to_annotations(
                det,
                image_id=rec["id"],
                first_id=len(results) + 1,
                size=size,
                detected_size=(pixels.shape[1], pixels.shape[0]),
            )
        bar.update(len(records))
    bar.close()
    m = coco_eval(gt, results, iou_type="bbox", per_class=False, max_dets=(1, 10, max_detections))
    return {f"retention/true/box/{k}": m[k] for k in RETENTION_KEYS}


def evaluate_test_split(
    gt: dict,
    images_root: str | Path,
    *,
    dino_dir: str | Path,
    sam_dir: str | Path,
    dino_params: Any,
    sam_params: Any,
    params: Any,
    log: Callable[[str], None] = print,
    student_dir: str | Path | None = None,
) -> Report:
    """Score the adapted teachers (and, with ``params.base``, the base models; and the adapters
    at each of ``params.adapter_scales``) on ``gt``.

    ``params`` is the ``evaluate`` section (EvaluateParams); ``dino_params``/``sam_params``
    the model sections. A teacher folder holding ``SKIPPED`` gives no metrics; ``log`` says why.
    """
    images_root = Path(images_root)
    dirs: dict[str, Path | None] = {"dino": Path(dino_dir), "sam": Path(sam_dir)}
    for name, folder in list(dirs.items()):
        assert folder is not None  # all set just above
        reason = skipped_reason(folder)
        if reason is not None:
            log(f"evaluate: no {name} metrics: {folder}/{SKIPPED_FILE} says: {reason}")
            dirs[name] = None
    keep = Filter(
        score_threshold=params.score_threshold,
        nms_iou=params.nms_iou,
        max_detections=params.max_detections,
    )
    gallery_ids = [img["id"] for img in gt["images"][: params.gallery_images]]
    retention_set = load_retention_set(params) if dirs["dino"] is not None else None
    retention: LabelMap | None = None
    runs: dict[str, VariantOutput] = {}
    for variant, scale in passes(params).items():
        if dirs["dino"] is None and dirs["sam"] is None:
            break
        which = f"{variant} models" if scale in (None, 1.0) else f"adapters at scale {scale:g}"
        log(f"evaluate: {which} on {len(gt['images'])} test images")
        teachers = load_teachers(
            gt,
            dino_dir=dirs["dino"],
            sam_dir=dirs["sam"],
            dino_params=dino_params,
            sam_params=sam_params,
            adapter_scale=scale,
        )
        if teachers.dino is not None and not runs:  # the first pass: the tokenizer is loaded
            names = [*teachers.label_map.names, *category_names(gt).values()]
            retention = retention_label_map(
                params, dataset_names=names, tokenizer=teachers.dino.processor.tokenizer, log=log
            )
        runs[variant] = run_variant(
            gt,
            images_root,
            teachers,
            keep=keep,
            text_threshold=params.text_threshold,
            multimask=sam_params.multimask,
            batch_size=2,
            gallery_ids=gallery_ids,
            desc=f"evaluate ({variant})",
            retention=retention,
        )
        if retention_set is not None and teachers.dino is not None:
            runs[variant].metrics.update(
                true_retention(
                    teachers.dino,
                    retention_set,
                    max_detections=keep.max_detections,
                    desc=f"retention set ({variant})",
                )
            )
        del teachers
    title = ("Grounded-SAM" if dirs["sam"] else "DINO") if dirs["dino"] else "SAM from true boxes"
    report = _report(
        gt,
        images_root,
        runs,
        gallery_ids,
        title=title,
        min_score=dino_params.box_threshold if dirs["dino"] else 0.0,
    )
    report.metrics.update(forgetting_metrics(gt, runs, params=params, retention=retention, log=log))
    report.tradeoff = tradeoff_rows(report.metrics, params.adapter_scales)
    report.metrics.update(
        student_metrics(gt, images_root, runs, student_dir=student_dir, params=params, log=log)
    )
    return report


SCALE_KEYS = ("box/map", "segm/map", "mask/miou", "retention/box/map", "retention/true/box/map")


def forgetting_metrics(
    gt: dict,
    runs: dict[str, VariantOutput],
    *,
    params: Any,
    retention: LabelMap | None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """``retention/...`` of the adapted pass and ``scale/<s>/...`` of every adapter scale (see the
    module docstring); one log line per scale."""
    out: dict[str, float] = {}
    scored: dict[str, dict[str, float]] = {name: dict(run.metrics) for name, run in runs.items()}
    base = runs.get("base")
    if retention is not None and base is not None and base.retention is not None:
        reference = reference_ground_truth(
            gt["images"],
            base.retention,
            threshold=params.retention_threshold,
            category_ids=retention.category_ids,
            names=retention.names,
        )
        out["retention/reference_boxes"] = float(len(reference["annotations"]))
        if not reference["annotations"]:
            named = ", ".join(retention.names[:5]) + (", ..." if len(retention.names) > 5 else "")
            log(
                "evaluate: retention/box/*: nothing to measure (-1): the base model detects none "
                f"of the {len(retention.names)} retention classes ({named}) with a score >= "
                f"{params.retention_threshold:g} on the test images; lower "
                "evaluate.retention_threshold, or name classes the images show in "
                "evaluate.retention_classes"
            )
        for name, run in runs.items():
            if run.retention is not None:
                found = retention_scores(
                    reference, run.retention, max_detections=params.max_detections
                )
                scored[name].update({f"retention/box/{k}": v for k, v in found.items()})
        out.update({k: v for k, v in scored["adapted"].items() if k.startswith("retention/box/")})
    base_map = runs["base"].metrics.get("box/map") if "base" in runs else None
    for scale in params.adapter_scales:
        scored_by = pass_of(scale, runs)
        if scored_by is None:
            continue
        values = {k: scored[scored_by][k] for k in SCALE_KEYS if k in scored[scored_by]}
        out.update({f"{scale_prefix(scale)}/{k}": v for k, v in values.items()})
        shown = [f"{k} {v:.3f}" for k, v in values.items()]
        if base_map is not None and base_map >= 0 and values.get("box/map", -1.0) >= 0:
            shown.insert(1, f"(gain {values['box/map'] - base_map:+.3f})")
        log(f"evaluate: adapter scale {scale:g}: {' '.join(shown) or 'no metrics'}")
    return out


def student_metrics(
    gt: dict,
    images_root: Path,
    runs: dict[str, VariantOutput],
    *,
    student_dir: str | Path | None,
    params: Any,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """``student/...`` (teacher.student.evaluate) and ``teacher/ms_per_image`` (the adapted
    teachers' Grounded-SAM time per test image, measured the same way) when a student exists."""
    if student_dir is None:
        return {}
    from teacher.student.evaluate import evaluate_student

    out = evaluate_student(
        gt,
        images_root,
        student_dir=student_dir,
        score_threshold=params.score_threshold,
        max_detections=params.max_detections,
        log=log,
    )
    if "adapted" in runs and runs["adapted"].seconds > 0:
        out["teacher/ms_per_image"] = 1000.0 * runs["adapted"].seconds / max(len(gt["images"]), 1)
    return out


def _report(
    gt: dict,
    images_root: Path,
    runs: dict[str, VariantOutput],
    gallery_ids: Sequence[Any],
    *,
    title: str,
    min_score: float,
) -> Report:
    """Merge the passes' metrics (base/, gain/), group PR rows by class, draw the gallery.

    The gallery shows detections scoring at least ``min_score`` (what ``teacher predict`` keeps).
    """
    adapted = runs.get("adapted", VariantOutput())
    metrics = dict(adapted.metrics)
    if "base" in runs:
        metrics.update({f"base/{k}": v for k, v in runs["base"].metrics.items()})
        metrics.update(gains(adapted.metrics, runs["base"].metrics))
    curves: dict[str, list[dict[str, float]]] = {}
    for row in adapted.curves:
        curves.setdefault(row["class"], []).append(
            {"recall": row["recall"], "precision": row["precision"]}
        )
    names = category_names(gt)
    order = {c["id"]: i for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
    anns_of = _by_image(gt)
    records = {img["id"]: img for img in gt["images"]}
    panels = {}
    for image_id in gallery_ids if runs else []:
        rec = records[image_id]
        image = load_image(images_root / rec["file_name"])
        det = adapted.shown.get(image_id)
        if det is not None:
            det = det.take(det.scores >= min_score)
        panels[f"{image_id}_{Path(rec['file_name']).stem}"] = gallery_panel(
            image, anns_of[image_id], det, names=names, order=order, title=title
        )
    return Report(metrics=metrics, curves=curves, panels=panels)
