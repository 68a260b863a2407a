"""The params loader and the one owner of every default (src/teacher/core/params.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from conftest import REPO_ROOT

from teacher.core.params import (
    LORA_PRESETS,
    SECTIONS,
    DinoParams,
    ParamsError,
    SamParams,
    field_comments,
    load_params,
    lora_pattern,
    render_yaml,
    to_dict,
)
from teacher.train.lora import matches


def write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_committed_params_yaml_is_the_generated_one():
    assert (REPO_ROOT / "params.yaml").read_text() == render_yaml(), (
        "params.yaml differs from the defaults in src/teacher/core/params.py: change the default there "
        "and run `python -m teacher.core.params > params.yaml`"
    )


def test_every_field_has_a_comment_and_the_yaml_round_trips_to_the_defaults():
    for name, cls in SECTIONS.items():
        assert all(field_comments(cls).values()), f"{name}: a field without a comment"
    loaded = load_params(REPO_ROOT / "params.yaml")
    for name, cls in SECTIONS.items():
        assert loaded[name] == cls(), name
    assert loaded["seed"] == 0


@dataclasses.dataclass
class _Commented:
    a: int = 1  # a's own comment
    b: int = 2  # b's own comment
    # c's comment,
    # on two lines
    c: int = 3


def test_a_field_commented_above_does_not_take_the_fields_before_it():
    """dino.lora_targets once read "hub id, ... to pin LoRA targets, ..." in params.yaml: the
    trailing comments of model and revision were taken as lines of its own."""
    assert field_comments(_Commented) == {
        "a": "a's own comment",
        "b": "b's own comment",
        "c": "c's comment, on two lines",
    }


def test_absent_sections_get_defaults_and_values_are_typed(tmp_path):
    params = load_params(
        write(tmp_path, "train:\n  lr: 1\n  epochs: 3\nsam:\n  lora_targets: [a, b]\n")
    )
    assert params["train"].lr == 1.0 and isinstance(
        params["train"].lr, float
    )  # int accepted as float
    assert params["train"].epochs == 3 and params["train"].batch_size == 2
    assert params["sam"].lora_targets == ("a", "b")  # lists become tuples: frozen, hashable
    assert params["dino"] == DinoParams() and params["seed"] == 0
    assert to_dict(params["sam"])["lora_targets"] == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lrr: 0.1\n", r"train: unknown key\(s\) lrr; allowed: epochs"),
        ("trian:\n  lr: 0.1\n", r"unknown section\(s\) trian"),
        ("train:\n  epochs: 2.5\n", r"train.epochs: expected int, got 2.5"),
        ("train:\n  epochs: true\n", r"train.epochs: expected int, got True"),
        ("train:\n  epochs: 0\n", r"train.epochs: 0 must be >= 1"),
        ("lora:\n  alpha: 0\n", r"lora.alpha: 0.0 must be > 0"),
        ("split:\n  train: 1.5\n", r"split.train: 1.5 must be <= 1"),
        ("split:\n  train: 0.5\n", r"split: train \+ val \+ test must sum to 1"),
        (
            "validate:\n  on_error: ignore\n",
            r"validate.on_error: 'ignore' is not one of 'fail', 'drop'",
        ),
        ("evaluate:\n  adapter_scales: []\n", r"adapter_scales: 0 scales; give 1 to 16.*\[1.0\]"),
        (
            "evaluate:\n  adapter_scales: [" + ", ".join(["0.5"] * 100_000) + "]\n",
            r"adapter_scales: 100000 scales; give 1 to 16",
        ),
        ("evaluate:\n  adapter_scales: [0.5, -1]\n", r"adapter_scales: \[-1\] not allowed"),
        ("evaluate:\n  adapter_scales: [.nan]\n", r"adapter_scales: \[nan\] not allowed"),
        ("seed: -1\n", r"seed: expected a non-negative integer"),
        ("train: 3\n", r"train: expected a mapping of keys"),
        ("- a\n- b\n", r"expected a mapping of sections"),
        ("train: [\n", r"not valid YAML"),
    ],
)
def test_bad_params_name_the_key_and_what_is_allowed(tmp_path, text, message):
    with pytest.raises(ParamsError, match=message) as e:
        load_params(write(tmp_path, text))
    assert str(tmp_path / "params.yaml") in str(e.value)


def test_missing_file_says_where_to_run(tmp_path):
    with pytest.raises(ParamsError, match="not found; run from the repository root"):
        load_params(tmp_path / "absent.yaml")


def test_lora_presets_expand_and_regexes_pass_through():
    qkv, dec = (
        "image_encoder.blocks.3.attn.qkv",
        "mask_decoder.transformer.layers.1.self_attn.q_proj",
    )
    assert matches(qkv, "sam-encoder-qkv") and not matches(dec, "sam-encoder-qkv")
    both = "sam-encoder-qkv+sam-decoder-attention"
    assert matches(qkv, both) and matches(dec, both)
    assert lora_pattern(r"foo\.\d+") == r"foo\.\d+" and lora_pattern(("a", "b")) == ["a", "b"]
    assert lora_pattern("sam-encoder-qkv+not-a-preset") == "sam-encoder-qkv+not-a-preset"  # a regex
    for pattern in LORA_PRESETS.values():
        re.compile(pattern)
    assert SamParams().lora_targets == "sam-encoder-qkv"


def test_demo_overlay_keys_exist_in_the_schema():
    overlay = yaml.safe_load((REPO_ROOT / "scripts" / "tiny-params.yaml").read_text())
    for section, values in overlay.items():
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert set(values) <= names, (section, set(values) - names)


def test_adapter_scales_take_one_to_sixteen_scales(tmp_path):
    sixteen = [round(0.1 * i, 1) for i in range(16)]
    scales = load_params(write(tmp_path, f"evaluate:\n  adapter_scales: {sixteen}\n"))
    assert scales["evaluate"].adapter_scales == tuple(sixteen)
    one = load_params(write(tmp_path, "evaluate:\n  adapter_scales: [1.0]\n"))
    assert one["evaluate"].adapter_scales == (1.0,)
    with pytest.raises(ParamsError, match="17 scales; give 1 to 16"):
        load_params(write(tmp_path, f"evaluate:\n  adapter_scales: {[*sixteen, 2.0]}\n"))
