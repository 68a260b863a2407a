"""The evaluate stage's work: teachers on the test split -> flat metrics, PR curves, gallery.

Metric keys (flat, stable; class names from the test split's categories):
- ``box/<k>``: Grounding DINO (with its adapter) COCO bbox metrics, ``<k>`` as in
  :func:`teacher.coco.metrics.summarize` (``map``, ``map_50``, ..., ``map/<class>``), detections
  decoded as Open-GroundingDino's COCO evaluation (:func:`teacher.dino.detect.score`: mean
  token probability per class, top 300 pairs, no threshold, no NMS), comparable with papers;
- ``mask/miou``, ``mask/miou/<class>``: SAM (with its adapter) prompted by the ground-truth
  boxes, mean mask IoU against the ground-truth masks;
- ``mask/miou_point``: the same prompted by one click per object, its mask's pixel farthest
  from the boundary (:func:`teacher.sam.scoring.score_gt_points`), as the smart tool is used;
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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from teacher.coco.detections import Detections
from teacher.coco.images import load_image, load_image_and_size
from teacher.coco.io import annotation_mask, has_mask
from teacher.coco.metrics import (
    category_names,
    coco_eval,
    coco_evaluate,
    mean_mask_iou,
    precision_recall,
    segm_ground_truth,
    summarize,
)
from teacher.core.artifacts import LABELS_FILE, SKIPPED_FILE, skipped_reason
from teacher.core.errors import TeacherError
from teacher.core.params import DinoParams, EvaluateParams, SamParams
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
from teacher.sam.predictor import prepare_image
from teacher.sam.scoring import is_sam_instance, score_gt_boxes, score_gt_points

if TYPE_CHECKING:
    from teacher.dino.model import DinoBundle


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


@dataclass
class _Collected:
    """What a pass collects image by image: ``out`` (all but its metrics), and the COCO results
    and IoUs that :func:`_scores` turns into its metrics."""

    out: VariantOutput = field(default_factory=VariantOutput)  # gallery, seconds, retention
    results: list[dict] = field(default_factory=list)  # labeling decode (Grounded-SAM, gallery)
    box_results: list[dict] = field(default_factory=list)  # reference protocol (box/*)
    ious: list[np.ndarray] = field(default_factory=list)  # per image: SAM from the true boxes
    cats: list[int] = field(default_factory=list)  # the category of each of those IoUs
    point_ious: list[np.ndarray] = field(default_factory=list)  # per image: SAM from one click


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

    anns_of = _by_image(gt)
    found = _Collected()
    out = found.out
    if retention is not None and teachers.dino is not None:
        out.retention = {}
    images = gt["images"]
    bar = tqdm(total=len(images), desc=desc, unit="img")
    for start in range(0, len(images), batch_size):
        records = images[start : start + batch_size]
        arrays = [load_image(images_root / r["file_name"]) for r in records]
        dets = _detect_batch(
            teachers, records, arrays, found, keep=keep, text_threshold=text_threshold
        )
        if out.retention is not None and retention is not None:  # the forgetting guard
            others = Teachers(dino=teachers.dino, sam=None, label_map=retention)
            seen = predict_images(others, arrays, keep=keep, text_threshold=text_threshold)
            out.retention.update(zip((r["id"] for r in records), seen, strict=True))
        for rec, image, det in zip(records, arrays, dets, strict=True):
            instances = [a for a in anns_of[rec["id"]] if is_sam_instance(a)]
            shown = rec["id"] in gallery_ids
            _segment_image(
                teachers, rec["id"], image, det, instances, found, multimask=multimask, shown=shown
            )
        bar.update(len(records))
    bar.close()
    out.metrics, out.curves = _scores(gt, teachers, found, max_detections=keep.max_detections)
    return out


def _detect_batch(
    teachers: Teachers,
    records: Sequence[dict],
    arrays: list[np.ndarray],
    found: _Collected,
    *,
    keep: Filter,
    text_threshold: float,
) -> list[Detections | None]:
    """DINO on one batch of images: the reference protocol's detections go to
    ``found.box_results`` (box/*); the labeling decode's (timed into ``found.out.seconds``) are
    returned, one per image, for Grounded-SAM. All None without DINO."""
    if teachers.dino is None:
        return [None] * len(records)
    from teacher.dino.detect import score

    for rec, scored in zip(records, score(teachers.dino, arrays, teachers.label_map), strict=True):
        found.box_results += to_annotations(
            scored, image_id=rec["id"], first_id=len(found.box_results) + 1
        )
    boxes_only = Teachers(dino=teachers.dino, sam=None, label_map=teachers.label_map)
    started = time.perf_counter()  # DINO's labeling decode on the batch; SAM per image
    dets: list[Detections | None] = list(
        predict_images(boxes_only, arrays, keep=keep, text_threshold=text_threshold)
    )
    found.out.seconds += time.perf_counter() - started
    return dets


def _segment_image(
    teachers: Teachers,
    image_id: Any,
    image: np.ndarray,
    det: Detections | None,
    instances: list[dict],
    found: _Collected,
    *,
    multimask: bool,
    shown: bool,
) -> None:
    """SAM on one image, one encoder pass shared by Grounded-SAM (DINO's ``det`` -> masks, timed
    into ``found.out.seconds``, to ``found.results``) and the mask IoU from the true boxes of
    ``instances`` (to ``found.ious``; from one click each to ``found.point_ious``). ``shown``: a gallery image, kept in ``found.out.shown``."""
    out = found.out
    started = time.perf_counter()
    prepared = None
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
        found.results += to_annotations(det, image_id=image_id, first_id=len(found.results) + 1)
        if shown:
            out.shown[image_id] = det
    if prepared is not None and instances:
        sam_alone = shown and teachers.dino is None  # the gallery shows SAM from true boxes
        iou, truth = score_gt_boxes(prepared, instances, multimask=multimask, keep_masks=sam_alone)
        found.ious.append(iou)
        found.cats += truth.category_ids.tolist()
        found.point_ious.append(score_gt_points(prepared, instances))
        if sam_alone:
            out.shown[image_id] = truth


def _scores(
    gt: dict, teachers: Teachers, found: _Collected, *, max_detections: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A pass's metrics (``box/*``, ``segm/*``, ``mask/*``: the teachers it ran) and its PR rows
    at IoU 0.5 (boxes), from what :func:`run_variant` collected."""
    names = category_names(gt)
    max_dets = (1, 10, max_detections)
    metrics: dict[str, float] = {}
    curves: list[dict[str, Any]] = []
    if teachers.dino is not None:
        evaluator = coco_evaluate(gt, found.box_results, iou_type="bbox", max_dets=max_dets)
        metrics.update({f"box/{k}": v for k, v in summarize(evaluator, names=names).items()})
        curves = precision_recall(evaluator, names=names, iou=0.5)
        if teachers.sam is not None:
            evaluator = coco_evaluate(
                segm_ground_truth(gt), found.results, iou_type="segm", max_dets=max_dets
            )
            metrics.update({f"segm/{k}": v for k, v in summarize(evaluator, names=names).items()})
    if teachers.sam is not None:
        all_ious = np.concatenate(found.ious) if found.ious else np.zeros((0,))
        mm = mean_mask_iou(all_ious, found.cats, names=names)
        metrics.update({f"mask/{k.removeprefix('mask_')}": v for k, v in mm.items()})
        points = np.concatenate(found.point_ious) if found.point_ious else np.zeros((0,))
        metrics["mask/miou_point"] = mean_mask_iou(points, found.cats)["mask_miou"]
    return metrics, curves


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
    dino_params: DinoParams,
    sam_params: SamParams,
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
        from teacher.sam.build import load_sam

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


@dataclass(frozen=True)
class Pass:
    """One pass over the test split: the models it loads and the adapter scale it scores."""

    kind: Literal["adapted", "base", "scaled"]  # adapters as trained, none, or scaled
    scale: float  # the adapter scale whose ``scale/<s>/...`` keys it gives (base: 0, adapted: 1)

    @property
    def name(self) -> str:
        """``adapted``, ``base`` or, a scaled pass, ``scale/<s>`` (its keys' prefix): logs, bars."""
        return scale_prefix(self.scale) if self.kind == "scaled" else self.kind

    @property
    def adapter_scale(self) -> float | None:
        """The scale the adapters are merged at (:func:`load_teachers`); None: no adapters."""
        return None if self.kind == "base" else self.scale

    @property
    def title(self) -> str:
        """What the pass runs, for the log."""
        if self.kind == "scaled":
            return f"adapters at scale {self.scale:g}"
        return f"{self.kind} models"

    @classmethod
    def scoring(cls, scale: float, *, base: bool) -> Pass:
        """The pass whose metrics are adapter scale ``scale``'s: scale 1 is the adapted pass, and
        scale 0 the base pass when there is one (``base``); any other scale its own pass."""
        if scale == 1.0:
            return ADAPTED
        if scale == 0.0 and base:
            return BASE
        return cls("scaled", scale)


ADAPTED = Pass("adapted", 1.0)
BASE = Pass("base", 0.0)


def passes(params: EvaluateParams) -> list[Pass]:
    """The passes over the test split, in order, each once.

    ``adapted`` (scale 1), ``base`` (with ``evaluate.base``), and a scaled pass for every other
    scale of ``evaluate.adapter_scales``: scale 1 reuses the adapted pass and scale 0 the base
    pass, whose outputs are the same (tests/evaluation/test_forgetting.py pins it).
    """
    out = [ADAPTED, BASE] if params.base else [ADAPTED]
    for scale in params.adapter_scales:
        scored_by = Pass.scoring(scale, base=params.base)
        if scored_by not in out:
            out.append(scored_by)
    return out


def retention_label_map(
    params: EvaluateParams,
    *,
    dataset_names: Sequence[str],
    tokenizer: Any,
    log: Callable[[str], None],
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


def load_retention_set(params: EvaluateParams) -> tuple[dict, Path] | None:
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
    bundle: DinoBundle, retention_set: tuple[dict, Path], *, max_detections: int, desc: str
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
    dino_params: DinoParams,
    sam_params: SamParams,
    params: EvaluateParams,
    log: Callable[[str], None] = print,
    student_dir: str | Path | None = None,
) -> Report:
    """Score the adapted teachers (and, with ``params.base``, the base models; and the adapters
    at each of ``params.adapter_scales``) on ``gt``.

    ``params`` is the ``evaluate`` section; ``dino_params``/``sam_params`` the model sections. A
    teacher folder holding ``SKIPPED`` gives no metrics; ``log`` says why.
    """
    images_root = Path(images_root)
    dino = trained_dir(Path(dino_dir), name="dino", log=log)
    sam = trained_dir(Path(sam_dir), name="sam", log=log)
    gallery_ids = [img["id"] for img in gt["images"][: params.gallery_images]]
    runs, retention = run_passes(
        gt,
        images_root,
        dino_dir=dino,
        sam_dir=sam,
        dino_params=dino_params,
        sam_params=sam_params,
        params=params,
        gallery_ids=gallery_ids,
        log=log,
    )
    title = ("Grounded-SAM" if sam else "DINO") if dino else "SAM from true boxes"
    min_score = dino_params.box_threshold if dino else 0.0
    report = _report(gt, images_root, runs, gallery_ids, title=title, min_score=min_score)
    report.metrics.update(forgetting_metrics(gt, runs, params=params, retention=retention, log=log))
    report.tradeoff = tradeoff_rows(report.metrics, params.adapter_scales)
    report.metrics.update(
        student_metrics(gt, images_root, runs, student_dir=student_dir, params=params, log=log)
    )
    return report


def trained_dir(folder: Path, *, name: str, log: Callable[[str], None]) -> Path | None:
    """``folder``, or None (logged) when it holds ``SKIPPED``: that teacher gives no metrics."""
    reason = skipped_reason(folder)
    if reason is None:
        return folder
    log(f"evaluate: no {name} metrics: {folder}/{SKIPPED_FILE} says: {reason}")
    return None


def run_passes(
    gt: dict,
    images_root: Path,
    *,
    dino_dir: Path | None,
    sam_dir: Path | None,
    dino_params: DinoParams,
    sam_params: SamParams,
    params: EvaluateParams,
    gallery_ids: Sequence[Any],
    log: Callable[[str], None],
) -> tuple[dict[Pass, VariantOutput], LabelMap | None]:
    """Every pass of :func:`passes` over ``gt`` (none when both teachers are absent), and the
    label map of the retention classes the passes detected (None: none)."""
    if dino_dir is None and sam_dir is None:
        return {}, None
    retention_set = load_retention_set(params) if dino_dir is not None else None
    retention: LabelMap | None = None
    runs: dict[Pass, VariantOutput] = {}
    for variant in passes(params):
        log(f"evaluate: {variant.title} on {len(gt['images'])} test images")
        teachers = load_teachers(
            gt,
            dino_dir=dino_dir,
            sam_dir=sam_dir,
            dino_params=dino_params,
            sam_params=sam_params,
            adapter_scale=variant.adapter_scale,
        )
        if teachers.dino is not None and not runs:  # the first pass: the tokenizer is loaded
            names = [*teachers.label_map.names, *category_names(gt).values()]
            retention = retention_label_map(
                params, dataset_names=names, tokenizer=teachers.dino.processor.tokenizer, log=log
            )
        runs[variant] = score_pass(
            gt,
            images_root,
            teachers,
            name=variant.name,
            params=params,
            multimask=sam_params.multimask,
            gallery_ids=gallery_ids,
            retention=retention,
            retention_set=retention_set,
        )
        del teachers
    return runs, retention


def score_pass(
    gt: dict,
    images_root: Path,
    teachers: Teachers,
    *,
    name: str,
    params: EvaluateParams,
    multimask: bool,
    gallery_ids: Sequence[Any],
    retention: LabelMap | None,
    retention_set: tuple[dict, Path] | None,
) -> VariantOutput:
    """One pass of the loaded ``teachers`` (called ``name``): :func:`run_variant` with the
    ``evaluate`` section's decode, and DINO's true box AP on the labelled retention set
    (``retention/true/box/*``) when there is one."""
    keep = Filter(
        score_threshold=params.score_threshold,
        nms_iou=params.nms_iou,
        max_detections=params.max_detections,
    )
    out = run_variant(
        gt,
        images_root,
        teachers,
        keep=keep,
        text_threshold=params.text_threshold,
        multimask=multimask,
        batch_size=2,
        gallery_ids=gallery_ids,
        desc=f"evaluate ({name})",
        retention=retention,
    )
    if retention_set is not None and teachers.dino is not None:
        out.metrics.update(
            true_retention(
                teachers.dino,
                retention_set,
                max_detections=keep.max_detections,
                desc=f"retention set ({name})",
            )
        )
    return out


SCALE_KEYS = ("box/map", "segm/map", "mask/miou", "retention/box/map", "retention/true/box/map")


def forgetting_metrics(
    gt: dict,
    runs: dict[Pass, VariantOutput],
    *,
    params: EvaluateParams,
    retention: LabelMap | None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """``retention/...`` of the adapted pass and ``scale/<s>/...`` of every adapter scale (see the
    module docstring); one log line per scale."""
    out: dict[str, float] = {}
    scored = {variant: dict(output.metrics) for variant, output in runs.items()}
    base = runs.get(BASE)
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
            log(nothing_to_measure(retention, threshold=params.retention_threshold))
        for variant, output in runs.items():
            if output.retention is not None:
                found = retention_scores(
                    reference, output.retention, max_detections=params.max_detections
                )
                scored[variant].update({f"retention/box/{k}": v for k, v in found.items()})
        out.update({k: v for k, v in scored[ADAPTED].items() if k.startswith("retention/box/")})
    out.update(scale_metrics(scored, params.adapter_scales, log=log))
    return out


def nothing_to_measure(retention: LabelMap, *, threshold: float) -> str:
    """The log line when the base model detects no retention class confidently: what to change."""
    named = ", ".join(retention.names[:5]) + (", ..." if len(retention.names) > 5 else "")
    return (
        "evaluate: retention/box/*: nothing to measure (-1): the base model detects none "
        f"of the {len(retention.names)} retention classes ({named}) with a score >= "
        f"{threshold:g} on the test images; lower "
        "evaluate.retention_threshold, or name classes the images show in "
        "evaluate.retention_classes"
    )


def scale_metrics(
    scored: dict[Pass, dict[str, float]],
    scales: Sequence[float],
    *,
    log: Callable[[str], None],
) -> dict[str, float]:
    """``scale/<s>/<key>`` (:data:`SCALE_KEYS`) for every adapter scale s in ``scales`` from the
    metrics of the pass that scored it (``scored``, retention included); one log line each."""
    out: dict[str, float] = {}
    base_map = scored[BASE].get("box/map") if BASE in scored else None
    for scale in scales:
        metrics = scored.get(Pass.scoring(scale, base=BASE in scored))
        if metrics is None:
            continue
        values = {k: metrics[k] for k in SCALE_KEYS if k in metrics}
        out.update({f"{scale_prefix(scale)}/{k}": v for k, v in values.items()})
        shown = [f"{k} {v:.3f}" for k, v in values.items()]
        if base_map is not None and base_map >= 0 and values.get("box/map", -1.0) >= 0:
            shown.insert(1, f"(gain {values['box/map'] - base_map:+.3f})")
        log(f"evaluate: adapter scale {scale:g}: {' '.join(shown) or 'no metrics'}")
    return out


def student_metrics(
    gt: dict,
    images_root: Path,
    runs: dict[Pass, VariantOutput],
    *,
    student_dir: str | Path | None,
    params: EvaluateParams,
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
    if ADAPTED in runs and runs[ADAPTED].seconds > 0:
        out["teacher/ms_per_image"] = 1000.0 * runs[ADAPTED].seconds / max(len(gt["images"]), 1)
    return out


def _report(
    gt: dict,
    images_root: Path,
    runs: dict[Pass, VariantOutput],
    gallery_ids: Sequence[Any],
    *,
    title: str,
    min_score: float,
) -> Report:
    """Merge the passes' metrics (base/, gain/), group PR rows by class, draw the gallery.

    The gallery shows detections scoring at least ``min_score`` (what ``teacher predict`` keeps).
    """
    adapted = runs.get(ADAPTED, VariantOutput())
    metrics = dict(adapted.metrics)
    if BASE in runs:
        metrics.update({f"base/{k}": v for k, v in runs[BASE].metrics.items()})
        metrics.update(gains(adapted.metrics, runs[BASE].metrics))
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
