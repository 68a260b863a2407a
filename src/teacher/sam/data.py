"""SAM training data: (box prompt, mask) samples of a COCO split, their batching, and the
disk cache of image embeddings for decoder-only training.

Every non-crowd instance with a mask (polygon or RLE) gives a (box prompt, mask) pair.
Geometry is segment-anything's (teacher.sam.model): longest side resized to the encoder size, boxes
into that frame, masks resized the same way and padded to the square input. Decoder-only
training reads each image's embedding from a disk cache instead of the image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from teacher.augment import sample_rng
from teacher.boxes import xywh_to_xyxy
from teacher.coco import annotation_mask, images_by_id, index_by_image, mask_kind
from teacher.digest import file_sha256
from teacher.images import image_path, load_image
from teacher.sam.model import (
    boxes_xyxy_to_input,
    embed_images,
    encoder_fingerprint,
    image_to_tensor,
    input_size,
    resize_image,
    resized_shape,
    unwrap,
)

SAM_MASK_KINDS = ("polygon", "rle_compressed", "rle_uncompressed")


def sam_instances(coco: dict[str, Any]) -> dict[Any, list[dict]]:
    """``{image id: [annotations]}`` of non-crowd annotations with a mask; images without any
    are left out."""
    out: dict[Any, list[dict]] = {}
    for image_id, anns in index_by_image(coco).items():
        keep = [a for a in anns if a.get("iscrowd") not in (1, True) and mask_kind(a) in SAM_MASK_KINDS]
        if keep:
            out[image_id] = keep
    return out


def choose_prompts(count: int, *, max_prompts: int, rng: np.random.Generator) -> np.ndarray:
    """Indexes of at most ``max_prompts`` of ``count`` instances (sorted; all when few enough)."""
    if count <= max_prompts:
        return np.arange(count)
    return np.sort(rng.choice(count, size=max_prompts, replace=False))


def jitter_boxes_xyxy(
    boxes: np.ndarray, *, fraction: float, rng: np.random.Generator, width: int, height: int
) -> np.ndarray:
    """(N, 4) xyxy boxes, each side moved by up to ``fraction`` of the box's width/height
    (uniform), clipped to the image and kept at least one pixel wide and high."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if fraction <= 0 or len(boxes) == 0:
        return boxes
    wh = boxes[:, 2:] - boxes[:, :2]
    noisy = boxes + rng.uniform(-fraction, fraction, boxes.shape) * np.concatenate([wh, wh], 1)
    noisy[:, 0::2] = noisy[:, 0::2].clip(0, width)
    noisy[:, 1::2] = noisy[:, 1::2].clip(0, height)
    noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
    return noisy


def instance_boxes_xywh(anns: list[dict], masks: list[np.ndarray]) -> np.ndarray:
    """(N, 4) COCO xywh of each annotation: its ``bbox``, or its mask's extent when it has none."""
    out = []
    for ann, mask in zip(anns, masks, strict=True):
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and box[2] > 0 and box[3] > 0):
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] if len(xs) else [0, 0, 1, 1]
        out.append([float(v) for v in box])
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def masks_to_input(masks: np.ndarray, *, size: int) -> Tensor:
    """(N, H, W) bool -> (N, size, size) bool: resized as the image (longest side ``size``,
    bilinear, threshold 0.5) and zero-padded right and bottom, as ``Sam.preprocess`` pads."""
    n, height, width = masks.shape
    h, w = resized_shape(height, width, size=size)
    t = torch.from_numpy(np.ascontiguousarray(masks)).float()[None]
    t = F.interpolate(t, (h, w), mode="bilinear", align_corners=False)[0] > 0.5
    return F.pad(t, (0, size - w, 0, size - h))


def augment_instances(
    transform: Callable, image: np.ndarray, masks: list[np.ndarray], boxes_xywh: np.ndarray, *, seed: int
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Apply an ``augment.build_transform`` pipeline (seeded) to an image and its instances;
    instances whose box is cropped away are dropped with their masks."""
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    masks = [m.astype(np.uint8) for m in masks]  # OpenCV warps uint8, not bool
    out = transform(image=image, masks=masks, bboxes=boxes_xywh, labels=[0] * len(masks),
                    ann_index=list(range(len(masks))))
    keep = [int(i) for i in out["ann_index"]]
    boxes = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
    return out["image"], [np.asarray(out["masks"][i], dtype=bool) for i in keep], boxes


class SamDataset(Dataset):
    """Training samples for SAM: one image and up to ``max_prompts`` of its instances.

    Items: ``image`` (3xhxw float 0..255, resized) or ``embedding`` (C, g, g) when
    ``embeddings`` maps image ids to cached files; ``boxes`` (N, 4) float32 xyxy in the input
    frame (jittered by ``box_jitter``); ``masks`` (N, S, S) bool; ``image_id``. Randomness
    (prompt choice, jitter, augmentation) is seeded by (seed, epoch, index).
    """

    def __init__(
        self,
        coco: dict[str, Any],
        image_root: str | Path,
        *,
        image_size: int,
        max_prompts: int,
        box_jitter: float,
        seed: int,
        transform: Callable | None = None,
        embeddings: dict[Any, Path] | None = None,
    ) -> None:
        images = images_by_id(coco)
        self.records = [(images[i], anns) for i, anns in sam_instances(coco).items()]
        self.image_root = Path(image_root)
        self.image_size, self.max_prompts, self.box_jitter = image_size, max_prompts, box_jitter
        self.seed, self.epoch = seed, 0
        self.transform, self.embeddings = transform, embeddings

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, anns = self.records[index]
        rng = sample_rng(self.seed, self.epoch, index)
        anns = [anns[i] for i in choose_prompts(len(anns), max_prompts=self.max_prompts, rng=rng)]
        if self.embeddings is not None:
            height, width = int(record["height"]), int(record["width"])
            masks = [annotation_mask(a, height, width) for a in anns]
            item = self._encode(None, masks, instance_boxes_xywh(anns, masks), (height, width), rng)
            item["embedding"] = load_file(str(self.embeddings[record["id"]]))["embedding"]
            return item | {"image_id": record["id"]}
        image = load_image(image_path(self.image_root, record["file_name"]))
        masks = [annotation_mask(a, *image.shape[:2]) for a in anns]
        boxes = instance_boxes_xywh(anns, masks)
        if self.transform is not None:
            aug = augment_instances(self.transform, image, masks, boxes, seed=int(rng.integers(2**31)))
            if len(aug[1]):  # everything cropped away: train on the plain image instead
                image, masks, boxes = aug
        item = self._encode(image, masks, boxes, image.shape[:2], rng)
        return item | {"image_id": record["id"]}

    def _encode(self, image, masks, boxes_xywh, hw, rng) -> dict[str, Any]:
        xyxy = jitter_boxes_xyxy(xywh_to_xyxy(boxes_xywh), fraction=self.box_jitter, rng=rng,
                                 width=hw[1], height=hw[0])
        boxes = boxes_xyxy_to_input(xyxy, tuple(hw), size=self.image_size)
        item = {"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                "masks": masks_to_input(np.stack(masks), size=self.image_size)}
        if image is not None:
            item["image"] = image_to_tensor(resize_image(image, size=self.image_size))
        return item


def collate_sam(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of SamDataset items: per-image lists (sizes differ); embeddings stacked (B, C, g, g)."""
    has_embedding = "embedding" in items[0]
    return {
        "images": None if has_embedding else [it["image"] for it in items],
        "embeddings": torch.stack([it["embedding"] for it in items]) if has_embedding else None,
        "boxes": [it["boxes"] for it in items],
        "masks": [it["masks"] for it in items],
        "image_ids": [it["image_id"] for it in items],
    }


@torch.no_grad()
def cache_sam_embeddings(
    sam: nn.Module, coco: dict[str, Any], image_root: str | Path, cache_dir: str | Path
) -> dict[Any, Path]:
    """Image embeddings of the images with masks, computed once into ``cache_dir``.

    Files: ``<cache_dir>/<encoder fingerprint>/<image sha256>.safetensors`` (key
    ``embedding``, (C, g, g) float32); existing ones are reused, so every epoch and every run
    with the same encoder and image reads them from disk. Returns ``{image id: file}``.
    """
    model = unwrap(sam)
    folder = Path(cache_dir) / encoder_fingerprint(model)
    folder.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    images, out = images_by_id(coco), {}
    for image_id in tqdm(sam_instances(coco), desc="SAM image embeddings", leave=False):
        path = image_path(image_root, images[image_id]["file_name"])
        target = folder / f"{file_sha256(path)}.safetensors"
        if not target.exists():
            image = resize_image(load_image(path), size=input_size(model))
            embedding = embed_images(model, [image_to_tensor(image)])[0].float().cpu()
            tmp = target.with_suffix(f".{os.getpid()}.tmp")  # unique: runs may share a cache
            save_file({"embedding": embedding.contiguous()}, str(tmp))
            os.replace(tmp, target)
        out[image_id] = target
    return out
