"""Segmentation losses for SAM: focal, dice, IoU-prediction MSE, best-of-K selection.

Mask tensors are (..., H, W): logits (any real) and binary targets (0/1 floats). Per-mask
losses reduce over the last two dimensions only, so ``(N, K, H, W)`` gives ``(N, K)`` and
the best of K candidates can be picked per prompt, as SAM trains with multimask output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def focal_loss(logits: Tensor, target: Tensor, *, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels: (..., H, W) -> (...).

    alpha weighs positives (1 - alpha negatives); alpha < 0 disables the weighting.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: Tensor, target: Tensor, *, smooth: float = 1.0) -> Tensor:
    """1 - soft dice of sigmoid(logits) vs target: (..., H, W) -> (...).

    smooth is added to numerator and denominator (empty target and empty prediction -> 0).
    """
    prob = logits.sigmoid().flatten(-2)
    target = target.flatten(-2)
    inter = (prob * target).sum(-1)
    return 1 - (2 * inter + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of binary masks (bool or 0/1): (..., H, W) -> (...); two empty masks give 1."""
    pred, target = pred.bool().flatten(-2), target.bool().flatten(-2)
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_prediction_loss(iou_pred: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """MSE between predicted IoU (...) and the actual IoU of (logits > 0) vs target (...)."""
    actual = mask_iou(logits.detach() > 0, target)
    return (iou_pred - actual) ** 2


def sam_loss(
    logits: Tensor,
    iou_pred: Tensor,
    target: Tensor,
    *,
    focal_weight: float,
    dice_weight: float,
    iou_weight: float,
    focal_alpha: float,
    focal_gamma: float,
) -> dict[str, Tensor]:
    """SAM's training loss for N prompts with K candidate masks each.

    logits: (N, K, H, W); iou_pred: (N, K); target: (N, H, W) 0/1.
    The mask loss (focal_weight * focal + dice_weight * dice) is taken, per prompt, from the
    candidate with the lowest mask loss (K = 1: the only one); the IoU head learns all K
    candidates' IoU (its job at inference is to rank them). Returns scalar means: ``loss``;
    ``focal`` and ``dice`` of the selected candidates; ``iou_mse`` averaged over all N x K
    candidates (selected or not), as it enters ``loss``.
    """
    target = target.unsqueeze(1).expand_as(logits).to(logits.dtype)
    focal = focal_loss(logits, target, alpha=focal_alpha, gamma=focal_gamma)  # (N, K)
    dice = dice_loss(logits, target)  # (N, K)
    mask_loss = focal_weight * focal + dice_weight * dice
    best = mask_loss.argmin(dim=1, keepdim=True)  # (N, 1)
    iou_mse = iou_prediction_loss(iou_pred, logits, target).mean()
    loss = mask_loss.gather(1, best).mean() + iou_weight * iou_mse
    return {
        "loss": loss,
        "focal": focal.gather(1, best).mean().detach(),
        "dice": dice.gather(1, best).mean().detach(),
        "iou_mse": iou_mse.detach(),
    }
