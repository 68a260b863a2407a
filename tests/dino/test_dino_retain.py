"""dino.retain_weight: the base model's open vocabulary kept while training (issue #37).

Pins: the base model is the adapter switched off (trained heads included); the grounded loss
leaves the retention tokens alone; the term against an independent brute-force implementation
(optimal pairing by enumeration, mmdet's quality focal loss); the names drawn into a prompt;
and that a short training with the term keeps the base model's answers closer than without.
"""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from teacher.core.params import DinoParams, LoraParams
from teacher.dino.data import DinoDataset, box_targets, collate_dino
from teacher.dino.labels import MAX_TEXT_TOKENS, build_label_map
from teacher.dino.model import load_dino
from teacher.dino.retain import (
    TERM_WEIGHTS,
    RetainNames,
    base_outputs,
    retain_loss,
    retain_names,
    retain_token_masks,
    user_tokens_only,
)
from teacher.dino.task import class_tokens, training_retain_names, training_step, wrap_for_training

PARAMS = DinoParams(model="tiny-random", shortest_edge=64, longest_edge=96, retain_weight=1.0)
LORA = LoraParams(rank=4, alpha=8, dropout=0.0)
COSTS = SimpleNamespace(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)


def _inputs(processor, prompts, seed=0):
    rng = np.random.default_rng(seed)
    ims = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for _ in prompts]
    pixels = processor.image_processor(images=ims, return_tensors="pt")
    text = processor.tokenizer(prompts, padding="longest", return_tensors="pt")
    return {**pixels, **text}


def _perturb(model, seed=1):
    """Move every trainable weight (LoRA B included): the adapter is no longer the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_base_outputs_are_the_pretrained_models_with_adapter_and_trained_heads_off():
    bundle = load_dino(PARAMS)
    inputs = _inputs(bundle.processor, ["circle . cat .", "star . bus ."])
    with torch.no_grad():
        expected = load_dino(PARAMS).model.eval()(**inputs)
    model = wrap_for_training(bundle.model, dino=PARAMS, lora=LORA, activation_checkpointing=False)
    _perturb(model)
    model.eval()
    found = base_outputs(model, inputs)
    torch.testing.assert_close(found.logits, expected.logits)
    torch.testing.assert_close(found.pred_boxes, expected.pred_boxes)
    with torch.no_grad():
        tuned = model(**inputs)
    assert (tuned.pred_boxes - expected.pred_boxes).abs().max() > 1e-3  # the adapter does act
    trained = dict(model.named_parameters())["base_model.model.model.enc_output.weight"]
    assert not torch.equal(trained, load_dino(PARAMS).model.model.enc_output.weight)  # restored


def test_in_a_training_step_both_forwards_share_one_pass_of_the_frozen_towers():
    """Train mode (BERT's dropout, the Swin's drop path on): within shared_towers the towers
    run once, the base forward and the fine-tuned one see the same features, and a fresh
    adapter answers as the base model (up to float rounding)."""
    from teacher.dino.retain import shared_towers

    bundle = load_dino(PARAMS)
    model = wrap_for_training(bundle.model, dino=PARAMS, lora=LORA, activation_checkpointing=False)
    model.train()
    inputs = _inputs(bundle.processor, ["circle . cat .", "star . bus ."])
    base = model.get_base_model()
    calls = []
    hooks = [
        # a tower's first part runs only when the tower computes (its __call__ runs either way)
        next(base.get_submodule(name).children()).register_forward_pre_hook(
            lambda *a: calls.append(1)
        )
        for name in ("model.backbone", "model.text_backbone")
    ]
    torch.manual_seed(0)
    with torch.no_grad(), shared_towers(model):
        reference = base_outputs(model, inputs)
        tuned = model(**inputs)
    assert len(calls) == 2  # each tower once
    # two code paths (adapter off / a zero LoRA delta added): equal up to float rounding
    torch.testing.assert_close(tuned.logits, reference.logits)
    torch.testing.assert_close(tuned.pred_boxes, reference.pred_boxes)
    with torch.no_grad():
        again = model(**inputs)  # outside: the towers draw their dropout afresh
    assert len(calls) == 4
    assert not torch.equal(again.pred_boxes, tuned.pred_boxes)
    for hook in hooks:
        hook.remove()


def test_grounded_loss_gives_the_retention_tokens_no_gradient():
    bundle = load_dino(PARAMS)
    model = wrap_for_training(bundle.model, dino=PARAMS, lora=LORA, activation_checkpointing=False)
    model.eval()
    inputs = _inputs(bundle.processor, ["circle . square . cat . dog .", "star . bus ."])
    labels = [
        box_targets(np.array([[20, 10, 30, 20]]), np.array([1]), width=80, height=60),
        box_targets(np.array([[10, 5, 40, 30]]), np.array([0]), width=80, height=60),
    ]
    with torch.no_grad():
        maps = build_label_maps(model(**inputs).logits, inputs["input_ids"])
    tokens = retain_token_masks(maps, [2, 1])
    assert tokens.sum(1).tolist() == [int(maps[0][2:].sum()), int(maps[1][1:].sum())]

    def logit_grad(ctx):
        with ctx:
            out = model(**inputs, labels=labels)
        return torch.autograd.grad(out.loss, out.logits)[0]

    free = logit_grad(user_tokens_only(model, tokens))
    plain = logit_grad(torch.enable_grad())
    for b in range(2):
        assert free[b][:, tokens[b]].abs().max() == 0  # no term of the grounded loss reaches them
        assert plain[b][:, tokens[b]].abs().max() > 0  # without: trained towards "no object"
        own = maps[b][: [2, 1][b]].bool().any(0)
        torch.testing.assert_close(free[b][:, own], plain[b][:, own])


def _reference_term(logits, boxes, base_logits, base_boxes, tokens, top_k, min_score):
    """An independent implementation: the targets (the best ``top_k`` base queries, at most
    half of them, scoring at least ``min_score``), the optimal pairing by enumeration, mmdet's
    quality focal loss (``F.binary_cross_entropy_with_logits(pred, score) * (sigmoid -
    score).abs().pow(2)``)."""
    ce = l1 = giou = 0.0
    matched, weight = 0, 0.0
    for b in range(len(logits)):
        t = tokens[b]
        ref = base_logits[b][:, t].sigmoid()
        score = ref.max(1).values
        top = torch.argsort(score, descending=True)[: min(top_k, len(score) // 2)]
        top = top[score[top] >= min_score]
        own = logits[b][:, t]
        xyxy = lambda x: box_convert(x, "cxcywh", "xyxy")  # noqa: E731
        pair_giou = generalized_box_iou(xyxy(boxes[b]), xyxy(base_boxes[b][top]))

        def cost(q, j, own=own, ref=ref, top=top, b=b, pair_giou=pair_giou):
            class_term = (own[q].sigmoid() - ref[top[j]]).abs().mean()
            box_term = (boxes[b][q] - base_boxes[b][top[j]]).abs().sum()
            return float(class_term + 5 * box_term - 2 * pair_giou[q, j])

        queries = range(len(own))
        best = min(
            itertools.permutations(queries, len(top)),
            key=lambda qs: sum(cost(q, j) for j, q in enumerate(qs)),
        )
        soft = torch.zeros_like(own)
        for j, q in enumerate(best):
            soft[q] = ref[top[j]]
            w = score[top[j]]
            l1 += float((boxes[b][q] - base_boxes[b][top[j]]).abs().sum() * w)
            giou += float((1 - pair_giou[q, j]) * w)
            weight += float(w)
        qfl = F.binary_cross_entropy_with_logits(own, soft, reduction="none")
        ce += float((qfl * (own.sigmoid() - soft).abs().pow(2)).sum())
        matched += len(top)
    return {
        "loss_retain_ce": ce / matched,
        "loss_retain_bbox": l1 / weight,
        "loss_retain_giou": giou / weight,
    }


def test_retain_loss_equals_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    queries, width = 6, 12

    def boxes():
        centre = torch.rand(2, queries, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(2, queries, 2, generator=gen) * 0.3 + 0.05
        return torch.cat([centre, size], -1)

    logits = torch.randn(2, queries, width, generator=gen) * 2
    base_logits = torch.randn(2, queries, width, generator=gen) * 2
    logits[:, :, 10:] = -torch.inf  # padding tokens: -inf logits, never retention tokens
    tokens = torch.zeros(2, width, dtype=torch.bool)
    tokens[0, 3:6] = True
    tokens[1, [1, 2, 7]] = True
    own_boxes, ref_boxes = boxes(), boxes()
    base_logits[1, 2] = -9  # a query the base model does not see: not a target
    found = retain_loss(
        logits, own_boxes, base_logits, ref_boxes, tokens, config=COSTS, top_k=3, min_score=0.3
    )
    expected = _reference_term(
        logits, own_boxes, base_logits, ref_boxes, tokens, top_k=3, min_score=0.3
    )
    for key, value in expected.items():
        assert float(found[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_retain_loss_is_zero_when_the_model_answers_as_the_base_model():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 8, 10, generator=gen)
    logits[0, 4:] = -30.0  # half the queries see nothing: the others are the targets
    boxes = torch.cat(
        [torch.rand(1, 8, 2, generator=gen) * 0.5 + 0.25, torch.full((1, 8, 2), 0.2)], -1
    )
    tokens = torch.zeros(1, 10, dtype=torch.bool)
    tokens[0, 2:5] = True
    # the targets are matched to themselves, the rest already score 0
    terms = retain_loss(logits, boxes, logits, boxes, tokens, config=COSTS, min_score=0.0)
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in terms.values())
    # an image without retention tokens contributes nothing, and the terms keep the graph
    empty = retain_loss(
        logits.requires_grad_(), boxes, logits.detach(), boxes, tokens & False, config=COSTS
    )
    assert all(float(v) == 0 for v in empty.values())


def test_retention_names_fill_the_prompt_reproducibly_and_leave_the_dataset_classes_out(tmp_path):
    bundle = load_dino(PARAMS)
    tok = bundle.processor.tokenizer
    coco = {"categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "widget"}]}
    names = training_retain_names(None, coco, tokenizer=tok, dino=PARAMS)
    assert names is not None and "car" not in {n.lower() for n in names.names}
    assert len(names.names) == 79 and names.per_prompt == PARAMS.retain_names
    assert (
        training_retain_names(
            None, coco, tokenizer=tok, dino=dataclasses.replace(PARAMS, retain_weight=0)
        )
        is None
    )
    assert retain_names([], tokenizer=tok, per_prompt=5) is None
    draw = lambda seed, used: names.draw(np.random.default_rng(seed), used_tokens=used)  # noqa: E731
    assert draw(3, 10) == draw(3, 10) and draw(3, 10) != draw(4, 10)
    assert len(draw(3, 10)) == PARAMS.retain_names
    # a nearly full prompt takes only what fits
    fit = draw(3, MAX_TEXT_TOKENS - 8)
    assert sum(names.tokens[names.names.index(n)] + 1 for n in fit) <= 8
    small = RetainNames(names=("ab", "cd"), tokens=(2, 2), per_prompt=5)
    assert small.draw(np.random.default_rng(0), used_tokens=MAX_TEXT_TOKENS - 3) != ()
    assert small.draw(np.random.default_rng(0), used_tokens=MAX_TEXT_TOKENS - 2) == ()


def test_dataset_items_are_unchanged_but_for_the_names_after_their_own_classes(tmp_path):
    from fake_adapters import write_tiny_coco

    coco = write_tiny_coco(tmp_path, n_images=3)
    bundle = load_dino(PARAMS)
    label_map = build_label_map(coco["categories"], tokenizer=bundle.processor.tokenizer)
    counts = class_tokens(label_map, bundle.processor.tokenizer)
    names = retain_names(
        ["ring", "cross", "arrow"], tokenizer=bundle.processor.tokenizer, per_prompt=2
    )
    plain = DinoDataset(coco, tmp_path, label_map=label_map, seed=0)
    kept = DinoDataset(
        coco, tmp_path, label_map=label_map, seed=0, class_tokens=counts, retain=names
    )
    a, b = plain[0], kept[0]
    assert set(b) - set(a) == {"retain"} and len(b["retain"]) == 2
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
    batch = collate_dino([b], processor=bundle.processor, label_map=label_map)
    text = bundle.processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    own = [label_map.names[i] for i in b["classes"]]
    assert text.replace(" ", "").endswith(
        "".join(f"{n}." for n in [*own, *b["retain"]]).replace(" ", "")
    )
    assert batch["own"] == [len(b["classes"])] and batch["retained"] == 2
    val = DinoDataset(
        coco,
        tmp_path,
        label_map=label_map,
        seed=0,
        all_chunks=True,
        class_tokens=counts,
        retain=names,
    )
    assert "retain" not in val[0]  # validation prompts are the dataset's own


def _retain_batch(processor) -> dict:
    """Two images whose prompts name one own class each, then 2 and 1 retention names."""
    return {
        **_inputs(processor, ["circle . cat . dog .", "star . bus ."]),
        "labels": [
            box_targets(np.array([[20, 10, 30, 20]]), np.array([0]), width=80, height=60),
            box_targets(np.array([[10, 5, 40, 30]]), np.array([0]), width=80, height=60),
        ],
        "own": [1, 1],
        "retained": 3,
    }


def test_training_step_adds_the_weighted_term_and_logs_it():
    bundle = load_dino(PARAMS)
    dino = dataclasses.replace(PARAMS, denoise_queries=4)
    model = wrap_for_training(bundle.model, dino=dino, lora=LORA, activation_checkpointing=False)
    _perturb(model)
    model.eval()  # deterministic: the same forward for both calls
    batch = _retain_batch(bundle.processor)
    torch.manual_seed(0)
    one = training_step(model, batch, retain_weight=1.0)
    torch.manual_seed(0)
    three = training_step(model, batch, retain_weight=3.0)
    terms = {k: v for k, v in one.items() if k.startswith("loss_retain")}
    assert set(terms) == set(TERM_WEIGHTS)
    assert all(float(v) > 0 for v in terms.values())
    assert TERM_WEIGHTS == {  # Grounding DINO's class / L1 / GIoU coefficients, _enc as the rest
        "loss_retain_ce": 2.0,
        "loss_retain_bbox": 5.0,
        "loss_retain_giou": 2.0,
        "loss_retain_ce_enc": 2.0,
        "loss_retain_bbox_enc": 5.0,
    }
    term = sum(TERM_WEIGHTS[k] * v for k, v in terms.items())
    torch.testing.assert_close(three["loss"] - one["loss"], 2 * term, rtol=1e-4, atol=1e-4)
    off = training_step(model, batch)
    assert not any(k.startswith("loss_retain") for k in off)


def test_a_fresh_adapter_pays_no_retention_term_in_a_training_step():
    """At the start of training (adapter B = 0, heads as pretrained), in train mode with the
    towers' dropout on, the fine-tuned model answers exactly as the base model: each target is
    matched to itself (box terms 0) and every proposal position equals the base's (0); only
    the class term of the queries that are no target (trained towards 0) remains."""
    bundle = load_dino(PARAMS)
    dino = dataclasses.replace(PARAMS, denoise_queries=4)
    model = wrap_for_training(bundle.model, dino=dino, lora=LORA, activation_checkpointing=False)
    model.train()
    batch = _retain_batch(bundle.processor)
    terms = training_step(model, batch, retain_weight=1.0)
    for key in (
        "loss_retain_bbox",
        "loss_retain_giou",
        "loss_retain_ce_enc",
        "loss_retain_bbox_enc",
    ):
        assert float(terms[key]) == pytest.approx(0.0, abs=1e-6), key


def test_proposal_terms_pair_position_with_position_and_skip_padding():
    from teacher.dino.retain import retain_proposal_loss

    gen = torch.Generator().manual_seed(2)
    logits, base = torch.randn(1, 5, 6, generator=gen), torch.randn(1, 5, 6, generator=gen)
    coords, base_coords = torch.randn(1, 5, 4, generator=gen), torch.randn(1, 5, 4, generator=gen)
    base_coords[0, 4] = torch.inf  # a padding position (transformers marks them inf)
    tokens = torch.tensor([[False, True, True, False, True, False]])
    found = retain_proposal_loss(logits, coords, base, base_coords, tokens, top_k=100)
    own, ref = logits[0, :4][:, tokens[0]], base[0, :4][:, tokens[0]].sigmoid()
    qfl = F.binary_cross_entropy_with_logits(own, ref, reduction="none")
    qfl = qfl * (own.sigmoid() - ref).abs().pow(2)
    w = ref.max(1).values
    shift = (coords[0, :4].sigmoid() - base_coords[0, :4].sigmoid()).abs().sum(1)
    assert float(found["loss_retain_ce_enc"]) == pytest.approx(float(qfl.sum() / 4), rel=1e-5)
    assert float(found["loss_retain_bbox_enc"]) == pytest.approx(
        float((shift * w).sum() / w.sum()), rel=1e-5
    )
