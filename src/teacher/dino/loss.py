"""Grounding DINO's grounded training loss, adapted from transformers
(``transformers/loss/loss_grounding_dino.py``, ``GroundingDinoForObjectDetectionLoss``, 5.x).

What differs from the original, and why: transformers offsets each image's class labels by
*that image's* label-map length instead of the running total, so for batches of 2+ images
with different prompts the one-hot targets come from the wrong image's label map.
:class:`GroundedImageLoss` uses the running offset. Pinned against an independent
Open-GroundingDino-style loss in tests/test_dino.py.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.loss.loss_for_object_detection import _set_aux_loss
from transformers.loss.loss_grounding_dino import (
    GroundingDinoHungarianMatcher,
    GroundingDinoImageLoss,
)


class GroundedImageLoss(GroundingDinoImageLoss):
    """transformers' criterion with the per-image label-map offset fixed (running total).

    The box count that normalises the loss is averaged over processes (as transformers does)
    only when ``across_processes``: evaluation runs on the main process alone and must not wait
    in a collective the other processes never join.
    """

    def __init__(self, *, matcher, focal_alpha: float, losses: list[str],
                 across_processes: bool = True):
        super().__init__(matcher, focal_alpha, losses)
        self.across_processes = across_processes

    def _get_target_classes_one_hot(self, outputs, targets, indices):
        logits, label_maps = outputs["logits"], outputs["label_maps"]
        offsets = np.cumsum([0] + [len(m) for m in label_maps[:-1]])
        class_labels = torch.cat([t["class_labels"][j] + int(off)
                                  for t, (_, j), off in zip(targets, indices, offsets, strict=True)])
        idx = self._get_source_permutation_idx(indices)
        onehot = torch.zeros_like(logits, dtype=torch.long)  # (batch, queries, 256)
        onehot[idx] = torch.cat(label_maps, dim=0)[class_labels].to(torch.long)
        return onehot

    def _num_boxes(self, targets, device) -> float:
        n = torch.tensor([float(sum(len(t["class_labels"]) for t in targets))], device=device)
        dist = torch.distributed
        if self.across_processes and dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return torch.clamp(n, min=1).item()

    def forward(self, outputs, targets):
        """Loss terms of the last layer, then of each auxiliary layer (suffix ``_i``)."""
        num_boxes = self._num_boxes(targets, outputs["logits"].device)
        layers = [("", outputs), *((f"_{i}", aux) for i, aux in
                                   enumerate(outputs.get("auxiliary_outputs") or []))]
        losses = {}
        for suffix, out in layers:
            indices = self.matcher({k: v for k, v in out.items() if k != "auxiliary_outputs"}, targets)
            for loss in self.losses:
                terms = self.get_loss(loss, out, targets, indices, num_boxes)
                losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        return losses


def grounded_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask,
                  outputs_class=None, outputs_coord=None, encoder_logits=None,
                  encoder_pred_boxes=None, *, across_processes: bool = True):
    """``GroundingDinoForObjectDetectionLoss`` (transformers 5.x) using :class:`GroundedImageLoss`.

    Same signature, terms and weights; returns ``(loss, loss_dict, auxiliary_outputs)``.
    """
    matcher = GroundingDinoHungarianMatcher(class_cost=config.class_cost,
                                            bbox_cost=config.bbox_cost, giou_cost=config.giou_cost)
    criterion = GroundedImageLoss(matcher=matcher, focal_alpha=config.focal_alpha,
                                  losses=["labels", "boxes", "cardinality"],
                                  across_processes=across_processes).to(device)
    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps,
               "text_mask": text_mask}
    auxiliary = None
    if config.auxiliary_loss:
        auxiliary = _set_aux_loss(outputs_class, outputs_coord)
        for aux in auxiliary:
            aux.update(label_maps=label_maps, text_mask=text_mask)
        outputs["auxiliary_outputs"] = auxiliary
    loss_dict = criterion(outputs, labels)
    weights = {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient,
               "loss_giou": config.giou_loss_coefficient}
    if config.two_stage:
        enc = {"logits": encoder_logits, "pred_boxes": encoder_pred_boxes,
               "label_maps": label_maps, "text_mask": text_mask}
        loss_dict.update({f"{k}_enc": v for k, v in criterion(enc, labels).items()})
        weights.update({f"{k}_enc": v for k, v in list(weights.items())})
    if config.auxiliary_loss:
        base = {k: v for k, v in weights.items() if not k.endswith("_enc")}
        for i in range(config.decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    return loss, loss_dict, auxiliary
