"""params.yaml sections -> typed, frozen dataclasses; the one owner of every default.

Every section of ``params.yaml`` has one dataclass here, with a comment per field: the default
value and that comment are written once, here. ``params.yaml`` is generated from them
(``python -m teacher.core.params > params.yaml``, see :func:`render_yaml`) and a test checks the
committed file is exactly that. Loading rejects unknown keys, wrong types and out-of-range
values with a message naming the key and what is allowed. Stages load only the sections they
declare in ``dvc.yaml``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Sequence
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


# One line per field, never wrapped: render_yaml reads each field's trailing comment.
# fmt: off
@dataclass(frozen=True)
class DataParams:
    annotations: str = "data/sample/annotations.json"  # your COCO export
    images: str = "data/sample/images"  # folder that file_name is relative to
    unlabeled: str = "data/sample/unlabeled"  # folder of unlabeled images the teachers label for the student (searched recursively); a folder without images = no pool, the student trains on human labels alone


@dataclass(frozen=True)
class ValidateParams:
    on_error: str = field(default="fail", metadata=_choices("fail", "drop"))  # fail: stop with a report; drop: remove offending records and go on
    min_box_size: float = field(default=2.0, metadata=_range(0))  # px; smaller boxes get a warning
    min_instances: int = field(default=3, metadata=_range(0))  # categories with fewer instances get a warning
    decode_images: bool = True  # decode every image as training will; false: read headers only (huge sets)
    max_drop_fraction: float = field(default=0.5, metadata=_range(0, 1))  # errors that would drop a larger share of images or annotations stop validate
    box_from_mask: bool = False  # true: boxes disagreeing with their masks (IoU < 0.5) are recomputed from them


@dataclass(frozen=True)
class SplitParams:
    train: float = field(default=0.7, metadata=_range(0, 1))  # fraction of images, by image
    val: float = field(default=0.15, metadata=_range(0, 1))  # fraction of images
    test: float = field(default=0.15, metadata=_range(0, 1))  # fraction of images

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
    weight_decay: float = field(default=1e-4, metadata=_range(0))  # AdamW; biases and norms get none
    warmup_steps: int = field(default=50, metadata=_range(0))  # linear warmup, then cosine decay
    clip_norm: float = field(default=1.0, metadata=_range(0))  # max grad norm (SAM; DINO uses dino.clip_norm); 0 disables clipping
    patience: int = field(default=5, metadata=_range(0))  # epochs without val improvement before stopping; 0 disables
    precision: str = field(default="auto", metadata=_choices("auto", "fp32", "bf16", "fp16"))  # auto: bf16/fp16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False  # recompute encoder/decoder layers in backward (less memory)
    max_steps_per_epoch: int = field(default=0, metadata=_range(0))  # 0 = whole train split
    num_workers: int = field(default=0, metadata=_range(0))  # DataLoader workers
    processes: int = field(default=1, metadata=_range(1))  # data-parallel processes (accelerate/DDP)


@dataclass(frozen=True)
class AugmentParams:
    policy: str = field(default="auto", metadata=_choices("auto", "none", "manual"))  # auto: derived from data/inspect.json; none; manual (only the values below)
    hflip: float | None = field(default=None, metadata=_range(0, 1))  # horizontal flip probability; null = policy decides
    scale_min: float | None = field(default=None, metadata=_range(0, lo_open=True))  # random rescale range, lower end
    scale_max: float | None = field(default=None, metadata=_range(0, lo_open=True))  # random rescale range, upper end
    crop: float | None = field(default=None, metadata=_range(0, 1))  # probability of a random crop
    color_jitter: float | None = field(default=None, metadata=_range(0, 1))  # brightness/contrast/saturation strength


@dataclass(frozen=True)
class DinoParams:
    model: str = "IDEA-Research/grounding-dino-tiny"  # hub id or local save_pretrained folder of Grounding DINO, MM-Grounding-DINO or LLMDet (its config.json picks the class), or tiny-random / tiny-random-mm
    revision: str = "main"  # hub revision (branch, tag or commit) to pin
    # LoRA targets, regex (full match on module names) or list of names: the attention
    # projections of the encoder, decoder and fusion layers, their FFNs (fc1, fc2), the text
    # projection, the decoder's reference-point head and the convolutions projecting the image
    # features (input_proj_vision, which both references train)
    lora_targets: str | list[str] = (
        r".*(encoder|decoder)\.layers\.\d+\..*(self_attn|cross_attn|encoder_attn|encoder_attn_text|attn|"
        r"text_enhancer_layer\.self_attn|fusion_layer\.attn)\.(query|key|value|out_proj|"
        r"value_proj|output_proj|sampling_offsets|attention_weights|vision_proj|text_proj|"
        r"values_vision_proj|values_text_proj|out_vision_proj|out_text_proj)"
        r"|.*(encoder|decoder)\.layers\.\d+\.(text_enhancer_layer\.|deformable_layer\.)?fc[12]"
        r"|model\.text_projection|model\.decoder\.reference_points_head\.layers\.\d+"
        r"|model\.input_proj_vision\.\d+\.0"
    )
    train_heads: bool = True  # train the box heads fully (decoder box MLP + two-stage proposal head; MM-Grounding-DINO: its class heads' biases too)
    offsets_lr_scale: float = field(default=0.1, metadata=_range(0))  # lr multiplier of sampling_offsets and reference_points_head (Open-GroundingDino: 0.1)
    clip_norm: float = field(default=0.1, metadata=_range(0))  # DINO's max grad norm, replaces train.clip_norm (both references: 0.1); 0 disables
    dropout: float = field(default=0.0, metadata=_range(0, 1))  # dropout of encoder/decoder layers while fine-tuning (both references: 0.0; the hub config: 0.1)
    negatives: int = field(default=0, metadata=_range(0))  # absent class names added to each training prompt (seeded; 0 = the prompt chunk as is)
    denoise_queries: int = field(default=0, metadata=_range(0))  # contrastive denoising queries per training image (MM-Grounding-DINO: 100; Open-GroundingDino: 0 = none)
    retain_weight: float = field(default=16.0, metadata=_range(0))  # keep the base model's answers for evaluate.retention_classes while training (Learning without Forgetting, docs/FORGETTING.md): make demo kept retention 0.38 instead of 0.06 at no cost in gain; short runs (6 epochs) gain less: lower it (1) or 0 = off
    retain_names: int = field(default=20, metadata=_range(0))  # retention names added after each training prompt's classes (seeded; as many as fit 256 tokens)
    shortest_edge: int = field(default=800, metadata=_range(32))  # image processor resize: shorter side
    longest_edge: int = field(default=1333, metadata=_range(32))  # image processor resize: cap on the longer side
    train_scale_min: float = field(default=0.6, metadata=_range(0, 1, lo_open=True))  # training resize: each image's shortest edge is drawn from train_scale_min..1 x shortest_edge in steps of 0.04, longest <= longest_edge (both references: 480-800 step 32 at 800; another shortest_edge scales them, teacher.dino.scales); 1 = shortest_edge only
    train_crop: float = field(default=0.5, metadata=_range(0, 1))  # probability of the references' crop branch before that resize: a window of 384-600 px at a shortest edge of 400/500/600 (at 800, scaled likewise); 0 = off
    box_threshold: float = field(default=0.25, metadata=_range(0, 1))  # labeling (predict): min box score
    text_threshold: float = field(default=0.25, metadata=_range(0, 1))  # labeling decode: min class score (its best token)


# Named LoRA targets, usable as (or joined with "+" into) dino.lora_targets / sam.lora_targets:
# the one place each module-name pattern is written.
# SAM presets, per family: (SAM (segment-anything), SAM 2.1 (transformers' Sam2Model)). The two
# name their modules apart (image_encoder.blocks / vision_encoder.backbone.blocks, out_proj /
# o_proj, lin1 / proj_in), so a preset is the alternation of both and, on either model, picks
# that model's own modules: sam.lora_targets keeps its meaning when sam.model changes family.
_SAM_DECODER_MLPS = r"(proj_in|layers\.\d+|proj_out)"  # SAM 2's FeedForward: in, hidden, out
SAM_LORA_PRESETS: dict[str, tuple[str, str]] = {
    # image encoder attention: the fused qkv projection of every block
    "sam-encoder-qkv": (
        r"image_encoder\.blocks\.\d+\.attn\.qkv",
        r"vision_encoder\.backbone\.blocks\.\d+\.attn\.qkv",
    ),
    # image encoder attention: the output projection of every block (join: "...-qkv+...-proj")
    "sam-encoder-proj": (
        r"image_encoder\.blocks\.\d+\.attn\.proj",
        r"vision_encoder\.backbone\.blocks\.\d+\.attn\.proj",
    ),
    # mask decoder attention only: decoder-only mode (image embeddings cached once)
    "sam-decoder-attention": (
        r"mask_decoder\.transformer\.layers\.\d+\.\w+\.(q_proj|k_proj|v_proj|out_proj)",
        r"mask_decoder\.transformer\.layers\.\d+\.\w+\.(q_proj|k_proj|v_proj|o_proj)",
    ),
    # every linear layer of the mask decoder: its attention (the final token-to-image one too),
    # MLPs, mask hypernetworks and IoU head (decoder-only mode on its own, as the one above);
    # not SAM 2's object-score head, which box / click prompting on images never reads
    "sam-decoder-linear": (
        r"mask_decoder\.(transformer\..*_proj|transformer\.layers\.\d+\.mlp\.lin[12]|output_hypernetworks_mlps\.\d+\.layers\.\d+|iou_prediction_head\.layers\.\d+)",
        r"mask_decoder\.(transformer\..*_proj|transformer\.layers\.\d+\.mlp\.(proj_in|proj_out)|output_hypernetworks_mlps\.\d+\."
        + _SAM_DECODER_MLPS
        + r"|iou_prediction_head\."
        + _SAM_DECODER_MLPS
        + ")",
    ),
}
LORA_PRESETS: dict[str, str] = {
    name: "|".join(f"(?:{p})" for p in patterns) for name, patterns in SAM_LORA_PRESETS.items()
}


def lora_pattern(targets: str | Sequence[str]) -> str | list[str]:
    """``targets`` with preset names expanded: ``"sam-encoder-qkv+sam-decoder-attention"`` ->
    one regex matching either; any other string is a regex (full match), a list is names."""
    if not isinstance(targets, str):
        return list(targets)
    parts = targets.split("+")
    if all(p in LORA_PRESETS for p in parts):
        return "|".join(f"(?:{LORA_PRESETS[p]})" for p in parts)
    return targets


@dataclass(frozen=True)
class SamParams:
    model: str = "vit_b"  # SAM: vit_b, vit_l, vit_h (Meta's checkpoints, cached + sha256-checked), a local .pth, tiny-random or tiny-pretrained; SAM 2.1: facebook/sam2.1-hiera-tiny|small|base-plus|large (hub, transformers), a local save_pretrained folder, or tiny-random-sam2 (docs/SAM.md)
    lora_targets: str | list[str] = "sam-encoder-qkv"  # preset names joined by "+" (sam-encoder-qkv, sam-encoder-proj, sam-decoder-attention or sam-decoder-linear: decoder-only mode, embeddings cached; each names the same layers in SAM and SAM 2), a regex (full match) or a list of names
    train_decoder: bool = False  # train the mask decoder fully (saved beside the adapter; SAM 2: all but conv_s0/conv_s1, which project the cached high-res features)
    box_jitter: float = field(default=0.1, metadata=_range(0, 1))  # training box noise, fraction of the box's width/height per side
    box_jitter_max: float = field(default=20.0, metadata=_range(0))  # ... and at most this many pixels of the model's input frame (SAM paper: 10 %, max 20 px)
    max_prompts: int = field(default=16, metadata=_range(1))  # prompts per image per step (sampled, seeded)
    point_prompts: float = field(default=0.1, metadata=_range(0, 1))  # share of training prompts that are one click inside the mask instead of its box (SAM paper: 0.5; 0.1 keeps box mIoU, docs/SAM.md); 0 = boxes only
    correction_points: int = field(default=1, metadata=_range(0, 8))  # rounds that add a click from the error region of the previous mask, each with its own loss (SAM paper: 8); 0 = first prompts only
    multimask: bool = False  # false: SAM's single-mask output, right for a box (more than one point); true: best of 3 candidates
    focal_weight: float = field(default=20.0, metadata=_range(0))  # loss = 20 focal + 1 dice + 1 IoU-prediction MSE (SAM paper)
    dice_weight: float = field(default=1.0, metadata=_range(0))  # weight of the dice loss
    iou_weight: float = field(default=1.0, metadata=_range(0))  # weight of the IoU-prediction MSE
    focal_alpha: float = field(default=0.25, metadata=_range(0, 1))  # focal loss alpha
    focal_gamma: float = field(default=2.0, metadata=_range(0))  # focal loss gamma
    embedding_cache_gib: float = field(default=32.0, metadata=_range(0))  # bound of the decoder-only embedding cache (per image: 4 MiB for vit_*, 16 MiB for SAM 2.1 with its high-res maps), least recently used evicted; `teacher prune-cache`


MAX_ADAPTER_SCALES = 16  # evaluate.adapter_scales: each scale not 0 or 1 is a pass over the test split


@dataclass(frozen=True)
class EvaluateParams:
    score_threshold: float = field(default=0.05, metadata=_range(0, 1))  # keep detections scoring at least this for AP (low: AP sweeps all scores)
    text_threshold: float = field(default=0.05, metadata=_range(0, 1))  # min class-token score of the labeling decode behind segm/* (low, as score_threshold; dino.text_threshold is predict's)
    nms_iou: float = field(default=0.7, metadata=_range(0, 1))  # per-class NMS IoU; 1 disables
    max_detections: int = field(default=100, metadata=_range(1))  # per image, as COCO's AR@100
    gallery_images: int = field(default=6, metadata=_range(0))  # test images drawn with predictions beside ground truth
    base: bool = True  # also score the pretrained models without adapters (base/..., gain/...); retention needs them
    retention_classes: tuple[str, ...] | None = None  # class names whose base-model detections on the test images are the forgetting reference (retention/box/*); null = the COCO-80 names; the dataset's own classes are always left out; [] = no retention
    retention_threshold: float = field(default=0.3, metadata=_range(0, 1))  # a base-model detection of a retention class scoring at least this is a reference box
    retention_data: str | None = None  # optional labelled retention set (COCO json of other classes): true box AP there for base and fine-tuned (retention/true/...); null = none
    retention_images: str | None = None  # folder that retention_data's file_name is relative to; null = the json's folder
    adapter_scales: tuple[float, ...] = (0.0, 0.5, 1.0)  # adapter scales evaluated (scale/<s>/...) and plotted (plots/tradeoff): 0 = base, 1 = as trained; 1 to 16 scales, each >= 0; [1.0] = no extra pass

    def __post_init__(self) -> None:
        n = len(self.adapter_scales)
        if not 1 <= n <= MAX_ADAPTER_SCALES:
            raise ParamsError(
                f"evaluate.adapter_scales: {n} scales; give 1 to {MAX_ADAPTER_SCALES} (each is "
                "a pass over the test split). [1.0] scores the adapters as trained only: it "
                "reuses the adapted pass and costs nothing"
            )
        bad = [s for s in self.adapter_scales if not (math.isfinite(s) and s >= 0)]
        if bad:
            raise ParamsError(
                f"evaluate.adapter_scales: {bad} not allowed; each scale must be a finite "
                "number >= 0 (0 = the base models, 1 = the adapters as trained)"
            )
        # floats, each once, in order (-0.0 becomes 0.0: one key per scale)
        scales = tuple(dict.fromkeys(float(s) + 0.0 for s in self.adapter_scales))
        object.__setattr__(self, "adapter_scales", scales)


@dataclass(frozen=True)
class LabelParams:
    score_threshold: float = field(default=0.2, metadata=_range(0, 1))  # teacher detections kept in data/teacher_labels.json (student.min_score picks which train)
    nms_iou: float = field(default=0.5, metadata=_range(0, 1))  # per-class NMS IoU; 1 disables (0.5 halves duplicate pre-labels against 0.7 for < 1 point of recall: docs/LABELING.md)
    agnostic_nms_iou: float = field(default=0.8, metadata=_range(0, 1))  # then NMS across classes: of two boxes overlapping above this IoU, whatever their classes, the lower-scoring goes (one object named twice); 1 disables (nested classes such as car / vehicle)
    max_detections: int = field(default=100, metadata=_range(1))  # per image
    batch_size: int = field(default=4, metadata=_range(1))  # images per Grounding DINO forward
    adapter_scale: float = field(default=1.0, metadata=_range(0))  # both teachers' adapters at this scale (0 = base models, 1 = as trained); pick it from evaluate's tradeoff plot
    processes: int = field(default=1, metadata=_range(1))  # data-parallel labeling processes on this machine (one per GPU; on CPU each takes its share of the cores); accelerate launch / torchrun runs one per rank instead
    shard_size: int = field(default=1000, metadata=_range(1))  # images per shard: each is written when done, and a rerun after a crash labels only the shards not written


@dataclass(frozen=True)
class StudentParams:
    model: str = "auto"  # auto: the smallest RF-DETR for the data (Roboflow/rf-detr-seg-nano with masks, Roboflow/rf-detr-nano without); a hub id, a local save_pretrained folder, or tiny-random
    revision: str = "main"  # hub revision (branch, tag or commit) to pin
    resolution: int = field(default=0, metadata=_range(0))  # square input side in px, a multiple of the backbone's patch size x windows; 0 = the model's own (384 nano, 312 seg-nano, 64 tiny-random)
    teacher_weight: float = field(default=0.5, metadata=_range(0))  # loss weight of teacher-labeled pool images relative to human-labeled ones; 0 = human labels alone
    min_score: float = field(default=0.3, metadata=_range(0, 1))  # teacher detections scoring below this are not used as labels
    score_threshold: float = field(default=0.3, metadata=_range(0, 1))  # teacher predict --student: min detection score
    max_detections: int = field(default=100, metadata=_range(1))  # per image, highest scores first
    lr: float | None = field(default=None, metadata=_range(0, lo_open=True))  # peak AdamW learning rate of the heads and projector (rf-detr: 1e-4); the decoder trains at lr x component_decay; null = train.lr
    lr_encoder: float | None = field(default=None, metadata=_range(0, lo_open=True))  # the ViT backbone's peak lr before layer decay (rf-detr: 1.5e-4); null = 1.5 x student.lr
    layer_decay: float = field(default=0.8, metadata=_range(0, 1, lo_open=True))  # backbone lr x this per ViT layer below the top (rf-detr's lr_vit_layer_decay)
    component_decay: float = field(default=0.7, metadata=_range(0, 1, lo_open=True))  # decoder lr x this, backbone lr x its square (rf-detr's lr_component_decay)
    clip_norm: float = field(default=0.1, metadata=_range(0))  # the student's max grad norm, replaces train.clip_norm (rf-detr: 0.1); 0 disables
    ema_decay: float = field(default=0.993, metadata=_range(0, 1))  # EMA of the weights (rf-detr: 0.993); validation keeps the better of EMA and trained weights; 0 = no EMA
    ema_tau: float = field(default=100, metadata=_range(0))  # EMA warm-up in optimizer steps: decay x (1 - exp(-step / tau)) (rf-detr: 100); 0 = no warm-up
    ignore_score: float = field(default=0.2, metadata=_range(0, 1))  # teacher detections scoring in [ignore_score, min_score) are ignore regions: neither object nor background for the student; = min_score: none
    score_weight: bool = True  # weigh each teacher label's class loss by the teacher's score (false: every kept label at weight 1)


# fmt: on
# params.yaml, as written by render_yaml: sections in this order, "seed" where it stands.
YAML_HEADER = """\
# Every knob of the pipeline. `dvc exp run -S section.key=value` changes one for an experiment.
# Unknown keys, wrong types and out-of-range values are errors. Generated from the defaults and
# comments in src/teacher/core/params.py (`python -m teacher.core.params > params.yaml`); a test keeps the
# two equal, so change a default or a comment there.
"""
YAML_ORDER = (
    "data",
    "seed",
    "validate",
    "split",
    "evaluate",
    "lora",
    "train",
    "augment",
    "dino",
    "sam",
    "label",
    "student",
)
YAML_BANNERS = {  # a comment line above a section
    "lora": "training (shared by train_dino and train_sam)",
    "dino": "Grounding DINO",
    "sam": "SAM",
    "label": "the student: teachers label data.unlabeled, RF-DETR trains on human + teacher labels",
}
SEED_DEFAULT = 0
SEED_COMMENT = "every random choice (split, LoRA init, sampling, augmentation) follows it"

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
    "label": LabelParams,
    "student": StudentParams,
}


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):  # a tuple field is a YAML list (frozen: kept as a tuple)
        return f"list of {_type_name(get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, get_args(tp)[0]) for v in value)
    if origin is tuple:  # tuple[X, ...]: a YAML list, or the tuple default
        return isinstance(value, (list, tuple)) and all(_matches(v, get_args(tp)[0]) for v in value)
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


def field_comments(cls: type) -> dict[str, str]:
    """Each field's ``# comment`` in ``cls``'s source, by name: the one trailing its first line,
    else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = {
        node.target.id: node.lineno
        for node in typing.cast(ast.ClassDef, ast.parse(source).body[0]).body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    tokens = [
        tok
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    comments = {tok.start[0]: tok.string.lstrip("# ").rstrip() for tok in tokens}
    # only comment lines count above a field: not the previous field's trailing comment
    whole = {
        tok.start[0]: comments[tok.start[0]] for tok in tokens if tok.line.lstrip().startswith("#")
    }
    return {name: comments.get(line) or _comment_above(whole, line) for name, line in lines.items()}


def _comment_above(comments: dict[int, str], line: int) -> str:
    """The whole-line comments right above ``line``, joined (a field whose comment is long)."""
    block: list[str] = []
    while line - 1 in comments:
        line -= 1
        block.insert(0, comments[line])
    return " ".join(block)


def _yaml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000)
        .strip()
        .removesuffix("\n...")
        .removesuffix("...")
        .strip()
    )


def _yaml_line(key: str, value: Any, comment: str, *, indent: str) -> str:
    text = f"{indent}{key}: {_yaml_value(value)}"
    return f"{text.ljust(24)}  # {comment}" if comment else text


def render_yaml() -> str:
    """params.yaml with every default and comment of the section dataclasses (the committed file)."""
    out = [YAML_HEADER]
    for name in YAML_ORDER:
        if name in YAML_BANNERS:
            out.append(f"# --- {YAML_BANNERS[name]} ".ljust(99, "-"))
        if name == "seed":
            out += [_yaml_line("seed", SEED_DEFAULT, SEED_COMMENT, indent=""), ""]
            continue
        cls = SECTIONS[name]
        comments = field_comments(cls)
        out.append(f"{name}:")
        out += [
            _yaml_line(f.name, f.default, comments[f.name], indent="  ")
            for f in dataclasses.fields(cls)
        ]
        out.append("")
    return "\n".join(out)


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
            f"{path}: unknown section(s) {', '.join(unknown)}; allowed: seed, {', '.join(SECTIONS)}"
        )
    try:
        params: dict[str, Any] = {name: parse_section(name, raw.get(name)) for name in SECTIONS}
        params["seed"] = parse_seed(raw.get("seed", SEED_DEFAULT))
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from e
    return params


def to_dict(section: Any) -> dict[str, Any]:
    """A section dataclass as a plain dict (tuples as lists), for saving beside outputs."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()
    }


if __name__ == "__main__":  # python -m teacher.core.params > params.yaml
    sys.stdout.write(render_yaml())
