"""The student's loss: RF-DETR's, with teacher labels treated as evidence rather than truth.

Reference: transformers 5.25's RF-DETR / LW-DETR criterion (``transformers.loss.loss_lw_detr``,
``loss_rf_detr``), itself a port of rf-detr's ``SetCriterion``: Hungarian matching per query
group (``group_detr``), IA-BCE class loss, L1 + GIoU box loss, point-sampled mask BCE + dice, the
same terms on every decoder layer and on the two-stage encoder proposals. With every target a
human label (weight 1, nothing ignored, every mask real) and at least one box in the batch,
:func:`student_loss` equals that criterion term by term (``tests/student/test_loss.py`` pins it
against transformers' own forward). Where it departs, and why:

- **Ignore regions.** A teacher detection scoring in [``student.ignore_score``,
  ``student.min_score``) is neither object nor background. It joins the Hungarian matching like
  any target (so it draws the query that would predict it, in every query group) and that
  query then gets no loss at all: no class loss on any class, positive or negative, no box or
  mask loss. Other queries are untouched. This is the "ignore" of one-to-many detectors
  (Faster R-CNN's ignored anchors, Unbiased Teacher's thresholding with a margin) said the DETR
  way: a query on an ignored box has zero class loss.
- **Scores weigh the class loss.** The positive term of a query matched to a teacher label is
  multiplied by the teacher's score (Soft Teacher weighs pseudo-label losses by the teacher's
  reliability; the score is the reliability the label stage records). Box and mask terms are
  not score-weighted.
- **Image weights.** Each image's terms (class, box, mask) count at its source's weight
  (``student.teacher_weight`` for pool images, 1 for human ones), inside one forward per batch.
- **Normalisation.** Every term divides by the batch's number of target boxes (ignored ones
  excluded) times ``group_detr``, at least one box per group: the reference clamps the product
  at 1, so a batch without boxes (pool images the teachers found nothing on) weighed its
  background loss up to ``group_detr`` (13) times more. Only this process's boxes count: the
  loop averages gradients over processes.
- **Masks.** Box-only instances in segmentation data carry their filled box for the matcher's
  mask cost, but no mask loss: the mask head is not taught rectangles.
- **Precision.** Matching and every term run in fp32 under autocast, as the references do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import box_iou, generalized_box_iou
from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher, LwDetrImageLoss
from transformers.loss.loss_rf_detr import (
    RfDetrHungarianMatcher,
    sample_point,
    sample_points_using_uncertainty,
)

GAMMA = 2.0  # IA-BCE's focusing exponent (the reference's constant)


def _float(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.float()
    if isinstance(x, dict):
        return {k: _float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float(v) for v in x)
    return x


class EvidenceLoss(LwDetrImageLoss):
    """LW/RF-DETR's criterion with per-target weights, ignore regions and image weights
    (see the module doc). Targets carry ``weight``, ``ignore``, ``has_mask`` and
    ``image_weight`` besides RF-DETR's ``class_labels``, ``boxes`` (and ``masks``)."""

    def __init__(self, *args: Any, mask_point_sample_ratio: int = 16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_point_sample_ratio = mask_point_sample_ratio

    # --- which matched pairs count, and at what weight ---------------------------------------

    @staticmethod
    def _matched(targets: list[dict], indices: list, key: str) -> Tensor:
        return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices, strict=True)])

    def _pair_weights(self, targets: list[dict], indices: list) -> tuple[Tensor, Tensor]:
        """Per matched pair: kept (not an ignore region) and the image weight."""
        ignore = self._matched(targets, indices, "ignore").bool()
        image = torch.cat(
            [
                t["image_weight"].reshape(1).expand(len(j))
                for t, (_, j) in zip(targets, indices, strict=True)
            ]
        )
        return ~ignore, image.float()

    # --- the terms --------------------------------------------------------------------------

    def loss_labels(self, outputs, targets, indices, num_boxes):
        logits = outputs["logits"]
        b, q, _ = logits.shape
        idx = self._get_source_permutation_idx(indices)
        classes = self._matched(targets, indices, "class_labels")
        weight = self._matched(targets, indices, "weight").to(logits)
        keep, _ = self._pair_weights(targets, indices)
        src_boxes = outputs["pred_boxes"][idx]
        tgt_boxes = self._matched(targets, indices, "boxes")
        ious = torch.diag(
            box_iou(
                center_to_corners_format(src_boxes.detach()), center_to_corners_format(tgt_boxes)
            )[0]
        ).to(logits)
        prob = logits.sigmoid()
        pos_weights = torch.zeros_like(logits)
        neg_weights = prob.pow(GAMMA)
        pos = (idx[0][keep], idx[1][keep], classes[keep])
        alpha = self.focal_alpha
        quality = (prob[pos].pow(alpha) * ious[keep].pow(1 - alpha)).clamp(0.01).detach()
        pos_weights[pos] = quality
        neg_weights[pos] = 1 - quality
        loss = -pos_weights * prob.log() - neg_weights * (1 - prob).log()
        scale = torch.stack([t["image_weight"].to(logits) for t in targets]).view(b, 1, 1)
        scale = scale.expand(b, q, logits.shape[2]).clone()
        scale[idx[0][~keep], idx[1][~keep], :] = 0.0  # a query on an ignore region: no loss
        scale[pos] = scale[pos] * weight[keep]  # the positive term at the label's weight
        return {"loss_ce": (loss * scale).sum() / num_boxes}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        idx = self._get_source_permutation_idx(indices)
        keep, image = self._pair_weights(targets, indices)
        src = outputs["pred_boxes"][idx][keep]
        tgt = self._matched(targets, indices, "boxes")[keep]
        w = image[keep]
        l1 = torch.nn.functional.l1_loss(src, tgt, reduction="none").sum(1)
        giou = 1 - torch.diag(
            generalized_box_iou(center_to_corners_format(src), center_to_corners_format(tgt))
        )
        return {
            "loss_bbox": (l1 * w).sum() / num_boxes,
            "loss_giou": (giou * w).sum() / num_boxes,
        }

    def loss_masks(self, outputs, targets, indices, num_boxes):
        """RF-DETR's point-sampled mask BCE + dice on the matched instances with a real mask."""
        idx = self._get_source_permutation_idx(indices)
        keep, image = self._pair_weights(targets, indices)
        keep = keep & self._matched(targets, indices, "has_mask").bool()
        source = outputs["pred_masks"][idx][keep]
        if source.numel() == 0:  # nothing to learn here; zero, still on the graph
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_mask_ce": zero, "loss_mask_dice": zero}
        target = self._matched(targets, indices, "masks")[keep].unsqueeze(1).float()
        source = source.unsqueeze(1)
        h, w = source.shape[-2:]
        points = max(h, h * w // self.mask_point_sample_ratio)
        with torch.no_grad():
            coords = sample_points_using_uncertainty(source, points, 3, 0.75)
            labels = sample_point(target, coords, align_corners=False, mode="nearest").squeeze(1)
        logits = sample_point(source, coords, align_corners=False).squeeze(1)
        weight = image[keep]
        ce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="none"
        ).mean(1)
        p = logits.sigmoid()
        dice = 1 - (2 * (p * labels).sum(1) + 1) / (p.sum(1) + labels.sum(1) + 1)
        return {
            "loss_mask_ce": (ce * weight).sum() / num_boxes,
            "loss_mask_dice": (dice * weight).sum() / num_boxes,
        }

    def get_loss(self, loss, outputs, targets, indices, num_boxes):
        terms = {"labels": self.loss_labels, "boxes": self.loss_boxes, "masks": self.loss_masks}
        return terms[loss](outputs, targets, indices, num_boxes)

    def forward(self, outputs, targets):
        group_detr = self.group_detr if self.training else 1
        last = {k: v for k, v in outputs.items() if k not in ("enc_outputs", "auxiliary_outputs")}
        boxes = sum(int((~t["ignore"].bool()).sum()) for t in targets)
        num_boxes = float(group_detr * max(boxes, 1))
        losses: dict[str, Tensor] = {}
        indices = self.matcher(last, targets, group_detr)
        for loss in self.losses:
            losses.update(self.get_loss(loss, last, targets, indices, num_boxes))
        for i, aux in enumerate(outputs.get("auxiliary_outputs") or []):
            indices = self.matcher(aux, targets, group_detr)
            for loss in self.losses:
                terms = self.get_loss(loss, aux, targets, indices, num_boxes)
                losses.update({f"{k}_{i}": v for k, v in terms.items()})
        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            indices = self.matcher(enc, targets, group_detr)
            for loss in self.losses:
                terms = self.get_loss(loss, enc, targets, indices, num_boxes)
                losses.update({f"{k}_enc": v for k, v in terms.items()})
        return losses


def _weight_dict(config: Any, *, masks: bool) -> dict[str, float]:
    """The reference's term weights: last layer, every other decoder layer, encoder proposals."""
    base = {
        "loss_ce": config.class_loss_coefficient,
        "loss_bbox": config.bbox_loss_coefficient,
        "loss_giou": config.giou_loss_coefficient,
    }
    if masks:
        base["loss_mask_ce"] = config.mask_class_loss_coefficient
        base["loss_mask_dice"] = config.mask_dice_loss_coefficient
    out = dict(base)
    if config.auxiliary_loss:
        for i in range(config.decoder_layers - 1):
            out.update({f"{k}_{i}": v for k, v in base.items()})
    out.update({f"{k}_enc": v for k, v in base.items()})
    return out


def _aux(classes: Any, coords: Any, masks: Any = None) -> list[dict[str, Tensor]]:
    if masks is None:
        return [
            {"logits": a, "pred_boxes": b} for a, b in zip(classes[:-1], coords[:-1], strict=True)
        ]
    return [
        {"logits": a, "pred_boxes": b, "pred_masks": c}
        for a, b, c in zip(classes[:-1], coords[:-1], masks[:-1], strict=True)
    ]


def _criterion(config: Any, *, masks: bool, device: Any) -> EvidenceLoss:
    if masks:
        matcher: Any = RfDetrHungarianMatcher(
            class_cost=config.class_cost,
            bbox_cost=config.bbox_cost,
            giou_cost=config.giou_cost,
            mask_point_sample_ratio=config.mask_point_sample_ratio,
            cost_mask_class_cost=config.mask_class_loss_coefficient,
            cost_mask_dice_cost=config.mask_dice_loss_coefficient,
        )
    else:
        matcher = LwDetrHungarianMatcher(
            class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost
        )
    losses = ["labels", "boxes"] + (["masks"] if masks else [])
    criterion = EvidenceLoss(
        matcher=matcher,
        num_classes=config.num_labels,
        focal_alpha=config.focal_alpha,
        losses=losses,
        group_detr=config.group_detr,
        mask_point_sample_ratio=getattr(config, "mask_point_sample_ratio", 16),
    )
    return criterion.to(device)


def detection_loss(
    logits,
    labels,
    device,
    pred_boxes,
    config,
    outputs_class=None,
    outputs_coord=None,
    enc_outputs_class=None,
    enc_outputs_coord=None,
    **kwargs,
):
    """``RfDetrForObjectDetection.loss_function`` (same arguments and return as transformers')."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        outputs: dict[str, Any] = _float(
            {
                "logits": logits,
                "pred_boxes": pred_boxes,
                "enc_outputs": {"logits": enc_outputs_class, "pred_boxes": enc_outputs_coord},
            }
        )
        aux = None
        if config.auxiliary_loss:
            aux = _aux(_float(outputs_class), _float(outputs_coord))
            outputs["auxiliary_outputs"] = aux
        return _total(_criterion(config, masks=False, device=device), outputs, labels, config, aux)


def segmentation_loss(
    logits,
    labels,
    device,
    pred_boxes,
    pred_masks,
    config,
    outputs_class=None,
    outputs_coord=None,
    outputs_masks=None,
    enc_outputs_class=None,
    enc_outputs_coord=None,
    enc_outputs_masks=None,
    **kwargs,
):
    """``RfDetrForInstanceSegmentation.loss_function`` (same arguments and return)."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        outputs: dict[str, Any] = _float(
            {
                "logits": logits,
                "pred_boxes": pred_boxes,
                "pred_masks": pred_masks,
                "enc_outputs": {
                    "logits": enc_outputs_class,
                    "pred_boxes": enc_outputs_coord,
                    "pred_masks": enc_outputs_masks,
                },
            }
        )
        aux = None
        if config.auxiliary_loss:
            aux = _aux(_float(outputs_class), _float(outputs_coord), _float(outputs_masks))
            outputs["auxiliary_outputs"] = aux
        return _total(_criterion(config, masks=True, device=device), outputs, labels, config, aux)


def _total(criterion: EvidenceLoss, outputs: dict, labels: list[dict], config: Any, aux: Any):
    criterion.train(True)
    terms = criterion(outputs, labels)
    weights = _weight_dict(config, masks="pred_masks" in outputs)
    loss = sum(terms[k] * weights[k] for k in terms if k in weights)
    return loss, terms, aux


def use_student_loss(model: Any, *, masks: bool) -> Any:
    """``model`` computing :mod:`this loss <teacher.student.loss>` when given labels."""
    model.loss_function = segmentation_loss if masks else detection_loss
    return model
