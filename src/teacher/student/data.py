"""Student training data: human and teacher-labeled images as RF-DETR targets, built with our COCO code.

Targets come from :mod:`teacher.coco.io`, not from the RF-DETR image processor's annotation helper:
in transformers 5.24 that helper filters crowd annotations out of the labels but not out of the
masks (labels and masks then pair up wrongly whenever an image has a crowd region) and reads
polygons only (a compressed-RLE mask fails). Here every instance keeps its own mask: polygons,
compressed and uncompressed RLE decode through pycocotools; crowd regions are left out of both.
"""

from __future__ import annotations

import dataclasses
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
from teacher.core.digest import file_sha256
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


@dataclass(frozen=True)
class Instances:
    """The instances of one image the loss sees, aligned row by row.

    ``boxes`` (n, 4) float32 COCO xywh px; ``labels`` (n,) int64 label indexes; ``masks``
    (n, H, W) bool or None (boxes-only data); ``has_mask`` (n,) bool: the instance brought its
    own mask (a box-only one in segmentation data carries its filled box, for the matcher only,
    and gets no mask loss); ``weight`` (n,) float32: the weight of its class loss (1 for a human
    label, the teacher's score for a teacher label); ``ignore`` (n,) bool: an uncertain teacher
    detection, an ignore region (:mod:`teacher.student.loss`).
    """

    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    has_mask: np.ndarray
    weight: np.ndarray
    ignore: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: Sequence[int], *, boxes: np.ndarray, masks: np.ndarray | None):
        """The ``rows`` kept (in that order) with their new ``boxes`` and ``masks``."""
        idx = np.asarray(rows, dtype=np.int64)
        return Instances(
            boxes, self.labels[idx], masks, self.has_mask[idx], self.weight[idx], self.ignore[idx]
        )


def instance_targets(
    anns: Sequence[dict[str, Any]],
    *,
    height: int,
    width: int,
    label_of: Mapping[int, int],
    masks: bool,
    min_score: float | None = None,
    score_weight: bool = True,
) -> Instances:
    """The instances of one image the loss sees (:class:`Instances`).

    Crowd regions, boxes without area and categories outside ``label_of`` are left out, each
    with its own mask, so every row stays aligned. An instance without a mask in segmentation
    data gets its filled box as the mask and ``has_mask`` False. With ``min_score`` (teacher
    labels) each annotation's class loss weighs by its ``score`` and one scoring below
    ``min_score`` is an ignore region (``score_weight`` False: weight 1, the score only picks);
    without (human labels) every weight is 1.
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
    scores = np.array(
        [1.0 if min_score is None else float(a["score"]) for a in kept], dtype=np.float32
    )
    weight = scores if score_weight else np.ones_like(scores)
    own = np.array([mask_kind(a) not in ("none", "invalid") for a in kept], dtype=bool)
    out = None
    if masks:
        out = np.zeros((len(kept), height, width), dtype=bool)
        for i, ann in enumerate(kept):
            if own[i]:
                out[i] = annotation_mask(ann, height, width)
            else:
                x, y, w, h = (int(round(v)) for v in ann["bbox"])
                out[i, max(y, 0) : y + h, max(x, 0) : x + w] = True
    ignore = scores < (min_score or 0.0)
    return Instances(boxes, labels, out, own & masks, weight, ignore)


def model_targets(
    inst: Instances, *, width: int, height: int, resolution: int, image_weight: float = 1.0
) -> dict[str, Tensor]:
    """One image's RF-DETR target: ``class_labels`` (n,), ``boxes`` (n, 4) cxcywh in [0, 1],
    with masks ``masks`` (n, R, R) float (nearest resize to the model's input side), and what
    :mod:`teacher.student.loss` reads besides: ``weight``, ``ignore``, ``has_mask`` (n,) and
    ``image_weight`` (the source's loss weight)."""
    norm = xywh_to_cxcywh_norm(
        np.asarray(inst.boxes, np.float32).reshape(-1, 4), width=width, height=height
    )
    target = {
        "class_labels": torch.as_tensor(inst.labels, dtype=torch.long),
        "boxes": torch.as_tensor(np.clip(norm, 0.0, 1.0), dtype=torch.float32),
        "weight": torch.as_tensor(inst.weight, dtype=torch.float32),
        "ignore": torch.as_tensor(inst.ignore, dtype=torch.bool),
        "has_mask": torch.as_tensor(inst.has_mask, dtype=torch.bool),
        "image_weight": torch.tensor(float(image_weight)),
    }
    masks = inst.masks
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
    min_score: float | None = None  # teacher labels: below it an ignore region; None: human
    score_weight: bool = True  # teacher labels: class loss weighed by the score


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

    Items: ``image`` HxWx3 uint8 (augmented), ``instances`` (:class:`Instances`, boxes in px of
    the augmented image), ``weight`` (the source's), ``source``, ``image_id``.
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
        inst = instance_targets(
            anns,
            height=h,
            width=w,
            label_of=self.label_of,
            masks=self.masks,
            min_score=source.min_score,
            score_weight=source.score_weight,
        )
        if self.transform is not None:
            seed = int(sample_rng(self.seed, self.epoch, index).integers(2**31))
            image, inst = augment(self.transform, image, inst, seed=seed)
        return {
            "image": image,
            "instances": inst,
            "weight": source.weight,
            "source": source.name,
            "image_id": record["id"],
        }


def augment(
    transform: Callable, image: np.ndarray, inst: Instances, *, seed: int
) -> tuple[np.ndarray, Instances]:
    """An ``augment.build_transform`` pipeline (seeded) on an image and its instances; the
    instances cropped away are dropped from every row."""
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    boxes, labels, masks = inst.boxes, inst.labels, inst.masks
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
    if masks is not None:
        h, w = out["image"].shape[:2]
        masks = (
            np.stack([np.asarray(out["masks"][i], dtype=bool) for i in kept])
            if kept
            else np.zeros((0, h, w), dtype=bool)
        )
    return out["image"], inst.take(kept, boxes=boxes, masks=masks)


def collate_student(items: list[dict[str, Any]], *, resolution: int) -> dict[str, Any]:
    """Batch: ``pixel_values`` (B, 3, R, R), ``labels`` (per image target dicts), ``weights`` (B,),
    ``sources``, ``image_ids``, ``sizes`` (width, height) of the images as fed."""
    labels = [
        model_targets(
            it["instances"],
            width=it["image"].shape[1],
            height=it["image"].shape[0],
            resolution=resolution,
            image_weight=it["weight"],
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


def drop_known_images(
    source: Source, human: Sequence[tuple[str, Mapping[str, Any], Path]]
) -> tuple[Source, list[str]]:
    """``source`` without the pool images whose bytes equal an image of a human split
    (sha256), and one line per image dropped. ``human``: (split name, COCO dict, image root).

    A pool image that is also a train, val or test image would inflate the student's test AP
    and steer early stopping on val; it is never trained on as a teacher label."""
    known: dict[str, str] = {}
    for split, coco, root in human:
        for img in coco["images"]:
            path = image_path(root, img["file_name"])
            if path.is_file():
                known.setdefault(file_sha256(path), f"{split} image {img['file_name']}")
    dropped, lines = set(), []
    for img in source.coco["images"]:
        path = image_path(source.image_root, img["file_name"])
        match = known.get(file_sha256(path)) if path.is_file() else None
        if match:
            dropped.add(img["id"])
            lines.append(f"pool image {img['file_name']} is {match} (same bytes): left out")
    if not dropped:
        return source, lines
    coco = {
        **source.coco,
        "images": [i for i in source.coco["images"] if i["id"] not in dropped],
        "annotations": [a for a in source.coco["annotations"] if a["image_id"] not in dropped],
    }
    return dataclasses.replace(source, coco=coco), lines


def has_targets(source: Source) -> bool:
    """Whether the teachers kept any detection as a target (scoring at least ``min_score``).

    A pool where they found nothing holds no evidence, only its absence: trained on, its images
    would all be background at the pool's weight, and a few hundred of them push every score of
    a small human set down (a student trained so scored box mAP@50 0.0 on the proving ground
    where the human labels alone gave 0.17). The student then trains on the human labels alone."""
    floor = source.min_score or 0.0
    return any(a["score"] >= floor for a in source.coco["annotations"])


def teacher_source(
    doc: dict[str, Any],
    *,
    path: Path,
    pool: Path,
    categories: Mapping[int, Any],
    min_score: float,
    weight: float,
    ignore_score: float | None = None,
    score_weight: bool = True,
) -> Source:
    """The teachers' labels as a training source: detections scoring at least ``min_score`` are
    targets; those scoring in [``ignore_score``, ``min_score``) are ignore regions (None: the
    same as ``min_score``, none); lower ones are dropped.

    Raises ``TeacherError`` naming the file, the first offending records and the fix when the
    labels do not fit the human split (unknown categories, missing scores, broken boxes).
    """
    ignore_score = min_score if ignore_score is None else ignore_score
    if ignore_score > min_score:
        raise TeacherError(
            f"student.ignore_score {ignore_score:g} is above student.min_score {min_score:g}: "
            "detections between the two are ignore regions; set ignore_score <= min_score "
            "(equal: no ignore regions)"
        )
    problems = teacher_label_problems(doc, categories=categories)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 5 else ""
        )
        raise TeacherError(
            f"{path}: {shown}. Fix: re-run `dvc repro label` so the teachers "
            "trained on this split write it again"
        )
    kept = [a for a in doc["annotations"] if a["score"] >= ignore_score]
    return Source(
        TEACHER,
        {**doc, "annotations": kept},
        Path(pool),
        weight,
        Path(path),
        min_score=min_score,
        score_weight=score_weight,
    )
