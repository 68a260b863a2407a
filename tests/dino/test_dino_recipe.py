"""Grounding DINO trained and scored as the reference recipes do (issue #10).

Each choice is pinned against an independent implementation written here, after
Open-GroundingDino (``models/GroundingDINO/groundingdino.py``: ``SetCriterion``,
``PostProcess``; ``matcher.py``; ``datasets/odvg.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fake_adapters import write_tiny_coco
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou
from transformers import GroundingDinoForObjectDetection
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from teacher.core.params import DinoParams, LoraParams, TrainParams
from teacher.dino.data import NEGATIVE, DinoDataset, box_targets, dino_items, prompt_classes
from teacher.dino.detect import decode_reference
from teacher.dino.labels import LabelMap, build_label_map
from teacher.dino.model import (
    build_tiny_random,
    load_dino,
    prepare_model,
    tiny_config,
    tiny_tokenizer,
)
from teacher.dino.task import OFFSET_PARAMS, class_tokens, wrap_for_training
from teacher.train.lora import save_adapter

PARAMS = DinoParams(model="tiny-random", shortest_edge=64, longest_edge=96)
LORA = LoraParams(rank=4, alpha=8, dropout=0.0)
PROMPT = "circle . square . star ."


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ims = []
    for _ in range(n):
        im = rng.integers(0, 60, (60, 80, 3), dtype=np.uint8)
        im[10:30, 20:50] = 230
        ims.append(im)
    return ims


def _inputs(processor, ims, prompts):
    pixels = processor.image_processor(images=ims, return_tensors="pt")
    text = processor.tokenizer(prompts, padding="longest", return_tensors="pt")
    return {**pixels, **text}


LABELS = [
    box_targets(
        np.array([[20, 10, 30, 20], [5, 30, 20, 20]]), np.array([2, 0]), width=80, height=60
    ),
    box_targets(np.array([[10, 5, 40, 30]]), np.array([1]), width=80, height=60),
]


# --- 1. auxiliary decoder losses ---------------------------------------------------------------


def test_auxiliary_losses_on_for_a_model_whose_config_has_them_off():
    bundle = load_dino(PARAMS)
    config = tiny_config(vocab_size=len(tiny_tokenizer()))
    config.auxiliary_loss = False  # as the hub checkpoint's config
    torch.manual_seed(0)
    model = prepare_model(GroundingDinoForObjectDetection(config)).eval()
    out = model(**_inputs(bundle.processor, _images(2), [PROMPT] * 2), labels=LABELS)
    layers = config.decoder_layers
    for i in range(layers - 1):
        assert {f"loss_ce_{i}", f"loss_bbox_{i}", f"loss_giou_{i}"} <= out.loss_dict.keys()
    layer0_boxes = out.auxiliary_outputs[0]["pred_boxes"]
    (grad,) = torch.autograd.grad(out.loss, layer0_boxes)
    assert grad.abs().sum() > 0  # layer 0's boxes are supervised
    expected = sum(
        w * out.loss_dict[f"{k}{s}"]
        for s in ["", "_enc", *(f"_{i}" for i in range(layers - 1))]
        for k, w in (("loss_ce", 2.0), ("loss_bbox", 5.0), ("loss_giou", 2.0))
    )
    torch.testing.assert_close(out.loss, expected)  # the logged total: weighted terms, nothing else


# --- 2. the two-stage (interm) loss from the undetached proposals ------------------------------


def _ogd_match(logits, boxes, label_map, target):
    """Open-GroundingDino ``HungarianMatcher.forward`` for one image (focal cost, 1/5/2)."""
    prob = logits.sigmoid()
    alpha, gamma = 0.25, 2.0
    neg = (1 - alpha) * prob**gamma * (-(1 - prob + 1e-8).log())
    pos = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
    maps = label_map[target["class_labels"]].float()
    maps = maps / maps.sum(-1, keepdim=True)
    cost_class = pos @ maps.T - neg @ maps.T
    cost_bbox = torch.cdist(boxes, target["boxes"], p=1)
    cost_giou = -generalized_box_iou(_xyxy(boxes), _xyxy(target["boxes"]))
    c = (5.0 * cost_bbox + 1.0 * cost_class + 2.0 * cost_giou).detach()
    c[~torch.isfinite(c)] = 0.0
    i, j = linear_sum_assignment(c.numpy())
    return torch.as_tensor(i), torch.as_tensor(j)


def _xyxy(b):
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def _ogd_interm_loss(enc_class, enc_coord_logits, num_queries, input_ids, attention_mask, targets):
    """``SetCriterion``'s ``interm_outputs`` terms, from the top-k proposals (``tgt_undetach``)."""
    top = torch.topk(enc_class.max(-1).values, num_queries, dim=1).indices
    b = torch.arange(len(top))[:, None]
    logits, boxes = enc_class[b, top], enc_coord_logits[b, top].sigmoid()
    label_maps = build_label_maps(logits, input_ids)
    text_mask = torch.zeros(logits.shape, dtype=torch.bool)
    text_mask[..., : attention_mask.shape[1]] = attention_mask.bool()[:, None, :]
    one_hot = torch.zeros(logits.shape)
    num_boxes = max(sum(len(t["class_labels"]) for t in targets), 1)
    l1 = giou = 0.0
    for k, target in enumerate(targets):
        i, j = _ogd_match(logits[k], boxes[k], label_maps[k], target)
        one_hot[k, i] = label_maps[k][target["class_labels"][j]].float()
        src, tgt = boxes[k, i], target["boxes"][j]
        l1 = l1 + (src - tgt).abs().sum()
        giou = giou + (1 - torch.diag(generalized_box_iou(_xyxy(src), _xyxy(tgt)))).sum()
    x, t = logits[text_mask], one_hot[text_mask]
    p = x.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    focal = ce * (1 - (p * t + (1 - p) * (1 - t))) ** 2 * (0.25 * t + 0.75 * (1 - t))
    return {
        "loss_ce_enc": focal.sum() / num_boxes,
        "loss_bbox_enc": l1 / num_boxes,
        "loss_giou_enc": giou / num_boxes,
    }, boxes


@pytest.fixture(scope="module")
def trained_forward():
    bundle = load_dino(PARAMS)
    model = wrap_for_training(bundle.model, dino=PARAMS, lora=LORA, activation_checkpointing=False)
    model.eval()  # no drop path: a deterministic forward for the parity check
    inputs = _inputs(bundle.processor, _images(2, seed=3), [PROMPT, "star . square ."])
    labels = [
        LABELS[0],
        box_targets(np.array([[10, 5, 40, 30]]), np.array([0]), width=80, height=60),
    ]
    return model, inputs, labels, model(**inputs, labels=labels)


def test_interm_terms_equal_open_groundingdinos_from_the_undetached_proposals(trained_forward):
    model, inputs, labels, out = trained_forward
    expected, boxes = _ogd_interm_loss(
        out.enc_outputs_class,
        out.enc_outputs_coord_logits,
        model.get_base_model().config.num_queries,
        inputs["input_ids"],
        inputs["attention_mask"],
        labels,
    )
    # the same proposals transformers hands the decoder (it detaches them; we do not)
    torch.testing.assert_close(boxes.detach(), out.init_reference_points)
    for k, v in expected.items():
        torch.testing.assert_close(out.loss_dict[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_every_loss_term_trains_something_so_the_total_holds_no_constant(trained_forward):
    model, _, _, out = trained_forward
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for term in (
        "loss_ce_enc",
        "loss_bbox_enc",
        "loss_giou_enc",
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "loss_ce_0",
        "loss_bbox_0",
    ):
        grads = torch.autograd.grad(
            out.loss_dict[term], params, retain_graph=True, allow_unused=True
        )
        norm = sum(float(g.norm()) for g in grads if g is not None)
        assert norm > 0, term
        if term == "loss_ce_enc":  # the proposal head trains
            head = [g for n, g in zip(names, grads, strict=True) if ".enc_output." in n]
            assert head and all(g is not None and g.abs().sum() > 0 for g in head)


def test_input_projection_trains_while_the_swin_runs_frozen(trained_forward):
    from teacher.dino.model import frozen_towers

    model, _, _, out = trained_forward
    assert "model.backbone" in frozen_towers(model)  # the Swin: no LoRA, no autograd
    named = [(n, p) for n, p in model.named_parameters() if "input_proj_vision" in n]
    assert named and all(p.requires_grad == ("lora_" in n) for n, p in named)
    lora = [(n, p) for n, p in named if p.requires_grad]
    grads = torch.autograd.grad(out.loss, [p for _, p in lora], retain_graph=True)
    # lora_B (zero at the start: lora_A gets its gradient through it once it moves)
    assert all(g.abs().sum() > 0 for (n, _), g in zip(lora, grads, strict=True) if "lora_B" in n)


# --- 3. what LoRA reaches, and at which learning rate -----------------------------------------


def test_default_lora_reaches_ffns_text_projection_and_offsets_train_at_their_own_lr():
    from teacher.train.loop import _adamw, trainable_parameters

    bundle = load_dino(PARAMS)
    model = wrap_for_training(bundle.model, dino=PARAMS, lora=LORA, activation_checkpointing=False)
    wrapped = {
        n.removesuffix(".lora_A.default.weight")
        for n, _ in model.named_parameters()
        if n.endswith("lora_A.default.weight")
    }
    for part in (
        "encoder.layers.0.deformable_layer.fc1",
        "encoder.layers.0.text_enhancer_layer.fc2",
        "decoder.layers.1.fc1",
        "model.text_projection",
        "decoder.reference_points_head.layers.0",
        "decoder.layers.0.encoder_attn.sampling_offsets",
        # both references train input_proj (Open-GroundingDino get_param_dicts: not in
        # lr_backbone_names; MM-Grounding-DINO: the neck, no lr_mult): the first place image
        # features adapt while the Swin is frozen. LoRA on each level's convolution here.
        *(f"model.input_proj_vision.{level}.0" for level in range(4)),
    ):
        assert any(n.endswith(part) for n in wrapped), part
    assert not any("text_backbone" in n or "backbone.conv_encoder" in n for n in wrapped)
    train = TrainParams(lr=1e-3)
    params = trainable_parameters(model)
    opt = _adamw(params, train=train, lr_scales={OFFSET_PARAMS: 0.1})
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in params:
        slow = "sampling_offsets" in name or "reference_points_head" in name
        assert lr_of[id(p)] == pytest.approx(1e-4 if slow else 1e-3), name
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged lr is the plain one


def test_fine_tuning_has_no_dropout_in_encoder_and_decoder():
    bundle = load_dino(PARAMS)
    lora = dataclasses.replace(LORA, dropout=0.05)
    model = wrap_for_training(bundle.model, dino=PARAMS, lora=lora, activation_checkpointing=False)
    base = model.get_base_model()
    assert bundle.model.config.dropout == 0.0
    for part in (base.model.encoder, base.model.decoder):
        for name, m in part.named_modules():
            if isinstance(m, torch.nn.Dropout):
                assert m.p == (0.05 if "lora_dropout" in name else 0.0), name
            for attr in ("dropout", "activation_dropout", "attention_dropout"):
                if isinstance(getattr(m, attr, None), float):
                    assert getattr(m, attr) == 0.0, (type(m).__name__, attr)


# --- 4. negatives in prompts -------------------------------------------------------------------


LM = LabelMap(
    category_ids=(1, 2, 3, 4, 5),
    names=("cat", "dog", "bird", "fish", "cow"),
    chunks=((0, 1, 2), (3, 4)),
)
TOKENS = [1, 1, 1, 1, 1]


def test_negatives_add_absent_names_reproducibly_within_the_token_limit():
    def draw(seed, **kw):
        return prompt_classes(
            LM, 0, {0}, negatives=2, class_tokens=TOKENS, rng=np.random.default_rng(seed), **kw
        )

    a = draw(7)
    assert 0 in a and len(a) == 3 and len(set(a)) == 3  # the object's class + 2 absent names
    assert draw(7) == a  # same seed, same prompt
    assert len({draw(s) for s in range(20)}) > 1  # names and order vary with the seed
    assert len(draw(7, max_tokens=6)) == 2  # [CLS] [SEP] + 2 per name: one negative fits
    negative = prompt_classes(
        LM, NEGATIVE, {0, 3}, negatives=2, class_tokens=TOKENS, rng=np.random.default_rng(1)
    )
    assert len(negative) == 2 and not {0, 3} & set(negative)  # absent names only
    assert prompt_classes(
        LM, 1, {3}, negatives=0, class_tokens=None, rng=np.random.default_rng(0)
    ) == (3, 4)  # 0: the chunk as is
    assert prompt_classes(
        LM, NEGATIVE, {3}, negatives=0, class_tokens=None, rng=np.random.default_rng(0)
    ) == (0, 1, 2)  # the chunk naming none


def test_chunked_training_items_include_a_chunk_naming_none_of_the_objects(tmp_path):
    coco = write_tiny_coco(tmp_path, n_images=2)
    coco["categories"] += [{"id": 7, "name": "fish"}]
    lm = LabelMap(
        category_ids=(1, 5, 7), names=("box", "round thing", "fish"), chunks=((0, 1), (2,))
    )
    assert [c for _, c in dino_items(coco, lm, all_chunks=False)] == [0, NEGATIVE, 0, NEGATIVE]
    assert [c for _, c in dino_items(coco, lm, all_chunks=True)] == [0, 1, 0, 1]
    ds = DinoDataset(coco, tmp_path, label_map=lm, seed=0)
    item = ds[1]
    assert item["classes"] == (2,) and len(item["labels"]) == 0 and item["boxes"].shape == (0, 4)
    with_neg = DinoDataset(
        coco, tmp_path, label_map=lm, seed=3, negatives=1, class_tokens=[1, 2, 1]
    )
    first = with_neg[0]
    assert set(first["classes"]) == {0, 1, 2}  # both objects' classes + the absent "fish"
    names = [lm.names[i] for i in first["classes"]]
    assert sorted(np.array(names)[first["labels"]].tolist()) == ["box", "round thing"]
    again = DinoDataset(coco, tmp_path, label_map=lm, seed=3, negatives=1, class_tokens=[1, 2, 1])
    assert [again[i]["classes"] for i in range(4)] == [with_neg[i]["classes"] for i in range(4)]


# --- 5. COCO scoring as Open-GroundingDino's PostProcess ---------------------------------------


def _ogd_postprocess(logits, boxes, tokenizer, names, sizes, num_select):
    """``PostProcess.forward`` with ``create_positive_map`` (char spans -> tokens), no NMS."""
    caption = " . ".join(names) + " ."
    tokenized = tokenizer(caption, return_tensors="pt")
    pos = torch.zeros(len(names), 256)
    for j, name in enumerate(names):
        start = caption.find(name)
        beg, end = tokenized.char_to_token(start), tokenized.char_to_token(start + len(name) - 1)
        pos[j, beg : end + 1] = 1
    pos = pos / pos.sum(-1, keepdim=True)
    prob = logits.sigmoid() @ pos.T  # (B, Q, C)
    values, index = torch.topk(prob.view(len(prob), -1), num_select, dim=1)
    query, label = index // prob.shape[2], index % prob.shape[2]
    xyxy = _xyxy(boxes)
    out = []
    for b, (w, h) in enumerate(sizes):
        picked = xyxy[b, query[b]] * torch.tensor([w, h, w, h], dtype=torch.float32)
        out.append((values[b], label[b], picked))
    return out


def test_box_scores_follow_open_groundingdinos_coco_postprocess():
    tok = load_dino(PARAMS).processor.tokenizer
    names = ["circle", "round thing", "star"]
    ids = tok([" . ".join(names) + " ."] * 2, return_tensors="pt")["input_ids"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, 256, generator=g) * 3
    logits[..., ids.shape[1] :] = float("-inf")  # padded text positions, as the model returns them
    boxes = torch.rand(2, 40, 4, generator=g) * 0.5 + 0.2
    sizes = [(80, 60), (100, 50)]
    ours = decode_reference(
        logits, boxes, ids, sizes=sizes, category_ids=[[3, 5, 9]] * 2, top_k=100
    )
    ref = _ogd_postprocess(logits, boxes, tok, names, sizes, num_select=100)
    for det, (scores, labels, xyxy) in zip(ours, ref, strict=True):
        assert len(det) == 100  # a query may appear under several classes; no NMS, no threshold
        np.testing.assert_allclose(det.scores, scores.numpy(), rtol=1e-5)
        assert det.category_ids.tolist() == np.array([3, 5, 9])[labels.numpy()].tolist()
        got = np.concatenate([det.boxes[:, :2], det.boxes[:, :2] + det.boxes[:, 2:]], 1)
        np.testing.assert_allclose(got, xyxy.numpy(), rtol=1e-5, atol=1e-3)


# --- 6. the saved adapter under plain peft ----------------------------------------------------


def test_plain_peft_from_pretrained_loads_the_trained_heads_exactly(tmp_path):
    from peft import PeftModel

    bundle = load_dino(PARAMS)
    model = wrap_for_training(bundle.model, dino=PARAMS, lora=LORA, activation_checkpointing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    inputs = _inputs(bundle.processor, _images(2), [PROMPT] * 2)
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    save_adapter(model, tmp_path)
    raw, _ = build_tiny_random(PARAMS)  # plain transformers: none of our preparation
    with pytest.raises(
        NotImplementedError, match="get_input_embeddings"
    ):  # transformers' gap: loud
        PeftModel.from_pretrained(raw, str(tmp_path))
    raw, _ = build_tiny_random(PARAMS)
    raw.get_input_embeddings = lambda: (
        raw.model.text_backbone.get_input_embeddings()
    )  # as docs/GROUNDING_DINO.md says
    plain = PeftModel.from_pretrained(raw, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, trained, rtol=0, atol=1e-6)


def test_class_tokens_count_each_name():
    tok = load_dino(PARAMS).processor.tokenizer
    lm = build_label_map(
        [{"id": 1, "name": "cat"}, {"id": 2, "name": "round thing"}], tokenizer=tok
    )
    assert class_tokens(lm, tok) == [
        len(tok(n, add_special_tokens=False)["input_ids"]) for n in lm.names
    ]


def test_params_defaults_follow_the_references():
    d = DinoParams()
    assert (d.clip_norm, d.dropout, d.offsets_lr_scale) == (0.1, 0.0, 0.1)
    assert dataclasses.replace(TrainParams(), clip_norm=d.clip_norm).clip_norm == 0.1


# --- 7. the stock `_enc` terms we replace, and the loss in float32 (issue #35) ----------------


def test_stock_enc_class_term_reaches_only_the_text_projection():
    """transformers' own ``_enc`` terms score the learned query embeddings against the text
    projection's output: no image in them, and the only weights their class term trains are the
    LoRA on ``text_projection``; its box terms (the detached proposals) train nothing."""
    import types

    from teacher.dino.model import HEAD_MODULES, _text_input_embeddings
    from teacher.train.lora import apply_lora

    bundle = load_dino(PARAMS)
    torch.manual_seed(0)
    stock = GroundingDinoForObjectDetection(tiny_config(vocab_size=len(tiny_tokenizer())))
    # as prepare_model, without our loss and proposal outputs: transformers' loss as shipped
    stock.get_input_embeddings = types.MethodType(_text_input_embeddings, stock)
    model = apply_lora(stock, lora=LORA, targets=PARAMS.lora_targets, train_modules=HEAD_MODULES)
    model.eval()
    out = model(**_inputs(bundle.processor, _images(2), [PROMPT] * 2), labels=LABELS)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def reached(term: str) -> set[str]:
        if not out.loss_dict[term].requires_grad:  # a constant to every weight
            return set()
        grads = torch.autograd.grad(
            out.loss_dict[term], [p for _, p in named], retain_graph=True, allow_unused=True
        )
        return {n for (n, _), g in zip(named, grads, strict=True) if g is not None and g.any()}

    ce = reached("loss_ce_enc")
    assert ce and all("model.text_projection.lora_" in n for n in ce), ce
    assert not reached("loss_bbox_enc") and not reached("loss_giou_enc")


def test_matcher_and_loss_run_in_float32_under_bf16_autocast(monkeypatch):
    """Both references train in fp32, so their matcher and loss do: under our bf16 autocast the
    matcher sees float32 inputs with autocast off (inside it, a matmul would otherwise run in
    bf16), matches as the plain fp32 matcher does on them, and the loss equals the one computed
    outside autocast."""
    from teacher.dino import loss as loss_module

    matched = []

    class Recording(loss_module.GroundingDinoHungarianMatcher):
        def forward(self, outputs, targets):
            indices = super().forward(outputs, targets)
            snapshot = {
                k: v.detach().clone() if torch.is_tensor(v) else v for k, v in outputs.items()
            }
            matched.append((snapshot, torch.is_autocast_enabled("cpu"), indices))
            return indices

    monkeypatch.setattr(loss_module, "GroundingDinoHungarianMatcher", Recording)
    bundle = load_dino(PARAMS)
    model = bundle.model.eval()
    seen = {}

    def recording_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, **kw):
        seen.update(logits=logits, pred_boxes=pred_boxes, args=(labels, device), kw=kw)
        seen.update(config=config, label_maps=label_maps, text_mask=text_mask)
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return loss_module.grounded_loss(
            logits, labels, device, pred_boxes, config, label_maps, text_mask, **kw
        )

    model.loss_function = recording_loss
    inputs = _inputs(bundle.processor, _images(2), [PROMPT] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=LABELS)
    assert seen["autocast"]  # the model's forward, and without our guard the loss, in bf16
    assert matched and all(
        o["logits"].dtype == o["pred_boxes"].dtype == torch.float32 and not autocast
        for o, autocast, _ in matched
    )
    plain = GroundingDinoHungarianMatcher(  # transformers' own, not the recording one
        class_cost=model.config.class_cost,
        bbox_cost=model.config.bbox_cost,
        giou_cost=model.config.giou_cost,
    )
    for outputs, _, indices in matched:
        for (i, j), (pi, pj) in zip(indices, plain(outputs, LABELS), strict=True):
            assert torch.equal(i, pi) and torch.equal(j, pj)
    kw = {k: v.detach() if torch.is_tensor(v) else v for k, v in seen["kw"].items()}
    loss, _, _ = loss_module.grounded_loss(
        seen["logits"].detach(),
        *seen["args"],
        seen["pred_boxes"].detach(),
        seen["config"],
        seen["label_maps"],
        seen["text_mask"],
        **kw,
    )
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.detach(), loss, rtol=0, atol=0)


# --- 8. every loss term logged (issue #35) -----------------------------------------------------


def test_training_step_returns_every_weighted_term_and_they_sum_to_the_loss():
    from teacher.dino.task import training_step

    bundle = load_dino(PARAMS)
    dino = dataclasses.replace(PARAMS, denoise_queries=6)
    model = wrap_for_training(bundle.model, dino=dino, lora=LORA, activation_checkpointing=False)
    batch = {**_inputs(bundle.processor, _images(2), [PROMPT] * 2), "labels": LABELS}
    terms = training_step(model, batch)
    layers = model.get_base_model().config.decoder_layers  # the last one has no suffix
    suffixes = ["", *(f"_{i}" for i in range(layers - 1)), "_enc", "_dn"]
    suffixes += [f"_dn_{i}" for i in range(layers - 1)]
    assert set(terms) == {"loss"} | {
        f"loss_{t}{s}" for t in ("ce", "bbox", "giou") for s in suffixes
    }
    weight = {"ce": 2.0, "bbox": 5.0, "giou": 2.0}  # transformers' weights, the references'
    total = sum(weight[k.split("_")[1]] * v for k, v in terms.items() if k != "loss")
    torch.testing.assert_close(total, terms["loss"].detach())


# --- 9. validation batches one image size, as test-time scoring (issue #35) --------------------


def test_validation_batches_hold_one_size_and_score_as_one_image_at_a_time(tmp_path):
    from teacher.dino.task import build_task

    small = write_tiny_coco(tmp_path / "a", n_images=3, size=(48, 64))
    tall = write_tiny_coco(tmp_path / "b", n_images=3, size=(70, 40))
    for folder, doc, offset in (("a", small, 0), ("b", tall, 100)):
        for im in doc["images"]:
            im["file_name"], im["id"] = f"{folder}/{im['file_name']}", im["id"] + offset
        for a in doc["annotations"]:
            a["image_id"], a["id"] = a["image_id"] + offset, a["id"] + offset
    coco = {**small, "images": [], "annotations": small["annotations"] + tall["annotations"]}
    coco["images"] = [
        im for pair in zip(small["images"], tall["images"], strict=True) for im in pair
    ]
    bundle = load_dino(PARAMS)
    model = wrap_for_training(bundle.model, dino=PARAMS, lora=LORA, activation_checkpointing=False)
    model.eval()
    lm = build_label_map(coco["categories"], tokenizer=bundle.processor.tokenizer)

    def task(batch_size):
        return build_task(
            model,
            processor=bundle.processor,
            label_map=lm,
            train_coco=coco,
            val_coco=coco,
            image_root=tmp_path,
            augment_policy={
                "hflip": 0,
                "scale_min": 1,
                "scale_max": 1,
                "crop": 0,
                "color_jitter": 0,
            },
            seed=0,
            batch_size=batch_size,
        )

    four, one = task(4), task(1)
    loader = four.validate.keywords["loader"]
    for batch in loader:
        assert len({tuple(m.shape) for m in batch["pixel_mask"]}) == 1
        assert int(batch["pixel_mask"].all(-1).all(-1).sum()) == len(
            batch["image_ids"]
        )  # no padding
    assert max(len(b["image_ids"]) for b in loader) > 1
    batched, alone = four.validate(model), one.validate(model)
    assert batched["val_map"] == pytest.approx(alone["val_map"], abs=1e-6)
    assert batched["val_map_50"] == pytest.approx(alone["val_map_50"], abs=1e-6)
