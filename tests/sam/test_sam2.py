"""SAM 2.1 as a teacher: names and bad input, LoRA presets per family, parity with transformers'
own Sam2Processor + Sam2Model path, training (box prompts, checkpointing, decoder-only on the
cache), the cache never read across families, export as save_pretrained. Driven by
tiny-random-sam2 (a 128 px Sam2Config, built in code)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from test_sam import shapes  # noqa: F401  (the fixture: two images, a circle and a square each)
from transformers import Sam2ImageProcessor, Sam2Model, Sam2Processor

from teacher.coco.boxes import xywh_to_xyxy
from teacher.coco.images import load_image
from teacher.core.errors import TeacherError
from teacher.core.params import LORA_PRESETS, LoraParams, SamParams
from teacher.sam import build as B
from teacher.sam import model as M
from teacher.sam import predictor as P
from teacher.sam.data import (
    SamDataset,
    cache_sam_embeddings,
    collate_sam,
    embedding_folder,
    entry_state,
)
from teacher.sam.embedding import Sam2Features, cache_bytes_per_image
from teacher.sam.sam2 import BoxPromptSam2
from teacher.sam.task import encoder_trains, training_step, wrap_for_training
from teacher.train.lora import apply_lora

SAM2 = B.TINY_RANDOM_SAM2


@pytest.fixture(scope="module")
def tiny2() -> BoxPromptSam2:
    return B.build_tiny_random_sam2()


# --- names, presets, bad input -----------------------------------------------------------------


def test_tiny_random_sam2_is_a_fixed_sam2_and_tiny_presets_stay_sam(tiny2):
    torch.manual_seed(123)  # the global seed does not matter
    again = B.load_base_sam(SAM2)
    assert isinstance(again, BoxPromptSam2) and isinstance(again, Sam2Model)
    for (name, a), b in zip(tiny2.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert M.input_size(again) == 128 and M.unwrap(again) is again
    for preset in (B.TINY_RANDOM, B.TINY_PRETRAINED):
        assert M.unwrap(B.load_base_sam(preset)).sam_family == "sam"


def test_save_pretrained_folder_round_trips(tiny2, tmp_path):
    tiny2.save_pretrained(tmp_path / "sam2")
    loaded = B.load_base_sam(str(tmp_path / "sam2"))
    assert isinstance(loaded, BoxPromptSam2)
    for a, b in zip(tiny2.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_names_and_folders_are_clear_errors_never_a_fallback(tmp_path, monkeypatch):
    with pytest.raises(TeacherError, match=r"facebook/sam2\.1-hiera-tiny.*tiny-random-sam2"):
        B.load_base_sam("facebook/sam3-hiera-huge")
    other = tmp_path / "dino"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "grounding-dino"}))
    with pytest.raises(TeacherError, match=r"dino.*model_type 'grounding-dino', not a SAM 2"):
        B.load_base_sam(str(other))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TeacherError, match=r"empty: a folder without a readable config.json"):
        B.load_base_sam(str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    with pytest.raises(TeacherError, match=r"hub cannot be reached.*Sam2Model.from_pretrained"):
        B.load_base_sam("facebook/sam2.1-hiera-tiny")


def _lora_targets(model: torch.nn.Module, preset: str) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_PRESETS[preset], n)
    ]


def test_each_preset_picks_the_same_layers_in_both_families(tiny2):
    sam = B.build_tiny_random()  # depth 2; the decoder: 2 layers, 4 mask tokens, IoU head depth 3
    hiera_blocks = sum(tiny2.config.vision_config.backbone_config.blocks_per_stage)  # 5
    want = {
        # family: (encoder-qkv, encoder-proj, decoder-attention, decoder-linear)
        "sam": (2, 2, 2 * 3 * 4, 2 * 3 * 4 + 4 + 2 * 2 + 4 * 3 + 3),
        "sam2": (hiera_blocks, hiera_blocks, 2 * 3 * 4, 2 * 3 * 4 + 4 + 2 * 2 + 4 * 3 + 3),
    }
    presets = ("sam-encoder-qkv", "sam-encoder-proj", "sam-decoder-attention", "sam-decoder-linear")
    for model in (sam, tiny2):
        found = {p: _lora_targets(model, p) for p in presets}
        assert tuple(len(found[p]) for p in presets) == want[M.unwrap(model).sam_family]
        assert all(n.endswith("attn.qkv") for n in found["sam-encoder-qkv"])
        assert all(n.endswith("attn.proj") for n in found["sam-encoder-proj"])
    # SAM 2's decoder-linear: every Linear of its decoder but the object-score head
    every = {
        n
        for n, m in tiny2.mask_decoder.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.startswith("pred_obj_score_head")
    }
    assert {n.removeprefix("mask_decoder.") for n in found["sam-decoder-linear"]} == every


# --- parity with transformers' own path --------------------------------------------------------


def _reference(base_state, image, *, boxes=None, points=None, labels=None, multimask):
    """transformers' path: Sam2Processor -> Sam2Model -> post_process_masks (logits)."""
    ref = Sam2Model(B.tiny_sam2_config()).eval()
    ref.load_state_dict(base_state)
    processor = Sam2Processor(Sam2ImageProcessor(size={"height": 128, "width": 128}))
    inputs = processor(
        images=image,
        input_boxes=None if boxes is None else [boxes.tolist()],
        input_points=None if points is None else [points.tolist()],
        input_labels=None if labels is None else [labels.tolist()],
        return_tensors="pt",
    )
    with torch.no_grad():
        out = ref(
            pixel_values=inputs["pixel_values"],
            input_boxes=inputs.get("input_boxes"),
            input_points=inputs.get("input_points"),
            input_labels=inputs.get("input_labels"),
            multimask_output=multimask,
        )
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], binarize=False)
    return masks[0], out.iou_scores[0]


@pytest.mark.parametrize("multimask", [False, True])
def test_fresh_adapter_equals_transformers_sam2_path(shapes, tiny2, multimask):  # noqa: F811
    coco, root = shapes
    image = load_image(root / "im0.png")  # 96 x 128: not square, stretched by both
    base_state = {k: v.clone() for k, v in tiny2.state_dict().items()}
    ours = apply_lora(
        B.build_tiny_random_sam2(),
        lora=LoraParams(rank=4),
        targets="sam-encoder-qkv+sam-decoder-linear",
    ).eval()
    lora_b = [p for n, p in ours.named_parameters() if "lora_B" in n]
    assert lora_b and all(not p.any() for p in lora_b)  # attached, fresh (B = 0)
    prepared = P.prepare_image(ours, image)
    sam = prepared.sam
    boxes_xywh = np.array([a["bbox"] for a in coco["annotations"] if a["image_id"] == 1][:2])
    low, iou = sam.decode(
        prepared.embedding, boxes=prepared.boxes_to_input(boxes_xywh), multimask=multimask
    )
    logits = sam.postprocess(low, prepared.input_size, prepared.original_size)
    ref_logits, ref_iou = _reference(
        base_state, image, boxes=xywh_to_xyxy(boxes_xywh), multimask=multimask
    )
    assert logits.shape == ref_logits.shape == (2, 3 if multimask else 1, 96, 128)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, ref_iou, atol=1e-6, rtol=1e-5)
    # clicks: a positive and a negative point per prompt
    points = np.array([[[40.0, 36.0], [90.0, 40.0]], [[96.0, 45.0], [20.0, 80.0]]])
    labels = np.array([[1, 0], [1, 0]])
    low, iou = sam.decode(
        prepared.embedding,
        points=prepared.points_to_input(points),
        labels=torch.as_tensor(labels),
        multimask=multimask,
    )
    logits = sam.postprocess(low, prepared.input_size, prepared.original_size)
    ref_logits, ref_iou = _reference(
        base_state, image, points=points, labels=labels, multimask=multimask
    )
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, ref_iou, atol=1e-6, rtol=1e-5)
    # and the predictor's masks are the reference's thresholded, best by predicted IoU
    masks, scores = prepared.predict(boxes_xywh, multimask=multimask)
    ref_boxes, ref_box_iou = _reference(
        base_state, image, boxes=xywh_to_xyxy(boxes_xywh), multimask=multimask
    )
    want = (ref_boxes[torch.arange(2), ref_box_iou.argmax(1)] > 0).numpy()
    assert (masks == want).mean() > 0.999
    np.testing.assert_allclose(scores, ref_box_iou.max(1).values.numpy(), atol=1e-5)


# --- training ----------------------------------------------------------------------------------


def _losses(model, batch, params, steps: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = []
    for _ in range(steps):
        loss = training_step(model, batch, sam_params=params)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def test_box_prompts_train_encoder_lora_with_checkpointing(shapes):  # noqa: F811
    coco, root = shapes
    params = SamParams(model=SAM2, max_prompts=2, point_prompts=0.0, correction_points=0)
    model = wrap_for_training(
        B.build_tiny_random_sam2(),
        sam_params=params,
        lora=LoraParams(rank=4, dropout=0.0),
        activation_checkpointing=True,
    )
    sam = M.unwrap(model)
    assert encoder_trains(model)
    assert all(getattr(b, "_teacher_checkpointed", False) for b in sam.encoder_blocks())
    ds = SamDataset(coco, root, geometry=sam.geometry, max_prompts=2, box_jitter=0.1, seed=0)
    batch = collate_sam([ds[0], ds[1]])
    assert batch["images"][0].shape == (3, 128, 128) and batch["masks"][0].shape == (2, 128, 128)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    losses = _losses(model, batch, params, steps=4)
    assert losses[-1] < 0.95 * losses[0]
    moved = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert set(moved) == set(before)  # every Hiera block's LoRA B trained through checkpointing


def test_decoder_only_trains_on_cached_features(shapes, tmp_path):  # noqa: F811
    coco, root = shapes
    params = SamParams(
        model=SAM2, lora_targets="sam-decoder-attention", train_decoder=True, max_prompts=2
    )
    model = wrap_for_training(
        B.build_tiny_random_sam2(),
        sam_params=params,
        lora=LoraParams(rank=4),
        activation_checkpointing=True,
    )
    sam = M.unwrap(model)
    assert not encoder_trains(model)  # conv_s0 / conv_s1 belong to the cached features
    assert not any(p.requires_grad for p in sam.mask_decoder.conv_s0.parameters())
    assert sam.mask_decoder.iou_prediction_head.proj_in.weight.requires_grad
    files = cache_sam_embeddings(model, coco, root, tmp_path / "cache")
    ds = SamDataset(
        coco, root, geometry=sam.geometry, max_prompts=2, box_jitter=0.0, seed=0, embeddings=files
    )
    cached = ds[0]["embedding"]
    assert isinstance(cached, Sam2Features)
    live = M.embed(sam.eval(), [load_image(root / "im0.png")])[0]
    for a, b in zip(
        (cached.image, cached.s0, cached.s1), (live.image, live.s0, live.s1), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    batch = collate_sam([ds[0], ds[1]])
    assert batch["images"] is None and batch["embeddings"].s0.shape == (2, 8, 32, 32)
    losses = _losses(model, batch, params, steps=4)
    assert losses[-1] < 0.95 * losses[0]


def test_the_cache_is_never_read_across_families(shapes, tmp_path):  # noqa: F811
    coco, root = shapes
    cache = tmp_path / "cache"
    sam_files = cache_sam_embeddings(B.build_tiny_random(), coco, root, cache)
    sam2_files = cache_sam_embeddings(B.build_tiny_random_sam2(), coco, root, cache)
    folder = embedding_folder(B.build_tiny_random_sam2(), cache)
    assert folder.name.startswith("sam2-") and folder != sam_files[1].parent
    assert entry_state(sam2_files[1], "sam2") == "ok"
    # the other family's entry at this family's place is damaged to the reader, either way
    assert entry_state(sam_files[1], "sam2") == "damaged"
    assert entry_state(sam2_files[1], "sam") == "damaged"
    sam2_files[1].write_bytes(sam_files[1].read_bytes())
    again = cache_sam_embeddings(B.build_tiny_random_sam2(), coco, root, cache)
    assert entry_state(again[1], "sam2") == "ok"  # recomputed, not read as SAM 2 features
    assert cache_bytes_per_image("sam") == 4 * 2**20
    assert cache_bytes_per_image("sam2") == 16 * 2**20
    assert sam2_files[2].stat().st_size >= cache_bytes_per_image("sam2", size=128, width=64)
