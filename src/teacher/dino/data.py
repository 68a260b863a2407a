"""Grounding DINO training data: samples of a COCO split and their batching.

One item per (image, prompt chunk): the chunk holding the image's classes (each chunk it
touches, when its classes span several), or every chunk for evaluation. Boxes stay COCO xywh
through augmentation; collate_dino resizes/pads through the processor and builds the loss
targets (teacher.dino.box_targets).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from teacher.augment import sample_rng
from teacher.boxes import xywh_to_cxcywh_norm
from teacher.coco import has_usable_box, index_by_image, is_crowd
from teacher.dino.labels import LabelMap
from teacher.images import image_path, load_image


def annotation_boxes(anns: list[dict], *, label_map: LabelMap, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and chunk-local labels of the annotations the loss sees.

    Crowd annotations, boxes without area and classes outside prompt chunk ``chunk`` are left
    out. Returns ``boxes`` (n, 4) float32 COCO xywh pixels and ``labels`` (n,) int64.
    """
    in_chunk = {label_map.category_ids[i]: j for j, i in enumerate(label_map.chunks[chunk])}
    kept = [a for a in anns if not is_crowd(a) and has_usable_box(a) and a["category_id"] in in_chunk]
    boxes = np.array([a["bbox"] for a in kept], dtype=np.float32).reshape(-1, 4)
    labels = np.array([in_chunk[a["category_id"]] for a in kept], dtype=np.int64)
    return boxes, labels


def box_targets(boxes: np.ndarray, labels: np.ndarray, *, width: int, height: int) -> dict[str, torch.Tensor]:
    """One image's loss target: ``class_labels`` (n,) long, ``boxes`` (n, 4) float cxcywh in [0, 1].

    ``boxes`` are COCO xywh pixels of an image ``width x height`` (after augmentation);
    normalised boxes do not change when the processor resizes the image.
    """
    norm = xywh_to_cxcywh_norm(np.asarray(boxes, np.float32).reshape(-1, 4), width=width, height=height)
    return {"class_labels": torch.as_tensor(np.asarray(labels), dtype=torch.long),
            "boxes": torch.as_tensor(np.clip(norm, 0.0, 1.0), dtype=torch.float32)}


def dino_items(coco: dict[str, Any], label_map: Any, *, all_chunks: bool) -> list[tuple[dict, int]]:
    """``(image record, chunk)`` pairs; images without boxes go to one chunk in turn."""
    by_image = index_by_image(coco)
    chunk_of = {cid: label_map.chunk_of(cid) for cid in label_map.category_ids}
    n = len(label_map.chunks)
    items = []
    for k, record in enumerate(coco["images"]):
        touched = sorted({chunk_of[a["category_id"]] for a in by_image.get(record["id"], [])
                          if a["category_id"] in chunk_of and not is_crowd(a)})
        chunks = range(n) if all_chunks else (touched or [k % n])
        items.extend((record, c) for c in chunks)
    return items


class DinoDataset(Dataset):
    """Grounding DINO samples of a COCO split.

    Items: ``image`` HxWx3 uint8 RGB (augmented), ``boxes`` (n, 4) float32 COCO xywh pixels in
    that image, ``labels`` (n,) int64 positions in prompt chunk ``chunk``, ``image_id``, ``size``
    (width, height) of the original image. Crowd boxes are left out. Augmentation is seeded by
    (seed, epoch, index).
    """

    def __init__(self, coco: dict[str, Any], image_root: str | Path, *, label_map: Any,
                 seed: int, transform: Callable | None = None, all_chunks: bool = False) -> None:
        self.items = dino_items(coco, label_map, all_chunks=all_chunks)
        self.anns = index_by_image(coco)
        self.image_root, self.label_map = Path(image_root), label_map
        self.seed, self.epoch, self.transform = seed, 0, transform

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, chunk = self.items[index]
        image = load_image(image_path(self.image_root, record["file_name"]))
        size = (image.shape[1], image.shape[0])
        boxes, labels = annotation_boxes(self.anns.get(record["id"], []), label_map=self.label_map,
                                         chunk=chunk)
        if self.transform is not None:
            seed = int(sample_rng(self.seed, self.epoch, index).integers(2**31))
            image, boxes, labels = augment_boxes(self.transform, image, boxes, labels, seed=seed)
        return {"image": image, "boxes": boxes, "labels": labels, "chunk": chunk,
                "image_id": record["id"], "size": size}


def augment_boxes(transform: Callable, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                  *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply an ``augment.build_transform`` pipeline (seeded) to an image and its xywh boxes;
    boxes cropped away are dropped with their labels."""
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    out = transform(image=image, bboxes=boxes, labels=labels.tolist(),
                    ann_index=list(range(len(boxes))))
    boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
    return out["image"], boxes, labels


def collate_dino(items: list[dict[str, Any]], *, processor: Any, label_map: Any) -> dict[str, Any]:
    """Batch for ``GroundingDinoForObjectDetection``: processor tensors + ``labels`` + metadata.

    ``pixel_values`` (B, 3, H, W) and ``pixel_mask`` (B, H, W) padded to the largest resized
    image; ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (B, T) each item's chunk
    prompt padded to the longest; ``labels`` per item ``class_labels`` (n,) and ``boxes``
    (n, 4) cxcywh normalised; ``image_ids``, ``chunks``, ``sizes`` (original width, height).
    """
    pixels = processor.image_processor(images=[it["image"] for it in items], return_tensors="pt")
    text = processor.tokenizer([label_map.prompts[it["chunk"]] for it in items],
                               padding="longest", return_tensors="pt")
    labels = [box_targets(it["boxes"], it["labels"], width=it["image"].shape[1],
                          height=it["image"].shape[0]) for it in items]
    return {**pixels, **text, "labels": labels, "image_ids": [it["image_id"] for it in items],
            "chunks": [it["chunk"] for it in items], "sizes": [it["size"] for it in items]}
