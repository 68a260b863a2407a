"""Grounded-SAM inference: class names -> Grounding DINO boxes -> SAM masks -> COCO results.

The teacher's labels for training students. Per image: DINO detects boxes for every class of
the label map (images batched), detections are filtered (score threshold, per-class NMS, then
class-agnostic NMS where asked, a cap per image), and SAM segments all boxes of the image from
one image embedding. The output is a COCO dataset: images with sizes, categories, and per
detection ``bbox`` (xywh, absolute pixels), ``segmentation`` (compressed RLE, ``counts`` a str),
``area`` and ``score``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from teacher.coco.boxes import clip_xywh, xywh_to_xyxy
from teacher.coco.detections import Detections
from teacher.coco.images import load_image_and_size, resize_mask
from teacher.coco.io import mask_to_rle
from teacher.core.artifacts import SKIPPED_FILE, skipped_reason
from teacher.core.errors import TeacherError
from teacher.core.params import LabelParams
from teacher.dino.labels import LabelMap
from teacher.sam.predictor import SAM_CHUNK  # boxes SAM decodes and upscales at a time

RAW_PER_KEPT = 4  # DINO candidates per kept detection, before per-class NMS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Teachers:
    """The loaded models of Grounded-SAM; either may be None where that teacher is absent."""

    dino: Any | None  # teacher.dino.DinoBundle
    sam: torch.nn.Module | None  # segment_anything Sam (adapter merged or wrapped)
    label_map: LabelMap


@dataclass(frozen=True)
class Filter:
    """Which detections to keep."""

    score_threshold: float = 0.25  # keep scores >= this
    nms_iou: float = 0.7  # per-class NMS IoU; >= 1 disables
    max_detections: int = 100  # per image, highest scores first
    agnostic_iou: float = 1.0  # NMS across classes after per-class NMS; >= 1 disables


def filter_from_args(args: argparse.Namespace, *, default_score: float) -> Filter:
    """A command line's Filter: ``--score-threshold`` (``default_score`` when not given, e.g.
    ``dino.box_threshold``), ``--nms-iou``, ``--max-detections`` and ``--agnostic-nms-iou``
    (the ``label`` stage's ``label.agnostic_nms_iou`` when the command has no such option or
    it is not given; ``teacher serve`` gives 1, off, by default)."""
    agnostic = getattr(args, "agnostic_nms_iou", None)
    return Filter(
        score_threshold=default_score if args.score_threshold is None else args.score_threshold,
        nms_iou=args.nms_iou,
        max_detections=args.max_detections,
        agnostic_iou=LabelParams().agnostic_nms_iou if agnostic is None else agnostic,
    )


@dataclass
class Detector:
    """What labels a pool (:mod:`teacher.inference.job`): ``detect`` (a batch of HxWx3 uint8
    images -> their detections), the categories (id, name) its detections use, and a
    description for the document's ``info``."""

    detect: Callable[[list[np.ndarray]], list[Detections]]
    categories: list[tuple[int, str]]
    description: str
    max_edge: int | None = None  # longest image side it uses; larger images are decoded to it


@dataclass
class Unreadable:
    """Images that could not be read: ``(file, reason)`` pairs, listed and skipped."""

    items: list[tuple[str, str]] = field(default_factory=list)


def nms_per_class(
    boxes_xywh: np.ndarray, scores: np.ndarray, category_ids: np.ndarray, *, iou_threshold: float
) -> np.ndarray:
    """Indexes kept by NMS run separately per class, highest score first.

    boxes_xywh (N, 4) COCO xywh; scores (N,); category_ids (N,). ``iou_threshold >= 1`` keeps
    every box (sorted by score).
    """
    scores_t = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if iou_threshold >= 1 or len(scores_t) == 0:
        return torch.argsort(scores_t, descending=True, stable=True).numpy()
    boxes = torch.as_tensor(xywh_to_xyxy(np.asarray(boxes_xywh, dtype=np.float32)))
    idxs = torch.as_tensor(np.asarray(category_ids, dtype=np.int64))
    return batched_nms(boxes, scores_t, idxs, float(iou_threshold)).numpy()


def nms_across_classes(
    boxes_xywh: np.ndarray, scores: np.ndarray, *, iou_threshold: float
) -> np.ndarray:
    """Indexes kept by class-agnostic NMS, highest score first: of two boxes overlapping at
    IoU > ``iou_threshold``, whatever their classes, the lower-scoring one is dropped (one
    object named twice, e.g. "triangle" and "shape"). ``iou_threshold >= 1`` keeps every box.

    boxes_xywh (N, 4) COCO xywh; scores (N,).
    """
    return nms_per_class(
        boxes_xywh, scores, np.zeros(len(scores), np.int64), iou_threshold=iou_threshold
    )


def select(det: Detections, keep: Filter) -> Detections:
    """Detections above the score threshold, after per-class NMS and then class-agnostic NMS
    (``keep.agnostic_iou``), at most ``max_detections``, sorted by score (masks, when present,
    follow their boxes)."""
    above = np.flatnonzero(det.scores >= keep.score_threshold)
    order = nms_per_class(
        det.boxes[above], det.scores[above], det.category_ids[above], iou_threshold=keep.nms_iou
    )
    kept = above[order]
    if keep.agnostic_iou < 1:
        kept = kept[
            nms_across_classes(det.boxes[kept], det.scores[kept], iou_threshold=keep.agnostic_iou)
        ]
    return det.take(kept[: keep.max_detections])


def clip_detections(det: Detections, *, width: int, height: int) -> Detections:
    """``det`` with its ``boxes`` (N, 4) xywh clipped to a ``width x height`` image."""
    return replace(det, boxes=clip_xywh(det.boxes, width=width, height=height))


def to_annotations(
    det: Detections,
    *,
    image_id: Any,
    first_id: int,
    size: tuple[int, int] | None = None,
    detected_size: tuple[int, int] | None = None,
) -> list[dict]:
    """COCO annotations (results with ``id``) of one image's detections.

    ``masks`` (N, H, W) bool when present become compressed RLE with their pixel ``area``;
    without masks the area is the box's. When the detections were made on a downscaled copy
    (images over ``teacher.coco.images.MAX_PIXELS``) of ``detected_size`` = (width, height), they
    are scaled back to the file's ``size``: boxes scaled, masks resized one at a time. The
    same for images over the teachers' :func:`working_edge`.
    """
    anns = []
    masks = det.masks
    boxes = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4)
    if size is not None and detected_size is not None and size != detected_size:
        boxes = boxes * np.array([size[0] / detected_size[0], size[1] / detected_size[1]] * 2)
    else:
        size = None
    for i, (box, score, cat) in enumerate(zip(boxes, det.scores, det.category_ids, strict=True)):
        bbox = [round(float(v), 2) for v in box]
        ann = {
            "id": first_id + i,
            "image_id": image_id,
            "category_id": int(cat),
            "bbox": bbox,
            "score": round(float(score), 5),
            "iscrowd": 0,
            "area": bbox[2] * bbox[3],
        }
        if masks is not None:
            mask = masks[i] if size is None else resize_mask(masks[i], size)
            ann["segmentation"] = mask_to_rle(mask)
            ann["area"] = int(mask.sum())
        anns.append(ann)
    return anns


def segment_detections(
    sam: torch.nn.Module,
    image: np.ndarray,
    det: Detections,
    *,
    multimask: bool = False,
    chunk: int = SAM_CHUNK,
    prepared: Any | None = None,
) -> Detections:
    """``det`` plus ``masks`` (N, H, W) bool from SAM.

    The image is embedded once (or ``prepared``, a :class:`teacher.sam.predictor.PreparedImage`
    of it, is reused), and not at all when there is no box; the boxes are decoded ``chunk`` at
    a time, which bounds the full-size float logits in memory (chunk x H x W).
    """
    from teacher.sam.predictor import prepare_image

    if len(det) == 0:
        return det.with_masks(np.zeros((0, *image.shape[:2]), bool))
    prepared = prepared if prepared is not None else prepare_image(sam, image)
    masks, _ = prepared.predict(det.boxes, multimask=multimask, chunk=chunk)
    return det.with_masks(masks)


def detect_batch(
    teachers: Teachers,
    images: Sequence[np.ndarray],
    *,
    box_threshold: float,
    text_threshold: float,
    max_detections: int,
) -> list[Detections]:
    """DINO's raw detections for a batch of HxWx3 uint8 images (one per image)."""
    from teacher.dino.detect import detect

    assert teachers.dino is not None, "detection needs the DINO teacher"
    return detect(
        teachers.dino,
        list(images),
        teachers.label_map,
        box_threshold=box_threshold,
        text_threshold=text_threshold,
        max_detections=max_detections,
    )


def predict_images(
    teachers: Teachers,
    images: Sequence[np.ndarray],
    *,
    keep: Filter,
    text_threshold: float,
    multimask: bool = False,
) -> list[Detections]:
    """Grounded-SAM on a batch of images: per image the kept detections, with ``masks`` when
    SAM is loaded. DINO sees the whole batch at once; SAM embeds each image with detections
    once, and an image without any not at all."""
    raw = detect_batch(
        teachers,
        images,
        box_threshold=keep.score_threshold,
        text_threshold=text_threshold,
        max_detections=RAW_PER_KEPT * keep.max_detections,
    )  # NMS needs spares
    out = []
    for image, det in zip(images, raw, strict=True):
        det = clip_detections(det, width=image.shape[1], height=image.shape[0])
        det = select(det, keep)
        if teachers.sam is not None:
            det = segment_detections(teachers.sam, image, det, multimask=multimask)
        out.append(det)
    return out


def working_edge(teachers: Teachers) -> int | None:
    """The longest image side the teachers look at: Grounding DINO's processor resizes to at
    most ``dino.longest_edge`` (1333 by default), SAM to its input size (1024). An image with a
    longer side is decoded straight to it (:func:`teacher.coco.images.working_size`): the
    teachers see the same resolution, memory no longer grows with the file's pixels, and the
    detections are scaled back to the file's size (:func:`to_annotations`)."""
    edges = []
    if teachers.dino is not None:
        edges.append(int(teachers.dino.processor.image_processor.size["longest_edge"]))
    if teachers.sam is not None:
        from teacher.sam.model import input_size, unwrap

        edges.append(int(input_size(unwrap(teachers.sam))))
    return max(edges, default=None)


def list_images(folder: str | Path) -> list[Path]:
    """Files under ``folder`` with an image suffix (recursively), sorted by relative path.

    Whatever is not a folder is listed, FIFOs, sockets and dangling links too, so that the job
    reports them unreadable (:func:`teacher.coco.images.file_problem`, checked without opening
    them) instead of leaving them out silently or blocking on them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TeacherError(f"{folder}: not a folder of images; pass the folder to label")
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
    )


def read_batches(
    paths: Sequence[Path], *, batch_size: int, unreadable: Unreadable, max_edge: int | None = None
) -> Iterator[list[tuple[Path, np.ndarray, tuple[int, int]]]]:
    """Decoded images (path, pixels, the file's full (width, height)) in batches, larger ones
    decoded to ``max_edge`` (:func:`working_edge`); unreadable ones go to ``unreadable`` and are
    skipped."""
    batch: list[tuple[Path, np.ndarray, tuple[int, int]]] = []
    for path in paths:
        try:
            batch.append((path, *load_image_and_size(path, max_edge=max_edge)))
        except TeacherError as e:
            unreadable.items.append((str(path), str(e)))
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- loading for `teacher predict` -------------------------------------------------------------


def parse_classes(text: str) -> list[str]:
    """``"cat, dog,,bird"`` -> ``["cat", "dog", "bird"]``; duplicates are an error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise TeacherError(f'--classes {text!r} names no class; give e.g. --classes "cat,dog"')
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TeacherError(f"--classes repeats {', '.join(dupes)}; name each class once")
    return names


def adapter_folder(adapters: Path | None, name: str, log) -> Path | None:
    """``adapters/<name>`` when it holds a trained adapter; None (with a note) when skipped/absent."""
    if adapters is None:
        return None
    folder = adapters / name
    reason = skipped_reason(folder)
    if reason is not None:
        log(
            f"predict: {name}: no adapter ({folder}/{SKIPPED_FILE}: {reason}); using the base model"
        )
        return None
    if not (folder / "adapter_config.json").exists():
        raise TeacherError(
            f"{folder}: no adapter_config.json; pass --adapters pointing at the "
            "folder holding dino/ and sam/ (models/ after `dvc repro`)"
        )
    return folder


def merged(bundle: Any) -> Any:
    """A DINO bundle whose adapter (if any) is merged into the weights: faster inference."""
    if hasattr(bundle.model, "merge_and_unload"):
        from teacher.train.lora import merge

        bundle.model = merge(bundle.model)
    return bundle


def load_predict_teachers(
    *,
    classes: Sequence[str] | None,
    adapters: str | Path | None,
    dino_params: Any,
    sam_params: Any,
    segment_masks: bool = True,
    adapter_scale: float = 1.0,
    device: Any = None,
    classes_per_call: bool = False,
    log=print,
) -> Teachers:
    """DINO (+ adapter) and SAM (+ adapter) on ``device`` (default: a GPU when there is one),
    with the class list to detect.

    Classes come from ``classes`` (ids 1..N in order) or, without it, the DINO adapter's
    ``labels.json``; with neither, an error, or with ``classes_per_call`` an empty label map (the
    caller brings the classes of each call: ``teacher serve`` from the labeling config).
    ``adapter_scale`` scales both adapters (:func:`teacher.train.lora.load_adapter`:
    0 = the base models, 1 = the adapters as trained).
    """
    from teacher.dino.labels import build_label_map
    from teacher.dino.model import load_dino
    from teacher.train.lora import check_adapter_scale

    adapter_scale = check_adapter_scale(adapter_scale)  # before any model is loaded
    if adapters is None and adapter_scale != 1.0:
        log(f"predict: adapter scale {adapter_scale:g} has no effect without adapters")
    adapters = Path(adapters) if adapters is not None else None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dino = merged(
        load_dino(
            dino_params,
            adapter_dir=adapter_folder(adapters, "dino", log),
            adapter_scale=adapter_scale,
        )
    )
    dino.model.to(device)
    if classes:
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
        label_map = build_label_map(cats, tokenizer=dino.processor.tokenizer)
    elif dino.label_map is not None:
        label_map = dino.label_map
    elif classes_per_call:
        label_map = LabelMap(category_ids=(), names=(), chunks=())
    else:
        raise TeacherError(
            'no classes to detect: pass --classes "cat,dog" or --adapters with '
            "a trained dino/ adapter (its labels.json holds the classes)"
        )
    sam = None
    if segment_masks:
        from teacher.sam.build import load_sam

        sam = load_sam(
            sam_params,
            adapter_dir=adapter_folder(adapters, "sam", log),
            adapter_scale=adapter_scale,
        )
        sam = sam.to(device).eval()
    return Teachers(dino=dino, sam=sam, label_map=label_map)


def predict_detector(
    device: Any,
    *,
    classes: Sequence[str] | None,
    adapters: str | Path | None,
    dino: Any,
    sam: Any,
    segment_masks: bool,
    adapter_scale: float,
    keep: Filter,
    text_threshold: float,
    log=print,
) -> Detector:
    """``teacher predict``'s Grounded-SAM as a labeling job's detector, loaded on ``device``."""
    teachers = load_predict_teachers(
        classes=classes,
        adapters=adapters,
        dino_params=dino,
        sam_params=sam,
        segment_masks=segment_masks,
        adapter_scale=adapter_scale,
        device=device,
        log=log,
    )
    return teachers_detector(
        teachers,
        keep=keep,
        text_threshold=text_threshold,
        multimask=sam.multimask,
        description="teacher predictions (Grounded-SAM)",
    )


def teachers_detector(
    teachers: Teachers, *, keep: Filter, text_threshold: float, multimask: bool, description: str
) -> Detector:
    """Grounded-SAM (:func:`predict_images`) over loaded teachers, as a labeling job's detector."""
    lm = teachers.label_map
    return Detector(
        partial(
            predict_images, teachers, keep=keep, text_threshold=text_threshold, multimask=multimask
        ),
        categories=list(zip(lm.category_ids, lm.names, strict=True)),
        description=description,
        max_edge=working_edge(teachers),
    )
