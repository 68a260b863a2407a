"""Grounding DINO: loading, targets, the batch-3 loss targets, post-processing, LoRA parity."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers.loss.loss_grounding_dino import GroundingDinoImageLoss
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from teacher.core.errors import TeacherError
from teacher.core.params import DinoParams, LoraParams
from teacher.dino.data import annotation_boxes, box_targets
from teacher.dino.detect import decode, detect
from teacher.dino.labels import LabelMap, build_label_map
from teacher.dino.loss import GroundedImageLoss
from teacher.dino.model import build_tiny_random, load_dino
from teacher.train.lora import apply_lora, load_adapter, merge

PARAMS = DinoParams(model="tiny-random", shortest_edge=64, longest_edge=96)
CATS = [{"id": 3, "name": "circle"}, {"id": 5, "name": "square"}, {"id": 9, "name": "star"}]
from teacher.dino.model import HEAD_MODULES as HEADS  # noqa: E402


def images(n: int, *, seed: int = 0) -> list[np.ndarray]:
    """Small RGB test images, each with a bright rectangle."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = rng.integers(0, 60, (60, 80, 3), dtype=np.uint8)
        x, y = rng.integers(5, 40), rng.integers(5, 30)
        im[y : y + 20, x : x + 30] = 230
        out.append(im)
    return out


def encode(bundle, ims, prompts):
    pixels = bundle.processor.image_processor(images=ims, return_tensors="pt")
    text = bundle.processor.tokenizer(prompts, padding="longest", return_tensors="pt")
    return {**pixels, **text}


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out.logits, out.pred_boxes


@pytest.fixture()
def bundle():
    return load_dino(PARAMS)


@pytest.fixture(scope="module")
def label_map():
    return build_label_map(CATS, tokenizer=load_dino(PARAMS).processor.tokenizer)


# --- loading -----------------------------------------------------------------------------------


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a, _ = build_tiny_random(PARAMS)
    assert torch.equal(torch.rand(1), expected)  # fork_rng: the caller's stream is untouched
    b, _ = build_tiny_random(PARAMS)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_pretrained_folder_loads_the_same_model(tmp_path, bundle):
    bundle.model.save_pretrained(tmp_path)
    bundle.processor.save_pretrained(tmp_path)
    local = load_dino(DinoParams(model=str(tmp_path), shortest_edge=64, longest_edge=96))
    inputs = encode(bundle, images(1), ["circle . square ."])
    for x, y in zip(outputs(bundle.model, inputs), outputs(local.model, inputs), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert local.processor.image_processor.size["shortest_edge"] == 64


def test_offline_hub_id_fails_at_once_saying_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(TeacherError) as err:
        load_dino(DinoParams(model="IDEA-Research/grounding-dino-tiny"))
    assert time.monotonic() - start < 10
    for fix in ("download", "local folder", "tiny-random"):
        assert fix in str(err.value)


# --- targets and the loss ----------------------------------------------------------------------


def test_targets_exclude_crowd_and_other_chunks():
    lm = LabelMap(category_ids=(3, 5, 9), names=("circle", "square", "star"), chunks=((0, 1), (2,)))
    anns = [
        {"category_id": 5, "bbox": [10, 20, 30, 40], "iscrowd": 0},
        {"category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        {"category_id": 9, "bbox": [1, 1, 5, 5]},
        {"category_id": 3, "bbox": [1, 1, 0, 5]},
    ]
    boxes, labels = annotation_boxes(anns, label_map=lm, classes=lm.chunks[0])
    assert labels.tolist() == [1] and boxes.tolist() == [[10, 20, 30, 40]]
    assert annotation_boxes(anns, label_map=lm, classes=lm.chunks[1])[1].tolist() == [0]
    assert annotation_boxes(anns, label_map=lm, classes=(2, 1))[1].tolist() == [
        1,
        0,
    ]  # prompt order
    t = box_targets(boxes, labels, width=100, height=200)
    assert t["class_labels"].dtype == torch.long
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.25, 0.2, 0.3, 0.2]]))


def _one_hot_inputs(tokenizer, prompts, class_labels):
    ids = tokenizer(prompts, padding="longest", return_tensors="pt")["input_ids"]
    logits = torch.zeros(len(prompts), 4, 256)
    label_maps = build_label_maps(logits, ids)
    targets = [{"class_labels": torch.tensor(c)} for c in class_labels]
    indices = [(torch.arange(len(c)), torch.arange(len(c))) for c in class_labels]
    return {"logits": logits, "label_maps": label_maps}, targets, indices


def test_batch_of_3_one_hot_targets_use_each_images_own_label_map(label_map):
    """transformers offsets image i's labels by len(label_maps[i]), not the running total."""
    tok = load_dino(PARAMS).processor.tokenizer
    prompts = ["circle . square . star .", "star .", "square . circle ."]
    class_labels = [[2, 0], [0], [1, 0]]
    outs, targets, indices = _one_hot_inputs(tok, prompts, class_labels)
    ours = GroundedImageLoss(matcher=None, focal_alpha=0.25, losses=[])._get_target_classes_one_hot(
        outs, targets, indices
    )
    for b, labels in enumerate(class_labels):
        for q, c in enumerate(labels):  # query q matched target q of image b
            assert torch.equal(ours[b, q], outs["label_maps"][b][c].long()), (b, q)
        assert ours[b, len(labels) :].sum() == 0
    stock = GroundingDinoImageLoss(matcher=None, focal_alpha=0.25, losses=[])
    same_prompt = _one_hot_inputs(tok, [prompts[0]] * 3, [[2, 0], [0], [1, 0]])
    # where all images share the prompt (label maps equal) both agree
    torch.testing.assert_close(
        stock._get_target_classes_one_hot(*same_prompt),
        GroundedImageLoss(matcher=None, focal_alpha=0.25, losses=[])._get_target_classes_one_hot(
            *same_prompt
        ),
    )


def test_batch_of_3_loss_equals_the_per_image_losses(bundle):
    """Eval mode, equal image sizes, different prompts: the batch loss is the box-weighted mean
    of each image's loss alone (every term is summed over boxes / total boxes)."""
    model = bundle.model.eval()
    ims = images(3, seed=1)
    prompts = ["circle . square . star .", "star .", "square . circle ."]
    labels = [
        box_targets(
            np.array([[5, 5, 30, 20], [40, 30, 20, 20]]), np.array([2, 0]), width=80, height=60
        ),
        box_targets(np.array([[10, 10, 30, 30]]), np.array([0]), width=80, height=60),
        box_targets(
            np.array([[20, 5, 30, 40], [0, 0, 10, 10]]), np.array([1, 0]), width=80, height=60
        ),
    ]
    with torch.no_grad():
        batch = model(**encode(bundle, ims, prompts), labels=labels)
        alone = [
            model(**encode(bundle, [im], [p]), labels=[t])
            for im, p, t in zip(ims, prompts, labels, strict=True)
        ]
    n = torch.tensor([len(t["class_labels"]) for t in labels], dtype=torch.float32)
    for term in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc"):
        expected = (
            sum(float(a.loss_dict[term]) * k for a, k in zip(alone, n.tolist(), strict=True))
            / n.sum()
        )
        assert float(batch.loss_dict[term]) == pytest.approx(float(expected), rel=1e-4), term


def test_loss_matches_transformers_where_its_targets_are_right(bundle):
    """One prompt for the whole batch: the stock loss builds the right targets; every decoder
    term agrees (the ``_enc`` terms differ on purpose: tests/dino/test_dino_recipe.py)."""
    from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss

    model = bundle.model.eval()
    inputs = encode(bundle, images(3, seed=2), ["circle . square . star ."] * 3)
    labels = [
        box_targets(np.array([[5, 5, 30, 20]]), np.array([2]), width=80, height=60),
        box_targets(
            np.array([[10, 10, 30, 30], [1, 2, 10, 10]]), np.array([0, 1]), width=80, height=60
        ),
        box_targets(np.array([[20, 5, 30, 40]]), np.array([1]), width=80, height=60),
    ]
    with torch.no_grad():
        ours = model(**inputs, labels=labels).loss_dict
        model.loss_function = GroundingDinoForObjectDetectionLoss
        stock = model(**inputs, labels=labels).loss_dict
    assert ours.keys() == stock.keys()
    for k in ours:
        if "_enc" not in k:
            torch.testing.assert_close(ours[k], stock[k], msg=k)


def rtdetr_vfl(logits, pred_boxes, targets, indices, num_boxes, *, alpha=0.75, gamma=2.0):
    """RT-DETR's ``loss_labels_vfl`` (``rtdetr_pytorch/src/zoo/rtdetr/rtdetr_criterion.py``),
    transcribed with torchvision's box ops: classes are logit columns, no text tokens."""
    import torchvision

    num_classes = logits.shape[-1]
    batch = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
    idx = (batch, torch.cat([s for s, _ in indices]))
    src = torchvision.ops.box_convert(pred_boxes[idx], "cxcywh", "xyxy")
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
    ious = torch.diag(
        torchvision.ops.box_iou(src, torchvision.ops.box_convert(tgt, "cxcywh", "xyxy"))
    )
    classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
    classes[idx] = torch.cat(
        [t["class_labels"][j] for t, (_, j) in zip(targets, indices, strict=True)]
    )
    target = torch.nn.functional.one_hot(classes, num_classes=num_classes + 1)[..., :-1]
    score = torch.zeros(logits.shape[:2])
    score[idx] = ious.detach()
    target_score = score[..., None] * target
    weight = alpha * logits.sigmoid().detach().pow(gamma) * (1 - target) + target_score
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target_score, weight=weight, reduction="none"
    )
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


def test_varifocal_class_term_matches_rtdetr():
    """``quality=True`` (pretraining only) is RT-DETR's varifocal loss, read over the prompt's
    tokens: with one token per class, the same as RT-DETR's over class columns; its gradient
    moves logits of other classes' tokens and of unmatched queries down only."""
    gen = torch.Generator().manual_seed(0)
    batch, queries, classes = 2, 6, 3
    logits = torch.randn(batch, queries, 256, generator=gen, requires_grad=True)
    pred_boxes = torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.25
    text_mask = torch.zeros(batch, queries, 256, dtype=torch.bool)
    text_mask[..., :classes] = True
    label_maps = tuple(torch.eye(classes, 256, dtype=torch.bool) for _ in range(batch))
    targets = [
        {
            "class_labels": torch.tensor([2, 0]),
            "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.3]]),
        },
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
    ]
    indices = [(torch.tensor([4, 1]), torch.tensor([0, 1])), (torch.tensor([3]), torch.tensor([0]))]
    outputs = {
        "logits": logits,
        "pred_boxes": pred_boxes,
        "label_maps": label_maps,
        "text_mask": text_mask,
    }
    ours = GroundedImageLoss(matcher=None, focal_alpha=0.25, losses=[], quality=True).loss_labels(
        outputs, targets, indices, num_boxes=3.0
    )["loss_ce"]
    theirs = rtdetr_vfl(logits[..., :classes], pred_boxes, targets, indices, 3.0)
    torch.testing.assert_close(ours, theirs)
    focal = GroundedImageLoss(matcher=None, focal_alpha=0.25, losses=[]).loss_labels(
        outputs, targets, indices, num_boxes=3.0
    )["loss_ce"]
    assert not torch.allclose(ours, focal)  # the flag changes the term
    (grad,) = torch.autograd.grad(ours, logits)
    assert (grad[..., classes:] == 0).all()  # tokens outside the prompt get nothing
    positive = torch.zeros(batch, queries, classes, dtype=torch.bool)
    positive[0, 4, 2] = positive[0, 1, 0] = positive[1, 3, 1] = True
    assert (grad[..., :classes][~positive] >= 0).all()  # negatives are only pushed down


def test_loss_accepts_an_image_without_boxes(bundle):
    empty = box_targets(np.zeros((0, 4)), np.zeros((0,), np.int64), width=80, height=60)
    out = bundle.model(
        **encode(bundle, images(2), ["circle ."] * 2),
        labels=[empty, box_targets(np.array([[1, 1, 20, 20]]), np.array([0]), width=80, height=60)],
    )
    assert torch.isfinite(out.loss)


# --- post-processing -----------------------------------------------------------------------------


def test_decode_picks_the_class_of_the_best_tokens_and_scales_boxes(label_map):
    tok = load_dino(PARAMS).processor.tokenizer
    ids = tok([label_map.prompts[0]], return_tensors="pt")["input_ids"]
    maps = build_label_maps(torch.zeros(1, 1, 256), ids)[0]
    logits = torch.full((1, 2, 256), -10.0)
    logits[0, 0, maps[2].bool()] = 3.0  # query 0: star tokens
    logits[0, 1, maps[0].bool()] = -1.0  # query 1: weak circle
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    (det,) = decode(
        logits,
        boxes,
        ids,
        sizes=[(200, 100)],
        category_ids=[[3, 5, 9]],
        box_threshold=0.3,
        text_threshold=0.3,
    )
    assert det.category_ids.tolist() == [9]
    np.testing.assert_allclose(det.boxes, [[80, 30, 40, 40]], atol=1e-4)
    assert det.scores[0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())


def test_detect_runs_every_chunk_and_returns_coco_ids(bundle):
    lm = LabelMap(category_ids=(3, 5, 9), names=("circle", "square", "star"), chunks=((0, 1), (2,)))
    dets = detect(
        bundle,
        images(3),
        lm,
        box_threshold=0.0,
        text_threshold=0.0,
        max_detections=200,
        batch_size=2,
    )
    assert len(dets) == 3
    for det in dets:
        assert det.boxes.shape == (len(det.scores), 4)
        assert set(det.category_ids.tolist()) == {3, 5, 9}  # both chunks present
        assert np.all(np.diff(det.scores) <= 0)


# --- LoRA parity and trained heads ---------------------------------------------------------------


def _wrap(bundle):
    return apply_lora(
        bundle.model,
        lora=LoraParams(rank=4, alpha=8, dropout=0.0),
        targets=PARAMS.lora_targets,
        train_modules=HEADS,
    )


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_fresh_adapter_changes_no_output(bundle):
    inputs = encode(bundle, images(2), ["circle . star ."] * 2)
    before = outputs(bundle.model, inputs)
    after = outputs(_wrap(bundle), inputs)
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_saved_adapter_and_heads_reload_identically_and_stay_tied(tmp_path, bundle):
    from teacher.train.lora import save_adapter

    model = _wrap(bundle)
    _perturb(model)
    inputs = encode(bundle, images(2), ["circle . star ."] * 2)
    trained = outputs(model, inputs)
    save_adapter(model, tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("bbox_embed" in k and "lora_" not in k for k in stored)  # heads: in peft's file
    fresh = load_dino(PARAMS)
    head = fresh.model.bbox_embed[0].layers[0].weight.clone()
    reloaded = load_adapter(fresh.model, tmp_path)
    for x, y in zip(trained, outputs(reloaded, inputs), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    base, src = reloaded.get_base_model(), model.get_base_model()
    assert not torch.equal(base.bbox_embed[0].layers[0].weight, head)  # heads were loaded
    for i in range(len(base.bbox_embed)):
        for name, p in base.bbox_embed[i].named_parameters():
            assert torch.equal(p, src.bbox_embed[i].get_parameter(name))
            assert p is base.bbox_embed[0].get_parameter(name)  # tied across decoder layers
            assert p is base.model.decoder.bbox_embed[i].get_parameter(name)


def test_merged_model_matches_unmerged(bundle):
    model = _wrap(bundle)
    _perturb(model, seed=1)
    inputs = encode(bundle, images(2), ["circle . square . star ."] * 2)
    unmerged = outputs(model, inputs)
    merged = outputs(merge(copy.deepcopy(model)), inputs)
    # tolerance: float32 reassociation of W x + B A x vs (W + B A) x
    torch.testing.assert_close(merged[0], unmerged[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(merged[1], unmerged[1], rtol=1e-4, atol=1e-5)


# --- memory: frozen towers without autograd, activation checkpointing ------------------------


def _grads(ckpt: bool) -> tuple[dict[str, torch.Tensor], list[bool]]:
    from teacher.dino.task import wrap_for_training

    bundle = load_dino(PARAMS)
    torch.manual_seed(0)
    model = wrap_for_training(
        bundle.model,
        dino=PARAMS,
        lora=LoraParams(rank=4, alpha=8, dropout=0.1),
        activation_checkpointing=ckpt,
    )
    base = model.get_base_model()
    layers = [*base.model.encoder.layers, *base.model.decoder.layers]
    assert all(getattr(layer, "_teacher_checkpointed", False) == ckpt for layer in layers)
    tower_grad = []
    for name in ("model.backbone", "model.text_backbone"):
        base.get_submodule(name).register_forward_hook(
            lambda m, i, o: tower_grad.append(
                any(
                    t.requires_grad
                    for t in torch.utils._pytree.tree_leaves(o)
                    if isinstance(t, torch.Tensor)
                )
            )
        )
    model.train()
    labels = [box_targets(np.array([[5, 5, 30, 20]]), np.array([1]), width=80, height=60)] * 2
    torch.manual_seed(1)  # same dropout / drop-path draws in both runs
    out = model(**encode(bundle, images(2), ["circle . square ."] * 2), labels=labels)
    out.loss.backward()
    grads = {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return grads, tower_grad


def test_frozen_towers_run_without_autograd_and_checkpointing_keeps_gradients():
    plain, towers = _grads(ckpt=False)
    assert towers == [False, False]  # image and text encoders: nothing recorded for backward
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in plain.items())
    checkpointed, _ = _grads(ckpt=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:  # recomputation in backward gives the same gradients
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_too_small_images_for_the_queries_fail_early():
    with pytest.raises(TeacherError, match="shortest_edge 40 is too small"):
        load_dino(DinoParams(model="tiny-random", shortest_edge=40, longest_edge=60))


@pytest.mark.parametrize("shape", [(62, 69), (69, 62), (118, 132), (1, 200), (200, 3), (40, 40)])
def test_small_near_square_images_are_padded_to_two_coarsest_positions(shape):
    """At a training size under 65 px (dino.train_scale_min x a small shortest_edge) a
    near-square image used to be padded side after side forever: its resized sides never passed
    64 px, so the coarsest level kept one position."""
    from teacher.dino.model import encoder_levels, pad_for_queries

    image = np.zeros((*shape, 3), np.uint8)
    out = pad_for_queries(image, num_queries=64, shortest_edge=57, longest_edge=120)
    levels = encoder_levels(*out.shape[:2], shortest_edge=57, longest_edge=120)
    assert sum(levels) >= 64 and levels[-1] >= 2
    assert np.array_equal(out[: shape[0], : shape[1]], image)  # padded at the bottom / right
