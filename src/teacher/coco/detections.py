"""One image's detections: boxes, scores, classes and optional masks, as one typed value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Detections of one image, best first where a producer says so.

    ``boxes`` (N, 4) float COCO xywh in absolute pixels; ``scores`` (N,) float32;
    ``category_ids`` (N,) int64 original COCO ids; ``masks`` (N, H, W) bool or None.
    Arrays are converted and their lengths checked on construction.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        cats = np.asarray(self.category_ids, dtype=np.int64).reshape(-1)
        n = len(boxes)
        if len(scores) != n or len(cats) != n:
            raise ValueError(
                f"Detections: {n} boxes, {len(scores)} scores, {len(cats)} category ids"
            )
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "category_ids", cats)
        if self.masks is not None:
            masks = np.asarray(self.masks, dtype=bool)
            if masks.ndim != 3 or len(masks) != n:
                raise ValueError(
                    f"Detections: masks {masks.shape} for {n} boxes; expected (N, H, W)"
                )
            object.__setattr__(self, "masks", masks)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))

    def take(self, index: np.ndarray | slice) -> Detections:
        """The detections at ``index`` (integer indexes, a bool mask or a slice), in that order."""
        return Detections(
            self.boxes[index],
            self.scores[index],
            self.category_ids[index],
            None if self.masks is None else self.masks[index],
        )

    def with_masks(self, masks: np.ndarray) -> Detections:
        return Detections(self.boxes, self.scores, self.category_ids, masks)

    def scaled(self, factor: float) -> Detections:
        """Boxes times ``factor``; masks repeated ``factor`` times per axis (an integer factor)."""
        masks = (
            None
            if self.masks is None
            else (self.masks.repeat(int(factor), axis=1).repeat(int(factor), axis=2))
        )
        return Detections(self.boxes * factor, self.scores, self.category_ids, masks)

    @staticmethod
    def concat(parts: Sequence[Detections]) -> Detections:
        """All of ``parts`` in order; masks only when every part has them."""
        if not parts:
            return Detections.empty()
        masks = (
            np.concatenate([p.masks for p in parts])
            if all(p.masks is not None for p in parts)
            else None
        )
        return Detections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.category_ids for p in parts]),
            masks,
        )

    def best(self, k: int) -> Detections:
        """The ``k`` highest scores, best first (stable on ties)."""
        return self.take(np.argsort(-self.scores, kind="stable")[:k])
