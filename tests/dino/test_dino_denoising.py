"""Contrastive denoising queries (teacher.dino.denoising) against a transcription of
MMDetection's, which MM-Grounding-DINO trains with: the queries, their attention mask, their
fixed targets and loss terms; and that they leave the matching queries' outputs alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss
from transformers.models.grounding_dino.modeling_grounding_dino import (
    build_label_maps,
    build_text_mask,
)

from teacher.core.params import DinoParams
from teacher.dino.data import box_targets
from teacher.dino.denoising import Denoiser, attention_mask, build_queries
from teacher.dino.model import load_dino

PARAMS = DinoParams(model="tiny-random", shortest_edge=64, longest_edge=96)


# --- MMDetection, transcribed ------------------------------------------------------------------
# mmdet/models/layers/transformer/dino_layers.py (CdnQueryGenerator.__call__ and helpers) and
# mmdet/models/dense_heads/grounding_dino_head.py (_get_dn_targets_single), v3.3, with
# mm_grounding_dino's dn_cfg. Boxes enter as normalised (x0, y0, x1, y1), as __call__ makes them.


def mm_inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def mm_xyxy_to_cxcywh(b):
    x1, y1, x2, y2 = b.split((1, 1, 1, 1), dim=-1)
    return torch.cat([(x2 + x1) / 2, (y2 + y1) / 2, (x2 - x1), (y2 - y1)], dim=-1)


def mm_cdn(gt_labels_list, gt_bboxes_list, label_embedding, *, num_matching_queries,
           num_dn_queries, label_noise_scale=0.5, box_noise_scale=1.0):  # fmt: skip
    gt_labels = torch.cat(gt_labels_list)
    gt_bboxes = torch.cat(gt_bboxes_list)
    num_target_list = [len(b) for b in gt_bboxes_list]
    max_num_target = max(num_target_list)
    num_groups = max(1, num_dn_queries // max_num_target)
    # generate_dn_label_query
    gt_labels_expand = gt_labels.repeat(2 * num_groups, 1).view(-1)
    p = torch.rand_like(gt_labels_expand.float())
    chosen_indice = torch.nonzero(p < (label_noise_scale * 0.5)).view(-1)
    new_labels = torch.randint_like(chosen_indice, 0, label_embedding.num_embeddings)
    noisy_labels_expand = gt_labels_expand.scatter(0, chosen_indice, new_labels)
    dn_label_query = label_embedding(noisy_labels_expand)
    # generate_dn_bbox_query
    gt_bboxes_expand = gt_bboxes.repeat(2 * num_groups, 1)
    positive_idx = torch.arange(len(gt_bboxes), dtype=torch.long)
    positive_idx = positive_idx.unsqueeze(0).repeat(num_groups, 1)
    positive_idx += 2 * len(gt_bboxes) * torch.arange(num_groups, dtype=torch.long)[:, None]
    positive_idx = positive_idx.flatten()
    negative_idx = positive_idx + len(gt_bboxes)
    rand_sign = torch.randint_like(gt_bboxes_expand, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
    rand_part = torch.rand_like(gt_bboxes_expand)
    rand_part[negative_idx] += 1.0
    rand_part *= rand_sign
    bboxes_whwh = mm_xyxy_to_cxcywh(gt_bboxes_expand)[:, 2:].repeat(1, 2)
    noisy = gt_bboxes_expand + torch.mul(rand_part, bboxes_whwh) * box_noise_scale / 2
    noisy = noisy.clamp(min=0.0, max=1.0)
    dn_bbox_query = mm_inverse_sigmoid(mm_xyxy_to_cxcywh(noisy), eps=1e-3)
    # collate_dn_queries
    batch_idx = torch.cat([torch.full_like(t.long(), i) for i, t in enumerate(gt_labels_list)])
    num_denoising_queries = int(max_num_target * 2 * num_groups)
    map_query_index = torch.cat([torch.arange(n) for n in num_target_list])
    map_query_index = torch.cat(
        [map_query_index + max_num_target * i for i in range(2 * num_groups)]
    ).long()
    batch_idx_expand = batch_idx.repeat(2 * num_groups, 1).view(-1)
    mapper = (batch_idx_expand, map_query_index)
    batch_size = len(gt_labels_list)
    labels_q = torch.zeros(batch_size, num_denoising_queries, dn_label_query.shape[-1])
    boxes_q = torch.zeros(batch_size, num_denoising_queries, 4)
    labels_q[mapper] = dn_label_query
    boxes_q[mapper] = dn_bbox_query
    # generate_dn_mask
    total = num_denoising_queries + num_matching_queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool)
    attn_mask[num_denoising_queries:, :num_denoising_queries] = True
    for i in range(num_groups):
        row_scope = slice(max_num_target * 2 * i, max_num_target * 2 * (i + 1))
        left_scope = slice(max_num_target * 2 * i)
        right_scope = slice(max_num_target * 2 * (i + 1), num_denoising_queries)
        attn_mask[row_scope, right_scope] = True
        attn_mask[row_scope, left_scope] = True
    meta = {"num_denoising_queries": num_denoising_queries, "num_denoising_groups": num_groups}
    return labels_q, boxes_q, attn_mask, meta


def mm_dn_positives(num_gt, meta):
    """_get_dn_targets_single: (pos_inds, pos_assigned_gt_inds) of one image."""
    num_groups = meta["num_denoising_groups"]
    per_group = int(meta["num_denoising_queries"] / num_groups)
    t = torch.arange(num_gt, dtype=torch.long).unsqueeze(0).repeat(num_groups, 1)
    pos_inds = (torch.arange(num_groups, dtype=torch.long).unsqueeze(1) * per_group + t).flatten()
    return pos_inds, t.flatten()


def mm_dn_loss(logits, boxes, text_mask, targets, positive_maps, meta):
    """_loss_dn_single with mm_grounding_dino's losses (focal alpha 0.25 gamma 2, L1, GIoU),
    unweighted: each term summed and divided by the number of positive queries."""
    labels, box_targets_, box_weights = [], [], []
    for t, pmap in zip(targets, positive_maps, strict=True):
        n = len(t["class_labels"])
        pos, gt = mm_dn_positives(n, meta)
        lab = torch.zeros(meta["num_denoising_queries"], logits.shape[-1])
        lab[pos] = pmap[t["class_labels"][gt]].float()
        bt = torch.zeros(meta["num_denoising_queries"], 4)
        bw = torch.zeros(meta["num_denoising_queries"], 4)
        bt[pos], bw[pos] = t["boxes"][gt], 1.0
        labels.append(lab), box_targets_.append(bt), box_weights.append(bw)
    labels = torch.stack(labels)
    positives = sum(len(t["class_labels"]) for t in targets) * meta["num_denoising_groups"]
    cls = sigmoid_focal_loss(
        logits[text_mask], labels[text_mask], alpha=0.25, gamma=2.0, reduction="sum"
    )
    bt, bw = torch.cat(box_targets_), torch.cat(box_weights)
    pred = boxes.reshape(-1, 4)
    l1 = ((pred - bt).abs() * bw).sum()
    keep = bw[:, 0] > 0

    def corners(b):
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)

    giou = generalized_box_iou_loss(corners(pred[keep]), corners(bt[keep]), reduction="sum")
    return cls / positives, l1 / positives, giou / positives


# --- the queries ---------------------------------------------------------------------------------


def targets_of(boxes_per_image, labels_per_image):
    return [
        {
            "class_labels": torch.tensor(lab, dtype=torch.int64),
            "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
        }
        for b, lab in zip(boxes_per_image, labels_per_image, strict=True)
    ]


TARGETS = targets_of(
    [
        [[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.9, 0.9]],
        [[0.2, 0.2, 0.1, 0.1]],
        [],
    ],
    [[2, 0, 1], [1], []],
)


def _corners(b):
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)


@pytest.mark.parametrize("max_queries", [100, 7, 2])
def test_queries_match_mmdetection_draw_for_draw(max_queries):
    embedding = nn.Embedding(256, 8)
    torch.manual_seed(3)
    ours = build_queries(TARGETS, embedding, matching=5, max_queries=max_queries)
    torch.manual_seed(3)
    labels, boxes, mask, meta = mm_cdn(
        [t["class_labels"] for t in TARGETS],
        [_corners(t["boxes"]) for t in TARGETS],
        embedding,
        num_matching_queries=5,
        num_dn_queries=max_queries,
    )
    assert ours is not None
    assert (ours.groups, ours.count) == (
        meta["num_denoising_groups"],
        meta["num_denoising_queries"],
    )
    assert ours.groups == max(1, max_queries // 3)
    torch.testing.assert_close(ours.labels, labels)
    # ours hands the decoder its reference boxes (in [0, 1]); mmdet's are their logits
    torch.testing.assert_close(ours.boxes, boxes.sigmoid())
    assert torch.equal(ours.mask, mask)
    for (query, obj), t in zip(ours.indices(TARGETS), TARGETS, strict=True):
        pos, gt = mm_dn_positives(len(t["class_labels"]), meta)
        assert torch.equal(query, pos) and torch.equal(obj, gt)


def test_positives_stay_near_their_box_and_negatives_farther():
    torch.manual_seed(0)
    one = targets_of([[[0.5, 0.5, 0.4, 0.4]]], [[0]])
    q = build_queries(one, nn.Embedding(256, 4), matching=3, max_queries=200, label_noise=0.01)
    assert q is not None and q.groups == 200 and q.per_group == 2
    moved = (_corners(q.boxes[0]) - _corners(one[0]["boxes"])).abs().amax(-1)
    positives, negatives = moved[0::2], moved[1::2]
    assert (positives <= 0.2 + 1e-5).all()  # box_noise 1: corners within w / 2
    assert (negatives >= 0.2 - 1e-5).all()


def test_mask_hides_denoising_from_matching_and_groups_from_each_other():
    mask = attention_mask(most=1, groups=2, matching=2)
    see = ~mask
    assert see[4:, 4:].all() and not see[4:, :4].any()  # matching: only themselves
    assert see[0:2, 0:2].all() and see[0:2, 4:].all() and not see[0:2, 2:4].any()
    assert see[2:4, 2:4].all() and not see[2:4, 0:2].any()


def test_no_objects_no_queries():
    empty = targets_of([[], []], [[], []])
    q = build_queries(empty, nn.Embedding(256, 4), matching=3)
    assert (q.count, q.groups) == (0, 1) and q.labels.shape == (2, 0, 4)
    assert q.boxes.shape == (2, 0, 4) and not q.mask.any() and q.mask.shape == (3, 3)


# --- in the model ----------------------------------------------------------------------------------


def _batch(bundle):
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for _ in range(2)]
    prompts = ["circle . square . star .", "square ."]
    pixels = bundle.processor.image_processor(images=ims, return_tensors="pt")
    text = bundle.processor.tokenizer(prompts, padding="longest", return_tensors="pt")
    labels = [
        box_targets(
            np.array([[5, 5, 30, 20], [40, 30, 20, 20]]), np.array([2, 0]), width=80, height=60
        ),
        box_targets(np.array([[10, 10, 30, 30]]), np.array([0]), width=80, height=60),
    ]
    return {**pixels, **text}, labels


def test_denoising_leaves_the_matching_queries_and_their_loss_alone():
    """Eval mode (no drop path): with the denoising queries in, the matching queries' outputs
    and loss terms are those of the model without them (the mask hides them); the model's
    state dict gains nothing, and its query count is restored."""
    bundle = load_dino(PARAMS)
    model = bundle.model.eval()
    inputs, labels = _batch(bundle)
    denoiser = Denoiser(model, max_queries=10)
    keys = set(model.state_dict())
    with torch.no_grad():
        plain = model(**inputs, labels=labels)
        with denoiser.training_on(labels) as q:
            noisy = model(**inputs, labels=labels)
    assert q is not None and q.count == 2 * 2 * 5
    assert model.config.num_queries == plain.logits.shape[1]
    assert noisy.logits.shape[1] == plain.logits.shape[1] + q.count
    finite = torch.isfinite(plain.logits)
    torch.testing.assert_close(noisy.logits[:, q.count :][finite], plain.logits[finite])
    torch.testing.assert_close(noisy.pred_boxes[:, q.count :], plain.pred_boxes)
    for term, value in plain.loss_dict.items():
        torch.testing.assert_close(noisy.loss_dict[term], value, msg=term)
    layers = model.config.decoder_layers
    expected = {f"loss_{t}_dn" for t in ("ce", "bbox", "giou")}
    expected |= {f"loss_{t}_dn_{i}" for t in ("ce", "bbox", "giou") for i in range(layers - 1)}
    assert set(noisy.loss_dict) - set(plain.loss_dict) == expected
    assert set(model.state_dict()) == keys
    with torch.no_grad():  # outside training_on the model is itself again
        again = model(**inputs, labels=labels)
    torch.testing.assert_close(again.logits, plain.logits)


def test_denoising_terms_match_mmdetection_and_train_the_label_embedding():
    bundle = load_dino(PARAMS)
    model = bundle.model.eval()
    inputs, labels = _batch(bundle)
    denoiser = Denoiser(model, max_queries=10)
    with denoiser.training_on(labels) as q:
        out = model(**inputs, labels=labels)
    k = q.count
    assert torch.equal(out.init_reference_points[:, :k], q.boxes)  # the first layer's references
    maps = build_label_maps(out.logits, inputs["input_ids"])
    text_mask = build_text_mask(out.logits, inputs["attention_mask"])[:, :k]
    meta = {"num_denoising_queries": k, "num_denoising_groups": q.groups}
    layers = [("_dn", out.logits, out.pred_boxes)]
    aux = out.auxiliary_outputs
    assert len(aux) == model.config.decoder_layers - 1
    # transformers' auxiliary outputs: the matching queries only (the loss split them)
    # so the layer's full outputs are recomputed from the decoder's states
    hidden, refs = out.intermediate_hidden_states, out.intermediate_reference_points
    for i in range(len(aux)):
        reference = torch.special.logit(
            out.init_reference_points if i == 0 else refs[:, i - 1], eps=1e-5
        )
        logits = model.class_embed[i](
            vision_hidden_state=hidden[:, i],
            text_hidden_state=out.encoder_last_hidden_state_text,
            text_token_mask=inputs["attention_mask"].bool(),
        )
        boxes = (model.bbox_embed[i](hidden[:, i]) + reference).sigmoid()
        layers.append((f"_dn_{i}", logits, boxes))
    for suffix, logits, boxes in layers:
        ce, l1, giou = mm_dn_loss(logits[:, :k], boxes[:, :k], text_mask, labels, maps, meta)
        torch.testing.assert_close(out.loss_dict[f"loss_ce{suffix}"], ce, msg=suffix)
        torch.testing.assert_close(out.loss_dict[f"loss_bbox{suffix}"], l1, msg=suffix)
        torch.testing.assert_close(out.loss_dict[f"loss_giou{suffix}"], giou, msg=suffix)
    # the total counts every denoising term at its matching term's weight (2 / 5 / 2)
    weight = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    expected = sum(
        v * weight[name]
        for key, v in out.loss_dict.items()
        for name in weight
        if key == name or key.startswith(name + "_")
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert denoiser.embedding.weight.grad is not None
    assert denoiser.embedding.weight.grad.abs().sum() > 0


def test_query_count_is_restored_when_the_forward_fails():
    bundle = load_dino(PARAMS)
    model = bundle.model
    inputs, labels = _batch(bundle)
    denoiser = Denoiser(model, max_queries=10)
    matching = model.config.num_queries
    seen = []

    def fail(module, args, output):  # inside the decoder, after the queries went in
        seen.append(model.config.num_queries)
        raise RuntimeError("a failure inside the decoder")

    hook = model.model.decoder.layers[0].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="inside the decoder"), denoiser.training_on(labels):
        model(**inputs, labels=labels)
    hook.remove()
    assert seen == [matching + 2 * 2 * 5]
    assert model.config.num_queries == matching


def test_a_batch_without_objects_has_the_same_terms_at_zero():
    """Every step logs (and, across processes, reduces) the same keys: a batch whose images have
    no objects gets the denoising terms too, at zero, and trains as usual."""
    bundle = load_dino(PARAMS)
    model = bundle.model.eval()
    inputs, labels = _batch(bundle)
    empty = [box_targets(np.zeros((0, 4)), np.zeros((0,), np.int64), width=80, height=60)] * 2
    denoiser = Denoiser(model, max_queries=10)
    with denoiser.training_on(labels):
        full = model(**inputs, labels=labels)
    with denoiser.training_on(empty) as q:
        none = model(**inputs, labels=empty)
    assert q.count == 0
    assert none.loss_dict.keys() == full.loss_dict.keys()
    for key in none.loss_dict:
        if "_dn" in key:
            assert float(none.loss_dict[key].detach()) == 0.0, key
    assert torch.isfinite(none.loss)
    none.loss.backward()
