"""params.yaml sections -> typed, frozen dataclasses.

Every section of ``params.yaml`` has one dataclass here, with a comment per field. Loading
rejects unknown keys, wrong types and out-of-range values with a message naming the key and
what is allowed. Stages load only the sections they declare in ``dvc.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ParamsError(ValueError):
    """A params.yaml value is missing, unknown, mistyped or out of range."""


def _choices(*values: str) -> dict:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


@dataclass(frozen=True)
class DataParams:
    annotations: str = "data/sample/annotations.json"  # COCO json of the raw export
    images: str = "data/sample/images"  # image root; file_name is resolved under it


@dataclass(frozen=True)
class ValidateParams:
    on_error: str = field(default="fail", metadata=_choices("fail", "drop"))  # stop, or drop offending records
    min_box_size: float = field(default=2.0, metadata=_range(0))  # px; smaller boxes get a warning
    min_instances: int = field(default=3, metadata=_range(0))  # categories with fewer get a warning


@dataclass(frozen=True)
class SplitParams:
    train: float = field(default=0.7, metadata=_range(0, 1))  # fraction of images
    val: float = field(default=0.15, metadata=_range(0, 1))
    test: float = field(default=0.15, metadata=_range(0, 1))

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ParamsError(
                f"split: train + val + test must sum to 1, got {self.train} + {self.val} + "
                f"{self.test} = {total:g}"
            )


@dataclass(frozen=True)
class LoraParams:
    rank: int = field(default=8, metadata=_range(1))  # LoRA rank r
    alpha: float = field(default=16.0, metadata=_range(0, lo_open=True))  # scaling = alpha / rank
    dropout: float = field(default=0.05, metadata=_range(0, 1))  # dropout on the LoRA input


@dataclass(frozen=True)
class TrainParams:
    epochs: int = field(default=20, metadata=_range(1))  # upper bound; early stopping may end sooner
    batch_size: int = field(default=2, metadata=_range(1))  # images per step per process
    grad_accum: int = field(default=1, metadata=_range(1))  # micro-batches per optimizer step
    lr: float = field(default=1e-4, metadata=_range(0, lo_open=True))  # peak AdamW learning rate
    weight_decay: float = field(default=1e-4, metadata=_range(0))
    warmup_steps: int = field(default=50, metadata=_range(0))  # linear warmup, then cosine decay
    clip_norm: float = field(default=1.0, metadata=_range(0))  # max grad norm (SAM; DINO uses dino.clip_norm); 0 disables clipping
    patience: int = field(default=5, metadata=_range(0))  # epochs without val improvement; 0 disables
    precision: str = field(default="auto", metadata=_choices("auto", "fp32", "bf16", "fp16"))  # auto: bf16/fp16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False  # recompute encoder/decoder layers in backward
    max_steps_per_epoch: int = field(default=0, metadata=_range(0))  # 0 = whole train split
    num_workers: int = field(default=0, metadata=_range(0))  # DataLoader workers
    processes: int = field(default=1, metadata=_range(1))  # data-parallel processes (accelerate/DDP)


@dataclass(frozen=True)
class AugmentParams:
    policy: str = field(default="auto", metadata=_choices("auto", "none", "manual"))  # auto: from data/inspect.json
    hflip: float | None = field(default=None, metadata=_range(0, 1))  # horizontal flip probability
    scale_min: float | None = field(default=None, metadata=_range(0, lo_open=True))  # random rescale range
    scale_max: float | None = field(default=None, metadata=_range(0, lo_open=True))
    crop: float | None = field(default=None, metadata=_range(0, 1))  # probability of a random crop
    color_jitter: float | None = field(default=None, metadata=_range(0, 1))  # brightness/contrast/saturation strength


@dataclass(frozen=True)
class DinoParams:
    model: str = "IDEA-Research/grounding-dino-tiny"  # hub id, local save_pretrained dir, or tiny-random
    revision: str = "main"  # hub revision (branch, tag or commit) to pin
    # LoRA targets, regex (full match on module names) or list of names: the attention
    # projections of the encoder, decoder and fusion layers, their FFNs (fc1, fc2), the text
    # projection and the decoder's reference-point head
    lora_targets: str | list[str] = (
        r".*(encoder|decoder)\.layers\.\d+\..*(self_attn|cross_attn|encoder_attn|encoder_attn_text|attn|"
        r"text_enhancer_layer\.self_attn|fusion_layer\.attn)\.(query|key|value|out_proj|"
        r"value_proj|output_proj|sampling_offsets|attention_weights|vision_proj|text_proj|"
        r"values_vision_proj|values_text_proj|out_vision_proj|out_text_proj)"
        r"|.*(encoder|decoder)\.layers\.\d+\.(text_enhancer_layer\.|deformable_layer\.)?fc[12]"
        r"|model\.text_projection|model\.decoder\.reference_points_head\.layers\.\d+"
    )
    train_heads: bool = True  # train the box heads fully (decoder box MLP + two-stage proposal head)
    offsets_lr_scale: float = field(default=0.1, metadata=_range(0))  # lr multiplier of sampling_offsets and reference_points_head (Open-GroundingDino: 0.1)
    clip_norm: float = field(default=0.1, metadata=_range(0))  # DINO's max grad norm, replaces train.clip_norm (both references: 0.1); 0 disables
    dropout: float = field(default=0.0, metadata=_range(0, 1))  # dropout of encoder/decoder layers while fine-tuning (both references: 0.0; the hub config: 0.1)
    negatives: int = field(default=0, metadata=_range(0))  # absent class names added to each training prompt (seeded; 0 = the prompt chunk as is)
    shortest_edge: int = field(default=800, metadata=_range(32))  # image processor resize
    longest_edge: int = field(default=1333, metadata=_range(32))
    box_threshold: float = field(default=0.25, metadata=_range(0, 1))  # inference: min box score
    text_threshold: float = field(default=0.25, metadata=_range(0, 1))  # labeling decode: min class score (its best token)


@dataclass(frozen=True)
class SamParams:
    model: str = "vit_b"  # vit_b, vit_l, vit_h (Meta checkpoints), a local .pth, or tiny-random
    lora_targets: str | list[str] = r"image_encoder\.blocks\.\d+\.attn\.qkv"  # regex or list
    train_decoder: bool = False  # train the mask decoder fully (saved beside the adapter)
    box_jitter: float = field(default=0.1, metadata=_range(0, 1))  # training box noise, fraction of box size
    max_prompts: int = field(default=16, metadata=_range(1))  # prompts per image per step (sampled)
    multimask: bool = True  # 3 candidate masks, loss on the best, as SAM trains
    focal_weight: float = field(default=20.0, metadata=_range(0))  # SAM paper 20 : 1 : 1
    dice_weight: float = field(default=1.0, metadata=_range(0))
    iou_weight: float = field(default=1.0, metadata=_range(0))
    focal_alpha: float = field(default=0.25, metadata=_range(0, 1))
    focal_gamma: float = field(default=2.0, metadata=_range(0))


@dataclass(frozen=True)
class EvaluateParams:
    score_threshold: float = field(default=0.05, metadata=_range(0, 1))  # keep detections above
    nms_iou: float = field(default=0.7, metadata=_range(0, 1))  # per-class NMS IoU; 1 disables
    max_detections: int = field(default=100, metadata=_range(1))  # per image, as COCO AP@100
    gallery_images: int = field(default=6, metadata=_range(0))  # test images drawn in the gallery
    base: bool = True  # also evaluate the pretrained models without adapters (base / gain keys)


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "validate": ValidateParams,
    "split": SplitParams,
    "lora": LoraParams,
    "train": TrainParams,
    "augment": AugmentParams,
    "dino": DinoParams,
    "sam": SamParams,
    "evaluate": EvaluateParams,
}


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, get_args(tp)[0]) for v in value)
    if origin is Literal:
        return value in get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_field(section: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    key = f"{section}.{f.name}"
    if not _matches(value, tp):
        raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is float or (get_origin(tp) in (Union, types.UnionType) and float in get_args(tp)):
        value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    lo, hi, lo_open = f.metadata.get("range", (None, None, False))
    if value is not None and isinstance(value, (int, float)):
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise ParamsError(f"{key}: {value!r} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and value > hi:
            raise ParamsError(f"{key}: {value!r} must be <= {hi}")
    if isinstance(value, list):
        value = tuple(value)
    return value


def parse_section(name: str, raw: Any) -> Any:
    """Build the dataclass of section ``name`` from its raw YAML mapping."""
    cls = SECTIONS[name]
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{name}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}"
        )
    values = {k: _check_field(name, fields[k], hints[k], v) for k, v in raw.items()}
    return cls(**values)


def parse_seed(raw: Any) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise ParamsError(f"seed: expected a non-negative integer, got {raw!r}")
    return raw


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml: every known section as its dataclass, plus ``seed``.

    Sections absent from the file get their defaults; unknown top-level keys are errors.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: not found; run from the repository root") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(raw) - set(SECTIONS) - {"seed"})
    if unknown:
        raise ParamsError(
            f"{path}: unknown section(s) {', '.join(unknown)}; "
            f"allowed: seed, {', '.join(SECTIONS)}"
        )
    try:
        params: dict[str, Any] = {name: parse_section(name, raw.get(name)) for name in SECTIONS}
        params["seed"] = parse_seed(raw.get("seed", 0))
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from e
    return params


def to_dict(section: Any) -> dict[str, Any]:
    """A section dataclass as a plain dict (tuples as lists), for saving beside outputs."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
