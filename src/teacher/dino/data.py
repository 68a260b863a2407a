"""Grounding DINO training data: samples of a COCO split and their batching.

One item per (image, prompt chunk): the chunk holding the image's classes (each chunk it
touches, when its classes span several), or every chunk for evaluation. When the class list is
split into several chunks, every image with objects also gets one *negative* item per epoch: a
chunk (drawn with the seed) naming none of its objects, with no targets, as inference runs every
chunk on every image. With ``dino.negatives`` > 0 a training prompt is not the chunk as is but
the image's classes of that chunk plus that many absent class names sampled with the seed
from the whole list, shuffled, within the token limit (Open-GroundingDino's ODVG ``OD`` mode:
positives + sampled negatives, shuffled). Boxes stay COCO xywh through augmentation;
collate_dino resizes/pads through the processor and builds the loss targets (box_targets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from teacher.coco.boxes import xywh_to_cxcywh_norm
from teacher.coco.images import decoded_size, image_path, load_image, probe_image
from teacher.coco.io import has_usable_box, index_by_image, is_crowd
from teacher.dataset.augment import sample_rng
from teacher.dino.labels import MAX_TEXT_TOKENS, LabelMap, prompt_text
from teacher.dino.retain import RetainNames
from teacher.dino.scales import TrainScales, apply_scale

NEGATIVE = -1  # item "chunk" of a negative item: a prompt naming none of the image's objects


def annotation_boxes(
    anns: list[dict], *, label_map: LabelMap, classes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and prompt-local labels of the annotations the loss sees.

    ``classes`` are the prompt indexes named by the prompt, in prompt order. Crowd annotations,
    boxes without area and classes the prompt does not name are left out. Returns ``boxes``
    (n, 4) float32 COCO xywh pixels and ``labels`` (n,) int64 positions in ``classes``.
    """
    in_chunk = {label_map.category_ids[i]: j for j, i in enumerate(classes)}
    kept = [
        a for a in anns if not is_crowd(a) and has_usable_box(a) and a["category_id"] in in_chunk
    ]
    boxes = np.array([a["bbox"] for a in kept], dtype=np.float32).reshape(-1, 4)
    labels = np.array([in_chunk[a["category_id"]] for a in kept], dtype=np.int64)
    return boxes, labels


def box_targets(
    boxes: np.ndarray, labels: np.ndarray, *, width: int, height: int
) -> dict[str, torch.Tensor]:
    """One image's loss target: ``class_labels`` (n,) long, ``boxes`` (n, 4) float cxcywh in [0, 1].

    ``boxes`` are COCO xywh pixels of an image ``width x height`` (after augmentation);
    normalised boxes do not change when the processor resizes the image.
    """
    norm = xywh_to_cxcywh_norm(
        np.asarray(boxes, np.float32).reshape(-1, 4), width=width, height=height
    )
    return {
        "class_labels": torch.as_tensor(np.asarray(labels), dtype=torch.long),
        "boxes": torch.as_tensor(np.clip(norm, 0.0, 1.0), dtype=torch.float32),
    }


def _touched_chunks(anns: list[dict], chunk_of: dict[int, int]) -> list[int]:
    return sorted(
        {
            chunk_of[a["category_id"]]
            for a in anns
            if a["category_id"] in chunk_of and not is_crowd(a)
        }
    )


def dino_items(coco: dict[str, Any], label_map: Any, *, all_chunks: bool) -> list[tuple[dict, int]]:
    """``(image record, chunk)`` pairs; images without boxes go to one chunk in turn.

    Training (``all_chunks`` False) with several chunks adds ``(record, NEGATIVE)`` for each
    image whose objects leave some chunk untouched.
    """
    by_image = index_by_image(coco)
    chunk_of = {cid: label_map.chunk_of(cid) for cid in label_map.category_ids}
    n = len(label_map.chunks)
    items: list[tuple[dict, int]] = []
    for k, record in enumerate(coco["images"]):
        touched = _touched_chunks(by_image.get(record["id"], []), chunk_of)
        chunks = list(range(n)) if all_chunks else (touched or [k % n])
        if not all_chunks and touched and len(touched) < n:
            chunks.append(NEGATIVE)
        items.extend((record, c) for c in chunks)
    return items


def prompt_classes(
    label_map: LabelMap,
    chunk: int,
    present: set[int],
    *,
    negatives: int,
    class_tokens: Sequence[int] | None,
    rng: np.random.Generator,
    max_tokens: int = MAX_TEXT_TOKENS,
) -> tuple[int, ...]:
    """Prompt indexes one training item's prompt names, in prompt order.

    ``present``: prompt indexes of the image's (non-crowd) objects. ``chunk`` >= 0 with
    ``negatives`` 0: that chunk as is. ``NEGATIVE`` with ``negatives`` 0: a chunk drawn from
    those naming none of ``present``. With ``negatives`` > 0: the chunk's present classes (none
    for ``NEGATIVE``) plus up to ``negatives`` absent classes drawn from the whole list,
    shuffled, as many as fit ``max_tokens`` (``class_tokens[i]``: tokens of name i, without
    its '.').
    """
    if negatives == 0:
        if chunk != NEGATIVE:
            return label_map.chunks[chunk]
        free = [c for c in label_map.chunks if not present.intersection(c)]
        return free[int(rng.integers(len(free)))]
    if class_tokens is None:
        raise ValueError("prompt_classes: dino.negatives > 0 needs the token count of every class")
    positives = [] if chunk == NEGATIVE else [i for i in label_map.chunks[chunk] if i in present]
    absent = np.array([i for i in range(len(label_map.names)) if i not in present], dtype=np.int64)
    drawn = rng.permutation(absent)[:negatives].tolist()
    used = 2 + sum(class_tokens[i] + 1 for i in positives)  # [CLS] [SEP], name + '.'
    chosen = list(positives)
    for i in drawn:
        if used + class_tokens[i] + 1 <= max_tokens:
            chosen.append(i)
            used += class_tokens[i] + 1
    if not chosen:  # nothing absent and nothing present: the chunk as is
        return label_map.chunks[max(chunk, 0)]
    return tuple(int(i) for i in rng.permutation(np.array(chosen, dtype=np.int64)))


class DinoDataset(Dataset):
    """Grounding DINO samples of a COCO split.

    Items: ``image`` HxWx3 uint8 RGB (augmented), ``boxes`` (n, 4) float32 COCO xywh pixels in
    that image, ``classes`` the prompt indexes its prompt names (in order), ``labels`` (n,)
    int64 positions in ``classes``, ``image_id``, ``size`` (width, height) of the original
    image. Crowd boxes are left out. With ``scales`` (training: :mod:`teacher.dino.scales`) the
    image may be cut to the references' crop window, and ``shortest_edge`` is the size the
    processor resizes it to (drawn per item). Augmentation, negative chunks, sampled negatives
    and scales are seeded by (seed, epoch, index); ``negatives`` > 0 needs ``class_tokens``.
    With ``retain`` (``dino.retain_weight``, :mod:`teacher.dino.retain`) an item also has
    ``retain``: retention names for the end of its prompt (drawn last; needs ``class_tokens``).
    """

    def __init__(
        self,
        coco: dict[str, Any],
        image_root: str | Path,
        *,
        label_map: Any,
        seed: int,
        transform: Callable | None = None,
        all_chunks: bool = False,
        negatives: int = 0,
        class_tokens: Sequence[int] | None = None,
        scales: TrainScales | None = None,
        retain: RetainNames | None = None,
    ) -> None:
        if retain is not None and class_tokens is None:
            raise ValueError("DinoDataset: retention names need the token count of every class")
        self.items = dino_items(coco, label_map, all_chunks=all_chunks)
        self.anns = index_by_image(coco)
        self.image_root, self.label_map = Path(image_root), label_map
        self.seed, self.epoch, self.transform = seed, 0, transform
        self.negatives = 0 if all_chunks else negatives
        self.class_tokens = class_tokens
        self.scales = scales
        self.retain = None if all_chunks else retain
        self._shapes: dict[Any, tuple[int, int]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, chunk = self.items[index]
        anns = self.anns.get(record["id"], [])
        rng = sample_rng(self.seed, self.epoch, index)
        seed = int(rng.integers(2**31))  # first draw: augmentation (as before negatives existed)
        classes = self.classes_of(anns, chunk, rng)
        image = load_image(image_path(self.image_root, record["file_name"]))
        size = (image.shape[1], image.shape[0])
        boxes, labels = annotation_boxes(anns, label_map=self.label_map, classes=classes)
        if self.transform is not None:
            image, boxes, labels = augment_boxes(self.transform, image, boxes, labels, seed=seed)
        extra: dict[str, Any] = {}
        if self.scales is not None:  # drawn after the augmentation seed and the negatives
            image, boxes, labels, shortest = apply_scale(self.scales, image, boxes, labels, rng=rng)
            extra["shortest_edge"] = shortest
        if self.retain is not None:  # drawn last: the draws before are as without retention
            used = 2 + sum(cast(Sequence[int], self.class_tokens)[i] + 1 for i in classes)
            extra["retain"] = self.retain.draw(rng, used_tokens=used)
        return {
            "image": image,
            "boxes": boxes,
            "labels": labels,
            "classes": classes,
            "image_id": record["id"],
            "size": size,
            **extra,
        }

    def image_shape(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of item ``index``'s image as loaded (before augmentation), read
        from the file's header (no decode)."""
        record, _ = self.items[index]
        if record["id"] not in self._shapes:
            path = image_path(self.image_root, record["file_name"])
            width, height = decoded_size(*probe_image(path, decode=False))
            self._shapes[record["id"]] = (height, width)
        return self._shapes[record["id"]]

    def classes_of(self, anns: list[dict], chunk: int, rng: np.random.Generator) -> tuple[int, ...]:
        """The prompt indexes of one item's prompt (see :func:`prompt_classes`)."""
        if chunk != NEGATIVE and self.negatives == 0:
            return self.label_map.chunks[chunk]
        ids = set(self.label_map.category_ids)
        present = {
            self.label_map.index_of(a["category_id"])
            for a in anns
            if not is_crowd(a) and a["category_id"] in ids
        }
        return prompt_classes(
            self.label_map,
            chunk,
            present,
            negatives=self.negatives,
            class_tokens=self.class_tokens,
            rng=rng,
        )


def augment_boxes(
    transform: Callable, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply an ``augment.build_transform`` pipeline (seeded) to an image and its xywh boxes;
    boxes cropped away are dropped with their labels."""
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    out = transform(
        image=image, bboxes=boxes, labels=labels.tolist(), ann_index=list(range(len(boxes)))
    )
    boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
    return out["image"], boxes, labels


def pad_thin_items(
    items: list[dict[str, Any]], *, processor: Any, num_queries: int
) -> list[dict[str, Any]]:
    """Items whose image is too thin for ``num_queries`` encoder tokens, padded at the bottom /
    right (``teacher.dino.model.pad_for_queries``) at the size each is resized to (its
    ``shortest_edge``, else the processor's); boxes and ``size`` in the padded frame."""
    from teacher.dino.model import pad_for_queries

    size = processor.image_processor.size
    out = []
    for it in items:
        image = pad_for_queries(
            it["image"],
            num_queries=num_queries,
            shortest_edge=it.get("shortest_edge", size["shortest_edge"]),
            longest_edge=size["longest_edge"],
        )
        out.append(
            it
            if image is it["image"]
            else {**it, "image": image, "size": (image.shape[1], image.shape[0])}
        )
    return out


def collate_dino(
    items: list[dict[str, Any]], *, processor: Any, label_map: Any, num_queries: int | None = None
) -> dict[str, Any]:
    """Batch for ``GroundingDinoForObjectDetection``: processor tensors + ``labels`` + metadata.

    ``pixel_values`` (B, 3, H, W) and ``pixel_mask`` (B, H, W) padded to the largest resized
    image; ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (B, T) each item's prompt
    padded to the longest; ``labels`` per item ``class_labels`` (n,) and ``boxes`` (n, 4)
    cxcywh normalised; ``image_ids``, ``classes`` (prompt indexes per item, in prompt order),
    ``sizes`` (original width, height). Items with a ``shortest_edge`` (training scales) are
    resized to it, the longest edge capped as the processor caps it. Items with ``retain``
    names (:mod:`teacher.dino.retain`) get them after their classes in the prompt; ``own``
    counts each prompt's own classes (the phrases before them).
    """
    if num_queries is not None:
        items = pad_thin_items(items, processor=processor, num_queries=num_queries)
    if any("shortest_edge" in it for it in items):
        pixels = pixels_at_own_sizes(items, processor=processor)
    else:
        pixels = processor.image_processor(
            images=[it["image"] for it in items],
            return_tensors="pt",
            input_data_format="channels_last",  # HxWx3: never guessed
        )
    text = processor.tokenizer(
        [
            prompt_text([*(label_map.names[i] for i in it["classes"]), *it.get("retain", ())])
            for it in items
        ],
        padding="longest",
        return_tensors="pt",
    )
    labels = [
        box_targets(
            it["boxes"], it["labels"], width=it["image"].shape[1], height=it["image"].shape[0]
        )
        for it in items
    ]
    return {
        **pixels,
        **text,
        "labels": labels,
        "image_ids": [it["image_id"] for it in items],
        "classes": [it["classes"] for it in items],
        "own": [len(it["classes"]) for it in items],
        "retained": sum(len(it.get("retain", ())) for it in items),
        "sizes": [it["size"] for it in items],
    }


def pixels_at_own_sizes(items: list[dict[str, Any]], *, processor: Any) -> dict[str, torch.Tensor]:
    """``pixel_values`` (B, 3, H, W) and ``pixel_mask`` (B, H, W): each item resized by the
    processor to its own ``shortest_edge`` (the processor's when absent), longest edge capped
    at the processor's, padded at the bottom / right to the largest, as the references batch
    multi-scale images."""
    from transformers.image_transforms import get_size_with_aspect_ratio

    image_processor = processor.image_processor
    default, longest = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]
    edges = [it.get("shortest_edge", default) for it in items]
    shapes = [
        get_size_with_aspect_ratio(it["image"].shape[:2], edge, longest)  # (h, w), as it resizes
        for it, edge in zip(items, edges, strict=True)
    ]
    pad = {"height": max(h for h, _ in shapes), "width": max(w for _, w in shapes)}
    parts = [
        image_processor(
            images=[it["image"]],
            size={"shortest_edge": edge, "longest_edge": longest},
            pad_size=pad,
            return_tensors="pt",
            input_data_format="channels_last",
        )
        for it, edge in zip(items, edges, strict=True)
    ]
    return {key: torch.cat([p[key] for p in parts]) for key in ("pixel_values", "pixel_mask")}
