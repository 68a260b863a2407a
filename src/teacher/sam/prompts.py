"""Point prompts: where SAM's training clicks, and where ``mask/miou_point`` clicks.

SAM's recipe (Kirillov et al. 2023, "Segment Anything", appendix A, *Training algorithm*): the
first prompt of a mask is, with equal probability, a point sampled uniformly inside the mask or
its (noisy) box; each further point is sampled uniformly from the error region of the previous
prediction (the candidate with the highest predicted IoU), positive where it is a false
negative, negative where it is a false positive. :mod:`teacher.sam.task` runs the iterations
(and says where it departs from the recipe); this module is the sampling, pure functions on
masks in SAM's input frame. Points are ``(x, y)`` pixel indexes in the input frame, as
``ResizeLongestSide.apply_coords`` gives them (the prompt encoder adds 0.5: a pixel's centre).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NOT_A_POINT = -1  # segment-anything's label of a padding point: the prompt encoder ignores it


def choose_point_prompts(count: int, *, share: float, rng: np.random.Generator) -> np.ndarray:
    """(count,) bool: which of ``count`` prompts are a point instead of a box, each with
    probability ``share`` (SAM: 0.5). ``share`` 0 draws nothing from ``rng``."""
    if share <= 0:
        return np.zeros(count, bool)
    return rng.random(count) < share


def sample_mask_points(masks: Tensor, *, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """One point per mask, uniform over its pixels (SAM's first point prompt).

    masks: (N, S, S) bool in the input frame. Returns points (N, 2) float32 x, y and ``found``
    (N,) bool: False for an empty mask (its point is (0, 0): keep a box prompt for it).
    """
    flat = masks.flatten(1).cpu().numpy()
    width = masks.shape[-1]
    points = np.zeros((len(flat), 2), np.float32)
    found = flat.any(1)
    for i in np.flatnonzero(found):
        k = int(rng.choice(np.flatnonzero(flat[i])))
        points[i] = (k % width, k // width)
    return torch.from_numpy(points), torch.from_numpy(found)


def correction_points(
    pred: Tensor,
    target: Tensor,
    *,
    extent: tuple[int, int],
    scale: float,
    rng: np.random.Generator,
) -> tuple[Tensor, Tensor]:
    """One correction click per prompt, uniform over the error region of its prediction (SAM's
    iterative points): a false-negative pixel gives a positive point (label 1), a false-positive
    one a negative point (label 0).

    pred, target: (N, h, w) bool at the decoder's low resolution; ``extent`` (h', w'): the
    image's part of that grid (the rest is padding, where no click can land); ``scale``: input
    pixels per low-res cell (4). A prompt whose prediction has no error gets a positive point
    inside its target (a click that agrees), and one whose target is empty too gets
    :data:`NOT_A_POINT`. Returns points (N, 2) float32 x, y in the input frame (the cell's
    centre) and labels (N,) int64.
    """
    h, w = extent
    pred_np = pred[:, :h, :w].cpu().numpy()
    target_np = target[:, :h, :w].cpu().numpy()
    points = np.zeros((len(pred_np), 2), np.float32)
    labels = np.full(len(pred_np), NOT_A_POINT, np.int64)
    for i, (p, t) in enumerate(zip(pred_np, target_np, strict=True)):
        region = np.flatnonzero(p != t)
        if not len(region):
            region = np.flatnonzero(t)
        if not len(region):
            continue
        k = int(rng.choice(region))
        row, col = divmod(k, w)
        labels[i] = int(t[row, col])  # in the target: a missed pixel (or an agreeing click)
        points[i] = ((col + 0.5) * scale - 0.5, (row + 0.5) * scale - 0.5)
    return torch.from_numpy(points), torch.from_numpy(labels)


def farthest_from_boundary(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask pixel farthest from its boundary (the image edge counts as one):
    where an annotator clicks to mean "this object". Ties (the ridge of a long shape): the one
    nearest their mean, the middle of the ridge.

    mask: (H, W) bool, not empty (an empty mask raises ValueError).
    """
    import cv2

    if not mask.any():
        raise ValueError("farthest_from_boundary: the mask is empty")
    padded = np.pad(mask.astype(np.uint8), 1)  # zeros around: the image edge is a boundary
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    ties = np.argwhere(distance >= distance.max())  # (T, 2) row, col: a ridge, often
    row, col = ties[np.argmin(((ties - ties.mean(0)) ** 2).sum(1))]
    return float(col), float(row)
