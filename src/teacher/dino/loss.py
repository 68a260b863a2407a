"""Grounding DINO's grounded training loss, adapted from transformers
(``transformers/loss/loss_grounding_dino.py``, ``GroundingDinoForObjectDetectionLoss``, 5.x).

What differs from the original, and why (each pinned in tests/dino/test_dino.py and
tests/dino/test_dino_recipe.py against independent implementations):

- One-hot offset: transformers offsets image i's class labels by *that image's* label-map
  length instead of the running total, so in any batch of 2+ images whose prompts differ
  (a batch of 2 included) image 1 onward is matched against another image's label map.
  :class:`GroundedImageLoss` uses the running offset.
- Auxiliary decoder losses always on, whatever ``config.auxiliary_loss`` says (the hub
  checkpoint says false): Open-GroundingDino (``aux_loss = True``) and MM-Grounding-DINO
  supervise every decoder layer; without it layers 0..L-2's box refinements get no gradient.
- The two-stage ``_enc`` terms are computed from the top-k encoder proposals *before* they are
  detached, as Open-GroundingDino's ``interm_outputs`` are (``hs_enc = tgt_undetach``,
  ``ref_enc = refpoint_embed_undetach.sigmoid()``): :func:`install_proposal_outputs` makes the
  model return them as ``encoder_logits`` / ``encoder_pred_boxes``. transformers scores the
  learned query embeddings against the pre-encoder text instead: independent of the image, its
  boxes the detached proposals', so its only gradient reaches the LoRA on ``text_projection``
  (pulling the class names towards fixed query embeddings; pinned in
  tests/dino/test_dino_recipe.py). Same matcher and weights as the decoder terms (OGD
  ``interm_loss_coef`` 1).
- Matcher and loss in fp32, autocast off (:func:`grounded_loss`): both references train in fp32
  (Open-GroundingDino's ``--amp`` is off in its scripts; MM-Grounding-DINO's configs use
  ``OptimWrapper``, not ``AmpOptimWrapper``), so their matching costs and loss never see bf16.
  Under our bf16 autocast the model's outputs are cast to float32 first.

``quality=True`` (``scripts/pretrain_tiny.py --varifocal``; never in fine-tuning, which follows
the references' focal loss) replaces the class term with RT-DETR's varifocal loss: a matched
query's class tokens are trained towards its box's IoU with the object instead of 1, so scores
rank boxes by fit (:func:`varifocal_loss`). Only the term is RT-DETR's: it keeps Grounding DINO's
class-term weight (2, against RT-DETR's 1 for ``loss_vfl``) and matcher costs.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from torch import nn
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import _set_aux_loss, box_iou
from transformers.loss.loss_grounding_dino import (
    GroundingDinoHungarianMatcher,
    GroundingDinoImageLoss,
)

from teacher.dino.denoising import DenoisingQueries


def varifocal_loss(
    logits: torch.Tensor,
    onehot: torch.Tensor,
    target_score: torch.Tensor,
    num_boxes: float,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Varifocal loss (Zhang et al., VarifocalNet, CVPR 2021) as RT-DETR computes it for DETR
    queries (``rtdetr_pytorch/src/zoo/rtdetr/rtdetr_criterion.py``, ``loss_labels_vfl``, alpha
    0.75, gamma 2): BCE towards ``target_score`` (a positive's IoU, 0 elsewhere), weighted by
    the target on positives and ``alpha * p ** gamma`` on negatives (``p`` detached), summed
    over every logit and divided by ``num_boxes``. ``onehot`` marks the positives."""
    prob = logits.sigmoid().detach()
    weight = alpha * prob.pow(gamma) * (1 - onehot) + target_score
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, target_score, weight=weight, reduction="none"
    )
    return loss.sum() / num_boxes


class GroundedImageLoss(GroundingDinoImageLoss):
    """transformers' criterion with the per-image label-map offset fixed (running total).

    The box count that normalises the loss is averaged over processes (as transformers does)
    only when ``across_processes``: evaluation runs on the main process alone and must not wait
    in a collective the other processes never join. ``quality``: the class term is
    :func:`varifocal_loss` towards each matched box's IoU (pretraining only, module docstring).
    """

    def __init__(
        self,
        *,
        matcher,
        focal_alpha: float,
        losses: list[str],
        across_processes: bool = True,
        quality: bool = False,
    ):
        super().__init__(matcher, focal_alpha, losses)
        self.across_processes = across_processes
        self.quality = quality

    def loss_labels(self, outputs, targets, indices, num_boxes):
        if not self.quality:
            return super().loss_labels(outputs, targets, indices, num_boxes)
        onehot = self._get_target_classes_one_hot(outputs, targets, indices).float()
        idx = self._get_source_permutation_idx(indices)
        matched = outputs["pred_boxes"][idx].detach()
        truth = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        iou, _ = box_iou(center_to_corners_format(matched), center_to_corners_format(truth))
        score = torch.zeros(onehot.shape[:2], dtype=onehot.dtype, device=onehot.device)
        score[idx] = torch.diag(iou).to(onehot.dtype)
        mask = outputs["text_mask"]
        loss = varifocal_loss(
            torch.masked_select(outputs["logits"], mask),
            torch.masked_select(onehot, mask),
            torch.masked_select(onehot * score[..., None], mask),
            num_boxes,
        )
        return {"loss_ce": loss}

    def _get_target_classes_one_hot(self, outputs, targets, indices):
        logits, label_maps = outputs["logits"], outputs["label_maps"]
        offsets = np.cumsum([0] + [len(m) for m in label_maps[:-1]])
        class_labels = torch.cat(
            [
                t["class_labels"][j] + int(off)
                for t, (_, j), off in zip(targets, indices, offsets, strict=True)
            ]
        )
        idx = self._get_source_permutation_idx(indices)
        onehot = torch.zeros_like(logits, dtype=torch.long)  # (batch, queries, 256)
        onehot[idx] = torch.cat(label_maps, dim=0)[class_labels].to(torch.long)
        return onehot

    def _num_boxes(self, targets, device) -> float:
        return self.mean_count(sum(len(t["class_labels"]) for t in targets), device)

    def mean_count(self, count: int, device) -> float:
        """``count`` averaged over processes (``across_processes``), at least 1: a normaliser."""
        n = torch.tensor([float(count)], device=device)
        dist = torch.distributed
        if self.across_processes and dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return torch.clamp(n, min=1).item()

    def forward(self, outputs, targets):
        """Loss terms of the last layer, then of each auxiliary layer (suffix ``_i``)."""
        num_boxes = self._num_boxes(targets, outputs["logits"].device)
        layers = [
            ("", outputs),
            *((f"_{i}", aux) for i, aux in enumerate(outputs.get("auxiliary_outputs") or [])),
        ]
        losses = {}
        for suffix, out in layers:
            indices = self.matcher(
                {k: v for k, v in out.items() if k != "auxiliary_outputs"}, targets
            )
            for loss in self.losses:
                terms = self.get_loss(loss, out, targets, indices, num_boxes)
                losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        return losses


def top_proposals(
    enc_outputs_class: torch.Tensor, enc_outputs_coord_logits: torch.Tensor, *, num_queries: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_queries`` encoder proposals the decoder starts from, with their gradients.

    ``enc_outputs_class`` (B, HW, 256) logits of every encoder position, ``enc_outputs_coord_logits``
    (B, HW, 4) their box logits. The same top-k transformers takes (best token logit per
    position); returns ``(logits (B, K, 256), boxes (B, K, 4) cxcywh in [0, 1])``, not detached.
    """
    index = enc_outputs_class.max(-1)[0].topk(num_queries, dim=1)[1]  # (B, K)
    logits = torch.gather(
        enc_outputs_class, 1, index[..., None].expand(-1, -1, enc_outputs_class.shape[-1])
    )
    coords = torch.gather(enc_outputs_coord_logits, 1, index[..., None].expand(-1, -1, 4))
    return logits, coords.sigmoid()


def _proposal_outputs_hook(module: nn.Module, args, output):
    """Forward hook of ``GroundingDinoModel``: ``encoder_logits`` / ``encoder_pred_boxes`` become
    the undetached top-k proposals (see the module docstring)."""
    if getattr(output, "enc_outputs_class", None) is None:
        return output
    logits, boxes = top_proposals(
        output.enc_outputs_class,
        output.enc_outputs_coord_logits,
        num_queries=cast(Any, module.config).num_queries,
    )
    output.encoder_logits, output.encoder_pred_boxes = logits, boxes
    return output


def install_proposal_outputs(model: nn.Module) -> None:
    """Make a ``GroundingDinoForObjectDetection`` (two-stage) return the undetached top-k encoder
    proposals as ``encoder_logits`` / ``encoder_pred_boxes``, which the loss reads; idempotent."""
    inner: Any = model.model  # GroundingDinoModel (nn.Module attributes are typed Tensor | Module)
    if not getattr(inner, "_teacher_proposal_hook", False):
        inner.register_forward_hook(_proposal_outputs_hook)
        inner._teacher_proposal_hook = True


def grounded_loss(
    logits,
    labels,
    device,
    pred_boxes,
    config,
    label_maps,
    text_mask,
    outputs_class=None,
    outputs_coord=None,
    encoder_logits=None,
    encoder_pred_boxes=None,
    *,
    across_processes: bool = True,
    quality: bool = False,
    denoising: DenoisingQueries | None = None,
):
    """``GroundingDinoForObjectDetectionLoss`` (transformers 5.x) with the three changes of the
    module docstring; same signature, terms and weights; returns ``(loss, loss_dict, auxiliary_outputs)``.
    ``quality``: the class terms are :func:`varifocal_loss` (pretraining only). ``denoising``:
    the first ``denoising.count`` queries are contrastive denoising queries
    (:mod:`teacher.dino.denoising`): they get their own terms (``loss_ce_dn``, ``loss_ce_dn_0``
    ...) on fixed pairs, and the matching terms see the other queries only. A batch without
    objects has no denoising queries but the same terms, zero, so every step logs and reduces
    the same keys. With ``quality`` their class terms are varifocal too (pretraining only; no
    reference combines the two). Runs in float32 with autocast off whatever the caller's
    autocast (module docstring): the model's outputs are cast up; gradients flow back through
    the casts.
    """
    up = [
        t.float() if isinstance(t, torch.Tensor) else t
        for t in (logits, pred_boxes, outputs_class, outputs_coord)
    ]
    enc = [t.float() if t is not None else None for t in (encoder_logits, encoder_pred_boxes)]
    with torch.autocast(device_type=up[0].device.type, enabled=False):
        return _grounded_loss(
            up[0],
            up[1],
            labels=labels,
            device=device,
            config=config,
            label_maps=label_maps,
            text_mask=text_mask,
            outputs_class=up[2],
            outputs_coord=up[3],
            encoder_logits=enc[0],
            encoder_pred_boxes=enc[1],
            across_processes=across_processes,
            quality=quality,
            denoising=denoising,
        )


def _grounded_loss(
    logits,
    pred_boxes,
    *,
    labels,
    device,
    config,
    label_maps,
    text_mask,
    outputs_class,
    outputs_coord,
    encoder_logits,
    encoder_pred_boxes,
    across_processes: bool,
    quality: bool,
    denoising: DenoisingQueries | None,
):
    """:func:`grounded_loss`'s body, on float32 inputs with autocast off."""
    dn: dict[str, Any] = {}
    if denoising is not None:
        k = denoising.count
        dn = {
            "logits": logits[:, :k],
            "pred_boxes": pred_boxes[:, :k],
            "text_mask": text_mask[:, :k],
        }
        logits, pred_boxes, text_mask = logits[:, k:], pred_boxes[:, k:], text_mask[:, k:]
        if outputs_class is not None:
            dn["layers"] = list(
                zip(outputs_class[:-1, :, :k], outputs_coord[:-1, :, :k], strict=True)
            )
            outputs_class, outputs_coord = outputs_class[:, :, k:], outputs_coord[:, :, k:]
    matcher = GroundingDinoHungarianMatcher(
        class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost
    )
    criterion = GroundedImageLoss(
        matcher=matcher,
        focal_alpha=config.focal_alpha,
        losses=["labels", "boxes", "cardinality"],
        across_processes=across_processes,
        quality=quality,
    ).to(device)
    outputs = {
        "logits": logits,
        "pred_boxes": pred_boxes,
        "label_maps": label_maps,
        "text_mask": text_mask,
    }
    # every decoder layer supervised whatever config.auxiliary_loss says (both references do)
    auxiliary = _set_aux_loss(outputs_class, outputs_coord) if outputs_class is not None else []
    for aux in auxiliary:
        aux.update(label_maps=label_maps, text_mask=text_mask)
    outputs["auxiliary_outputs"] = auxiliary
    loss_dict = criterion(outputs, labels)
    weights = {
        "loss_ce": 2.0,
        "loss_bbox": config.bbox_loss_coefficient,
        "loss_giou": config.giou_loss_coefficient,
    }
    if config.two_stage:
        enc = {
            "logits": encoder_logits,
            "pred_boxes": encoder_pred_boxes,
            "label_maps": label_maps,
            "text_mask": text_mask,
        }
        loss_dict.update({f"{k}_enc": v for k, v in criterion(enc, labels).items()})
        weights.update({f"{k}_enc": v for k, v in list(weights.items())})
    base = {k: v for k, v in weights.items() if not k.endswith("_enc")}
    for i in range(len(auxiliary)):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    if denoising is not None:
        pairs = [(i.to(device), j.to(device)) for i, j in denoising.indices(labels)]
        # MMDetection's avg_factor: this process's positive queries, averaged over processes
        # (sync_cls_avg_factor); groups differ between processes, so the product is averaged
        positives = criterion.mean_count(sum(len(i) for i, _ in pairs), device)
        layers = [("_dn", dn["logits"], dn["pred_boxes"])]
        layers += [(f"_dn_{i}", c, b) for i, (c, b) in enumerate(dn.get("layers", []))]
        for suffix, layer_logits, layer_boxes in layers:
            out = {
                "logits": layer_logits,
                "pred_boxes": layer_boxes,
                "label_maps": label_maps,
                "text_mask": dn["text_mask"],
            }
            for term in ("labels", "boxes"):
                found = criterion.get_loss(term, out, labels, pairs, positives)
                loss_dict.update({f"{k}{suffix}": v for k, v in found.items()})
            weights.update({f"{k}{suffix}": v for k, v in base.items()})
    loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    return loss, loss_dict, auxiliary
