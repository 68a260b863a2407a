"""Prompt a prepared image, as segment-anything's ``predictor.py``; either SAM family.

:func:`prepare_image` runs the image encoder once (``SamPredictor.set_image``); the immutable
:class:`PreparedImage` answers any number of box prompts (COCO xywh, original pixels) against
that embedding, and click prompts (:meth:`PreparedImage.predict_points`); :func:`segment` does
both for one image. The family's geometry, decoder and post-processing come from the model
(:mod:`teacher.sam.model`'s family interface).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from teacher.coco.boxes import xywh_to_xyxy
from teacher.sam.embedding import Embedding
from teacher.sam.model import embed, select_best, unwrap

SAM_CHUNK = 16  # box prompts decoded and upscaled at a time: bounds the (chunk, H, W) float logits


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for box prompts: segment-anything's ``SamPredictor.set_image`` state.

    The encoder ran once (:func:`prepare_image`); :meth:`predict` answers any number of box
    prompts against the embedding, ``chunk`` boxes per decoder call, so the full-size float
    logits in memory are (chunk, H, W) however many boxes an image has.
    """

    sam: Any  # the (unwrapped) model whose encoder computed ``embedding``, either family
    embedding: Embedding  # (C, g, g) on the model's device (SAM 2: + its high-res maps)
    original_size: tuple[int, int]  # (H, W) of the image as given
    input_size: tuple[int, int]  # (h, w): the image's extent in the input frame

    def boxes_to_input(self, boxes_xywh: np.ndarray) -> Tensor:
        """(N, 4) COCO xywh in original pixels -> (N, 4) float32 xyxy in the input frame."""
        xyxy = xywh_to_xyxy(np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4))
        return torch.as_tensor(
            self.sam.geometry.boxes_to_input(xyxy, self.original_size),
            dtype=torch.float32,
            device=self.embedding.device,
        )

    def points_to_input(self, points_xy: np.ndarray) -> Tensor:
        """(..., 2) x, y in original pixels -> float32 in the input frame."""
        return torch.as_tensor(
            self.sam.geometry.points_to_input(points_xy, self.original_size),
            dtype=torch.float32,
            device=self.embedding.device,
        )

    @torch.no_grad()
    def predict_chunks(
        self, boxes_xywh: np.ndarray, *, multimask: bool = False, chunk: int = SAM_CHUNK
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Masks bool (n, H, W) and predicted IoU float32 (n,) of consecutive chunks of at most
        ``chunk`` boxes (COCO xywh, original pixels); multimask: the best of 3 by predicted IoU."""
        boxes = self.boxes_to_input(boxes_xywh)
        for start in range(0, len(boxes), chunk):
            low_res, scores = self.sam.decode(
                self.embedding, boxes=boxes[start : start + chunk], multimask=multimask
            )
            yield self._best_masks(low_res, scores)

    def _best_masks(self, low_res: Tensor, scores: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(n, K, h, w) low-res logits, (n, K) IoU -> the best candidate of each prompt by
        predicted IoU (chosen before upscaling) as bool (n, H, W) at the original size, and its
        predicted IoU float32 (n,)."""
        best, best_scores = select_best(low_res, scores)
        logits = self.sam.postprocess(best[:, None], self.input_size, self.original_size)
        return (
            (logits[:, 0] > self.sam.mask_threshold).cpu().numpy(),
            best_scores.float().cpu().numpy(),
        )

    @torch.no_grad()
    def predict_points(
        self,
        points_xy: np.ndarray,
        labels: np.ndarray,
        *,
        multimask: bool = True,
        chunk: int = SAM_CHUNK,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks bool (N, H, W) and predicted IoU float32 (N,) of N click prompts.

        points_xy: (N, P, 2) x, y in original pixels; labels: (N, P) 1 positive, 0 negative.
        multimask (default, as ``SamPredictor`` for a click and the smart tool of
        ``teacher serve``): the best of 3 candidates by predicted IoU.
        """
        coords = self.points_to_input(np.asarray(points_xy, np.float64).reshape(len(labels), -1, 2))
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(coords.shape[:2])
        parts = []
        for start in range(0, len(coords), chunk):
            low_res, scores = self.sam.decode(
                self.embedding,
                points=coords[start : start + chunk],
                labels=labels_t[start : start + chunk],
                multimask=multimask,
            )
            parts.append(self._best_masks(low_res, scores))
        if not parts:
            return np.zeros((0, *self.original_size), bool), np.zeros((0,), np.float32)
        return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])

    def predict(
        self, boxes_xywh: np.ndarray, *, multimask: bool = False, chunk: int = SAM_CHUNK
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks bool (N, H, W) and predicted IoU float32 (N,) of all boxes (see predict_chunks)."""
        parts = list(self.predict_chunks(boxes_xywh, multimask=multimask, chunk=chunk))
        if not parts:
            return np.zeros((0, *self.original_size), bool), np.zeros((0,), np.float32)
        return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])


@torch.no_grad()
def prepare_image(
    model: nn.Module,
    image: np.ndarray | None = None,
    *,
    embedding: Embedding | None = None,
    original_size: tuple[int, int] | None = None,
) -> PreparedImage:
    """Run the image encoder once on ``image`` (HxWx3 uint8 RGB), as ``SamPredictor.set_image``.

    Or wrap an ``embedding`` (C, g, g; SAM 2: its features) computed before (the decoder-only
    cache) of an image of ``original_size`` (H, W): then the image is not needed.
    """
    sam = unwrap(model)
    if embedding is None:
        if image is None:
            raise ValueError("prepare_image: pass an image, or an embedding and its original_size")
        original_size = (int(image.shape[0]), int(image.shape[1]))
        embedding = embed(sam, [image])[0]
    elif original_size is None:
        if image is None:
            raise ValueError("prepare_image: an embedding needs the image's original_size")
        original_size = (int(image.shape[0]), int(image.shape[1]))
    resized = sam.geometry.resized_shape(*original_size)
    return PreparedImage(
        sam=sam,
        embedding=embedding.to(sam.device),
        original_size=(int(original_size[0]), int(original_size[1])),
        input_size=(int(resized[0]), int(resized[1])),
    )


def segment(
    model: nn.Module,
    image: np.ndarray,
    boxes_xywh: np.ndarray,
    *,
    multimask: bool = False,
    embedding: Embedding | None = None,
    chunk: int = SAM_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the objects in ``boxes_xywh`` (COCO xywh, absolute pixels) of one image.

    image: HxWx3 uint8 RGB. One embedding (``embedding`` (C, g, g) when already computed), the
    boxes decoded ``chunk`` at a time. multimask: False (default) uses SAM's single-mask output,
    what a box prompt calls for; True keeps the best of three by predicted IoU.
    Returns masks bool (N, H, W) and predicted IoU float32 (N,). No boxes: no encoder pass.
    """
    if len(np.asarray(boxes_xywh).reshape(-1, 4)) == 0:
        return np.zeros((0, *image.shape[:2]), bool), np.zeros((0,), np.float32)
    prepared = prepare_image(model, image, embedding=embedding)
    return prepared.predict(boxes_xywh, multimask=multimask, chunk=chunk)
