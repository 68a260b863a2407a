"""SAM training data: (prompt, mask) samples of a COCO split, their batching, and the
disk cache of image embeddings for decoder-only training.

Every non-crowd instance with a mask (polygon or RLE) gives a (prompt, mask) pair: its box,
or (share ``point_prompts``) a point inside its mask (:mod:`teacher.sam.prompts`).
Geometry is the model family's (:mod:`teacher.sam.geometry`): SAM's longest side resized to the
encoder size and padded, SAM 2's image stretched to the square input; boxes and masks go into
that frame the same way. Decoder-only training reads each image's embedding from a disk cache
instead of the image (SAM 2: with its high-res maps, :mod:`teacher.sam.embedding`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from teacher.coco.boxes import xywh_to_xyxy
from teacher.coco.images import image_path, load_image
from teacher.coco.io import annotation_mask, images_by_id, index_by_image
from teacher.core.digest import file_sha256
from teacher.core.errors import TeacherError
from teacher.dataset.augment import sample_rng
from teacher.sam.embedding import (
    Embedding,
    embedding_from_tensors,
    embedding_tensors,
    stack_embeddings,
    valid_entry,
)
from teacher.sam.geometry import Geometry, SamGeometry
from teacher.sam.model import encoder_fingerprint, image_to_tensor, unwrap
from teacher.sam.predictor import prepare_image
from teacher.sam.prompts import choose_point_prompts, sample_mask_points
from teacher.sam.scoring import instance_boxes_xywh, is_sam_instance

log = logging.getLogger(__name__)


def sam_instances(coco: dict[str, Any]) -> dict[Any, list[dict]]:
    """``{image id: [annotations]}`` of SAM instances (:func:`is_sam_instance`); images without
    any are left out."""
    out: dict[Any, list[dict]] = {}
    for image_id, anns in index_by_image(coco).items():
        keep = [a for a in anns if is_sam_instance(a)]
        if keep:
            out[image_id] = keep
    return out


def choose_prompts(count: int, *, max_prompts: int, rng: np.random.Generator) -> np.ndarray:
    """Indexes of at most ``max_prompts`` of ``count`` instances (sorted; all when few enough)."""
    if count <= max_prompts:
        return np.arange(count)
    return np.sort(rng.choice(count, size=max_prompts, replace=False))


def jitter_boxes_xyxy(
    boxes: np.ndarray,
    *,
    fraction: float,
    max_shift: float,
    rng: np.random.Generator,
    width: float,
    height: float,
) -> np.ndarray:
    """(N, 4) xyxy boxes, each side moved by up to ``fraction`` of the box's width/height
    (uniform) and never more than ``max_shift`` pixels (SAM's paper: 10 % of the side, at most
    20 px). The result stays inside the ``width`` x ``height`` image, at least 1 px wide and high
    (images of at least 1 x 1 px)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if fraction <= 0 or max_shift <= 0 or len(boxes) == 0:
        return boxes
    wh = boxes[:, 2:] - boxes[:, :2]
    reach = np.minimum(fraction * np.concatenate([wh, wh], 1), max_shift)
    noisy = boxes + rng.uniform(-1.0, 1.0, boxes.shape) * reach
    noisy[:, 0] = noisy[:, 0].clip(0, width - 1)
    noisy[:, 1] = noisy[:, 1].clip(0, height - 1)
    noisy[:, 2] = np.clip(noisy[:, 2], noisy[:, 0] + 1, width)
    noisy[:, 3] = np.clip(noisy[:, 3], noisy[:, 1] + 1, height)
    return noisy


def masks_to_input(masks: np.ndarray, *, size: int) -> Tensor:
    """(N, H, W) bool -> (N, size, size) bool: resized as the image (longest side ``size``,
    bilinear, threshold 0.5) and zero-padded right and bottom, as ``Sam.preprocess`` pads
    (SAM's geometry; either family: ``model.geometry.masks_to_input``)."""
    return SamGeometry(size).masks_to_input(masks)


def augment_instances(
    transform: Callable,
    image: np.ndarray,
    masks: list[np.ndarray],
    boxes_xywh: np.ndarray,
    *,
    seed: int,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Apply an ``augment.build_transform`` pipeline (seeded) to an image and its instances;
    instances whose box is cropped away are dropped with their masks."""
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    masks = [m.astype(np.uint8) for m in masks]  # OpenCV warps uint8, not bool
    out = transform(
        image=image,
        masks=masks,
        bboxes=boxes_xywh,
        labels=[0] * len(masks),
        ann_index=list(range(len(masks))),
    )
    keep = [int(i) for i in out["ann_index"]]
    boxes = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
    return out["image"], [np.asarray(out["masks"][i], dtype=bool) for i in keep], boxes


class SamDataset(Dataset):
    """Training samples for SAM: one image and up to ``max_prompts`` of its instances.

    Items: ``image`` (3xhxw float 0..255, resized by ``geometry``, the model's) or ``embedding``
    (C, g, g; SAM 2: with its high-res maps) when ``embeddings`` maps image ids to cached files; ``boxes`` (N, 4) float32 xyxy in the input
    frame (jittered by ``box_jitter``, at most ``box_jitter_max`` input pixels, inside the
    image); ``masks`` (N, S, S) bool; ``points`` (N, 2) float32 x, y in the input frame, a pixel
    of the mask drawn uniformly, and ``is_point`` (N,) bool, the prompts that are that point
    instead of the box (each with probability ``point_prompts``; never an instance whose mask
    vanished at the input size); ``extent`` (h, w): the image's part of the S x S input;
    ``seed``: an int for the correction clicks the training step draws; ``image_id``. With
    embeddings the image is not read: its size is the record's, which
    :func:`cache_sam_embeddings` checked against the file. Randomness (prompt choice, jitter,
    points, augmentation) is seeded by (seed, epoch, index).
    """

    def __init__(
        self,
        coco: dict[str, Any],
        image_root: str | Path,
        *,
        geometry: Geometry,
        max_prompts: int,
        box_jitter: float,
        seed: int,
        box_jitter_max: float = 20.0,
        point_prompts: float = 0.0,
        transform: Callable | None = None,
        embeddings: dict[Any, Path] | None = None,
    ) -> None:
        images = images_by_id(coco)
        self.records = [(images[i], anns) for i, anns in sam_instances(coco).items()]
        self.image_root = Path(image_root)
        self.geometry, self.max_prompts, self.box_jitter = geometry, max_prompts, box_jitter
        self.box_jitter_max, self.point_prompts = box_jitter_max, point_prompts
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
            item["embedding"] = embedding_from_tensors(
                load_file(str(self.embeddings[record["id"]]))
            )
            return item | {"image_id": record["id"]}
        image = load_image(image_path(self.image_root, record["file_name"]))
        masks = [annotation_mask(a, *image.shape[:2]) for a in anns]
        boxes = instance_boxes_xywh(anns, masks)
        if self.transform is not None:
            aug = augment_instances(
                self.transform, image, masks, boxes, seed=int(rng.integers(2**31))
            )
            if len(aug[1]):  # everything cropped away: train on the plain image instead
                image, masks, boxes = aug
        item = self._encode(image, masks, boxes, image.shape[:2], rng)
        return item | {"image_id": record["id"]}

    def _encode(self, image, masks, boxes_xywh, hw, rng) -> dict[str, Any]:
        boxes = self.geometry.boxes_to_input(xywh_to_xyxy(boxes_xywh), tuple(hw))
        h, w = self.geometry.resized_shape(*hw)  # the image's extent in the input frame
        boxes = jitter_boxes_xyxy(
            boxes,
            fraction=self.box_jitter,
            max_shift=self.box_jitter_max,
            rng=rng,
            width=w,
            height=h,
        )
        masks_in = self.geometry.masks_to_input(np.stack(masks))
        is_point = choose_point_prompts(len(masks_in), share=self.point_prompts, rng=rng)
        points, found = sample_mask_points(masks_in, rng=rng)
        item = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32),
            "masks": masks_in,
            "points": points,
            "is_point": torch.from_numpy(is_point) & found,
            "extent": (int(h), int(w)),
            "seed": int(rng.integers(2**31)),
        }
        if image is not None:
            item["image"] = image_to_tensor(self.geometry.resize_image(image))
        return item


def collate_sam(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of SamDataset items: per-image lists (sizes differ); embeddings stacked (B, C, g, g)."""
    has_embedding = "embedding" in items[0]
    return {
        "images": None if has_embedding else [it["image"] for it in items],
        "embeddings": stack_embeddings([it["embedding"] for it in items])
        if has_embedding
        else None,
        "boxes": [it["boxes"] for it in items],
        "masks": [it["masks"] for it in items],
        "points": [it["points"] for it in items],
        "is_point": [it["is_point"] for it in items],
        "extents": [it["extent"] for it in items],
        "seeds": [it["seed"] for it in items],
        "image_ids": [it["image_id"] for it in items],
    }


# --- the embedding cache of decoder-only training -----------------------------------------------
#
# One file per (encoder, image): ``<cache_dir>/<folder>/<image sha256>.safetensors``, the folder
# the encoder fingerprint (SAM) or ``sam2-<fingerprint>`` (SAM 2; the fingerprint hashes the
# family too), holding ``embedding`` (C, g, g) float32 (SAM 2: also its two high-res maps,
# teacher.sam.embedding) and the image's size in its metadata. Per image at 1024 px: 4 MiB for
# SAM (256 x 64 x 64), 16 MiB for SAM 2 (+ 64 x 128 x 128 + 32 x 256 x 256); 64 KiB for
# tiny-random and for tiny-random-sam2. An entry with another family's tensors is
# damaged to the reader (recomputed, never used). Entries are touched when used; beyond ``max_bytes`` the least recently used go
# first, so entries of edited images (a new sha256) and of old encoders (a new fingerprint),
# never used again, are the first evicted. ``teacher prune-cache`` removes them on demand.

CACHE_SUFFIX = ".safetensors"
TMP_MAX_AGE_S = 3600  # a .tmp file older than this is a crashed write, not one in progress


def _check_size(image_id: Any, record: dict, height: int, width: int, source: str) -> None:
    """The COCO record's size must be the image's: embeddings and masks are placed by it."""
    if (int(record["height"]), int(record["width"])) != (height, width):
        raise TeacherError(
            f"image {image_id!r} ({record['file_name']}): the image is {width}x{height} px but "
            f"its COCO record says {record['width']}x{record['height']} ({source}); re-run the "
            "validate stage (dvc repro validate), which takes sizes from the image files"
        )


def _write_embedding(target: Path, embedding: Embedding, height: int, width: int) -> None:
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # unique: processes and runs share a cache
    save_file(
        embedding_tensors(embedding),
        str(tmp),
        metadata={"height": str(height), "width": str(width)},
    )
    os.replace(tmp, target)


def cached_size(path: Path) -> tuple[int, int]:
    """(height, width) of the image a cached embedding was computed from; (-1, -1) when the
    entry has no size or its header is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return int(meta.get("height", -1)), int(meta.get("width", -1))
    except Exception:  # safetensors' own error types (truncated, oversized header, ...)
        return -1, -1


def entry_state(path: Path, family: str = "sam") -> str:
    """``"missing"``; ``"ok"``; ``"old"`` (written by a version that recorded no image size:
    embedded again); ``"damaged"`` (unreadable, foreign, of the other family or non-finite:
    embedded again, with a warning, never trained on)."""
    if not path.exists():
        return "missing"
    if not cached_embedding_ok(path, family):
        return "damaged"
    return "ok" if cached_size(path)[0] >= 0 else "old"


def cached_embedding_ok(path: Path, family: str = "sam") -> bool:
    """True when a cache entry loads and holds exactly ``family``'s finite tensors (SAM: one
    (C, g, g) ``embedding``; SAM 2: with its high-res maps): a truncated, foreign, other-family
    or NaN file is recomputed, not trained on."""
    try:
        tensors = load_file(str(path))
    except Exception:  # safetensors raises its own error types for damaged files
        return False
    return valid_entry(tensors, family)


def _ready(path: Path) -> bool:
    """An entry exists and records its image's size (entries of older versions do not: redone)."""
    return path.exists() and cached_size(path)[0] >= 0


def _wait_for(paths: list[Path], *, timeout_s: float) -> None:
    """Block until every entry is ready (the other processes' shares of the cache)."""
    deadline = time.monotonic() + timeout_s
    while missing := [p for p in paths if not _ready(p)]:
        if time.monotonic() > deadline:
            raise TeacherError(
                f"{len(missing)} image embeddings (e.g. {missing[0]}) were not "
                f"written by the other training processes within {timeout_s:.0f} s"
            )
        time.sleep(0.2)


def embedding_folder(sam: nn.Module, cache_dir: str | Path) -> Path:
    """The cache folder of this model's image encoder: ``<cache_dir>/<encoder fingerprint>``
    (SAM), ``<cache_dir>/sam2-<encoder fingerprint>`` (SAM 2)."""
    model = unwrap(sam)
    prefix = "" if model.sam_family == "sam" else f"{model.sam_family}-"
    return Path(cache_dir) / f"{prefix}{encoder_fingerprint(model)}"


def embedding_paths(folder: Path, coco: dict[str, Any], image_root: str | Path) -> dict[Any, Path]:
    """``{image id: file in folder}`` of the images with SAM instances (existing or not)."""
    images = images_by_id(coco)
    return {
        i: folder / f"{file_sha256(image_path(image_root, images[i]['file_name']))}{CACHE_SUFFIX}"
        for i in sam_instances(coco)
    }


@torch.no_grad()
def cache_sam_embeddings(
    sam: nn.Module,
    coco: dict[str, Any],
    image_root: str | Path,
    cache_dir: str | Path,
    *,
    rank: int = 0,
    world: int = 1,
    timeout_s: float = 24 * 3600,
) -> dict[Any, Path]:
    """Image embeddings of the images with SAM instances, computed once into ``cache_dir``.

    Existing entries are reused (every epoch and every run with the same encoder and image
    reads them from disk) and touched (least recently used is evicted first). With ``world`` > 1
    processes each computes its share (every ``world``-th image from ``rank``) and waits for the
    others' files. Every entry's image size is checked against its COCO record.
    Returns ``{image id: file}``.
    """
    model = unwrap(sam)
    folder = embedding_folder(model, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out = embedding_paths(folder, coco, image_root)
    from tqdm.auto import tqdm

    images = images_by_id(coco)
    mine = [i for k, i in enumerate(out) if k % world == rank]
    for image_id in tqdm(mine, desc="SAM image embeddings", leave=False):
        state = entry_state(out[image_id], model.sam_family)
        if state == "ok":
            continue
        if state == "damaged":
            log.warning("SAM embedding cache: %s is damaged; recomputing it", out[image_id])
        record = images[image_id]
        image = load_image(image_path(image_root, record["file_name"]))
        height, width = image.shape[:2]
        _check_size(image_id, record, height, width, "read from the file")
        _write_embedding(out[image_id], prepare_image(model, image).embedding, height, width)
    if world > 1:
        _wait_for(list(out.values()), timeout_s=timeout_s)
    for image_id, path in out.items():
        height, width = cached_size(path)
        _check_size(image_id, images[image_id], height, width, f"cached in {path}")
        os.utime(path)  # used now: least recently used is evicted first
    return out


def cache_split_embeddings(
    sam: nn.Module,
    cocos: list[dict[str, Any]],
    image_root: str | Path,
    cache_dir: str | Path,
    *,
    max_bytes: int,
    rank: int = 0,
    world: int = 1,
) -> list[dict[Any, Path]]:
    """:func:`cache_sam_embeddings` of each split (train, val), then, on the main process only
    and once every split is built, least recently used eviction beyond ``max_bytes``, never of
    the entries these splits use (no process still needs an evicted file)."""
    maps = [
        cache_sam_embeddings(sam, coco, image_root, cache_dir, rank=rank, world=world)
        for coco in cocos
    ]
    if rank == 0:
        prune_embedding_cache(
            cache_dir, max_bytes=max_bytes, keep={p for m in maps for p in m.values()}
        )
    return maps


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune_embedding_cache` did."""

    removed: int  # files deleted (stale, evicted, crashed writes)
    freed: int  # bytes deleted
    kept: int  # files left
    size: int  # bytes left (above max_bytes only when ``keep`` alone is larger)


def prune_embedding_cache(
    cache_dir: str | Path,
    *,
    max_bytes: int | None,
    keep: Collection[Path] = (),
    current: Collection[Path] | None = None,
) -> Pruned:
    """Bound the embedding cache: delete entries not in ``current`` (when given: stale ones of
    old encoders or edited images), then the least recently used until at most ``max_bytes``
    remain; entries in ``keep`` stay (the run using them). Crashed writes (old ``.tmp``) and
    empty encoder folders go too."""
    root = Path(cache_dir)
    keep = {Path(p).resolve() for p in keep}
    current = None if current is None else {Path(p).resolve() for p in current}
    removed = freed = 0
    entries = []
    for path in root.glob("*/*"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile by another run
            continue
        if path.suffix == ".tmp" and time.time() - stat.st_mtime > TMP_MAX_AGE_S:
            removed, freed = removed + 1, freed + stat.st_size
            path.unlink(missing_ok=True)
        elif path.suffix == CACHE_SUFFIX:
            entries.append((stat.st_mtime, stat.st_size, path))
    entries.sort()  # oldest use first
    total = sum(size for _, size, _ in entries)
    kept = []
    for _, size, path in entries:
        stale = current is not None and path.resolve() not in current
        over = max_bytes is not None and total > max_bytes
        if (stale or over) and path.resolve() not in keep:
            path.unlink(missing_ok=True)
            removed, freed, total = removed + 1, freed + size, total - size
        else:
            kept.append(path)
    for folder in root.glob("*"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if max_bytes is not None and total > max_bytes:
        log.warning(
            "SAM embedding cache %s: %.2f GiB in use by this run, above its bound of "
            "%.2f GiB (sam.embedding_cache_gib); nothing in use was evicted",
            root,
            total / 2**30,
            max_bytes / 2**30,
        )
    return Pruned(removed=removed, freed=freed, kept=len(kept), size=total)
