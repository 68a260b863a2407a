"""The student's tiny-pretrained preset: committed, small, loads for both kinds of data, detects
the pretraining domain it was trained on, and is remade by its script deterministically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from teacher.core.params import StudentParams
from teacher.dataset import synth
from teacher.proving.student import held_out_scores, pretrain_student
from teacher.student.model import (
    TINY_PRETRAINED,
    TINY_PRETRAINED_CLASSES,
    TINY_PRETRAINED_RESOLUTION,
    TINY_PRETRAINED_WEIGHTS,
    build_student,
    class_heads,
)

PRESET = StudentParams(model=TINY_PRETRAINED)
HELD_OUT = 123_456  # a seed the pretraining does not train on
# the committed preset scores box mAP@50 0.405 on these 40 images (0.446 on the next seed's,
# 0.395 on the script's 200 held-out ones); the bar leaves room for another CPU's last bits
BOX_MAP_50_BAR = 0.35


def test_the_preset_is_committed_and_at_most_5_mb():
    assert TINY_PRETRAINED_WEIGHTS.stat().st_size <= 5 * 2**20


@pytest.mark.parametrize("masks", [True, False])
def test_the_preset_loads_for_either_kind_of_data_with_its_heads_resized(masks):
    model, resolution, name = build_student(PRESET, names=["circle", "square"], masks=masks)
    assert (resolution, name) == (TINY_PRETRAINED_RESOLUTION, TINY_PRETRAINED)
    stored = load_file(str(TINY_PRETRAINED_WEIGHTS))
    prefix = "" if masks else "model."
    state = model.state_dict()
    same = [k for k in state if f"{prefix}{k}" in stored and "class_embed" not in k]
    assert len(same) > 100
    assert all(torch.equal(state[k], stored[f"{prefix}{k}"]) for k in same)
    for head in class_heads(model):  # the first two pretrained rows (ring, cross)
        key = next(k for k, v in model.named_parameters() if v is head.weight)
        assert torch.equal(head.weight, stored[f"{prefix}{key}"][:2])


def test_the_preset_detects_the_pretraining_domain(one_thread):
    from teacher.student.model import model_class, tiny_pretrained_config

    model = model_class(True)(tiny_pretrained_config(names=TINY_PRETRAINED_CLASSES))
    model.load_state_dict(load_file(str(TINY_PRETRAINED_WEIGHTS)))
    coco, pixels = synth.make_dataset(synth.PRETRAIN, n_images=40, seed=HELD_OUT)
    scores = held_out_scores(model, coco, pixels, resolution=TINY_PRETRAINED_RESOLUTION)
    assert scores["map_50"] >= BOX_MAP_50_BAR


def test_pretraining_repeats_per_seed_and_trains_every_part(one_thread):
    def run(steps: int):
        return pretrain_student(
            steps=steps, seed=5, n_images=8, n_test=2, batch_size=2, lr=1e-3, log=lambda _: None
        )

    state, scores = run(2)
    again, _ = run(2)
    initial, _ = run(0)
    assert set(scores) == {"map_50", "map", "segm_map"}
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert set(state) == set(load_file(str(TINY_PRETRAINED_WEIGHTS)))
    for part in ("backbone.backbone.encoder", "decoder.layers", "class_embed", "query_features"):
        keys = [k for k in state if part in k and k.endswith("weight")]
        assert keys and any(not torch.equal(state[k], initial[k]) for k in keys), part


def test_the_script_writes_loadable_student_weights(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_tiny.py"
    done = subprocess.run(
        [sys.executable, str(script), "student", "--steps", "2", "--images", "8",
         "--test-images", "2", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out test" in done.stdout
    written = load_file(str(tmp_path / "student-tiny-pretrained.safetensors"))
    assert set(written) == set(load_file(str(TINY_PRETRAINED_WEIGHTS)))
