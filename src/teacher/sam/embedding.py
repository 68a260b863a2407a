"""What a SAM family's image encoder hands its mask decoder, in memory and in the disk cache.

SAM: one tensor, the image embedding (C, g, g) (256 x 64 x 64 for Meta's models at 1024 px).
SAM 2: :class:`Sam2Features`, the image embedding (with ``no_memory_embedding`` added, as
``Sam2Model`` does for a single image) and the two high-resolution maps its mask decoder adds
while upscaling, already projected by the decoder's ``conv_s0`` / ``conv_s1`` (transformers'
``get_image_features`` does so once per image "to avoid running it again on every click").
Both index per image (``emb[i]``), move (``.to(device)``) and report ``.shape`` / ``.device``
of the image embedding, so the code around them does not branch on the family.

Cache files (safetensors) hold :func:`embedding_tensors`: ``embedding``, plus ``high_res_s0``
and ``high_res_s1`` for SAM 2. Bytes per image at 1024 px, float32: SAM 256x64x64 = 4 MiB;
SAM 2 256x64x64 + 64x128x128 + 32x256x256 = 1 + 1 + 2 M floats = 16 MiB
(:func:`cache_bytes_per_image`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

EMBEDDING_KEY = "embedding"  # the image embedding, both families
HIGH_RES_KEYS = ("high_res_s0", "high_res_s1")  # SAM 2's projected high-res maps (4g and 2g)


@dataclass(frozen=True)
class Sam2Features:
    """SAM 2's encoder output for one image or a batch (a leading batch dimension on each).

    image: (..., C, g, g); s0: (..., C/8, 4g, 4g); s1: (..., C/4, 2g, 2g), C the decoder width.
    """

    image: Tensor
    s0: Tensor
    s1: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.image.shape

    @property
    def device(self) -> torch.device:
        return self.image.device

    def to(self, *args: Any, **kwargs: Any) -> Sam2Features:
        return Sam2Features(*(t.to(*args, **kwargs) for t in (self.image, self.s0, self.s1)))

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> Sam2Features:
        return Sam2Features(self.image[i], self.s0[i], self.s1[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


Embedding = Tensor | Sam2Features


def embedding_tensors(embedding: Embedding) -> dict[str, Tensor]:
    """One image's embedding as named float32 CPU tensors (a cache file's content)."""
    parts = (
        {
            EMBEDDING_KEY: embedding.image,
            HIGH_RES_KEYS[0]: embedding.s0,
            HIGH_RES_KEYS[1]: embedding.s1,
        }
        if isinstance(embedding, Sam2Features)
        else {EMBEDDING_KEY: embedding}
    )
    return {k: v.detach().float().cpu().contiguous() for k, v in parts.items()}


def embedding_from_tensors(tensors: dict[str, Tensor]) -> Embedding:
    """The inverse of :func:`embedding_tensors`."""
    if HIGH_RES_KEYS[0] in tensors:
        return Sam2Features(tensors[EMBEDDING_KEY], *(tensors[k] for k in HIGH_RES_KEYS))
    return tensors[EMBEDDING_KEY]


def stack_embeddings(items: list[Embedding]) -> Embedding:
    """Per-image embeddings -> one batch (B, ...)."""
    if isinstance(items[0], Sam2Features):
        feats = [f for f in items if isinstance(f, Sam2Features)]
        return Sam2Features(
            *(torch.stack([getattr(f, k) for f in feats]) for k in ("image", "s0", "s1"))
        )
    return torch.stack([t for t in items if isinstance(t, Tensor)])


def cache_keys(family: str) -> set[str]:
    """The tensor names a cache entry of ``family`` ("sam" or "sam2") holds, exactly."""
    return {EMBEDDING_KEY, *HIGH_RES_KEYS} if family == "sam2" else {EMBEDDING_KEY}


def valid_entry(tensors: dict[str, Tensor], family: str) -> bool:
    """A cache entry of ``family``: its exact names, a square (C, g, g) image embedding, the
    high-res maps 4x and 2x its side (SAM 2), every value finite."""
    if set(tensors) != cache_keys(family):
        return False
    emb = tensors[EMBEDDING_KEY]
    if emb.ndim != 3 or emb.shape[1] != emb.shape[2]:
        return False
    g = emb.shape[-1]
    for key, factor in zip(HIGH_RES_KEYS, (4, 2), strict=True):
        if key in tensors and tuple(tensors[key].shape[-2:]) != (factor * g, factor * g):
            return False
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def cache_bytes_per_image(family: str, *, size: int = 1024, width: int = 256) -> int:
    """float32 bytes of one cache entry's tensors: SAM (C, g, g); SAM 2 adds (C/8, 4g, 4g) and
    (C/4, 2g, 2g); g = size / 16, C = ``width`` (256 for every released model)."""
    g = size // 16
    floats = width * g * g
    if family == "sam2":
        floats += (width // 8) * (4 * g) ** 2 + (width // 4) * (2 * g) ** 2
    return 4 * floats
