"""Detector families (issue #35): MM-Grounding-DINO (and LLMDet, whose checkpoints are
MM-Grounding-DINO ones) trains, saves, reloads, predicts and exports as Grounding DINO does,
and a checkpoint loads as the family its config.json names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForZeroShotObjectDetection,
    GroundingDinoForObjectDetection,
    MMGroundingDinoForObjectDetection,
)

from teacher.core.artifacts import LABELS_FILE
from teacher.core.errors import TeacherError
from teacher.core.params import DinoParams, LoraParams
from teacher.dino.data import box_targets
from teacher.dino.detect import detect
from teacher.dino.labels import LabelMap, build_label_map
from teacher.dino.model import TINY_RANDOM, TINY_RANDOM_MM, load_dino
from teacher.dino.task import save_dino, training_step, wrap_for_training
from teacher.inference.export import export_dino

SIZES = {"shortest_edge": 64, "longest_edge": 96}
MM = DinoParams(model=TINY_RANDOM_MM, **SIZES)
LORA = LoraParams(rank=4, alpha=8, dropout=0.0)
CATS = [{"id": 3, "name": "circle"}, {"id": 5, "name": "square"}, {"id": 9, "name": "star"}]
PROMPT = "circle . square . star ."


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ims = []
    for _ in range(n):
        im = rng.integers(0, 60, (60, 80, 3), dtype=np.uint8)
        im[10:30, 20:50] = 230
        ims.append(im)
    return ims


def _batch(processor) -> dict:
    pixels = processor.image_processor(images=_images(2), return_tensors="pt")
    text = processor.tokenizer([PROMPT, "star . square ."], padding="longest", return_tensors="pt")
    labels = [
        box_targets(np.array([[20, 10, 30, 20]]), np.array([2]), width=80, height=60),
        box_targets(np.array([[10, 5, 40, 30]]), np.array([0]), width=80, height=60),
    ]
    return {**pixels, **text, "labels": labels}


def _label_map(bundle) -> LabelMap:
    return build_label_map(CATS, tokenizer=bundle.processor.tokenizer)


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _detect(bundle, label_map):
    return detect(
        bundle, _images(2, seed=1), label_map, box_threshold=0.0, text_threshold=0.0, batch_size=2
    )


def _assert_same(dets, other, *, atol=0.0):
    for a, b in zip(dets, other, strict=True):
        np.testing.assert_array_equal(a.category_ids, b.category_ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=atol)
        np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=1000 * atol)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """tiny-random-mm written by save_pretrained: a local MM-Grounding-DINO checkpoint."""
    folder = tmp_path_factory.mktemp("mm-base")
    bundle = load_dino(MM)
    bundle.model.save_pretrained(str(folder), safe_serialization=True)
    bundle.processor.save_pretrained(str(folder))
    return folder


def test_checkpoints_load_as_the_family_their_config_names(base_folder, tmp_path):
    assert (
        json.loads((base_folder / "config.json").read_text())["model_type"] == "mm-grounding-dino"
    )
    loaded = load_dino(DinoParams(model=str(base_folder), **SIZES)).model
    assert type(loaded) is MMGroundingDinoForObjectDetection
    torch.testing.assert_close(loaded.state_dict(), load_dino(MM).model.state_dict())
    gd = tmp_path / "gd"
    load_dino(DinoParams(model=TINY_RANDOM, **SIZES)).model.save_pretrained(str(gd))
    load_dino(MM).processor.save_pretrained(str(gd))
    assert (
        type(load_dino(DinoParams(model=str(gd), **SIZES)).model) is GroundingDinoForObjectDetection
    )


def test_a_folder_of_another_model_fails_saying_what_it_is(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "detr"}))
    with pytest.raises(TeacherError, match=r"model_type 'detr'.*MM-Grounding-DINO"):
        load_dino(DinoParams(model=str(tmp_path), **SIZES))


def _one_step(name: str):
    """A tiny model of ``dino.model`` ``name`` wrapped for training; its loss after one
    training step's backward, and its parameters by name."""
    dino = DinoParams(model=name, **SIZES)
    bundle = load_dino(dino)
    model = wrap_for_training(bundle.model, dino=dino, lora=LORA, activation_checkpointing=False)
    terms = training_step(model, _batch(bundle.processor))
    terms["loss"].backward()
    return terms["loss"], dict(model.named_parameters())


def _learning(named) -> set[str]:
    return {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}


def test_mm_trains_one_step_with_lora_as_grounding_dino_does_and_its_class_biases():
    loss, named = _one_step(TINY_RANDOM_MM)
    assert torch.isfinite(loss)
    lora_b = {n for n in named if "lora_B" in n}
    learning = _learning(named)
    assert len(lora_b & learning) > 50
    # the same LoRA matrices get a gradient as in Grounding DINO (same module names and targets)
    gd_loss, gd_named = _one_step(TINY_RANDOM)
    assert torch.isfinite(gd_loss)
    assert lora_b & learning == {n for n in gd_named if "lora_B" in n} & _learning(gd_named)
    # MM's contrastive class heads carry a learned bias (Grounding DINO's have no parameters)
    biases = {n for n, p in named.items() if "class_embed" in n and p.requires_grad}
    assert any("encoder_output_class_embed" in n for n in biases)
    assert biases <= learning
    assert not any("class_embed" in n and p.requires_grad for n, p in gd_named.items())


def test_mm_trains_with_denoising_queries():
    dino = DinoParams(model=TINY_RANDOM_MM, denoise_queries=10, **SIZES)
    bundle = load_dino(dino)
    model = wrap_for_training(bundle.model, dino=dino, lora=LORA, activation_checkpointing=False)
    terms = training_step(model, _batch(bundle.processor))
    assert torch.isfinite(terms["loss"]) and "loss_ce_dn" in terms


@pytest.fixture(scope="module")
def adapter(base_folder, tmp_path_factory):
    """An adapter trained (perturbed) on the local MM folder, and what it detects."""
    dino = DinoParams(model=str(base_folder), **SIZES)
    bundle = load_dino(dino)
    model = wrap_for_training(bundle.model, dino=dino, lora=LORA, activation_checkpointing=False)
    _perturb(model)
    label_map = _label_map(bundle)
    folder = tmp_path_factory.mktemp("mm-adapter")
    save_dino(model, folder, label_map=label_map)
    bundle.model = model
    return dino, folder, label_map, _detect(bundle, label_map)


def test_adapter_on_a_local_mm_folder_reloads_and_predicts_the_same(adapter):
    dino, folder, label_map, trained = adapter
    reloaded = load_dino(dino, adapter_dir=folder)
    assert type(reloaded.model.get_base_model()) is MMGroundingDinoForObjectDetection
    assert reloaded.label_map == label_map
    # to float32 rounding (1 ulp seen under pytest; 0 when run alone)
    _assert_same(_detect(reloaded, label_map), trained, atol=1e-6)
    assert not all(len(d.scores) == 0 for d in trained)


def test_export_reloads_as_mm_grounding_dino_and_predicts_the_same(adapter, tmp_path):
    dino, folder, label_map, trained = adapter
    out = export_dino(dino, folder, tmp_path / "dino")
    assert (out / LABELS_FILE).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MMGroundingDinoForObjectDetection"]
    assert type(AutoModelForZeroShotObjectDetection.from_pretrained(str(out))) is (
        MMGroundingDinoForObjectDetection
    )
    exported = load_dino(DinoParams(model=str(out), **SIZES))
    assert type(exported.model) is MMGroundingDinoForObjectDetection
    # merged weights: float32 reassociation of W x + B A x vs (W + B A) x
    _assert_same(_detect(exported, label_map), trained, atol=1e-4)
