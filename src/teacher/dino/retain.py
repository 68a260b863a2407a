"""Keep the base model's open vocabulary while fine-tuning (``dino.retain_weight``).

Learning without Forgetting (Li & Hoiem, 2016) for an open-vocabulary detector: on the new
task's own training images, the model is trained to keep the *old* task's outputs, which the
frozen original computes. With a LoRA adapter the original is the same weights with the adapter
switched off (peft's ``disable_adapter()``), so it costs one forward without gradients and no
second copy of the model.

What "the old task" is here: class names the dataset does not have (``evaluate.retention_classes``,
default COCO-80 minus the dataset's classes; the same names ``evaluate`` measures retention on).
Each training prompt gets up to ``dino.retain_names`` of them after its own classes, drawn with
the seed, as many as fit the 256-token prompt (:class:`RetainNames`). The user's classes are never
among them. One forward of the fine-tuned model serves both terms:

- the grounded loss sees the user's tokens only: the retention names' tokens are taken out of its
  text mask (:func:`user_tokens_only`), so it never trains them towards "no object";
- the retention term (:func:`retain_loss`) distils the base model's answers for those tokens, as
  the detection LwF of Shmelkov et al. (2017, "Incremental learning of object detectors without
  catastrophic forgetting") distils the old classes' scores and boxes of the old network's
  confident proposals. A DETR has no fixed proposals to pair, so the pairing is DETR's: the base
  model's :data:`RETAIN_TOP_K` best queries (at most a quarter of them) (by their best retention-token score) are matched to
  the fine-tuned model's queries by the Hungarian matcher, with Grounding DINO's matching costs
  (class: mean absolute score difference over the retention tokens; box: L1 and GIoU). Matched
  queries learn the base model's scores (soft targets) and, weighted by the base score, its
  boxes; every other query learns score 0 on the retention tokens, as the base model's unmatched
  queries score next to nothing. The class term is the quality focal loss of Generalized Focal
  Loss (Li et al., 2020): BCE against a soft target with the modulating factor
  ``|target - sigmoid|^2``, so the hundreds of near-zero queries do not drown the matched ones
  (a focal loss with soft targets, as Grounding DINO's class term is focal). Last decoder layer
  only: the term constrains what the model outputs, not how each layer gets there.

Weights: ``dino.retain_weight`` x (2 class + 5 L1 + 2 GIoU), Grounding DINO's loss coefficients.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import generalized_box_iou

from teacher.dino.labels import MAX_TEXT_TOKENS

# the base model's queries that are targets (per image): those whose best retention-token score
# is at least RETAIN_MIN_SCORE, below evaluate's retention thresholds (evaluate.retention_threshold
# 0.3; 0.15 in make demo), so every box the forgetting guard counts is kept; at most RETAIN_TOP_K
# (evaluate scores 100 detections per image) and half the queries (QUERY_SHARE): targets must be
# fewer than the queries, as DETR's objects are, or the matching pairs queries far apart (the
# tiny preset's 64 queries with all 64 as targets: its decoder box term grew to 2.5). Every
# other query learns score 0 for the retention names: the base model's low-score tail is not
# what the guard counts, and dropping it only removes false positives there.
RETAIN_MIN_SCORE = 0.1
RETAIN_TOP_K = 100
QUERY_SHARE = 2
QFL_BETA = 2.0  # Generalized Focal Loss's quality focal loss exponent (its paper's 2)
# the term's weights: Grounding DINO's class (2), L1 (5) and GIoU (2) loss coefficients
# (the proposals' terms as Grounding DINO weighs its _enc terms: as the decoder's)
TERM_WEIGHTS = {
    "loss_retain_ce": 2.0,
    "loss_retain_bbox": 5.0,
    "loss_retain_giou": 2.0,
    "loss_retain_ce_enc": 2.0,
    "loss_retain_bbox_enc": 5.0,
}


@dataclass(frozen=True)
class RetainNames:
    """The retention names and their token counts; draws a training prompt's share."""

    names: tuple[str, ...]
    tokens: tuple[int, ...]  # tokens of each name (no special tokens, no '.')
    per_prompt: int  # dino.retain_names

    def draw(
        self, rng: np.random.Generator, *, used_tokens: int, max_tokens: int = MAX_TEXT_TOKENS
    ) -> tuple[str, ...]:
        """Up to ``per_prompt`` names in a random order (``rng``), each only if it still fits a
        prompt that already uses ``used_tokens`` tokens ([CLS], [SEP] and the own classes)."""
        chosen: list[str] = []
        for i in rng.permutation(len(self.names)):
            if len(chosen) == self.per_prompt:
                break
            cost = self.tokens[i] + 1  # the name and its '.'
            if used_tokens + cost <= max_tokens:
                chosen.append(self.names[i])
                used_tokens += cost
        return tuple(chosen)


def retain_names(names: Sequence[str], *, tokenizer: Any, per_prompt: int) -> RetainNames | None:
    """:class:`RetainNames` of ``names`` (already without the dataset's classes); None when
    there is nothing to retain (no names, or ``per_prompt`` 0)."""
    if not names or per_prompt <= 0:
        return None
    tokens = tuple(len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in names)
    kept = [(n, t) for n, t in zip(names, tokens, strict=True) if t > 0]
    if not kept:
        return None
    return RetainNames(
        names=tuple(n for n, _ in kept), tokens=tuple(t for _, t in kept), per_prompt=per_prompt
    )


def retain_token_masks(label_maps: Sequence[Tensor], own_classes: Sequence[int]) -> Tensor:
    """(B, T) bool: the tokens of each prompt's retention names.

    ``label_maps``: per image (phrases, T), transformers' ``build_label_maps`` (one row per
    '.'-separated phrase, in prompt order); ``own_classes[i]``: how many of image i's phrases are
    its own classes (they come first; the rest are retention names).
    """
    rows = [m[int(k) :].bool().any(0) for m, k in zip(label_maps, own_classes, strict=True)]
    return torch.stack(rows)


def _peft(model: nn.Module) -> Any:
    """The peft model inside a DDP wrapper (or the model itself)."""
    return cast(Any, model).module if hasattr(model, "module") else model


def _trained_in_place(model: nn.Module) -> list[str]:
    """Names of the base weights that train fully (not LoRA, not our own modules)."""
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n and not n.startswith(OWN_MODULES)
    ]


OWN_MODULES = ("denoiser.", "retain_base.")  # modules we add to the peft model


class PretrainedValues(nn.Module):
    """The pretrained values of the weights that train in place (``dino.train_heads``' box
    heads): peft's ``disable_adapter()`` switches LoRA off, but these are the model's own
    parameters, trained as they are, so the base model needs their values from before training.
    Kept as non-persistent buffers: they follow the model to its device and are never saved.
    Take it before a checkpoint is loaded (:func:`keep_pretrained_values`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        params = dict(model.named_parameters())
        self.names = _trained_in_place(model)
        for i, name in enumerate(self.names):
            self.register_buffer(f"w{i}", params[name].detach().clone(), persistent=False)

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """Within: the model's in-place-trained weights hold their pretrained values."""
        params = dict(model.named_parameters())
        saved = []
        try:
            for i, name in enumerate(self.names):
                param = params[name]
                saved.append((param, param.data))
                param.data = getattr(self, f"w{i}")
            yield
        finally:
            for param, data in saved:
                param.data = data


def keep_pretrained_values(model: nn.Module) -> nn.Module:
    """``model`` (LoRA-wrapped, not yet trained) with :class:`PretrainedValues` as
    ``retain_base``, when some of its base weights train in place."""
    if _trained_in_place(model):
        model.add_module("retain_base", PretrainedValues(model))
    return model


@torch.no_grad()
def base_outputs(model: nn.Module, inputs: dict[str, Tensor]) -> Any:
    """The base model's outputs on ``inputs``: the same weights with the adapter switched off
    and the in-place-trained weights at their pretrained values (:class:`PretrainedValues`),
    without gradients, in the model's current mode. In a training step, within
    :func:`shared_towers`, it sees the very image and text features the fine-tuned forward
    then sees (the frozen Swin's drop path and BERT's dropout drawn once): the two differ by the
    adapter alone, and a fresh adapter answers as the base model (the term is 0 up to rounding)."""
    peft = _peft(model)
    keep = peft._modules.get("retain_base")
    if keep is None and _trained_in_place(peft):
        raise ValueError(
            "base_outputs: weights train in place but their pretrained values were not kept "
            "(keep_pretrained_values before training)"
        )
    with peft.disable_adapter(), keep.swapped_in(peft) if keep else nullcontext():
        return peft(**inputs)


def _containers_copied(value: Any) -> Any:
    """``value`` with its lists, tuples and dicts copied (tensors shared): the model appends to
    the backbone's list of position embeddings, which must not grow on a replay."""
    if isinstance(value, list):
        return [_containers_copied(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_containers_copied(v) for v in value)
    if isinstance(value, dict):  # transformers' ModelOutput is a dict (and keeps its class)
        copied = copy.copy(value)
        for key in value:
            copied[key] = _containers_copied(value[key])
        return copied
    return value


@contextmanager
def shared_towers(model: nn.Module):
    """Within: each frozen tower (:func:`teacher.dino.model.frozen_towers`: the Swin and BERT
    when no LoRA reaches them) computes once and answers its later calls with that output.

    For one training step: the base model's forward and the fine-tuned one take the same
    inputs, and a frozen tower is the same weights in both, so the second forward skips the
    image and text encoders (the cost of the term is the base model's fusion encoder and
    decoder without gradients)."""
    from teacher.dino.model import frozen_towers

    base = _peft(model).get_base_model()
    patched = []
    for name in frozen_towers(base):
        module = base.get_submodule(name)
        forward = module.forward
        memo: list[Any] = []

        def replay(*args: Any, _forward: Any = forward, _memo: list = memo, **kwargs: Any) -> Any:
            if not _memo:
                _memo.append(_forward(*args, **kwargs))
            return _containers_copied(_memo[0])

        module.forward = replay
        patched.append((module, forward))
    try:
        yield
    finally:
        for module, forward in patched:
            module.forward = forward


@contextmanager
def user_tokens_only(model: nn.Module, retain_tokens: Tensor):
    """Within: the model's grounded loss leaves the retention tokens (``retain_tokens`` (B, T)
    bool, T the logits' text width, as :func:`retain_token_masks` gives them) out of its text
    mask: no term of it trains them (the retention term does)."""
    base = _peft(model).get_base_model()
    previous = base.loss_function

    def loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, **kwargs):
        keep = ~retain_tokens.to(text_mask.device)[:, None, :]
        return previous(
            logits, labels, device, pred_boxes, config, label_maps, text_mask & keep, **kwargs
        )

    base.loss_function = loss
    try:
        yield
    finally:
        base.loss_function = previous


def _corners(boxes: Tensor) -> Tensor:
    """cxcywh -> xyxy (transformers' helper, as its matcher and loss use it)."""
    return cast(Tensor, center_to_corners_format(cast(Any, boxes)))


def _qfl(logits: Tensor, target: Tensor) -> Tensor:
    """Generalized Focal Loss's quality focal loss, elementwise: BCE against a soft target with
    the factor ``|target - sigmoid|^beta`` (mmdet's ``quality_focal_loss_tensor_target``)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * (logits.sigmoid() - target).abs().pow(QFL_BETA)


def retain_loss(
    logits: Tensor,
    boxes: Tensor,
    base_logits: Tensor,
    base_boxes: Tensor,
    tokens: Tensor,
    *,
    config: Any,
    top_k: int = RETAIN_TOP_K,
    min_score: float = RETAIN_MIN_SCORE,
) -> dict[str, Tensor]:
    """The retention terms (module docstring), unweighted: ``loss_retain_ce`` (quality focal
    loss, per matched query), ``loss_retain_bbox`` (L1) and ``loss_retain_giou``, both per unit
    of base score.

    logits / base_logits: (B, Q, T) of the fine-tuned and base model's last decoder layer (the
    same queries count; denoising queries left out); boxes / base_boxes: (B, Q, 4) cxcywh in
    [0, 1]; tokens: (B, T) bool, each image's retention tokens (:func:`retain_token_masks`).
    ``config``: the model's (class_cost, bbox_cost, giou_cost). fp32, autocast off.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits, boxes = logits.float(), boxes.float()
        base_logits, base_boxes = base_logits.float().detach(), base_boxes.float().detach()
        zero = boxes.sum() * 0.0  # keeps the graph without retention tokens (logits hold -inf)
        ce, l1, giou = zero, zero, zero
        matched, weight = 0, 0.0
        for b in range(len(logits)):
            t = tokens[b].to(logits.device)
            if not bool(t.any()):
                continue
            own, ref = logits[b][:, t], base_logits[b][:, t].sigmoid()  # (Q, n)
            score = ref.max(1).values
            top = score.topk(min(top_k, max(len(score) // QUERY_SHARE, 1))).indices
            top = top[score[top] >= min_score]
            if len(top) == 0:  # nothing the base model saw: every query learns 0
                ce = ce + _qfl(own, torch.zeros_like(own)).sum()
                continue
            target, target_box, target_score = ref[top], base_boxes[b][top], score[top]
            prob = own.sigmoid()
            pair_giou = generalized_box_iou(_corners(boxes[b]), _corners(target_box))
            cost = (
                config.class_cost * torch.cdist(prob, target, p=1) / t.sum()
                + config.bbox_cost * torch.cdist(boxes[b], target_box, p=1)
                - config.giou_cost * pair_giou
            )
            rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
            rows_t = torch.as_tensor(rows, device=logits.device)
            cols_t = torch.as_tensor(cols, device=logits.device)
            soft = torch.zeros_like(prob)
            soft[rows_t] = target[cols_t]
            ce = ce + _qfl(own, soft).sum()
            w = target_score[cols_t]
            l1 = l1 + ((boxes[b][rows_t] - target_box[cols_t]).abs().sum(1) * w).sum()
            giou = giou + ((1.0 - pair_giou[rows_t, cols_t]) * w).sum()
            matched += len(rows)
            weight += float(w.sum())
        return {
            "loss_retain_ce": ce / max(matched, 1),  # per target (none: the sum)
            "loss_retain_bbox": l1 / max(weight, 1e-6),
            "loss_retain_giou": giou / max(weight, 1e-6),
        }


def retain_proposal_loss(
    enc_logits: Tensor,
    enc_coords: Tensor,
    base_enc_logits: Tensor,
    base_enc_coords: Tensor,
    tokens: Tensor,
    *,
    top_k: int = RETAIN_TOP_K,
) -> dict[str, Tensor]:
    """The proposals' retention terms, unweighted: ``loss_retain_ce_enc`` (quality focal loss
    of every encoder position's retention-token scores against the base model's, per
    ``top_k`` positions, the decoder term's unit) and ``loss_retain_bbox_enc`` (L1 of the
    proposal boxes, weighted by the base position's best retention score, per unit of it).

    The decoder's queries are the encoder's top-scoring positions (two-stage), a selection no
    gradient passes: once fine-tuning lifts the user's classes elsewhere, the positions where
    the base model saw a retention object stop being selected, and the matched decoder term has
    no query left to pull back (measured: its box term grew 250-fold over a training run). Both
    models score the same positions (one image, one feature grid), so these terms pair position
    with position, no matching: the selection itself is kept.

    enc_logits / base_enc_logits: (B, HW, T) ``enc_outputs_class``; enc_coords /
    base_enc_coords: (B, HW, 4) ``enc_outputs_coord_logits`` (inverse-sigmoid; padding
    positions are not finite and are left out); tokens: (B, T) bool.
    """
    with torch.autocast(device_type=enc_logits.device.type, enabled=False):
        enc_logits, enc_coords = enc_logits.float(), enc_coords.float()
        base_enc_logits = base_enc_logits.float().detach()
        base_enc_coords = base_enc_coords.float().detach()
        zero = enc_logits.new_zeros(())
        ce, l1, count, weight = zero, zero, 0, 0.0
        for b in range(len(enc_logits)):
            t = tokens[b].to(enc_logits.device)
            valid = torch.isfinite(base_enc_coords[b]).all(-1) & torch.isfinite(enc_coords[b]).all(
                -1
            )
            if not bool(t.any()) or not bool(valid.any()):
                continue
            own = enc_logits[b][valid][:, t]
            ref = base_enc_logits[b][valid][:, t].sigmoid()
            ce = ce + _qfl(own, ref).sum()
            w = ref.max(1).values
            shift = (enc_coords[b][valid].sigmoid() - base_enc_coords[b][valid].sigmoid()).abs()
            l1 = l1 + (shift.sum(1) * w).sum()
            count += min(top_k, int(valid.sum()))
            weight += float(w.sum())
        return {
            "loss_retain_ce_enc": ce / max(count, 1),
            "loss_retain_bbox_enc": l1 / max(weight, 1e-6),
        }


def weighted_total(terms: dict[str, Tensor], weight: float) -> Tensor:
    """``weight`` x the terms with their coefficients (:data:`TERM_WEIGHTS`)."""
    return weight * cast(Tensor, sum(TERM_WEIGHTS[k] * v for k, v in terms.items()))
