"""Student training data: human and teacher-labeled images as RF-DETR targets, built with our COCO code.

Targets come from :mod:`teacher.coco.io`, not from the RF-DETR image processor's annotation helper:
in transformers 5.24 that helper filters crowd annotations out of the labels but not out of the
masks (labels and masks then pair up wrongly whenever an image has a crowd region) and reads
polygons only (a compressed-RLE mask fails). Here every instance keeps its own mask: polygons,
compressed and uncompressed RLE decode through pycocotools; crowd regions are left out of both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from teacher.coco.boxes import xywh_to_cxcywh_norm
from teacher.coco.images import image_path, load_image
from teacher.coco.io import (
    annotation_mask,
    coco_format_problem,
    geometry_problem,
    index_by_image,
    load_coco,
    mask_kind,
)
from teacher.core.errors import TeacherError
from teacher.dataset.augment import sample_rng
from teacher.dataset.validation.registry import RULES
from teacher.student.model import preprocess

HUMAN, TEACHER = "human", "teacher"


def label_index(categories: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """``{category id: label index}``, 0..N-1 in id order (the student's class heads)."""
    return {int(c["id"]): i for i, c in enumerate(sorted(categories, key=lambda c: int(c["id"])))}


def has_masks(coco: Mapping[str, Any]) -> bool:
    """True when any non-crowd annotation has a mask: the student segments (RfDetrForInstanceSegmentation)."""
    return any(
        not a.get("iscrowd") and mask_kind(a) not in ("none", "invalid")
        for a in coco["annotations"]
    )


def instance_targets(
    anns: Sequence[dict[str, Any]],
    *,
    height: int,
    width: int,
    label_of: Mapping[int, int],
    masks: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The instances of one image the loss sees: ``boxes`` (n, 4) float32 COCO xywh px,
    ``labels`` (n,) int64 label indexes and, with ``masks``, ``masks`` (n, H, W) bool.

    Crowd regions, boxes without area and categories outside ``label_of`` are left out, each
    with its own mask, so boxes, labels and masks stay aligned. An instance without a mask in
    segmentation data gets its filled box as the mask.
    """
    kept = [
        a
        for a in anns
        if not a.get("iscrowd")
        and int(a["category_id"]) in label_of
        and len(a.get("bbox") or []) == 4
        and a["bbox"][2] > 0
        and a["bbox"][3] > 0
    ]
    boxes = np.array([a["bbox"] for a in kept], dtype=np.float32).reshape(-1, 4)
    labels = np.array([label_of[int(a["category_id"])] for a in kept], dtype=np.int64)
    if not masks:
        return boxes, labels, None
    out = np.zeros((len(kept), height, width), dtype=bool)
    for i, ann in enumerate(kept):
        if mask_kind(ann) in ("none", "invalid"):
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            out[i, max(y, 0) : y + h, max(x, 0) : x + w] = True
        else:
            out[i] = annotation_mask(ann, height, width)
    return boxes, labels, out


def model_targets(
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None,
    *,
    width: int,
    height: int,
    resolution: int,
) -> dict[str, Tensor]:
    """One image's RF-DETR target: ``class_labels`` (n,), ``boxes`` (n, 4) cxcywh in [0, 1] and,
    with masks, ``masks`` (n, R, R) float (nearest resize to the model's input side)."""
    norm = xywh_to_cxcywh_norm(
        np.asarray(boxes, np.float32).reshape(-1, 4), width=width, height=height
    )
    target = {
        "class_labels": torch.as_tensor(labels, dtype=torch.long),
        "boxes": torch.as_tensor(np.clip(norm, 0.0, 1.0), dtype=torch.float32),
    }
    if masks is not None:
        m = torch.as_tensor(np.asarray(masks, dtype=np.float32)).reshape(-1, 1, height, width)
        m = torch.nn.functional.interpolate(m, size=(resolution, resolution), mode="nearest")
        target["masks"] = m[:, 0]
    return target


@dataclass(frozen=True)
class Source:
    """One labeled image collection: a COCO dict, its image root, its loss weight."""

    name: str  # HUMAN | TEACHER
    coco: dict[str, Any]
    image_root: Path
    weight: float
    labels_file: Path | None = None  # where masks left on disk are read (load_teacher_labels)


MASK_AT = "segmentation_at"  # (offset, length) in the labels file of an annotation with a mask


def load_teacher_labels(path: Path) -> dict[str, Any]:
    """The teacher labels file with every annotation's mask left on disk: such an annotation
    holds ``MASK_AT`` (where its line is) instead of ``segmentation``, and
    :func:`with_mask` reads it back when its image is loaded. Every process of the student's
    training then holds boxes and scores only, not the pool's RLE masks.

    Streams the layout ``teacher.coco.io.dumps_coco`` writes (one record per line, what the
    label stage writes); any other JSON is read whole, masks included. An annotation whose mask
    is not one COCO knows keeps it, so :func:`teacher_label_problems` names it."""
    doc: dict[str, Any] = {}
    key = None
    offset = 0
    with Path(path).open("rb") as f:
        for raw in f:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith(' "') and line.endswith(": ["):
                key = json.loads(line.strip()[:-3])
                doc[key] = []
            elif line.startswith("  {") and key is not None:
                text = line.strip().removesuffix(",")
                record = json.loads(text)
                if key == "annotations" and mask_kind(record) not in ("none", "invalid"):
                    start = offset + len(raw) - len(raw.lstrip())
                    del record["segmentation"]
                    record[MASK_AT] = [start, len(text.encode("utf-8"))]
                doc[key].append(record)
            elif line.startswith(" ]"):
                key = None
            elif line.startswith(' "'):  # ` "key": value` on one line
                name, _, value = line.strip().removesuffix(",").partition(": ")
                doc[json.loads(name)] = json.loads(value)
            elif line not in ("{", "}"):
                return load_coco(path)  # not our layout: the whole document
            offset += len(raw)
    return doc if not coco_format_problem(doc) else load_coco(path)


def with_mask(ann: dict[str, Any], labels_file: Path | None) -> dict[str, Any]:
    """``ann`` with its ``segmentation`` read back from ``labels_file`` when it was left there."""
    if labels_file is None or MASK_AT not in ann:
        return ann
    start, length = ann[MASK_AT]
    with Path(labels_file).open("rb") as f:
        f.seek(start)
        return json.loads(f.read(length))


class StudentDataset(Dataset):
    """Images of every source, with their instances.

    Items: ``image`` HxWx3 uint8 (augmented), ``boxes`` (n, 4) xywh px in it, ``labels`` (n,),
    ``masks`` (n, H, W) bool or None, ``weight`` (the source's), ``source``, ``image_id``.
    Augmentation is seeded by (seed, epoch, index).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        label_of: Mapping[int, int],
        masks: bool,
        seed: int,
        transform: Callable | None = None,
    ) -> None:
        self.items = [
            (s, rec, anns)
            for s in sources
            for rec, anns in zip(s.coco["images"], index_by_image(s.coco).values(), strict=True)
        ]
        self.label_of, self.masks = dict(label_of), masks
        self.seed, self.epoch, self.transform = seed, 0, transform

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, record, anns = self.items[index]
        if self.masks:
            anns = [with_mask(a, source.labels_file) for a in anns]
        image = load_image(image_path(source.image_root, record["file_name"]))
        h, w = image.shape[:2]
        boxes, labels, masks = instance_targets(
            anns, height=h, width=w, label_of=self.label_of, masks=self.masks
        )
        if self.transform is not None:
            seed = int(sample_rng(self.seed, self.epoch, index).integers(2**31))
            image, boxes, labels, masks = augment(
                self.transform, image, boxes, labels, masks, seed=seed
            )
        return {
            "image": image,
            "boxes": boxes,
            "labels": labels,
            "masks": masks,
            "weight": source.weight,
            "source": source.name,
            "image_id": record["id"],
        }


def augment(
    transform: Callable,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None,
    *,
    seed: int,
):
    """An ``augment.build_transform`` pipeline (seeded) on an image, its boxes and masks; the
    instances cropped away are dropped from all three."""
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    # OpenCV warps uint8, not bool
    extra = (
        {"masks": [m.astype(np.uint8) for m in masks]} if masks is not None and len(masks) else {}
    )
    out = transform(
        image=image,
        bboxes=boxes,
        labels=labels.tolist(),
        ann_index=list(range(len(boxes))),
        **extra,
    )
    kept = [int(i) for i in out["ann_index"]]
    boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
    if masks is not None:
        h, w = out["image"].shape[:2]
        masks = (
            np.stack([np.asarray(out["masks"][i], dtype=bool) for i in kept])
            if kept
            else np.zeros((0, h, w), dtype=bool)
        )
    return out["image"], boxes, labels, masks


def collate_student(items: list[dict[str, Any]], *, resolution: int) -> dict[str, Any]:
    """Batch: ``pixel_values`` (B, 3, R, R), ``labels`` (per image target dicts), ``weights`` (B,),
    ``sources``, ``image_ids``, ``sizes`` (width, height) of the images as fed."""
    labels = [
        model_targets(
            it["boxes"],
            it["labels"],
            it["masks"],
            width=it["image"].shape[1],
            height=it["image"].shape[0],
            resolution=resolution,
        )
        for it in items
    ]
    return {
        "pixel_values": preprocess([it["image"] for it in items], resolution=resolution),
        "labels": labels,
        "weights": torch.tensor([it["weight"] for it in items]),
        "sources": [it["source"] for it in items],
        "image_ids": [it["image_id"] for it in items],
        "sizes": [(it["image"].shape[1], it["image"].shape[0]) for it in items],
    }


# --- the teachers' labels --------------------------------------------------------------------------


def teacher_label_problems(doc: Mapping[str, Any], *, categories: Mapping[int, Any]) -> list[str]:
    """What in a teacher-labels COCO dict the student cannot train on (one line per record).

    Boxes (and polygons still in memory) go through validate's geometry rules
    (``non_finite_coordinates``, ``coordinates_far_outside``), as human labels do."""
    problems = []
    image_ids = {img.get("id") for img in doc["images"]}
    sizes = {img.get("id"): (img.get("width"), img.get("height")) for img in doc["images"]}
    for img in doc["images"]:
        if (
            not isinstance(img.get("file_name"), str)
            or not isinstance(img.get("width"), int)
            or not isinstance(img.get("height"), int)
        ):
            problems.append(f"image {img.get('id')!r}: needs file_name, width and height")
    for ann in doc["annotations"]:
        where = f"annotation {ann.get('id')!r}"
        score = ann.get("score")
        bbox = ann.get("bbox")
        if ann.get("image_id") not in image_ids:
            problems.append(
                f"{where}: image_id {ann.get('image_id')!r} is not an image of the file"
            )
        elif not isinstance(score, (int, float)) or isinstance(score, bool) or not 0 <= score <= 1:
            problems.append(f"{where}: score {score!r} is not a number in [0, 1]")
        elif ann.get("category_id") not in categories:
            problems.append(
                f"{where}: category_id {ann.get('category_id')!r} is not a category "
                f"of the human train split ({sorted(categories)})"
            )
        elif not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)
        ):
            problems.append(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
        elif mask_kind(ann) == "invalid":
            problems.append(f"{where}: segmentation is neither polygons nor RLE")
        elif problem := _geometry_problem(ann, sizes[ann["image_id"]]):
            problems.append(f"{where}: bbox {bbox!r}: {problem}")
    return problems


def _geometry_problem(ann: Mapping[str, Any], size: tuple[Any, Any]) -> str | None:
    """validate's geometry rule that ``ann`` breaks in an image of ``size`` (width, height),
    as ``"<message> (<detail>) [<rule>]"``; None when its numbers are sane or the size unknown
    (that image's own problem is listed)."""
    width, height = size
    if not (isinstance(width, int) and isinstance(height, int)) or width <= 0 or height <= 0:
        return None
    found = geometry_problem(dict(ann), width=width, height=height)
    if found is None:
        return None
    rule, detail = found
    return f"{RULES[rule].message} ({detail}) [{rule}]"


def teacher_source(
    doc: dict[str, Any],
    *,
    path: Path,
    pool: Path,
    categories: Mapping[int, Any],
    min_score: float,
    weight: float,
) -> Source:
    """The teachers' labels as a training source: detections scoring at least ``min_score``.

    Raises ``TeacherError`` naming the file, the first offending records and the fix when the
    labels do not fit the human split (unknown categories, missing scores, broken boxes).
    """
    problems = teacher_label_problems(doc, categories=categories)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 5 else ""
        )
        raise TeacherError(
            f"{path}: {shown}. Fix: re-run `dvc repro label` so the teachers "
            "trained on this split write it again"
        )
    kept = [a for a in doc["annotations"] if a["score"] >= min_score]
    return Source(TEACHER, {**doc, "annotations": kept}, Path(pool), weight, Path(path))
