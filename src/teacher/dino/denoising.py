"""Contrastive denoising (CDN) queries for training Grounding DINO, after MM-Grounding-DINO.

DINO (Zhang et al., ICLR 2023) trains the decoder beside its matched queries on extra queries
made from the ground truth: each object's box, jittered a little (a *positive*: reconstruct
the object) and jittered more (a *negative*: say "no object"), each with its label, sometimes
swapped for a random one, as the content query. Their assignment is fixed, not matched, so
the decoder is taught to refine boxes and name objects from the first step. Of the two
fine-tuning references, MM-Grounding-DINO trains with it
(``configs/mm_grounding_dino/grounding_dino_swin-t_pretrain_obj365.py``: ``dn_cfg`` label
noise 0.5, box noise 1.0, dynamic groups of at most 100 queries); Open-GroundingDino builds
its model with ``dn_number=0`` (``models/GroundingDINO/groundingdino.py``), so it does not.
transformers' Grounding DINO has no denoising part: :class:`Denoiser` adds it with hooks.

What follows MMDetection (``mmdet/models/layers/transformer/dino_layers.py``,
``CdnQueryGenerator``; ``mmdet/models/dense_heads/grounding_dino_head.py``,
``_get_dn_targets_single``), pinned in tests/dino/test_dino_denoising.py against a transcription:

- label queries: a learnt embedding of the object's class index in its prompt (256 rows, the
  text length); each query's label is replaced by a random one with probability
  ``label_noise / 2``;
- box queries: corners moved by up to ``box_noise / 2`` x (w, h, w, h) for positives, between
  that and twice it for negatives, clamped to the image, as inverse-sigmoid (cx, cy, w, h);
- groups: ``max(1, num_queries // max objects in an image)``, each [positives, negatives] of
  the batch's largest object count, padded with zeros; denoising queries come first;
- attention mask: the matching queries see no denoising query, and no group sees another;
- targets: the positive of object j in group g is query ``g * 2n + j`` (n the batch's largest
  object count), trained towards object j's class tokens and box; negatives and padding towards
  no class; normalised by the number of positives.

The loss terms use this project's grounded loss (:mod:`teacher.dino.loss`) with these fixed
indices: its focal class term and weights (2 / 5 / 2, as the matching part's), suffixed
``_dn``. The label embedding is a training tool, never saved with the weights: inference
never builds denoising queries.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from teacher.coco.boxes import cxcywh_norm_to_xyxy, xyxy_to_cxcywh_norm

LABEL_ROWS = 256  # MM-Grounding-DINO's bbox_head num_classes: the text length
MASKED = True


@dataclass(frozen=True)
class DenoisingQueries:
    """One batch's denoising part: ``labels`` (B, Q, d) content queries, ``boxes`` (B, Q, 4)
    reference boxes in [0, 1] (cx, cy, w, h), ``mask`` (Q + matching, Q + matching) bool, True
    where a query may not attend; ``groups`` and ``per_group`` (= 2 x the batch's largest object
    count) lay the Q = groups x per_group queries out."""

    labels: Tensor
    boxes: Tensor
    mask: Tensor
    groups: int
    per_group: int

    @property
    def count(self) -> int:
        return self.groups * self.per_group

    def indices(self, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Fixed (query, object) pairs of each image: the positives of every group."""
        pairs = []
        for t in targets:
            n = len(t["class_labels"])
            obj = torch.arange(n, dtype=torch.int64).repeat(self.groups)
            group = torch.arange(self.groups, dtype=torch.int64).repeat_interleave(n)
            pairs.append((group * self.per_group + obj, obj))
        return pairs


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """MMDetection's ``inverse_sigmoid``: logit of ``x`` clamped to [eps, 1 - eps]."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def build_queries(
    targets: list[dict[str, Tensor]],
    embedding: nn.Embedding,
    *,
    matching: int,
    max_queries: int = 100,
    label_noise: float = 0.5,
    box_noise: float = 1.0,
) -> DenoisingQueries:
    """The denoising queries of a batch (``targets``: ``class_labels`` and ``boxes`` cxcywh in
    [0, 1] per image). Random draws in MMDetection's order (labels, then box signs and
    magnitudes) from torch's global generator. A batch without objects gets none (count 0,
    one group, as MMDetection): its loss terms are zero, the same keys as any other step's."""
    counts = [len(t["class_labels"]) for t in targets]
    most = max(counts, default=0)
    groups = max(1, max_queries // most) if most else 1
    labels = torch.cat([t["class_labels"] for t in targets]).long()
    xyxy = cxcywh_norm_to_xyxy(  # in [0, 1]: MMDetection noises the normalised corners
        torch.cat([t["boxes"] for t in targets]).float().reshape(-1, 4), width=1, height=1
    )
    total = len(labels)
    device = xyxy.device

    # labels: a share label_noise / 2 of the 2 x groups copies replaced by random rows
    expanded = labels.repeat(2 * groups, 1).view(-1)
    chosen = torch.nonzero(torch.rand_like(expanded.float()) < label_noise * 0.5).view(-1)
    noisy = expanded.scatter(0, chosen, torch.randint_like(chosen, 0, embedding.num_embeddings))
    label_queries = embedding(noisy)

    # boxes: corners moved within box_noise / 2 x (w, h) (positives) or beyond it (negatives)
    boxes = xyxy.repeat(2 * groups, 1)
    positive = torch.arange(total, device=device).unsqueeze(0).repeat(groups, 1)
    positive = (positive + 2 * total * torch.arange(groups, device=device)[:, None]).flatten()
    negative = positive + total
    sign = torch.randint_like(boxes, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
    part = torch.rand_like(boxes)
    part[negative] += 1.0
    part *= sign
    whwh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    boxes = (boxes + part * whwh * box_noise / 2).clamp(min=0.0, max=1.0)
    box_queries = inverse_sigmoid(xyxy_to_cxcywh_norm(boxes, width=1, height=1))

    # into (image, slot): group k's positives at [2k n, 2k n + n), negatives after them
    image = torch.cat([torch.full((c,), i, dtype=torch.int64) for i, c in enumerate(counts)])
    slot = torch.cat([torch.arange(c) for c in counts])
    slot = torch.cat([slot + most * k for k in range(2 * groups)]).to(device)
    image = image.repeat(2 * groups).to(device)
    count = 2 * most * groups
    batched_labels = label_queries.new_zeros(len(targets), count, label_queries.shape[-1])
    batched_boxes = label_queries.new_zeros(len(targets), count, 4)
    batched_labels[image, slot] = label_queries
    batched_boxes[image, slot] = box_queries.to(label_queries.dtype)
    return DenoisingQueries(
        labels=batched_labels,
        boxes=batched_boxes.sigmoid(),
        mask=attention_mask(most, groups, matching, device=device),
        groups=groups,
        per_group=2 * most,
    )


def attention_mask(most: int, groups: int, matching: int, *, device=None) -> Tensor:
    """True where a query may not attend (MMDetection's ``generate_dn_mask``): the matching
    queries (last ``matching``) see no denoising query; each group sees only itself and the
    matching queries."""
    count = 2 * most * groups
    mask = torch.zeros(count + matching, count + matching, dtype=torch.bool, device=device)
    mask[count:, :count] = MASKED
    for k in range(groups):
        rows = slice(2 * most * k, 2 * most * (k + 1))
        mask[rows, : 2 * most * k] = MASKED
        mask[rows, 2 * most * (k + 1) : count] = MASKED
    return mask


class Denoiser(nn.Module):
    """Adds contrastive denoising queries to a ``GroundingDinoForObjectDetection``'s training
    forwards. ``with denoiser.training_on(labels): out = model(**inputs, labels=labels)``: the
    decoder runs the denoising queries before the matching ones, behind :func:`attention_mask`,
    and the model's loss adds their terms (``loss_ce_dn``, ...; ``_dn_i`` per auxiliary layer).
    Outside ``training_on`` the model is untouched. The label embedding (this module's only
    weights) must be given to the optimiser; it is not part of the model's state dict."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_queries: int = 100,
        label_noise: float = 0.5,
        box_noise: float = 1.0,
    ):
        super().__init__()
        inner: Any = model.model  # GroundingDinoModel
        device = next(model.parameters()).device
        self.embedding = nn.Embedding(LABEL_ROWS, int(inner.config.d_model), device=device)
        self.max_queries, self.label_noise, self.box_noise = max_queries, label_noise, box_noise
        self._model = [model]  # a list: not a submodule (its weights are the model's own)
        self._queries: DenoisingQueries | None = None
        inner.decoder.register_forward_pre_hook(self._decoder_inputs, with_kwargs=True)
        inner.decoder.register_forward_hook(self._decoder_outputs)
        inner.register_forward_hook(self._model_outputs)

    @contextmanager
    def training_on(self, labels: list[dict[str, Tensor]]):
        """Within: the model's forwards carry the denoising queries of ``labels``."""
        model: Any = self._model[0]
        config = model.config
        queries = build_queries(
            labels,
            self.embedding,
            matching=int(config.num_queries),
            max_queries=self.max_queries,
            label_noise=self.label_noise,
            box_noise=self.box_noise,
        )
        previous_loss, matching = model.loss_function, config.num_queries
        self._queries = queries
        model.loss_function = _with_denoising(previous_loss, queries)
        try:
            yield queries
        finally:
            self._queries = None
            model.loss_function = previous_loss
            config.num_queries = matching

    def _decoder_inputs(self, decoder: nn.Module, args, kwargs):
        q = self._queries
        if q is None:
            return None
        kwargs = dict(kwargs)
        embeds, refs = kwargs["inputs_embeds"], kwargs["reference_points"]
        kwargs["inputs_embeds"] = torch.cat([q.labels.to(embeds.dtype), embeds], 1)
        kwargs["reference_points"] = torch.cat([q.boxes.to(refs.dtype), refs], 1)
        additive = torch.zeros(q.mask.shape, dtype=embeds.dtype, device=embeds.device)
        kwargs["self_attn_mask"] = additive.masked_fill(q.mask, torch.finfo(embeds.dtype).min)
        # transformers' decoder sizes its text mask by config.num_queries (restored on exit)
        config: Any = decoder.config
        config.num_queries = embeds.shape[1] + q.count
        return args, kwargs

    def _decoder_outputs(self, decoder: nn.Module, args, output):
        if self._queries is not None:  # back to the matching count before anything reads it
            config: Any = decoder.config
            config.num_queries -= self._queries.count
        return output

    def _model_outputs(self, module: nn.Module, args, output):
        q = self._queries
        if q is None:
            return output
        refs = output.init_reference_points
        output.init_reference_points = torch.cat([q.boxes.to(refs.dtype), refs], 1)
        return output


def _with_denoising(loss_function, queries: DenoisingQueries):
    def loss(*args, **kwargs):
        return loss_function(*args, **kwargs, denoising=queries)

    return loss
