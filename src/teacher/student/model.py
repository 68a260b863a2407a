"""RF-DETR (transformers) as the student: build, load, save, preprocess, decode.

``student.model`` names a hub id (``auto``: the smallest RF-DETR for the data kind,
``Roboflow/rf-detr-seg-nano`` when the data has instance masks, ``Roboflow/rf-detr-nano``
otherwise), a local ``save_pretrained`` folder, ``tiny-random``: the same architecture at toy
size built in code with a fixed seed (no download), or ``tiny-pretrained``: a small RF-DETR
pretrained here on the synthetic pretraining domain (committed, our stand-in for a
COCO-pretrained checkpoint). ``RfDetrForInstanceSegmentation`` when the
data has masks, ``RfDetrForObjectDetection`` otherwise.

Input: every image is resized (aspect not kept, as RF-DETR trains) to a square of
``resolution`` px and normalised with the ImageNet mean/std; boxes are normalised cxcywh, so the
resize does not change them. A trained student folder holds the transformers weights
(``config.json``, ``model.safetensors``) and ``student.json`` (:class:`StudentInfo`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import (
    RfDetrConfig,
    RfDetrDinov2Config,
    RfDetrForInstanceSegmentation,
    RfDetrForObjectDetection,
)

from teacher.coco.detections import Detections
from teacher.core.errors import TeacherError
from teacher.core.hub import hub_reachable
from teacher.core.params import StudentParams

TINY_RANDOM = "tiny-random"
TINY_PRETRAINED = "tiny-pretrained"
TINY_PRETRAINED_WEIGHTS = (
    Path(__file__).resolve().parent.parent / "weights" / "student-tiny-pretrained.safetensors"
)
TINY_PRETRAINED_RESOLUTION = 128
# the synthetic pretraining domain's classes (teacher.dataset.synth.PRETRAIN), its class rows
TINY_PRETRAINED_CLASSES = ("ring", "cross", "hexagon", "diamond", "pentagon", "arrow")
AUTO = "auto"
TINY_SEED = 20240614  # fixed: every stage builds identical tiny-random initial weights
TINY_RESOLUTION = 64
HUB_DEFAULTS = {False: "Roboflow/rf-detr-nano", True: "Roboflow/rf-detr-seg-nano"}  # masks -> id
INFO_FILE = "student.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StudentInfo:
    """What a student folder needs besides its weights (``student.json``)."""

    source: str  # student.model it was trained from (resolved: hub id, folder, tiny-random)
    masks: bool  # instance segmentation (RfDetrForInstanceSegmentation) or boxes only
    resolution: int  # square input side, px
    category_ids: tuple[int, ...]  # COCO category id of label index 0..N-1
    names: tuple[str, ...]  # class names, same order


def model_class(masks: bool) -> Any:
    """``RfDetrForInstanceSegmentation`` with masks, ``RfDetrForObjectDetection`` without."""
    return RfDetrForInstanceSegmentation if masks else RfDetrForObjectDetection


def resolve_name(model: str, *, masks: bool) -> str:
    """``student.model`` with ``auto`` replaced by the smallest RF-DETR of the data kind."""
    return HUB_DEFAULTS[masks] if model == AUTO else model


def small_config(*, names: Sequence[str], width: int, heads: int, image_size: int) -> RfDetrConfig:
    """RF-DETR at small size: a 4-layer ViT ``width`` wide with ``heads`` heads (patch 8, 2x2
    windows, ``image_size`` px), 2 decoder layers as wide, 30 queries in 3 groups."""
    backbone = RfDetrDinov2Config(
        hidden_size=width,  # type: ignore[call-arg]  # out_features: a kwarg of __post_init__
        num_hidden_layers=4,
        num_attention_heads=heads,
        mlp_ratio=2,
        patch_size=8,
        image_size=image_size,
        num_windows=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return RfDetrConfig(
        backbone_config=backbone,
        d_model=width,
        decoder_ffn_dim=2 * width,
        decoder_layers=2,
        decoder_self_attention_heads=heads,
        decoder_cross_attention_heads=heads,
        decoder_n_points=2,
        num_queries=30,
        group_detr=3,
        c2f_num_blocks=1,
        intermediate_size=2 * width,
        **FINE_TUNING,
        **label_config(names),
    )


def tiny_config(*, names: Sequence[str]) -> RfDetrConfig:
    """RF-DETR at toy size (``tiny-random``): :func:`small_config` 32 wide, 2 heads, 64 px."""
    return small_config(names=names, width=32, heads=2, image_size=TINY_RESOLUTION)


def tiny_pretrained_config(*, names: Sequence[str]) -> RfDetrConfig:
    """The ``tiny-pretrained`` student: :func:`small_config` 64 wide, 4 heads, 128 px,
    pretrained by ``scripts/pretrain_tiny.py student`` (:mod:`teacher.proving.student`)."""
    return small_config(names=names, width=64, heads=4, image_size=TINY_PRETRAINED_RESOLUTION)


def tiny_pretrained(*, masks: bool, names: Sequence[str]) -> nn.Module:
    """The committed ``tiny-pretrained`` weights (a segmenting RF-DETR; without masks its
    detector inside), class heads resized to ``names`` from the pretrained rows."""
    from safetensors.torch import load_file

    if not TINY_PRETRAINED_WEIGHTS.is_file():
        raise TeacherError(
            f"student.model={TINY_PRETRAINED}: {TINY_PRETRAINED_WEIGHTS} is missing; restore it "
            "from git (git checkout -- src/teacher/weights) or remake it with "
            "`python scripts/pretrain_tiny.py student`"
        )
    state = load_file(str(TINY_PRETRAINED_WEIGHTS))
    if not masks:  # RfDetrForInstanceSegmentation holds the detector as .model
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model = model_class(masks)(tiny_pretrained_config(names=TINY_PRETRAINED_CLASSES))
    model.load_state_dict(state)
    return reinitialize_class_heads(model, names)


# The released RF-DETR architectures the pipeline defaults to, as transformers' conversion script
# (convert_rf_detr_weights_to_hf.py) builds them: for benchmarks at real size without a download.
_VIT_SMALL = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "out_features": ["stage3", "stage6", "stage9", "stage12"],
    "patch_size": 16,
    "num_windows": 2,
    "image_size": 384,
}
ARCHITECTURES: dict[
    str, tuple[dict[str, Any], dict[str, Any], int]
] = {  # backbone, model, input side
    "rf-detr-nano": (_VIT_SMALL, {"decoder_layers": 2}, 384),
    "rf-detr-seg-nano": (
        {**_VIT_SMALL, "image_size": 312, "patch_size": 12, "num_windows": 1},
        {"decoder_layers": 4, "num_queries": 100, "class_loss_coefficient": 5.0},
        312,
    ),
}


def architecture_config(name: str, *, names: Sequence[str]) -> RfDetrConfig:
    """The config of a released RF-DETR size (:data:`ARCHITECTURES`), class heads for ``names``."""
    backbone, model, _ = ARCHITECTURES[name]
    base = {
        "d_model": 256,
        "num_queries": 300,
        "decoder_self_attention_heads": 8,
        "decoder_cross_attention_heads": 16,
        "decoder_n_points": 2,
    }
    return RfDetrConfig(
        backbone_config=RfDetrDinov2Config(**backbone), **{**base, **model, **label_config(names)}
    )


# rf-detr fine-tunes without dropout (main.py: --dropout 0, --drop_path 0); transformers'
# RfDetrConfig defaults to dropout 0.1 in the decoder. Applied to every student we build or load.
FINE_TUNING: dict[str, Any] = {"dropout": 0.0}


def label_config(names: Sequence[str]) -> dict[str, Any]:
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def _offline_error(name: str, revision: str, err: Exception) -> TeacherError:
    return TeacherError(
        f"student.model {name!r} (revision {revision!r}) is not a local folder, not in the Hugging "
        f"Face cache, and the hub cannot be reached ({str(err).splitlines()[0]}). Fix: download it "
        f"once where there is network (huggingface-cli download {name} --local-dir "
        f"weights/{name.split('/')[-1]}), copy the folder and set student.model to it in "
        f"params.yaml, or use student.model: {TINY_RANDOM}."
    )


def class_heads(model: nn.Module) -> list[nn.Linear]:
    """The class heads of an RF-DETR: the decoder's ``class_embed`` and one
    ``enc_out_class_embed`` per query group (two-stage proposals)."""
    inner: Any = model.model
    det: Any = inner if hasattr(inner, "class_embed") else model  # seg wraps detection
    return [det.class_embed, *det.model.enc_out_class_embed]


def reinitialize_class_heads(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """``model``'s class heads resized to ``names`` from its pretrained rows, as rf-detr's
    ``reinitialize_detection_head``: the rows are repeated until there are enough, and the
    first ``len(names)`` kept (weights and biases), not drawn at random. A pretrained head then
    starts with its calibrated background bias and features that already separate objects."""
    k = len(names)
    with torch.no_grad():
        for head in class_heads(model):
            n = head.weight.shape[0]
            repeats = -(-k // n)
            head.weight = nn.Parameter(head.weight.data.repeat(repeats, 1)[:k].clone())
            head.bias = nn.Parameter(head.bias.data.repeat(repeats)[:k].clone())
            head.out_features = k
    for key, value in label_config(names).items():
        setattr(model.config, key, value)
    return model


def _pretrained(name: str, *, revision: str, masks: bool, names: Sequence[str]) -> nn.Module:
    """A hub id or local folder, its class heads resized to ``names`` from the pretrained rows
    (:func:`reinitialize_class_heads`; cache first, fails fast offline)."""
    cls = model_class(masks)
    local = Path(name).is_dir()
    kwargs = {**FINE_TUNING, **({} if local else {"revision": revision})}
    try:
        return reinitialize_class_heads(
            cls.from_pretrained(name, local_files_only=True, **kwargs), names
        )
    except OSError as err:
        if local:
            raise TeacherError(
                f"student.model {name!r}: not an RF-DETR folder written by save_pretrained ({err})"
            ) from err
        if not hub_reachable():
            raise _offline_error(name, revision, err) from err
    try:
        return reinitialize_class_heads(
            cls.from_pretrained(name, local_files_only=False, **kwargs), names
        )
    except OSError as err:
        raise _offline_error(name, revision, err) from err


def default_resolution(name: str, model: Any) -> int:
    """The input side a model was trained at: tiny-random 64; else its image processor's size."""
    if name == TINY_RANDOM:
        return TINY_RESOLUTION
    if name == TINY_PRETRAINED:
        return TINY_PRETRAINED_RESOLUTION
    if (Path(name) / INFO_FILE).is_file():  # a student folder (a trained one, tiny-pretrained)
        return load_info(Path(name)).resolution
    from transformers import AutoImageProcessor

    try:
        size = AutoImageProcessor.from_pretrained(name, local_files_only=True).size
    except (OSError, ValueError) as err:
        raise TeacherError(
            f"student.model {name!r}: no image processor to read its input size "
            f"from ({str(err).splitlines()[0]}); set student.resolution"
        ) from err
    side = getattr(size, "height", None) or (size.get("height") if isinstance(size, dict) else None)
    if not side:
        raise TeacherError(
            f"student.model {name!r}: its image processor has no fixed square size "
            f"({size}); set student.resolution in params.yaml"
        )
    return int(side)


def check_resolution(model: Any, resolution: int, *, name: str) -> None:
    """The backbone cuts the image into patches and windows: the side must divide evenly."""
    bb = model.config.backbone_config
    step = bb.patch_size * bb.num_windows
    if resolution % step:
        lower = max(step, resolution // step * step)
        raise TeacherError(
            f"student.resolution {resolution} is not a multiple of {step} (patch size "
            f"{bb.patch_size} x {bb.num_windows} windows) for {name!r}; use "
            f"{lower} or {lower + step}"
        )


def build_student(
    params: StudentParams, *, names: Sequence[str], masks: bool
) -> tuple[nn.Module, int, str]:
    """The model to train, its input side and the resolved ``student.model``."""
    name = resolve_name(params.model, masks=masks)
    if name == TINY_RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = model_class(masks)(tiny_config(names=names))
    elif name == TINY_PRETRAINED:
        model = tiny_pretrained(masks=masks, names=names)
    else:
        model = _pretrained(name, revision=params.revision, masks=masks, names=names)
    resolution = params.resolution or default_resolution(name, model)
    check_resolution(model, resolution, name=name)
    return model, resolution, name


# --- a trained student folder --------------------------------------------------------------------


def save_student(model: Any, out_dir: Path, *, info: StudentInfo) -> None:
    """``out_dir``: transformers ``save_pretrained`` (safetensors) + ``student.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    doc = {**asdict(info), "category_ids": list(info.category_ids), "names": list(info.names)}
    (out_dir / INFO_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def load_info(model_dir: Path) -> StudentInfo:
    path = Path(model_dir) / INFO_FILE
    try:
        doc = json.loads(path.read_text())
        return StudentInfo(
            source=str(doc["source"]),
            masks=bool(doc["masks"]),
            resolution=int(doc["resolution"]),
            category_ids=tuple(int(c) for c in doc["category_ids"]),
            names=tuple(str(n) for n in doc["names"]),
        )
    except FileNotFoundError as e:
        raise TeacherError(
            f"{path}: not found; {model_dir} is not a trained student folder "
            "(run `dvc repro train_student`, or pass the folder it wrote)"
        ) from e
    except (ValueError, KeyError, TypeError) as e:
        raise TeacherError(f"{path}: damaged ({e}); re-run `dvc repro train_student`") from e


@dataclass
class Student:
    """A loaded student: ``forward(pixel_values) -> (logits, pred_boxes[, pred_masks])`` and its info.

    ``forward`` is a PyTorch module (:class:`StudentOutputs`) or an ONNX Runtime session wrapper
    (``teacher.student.onnx.OnnxStudent``): both take and return tensors of the same shapes.
    """

    forward: Callable[[Tensor], tuple[Tensor, ...]]
    info: StudentInfo


class StudentOutputs(nn.Module):
    """The model as a function of ``pixel_values`` (B, 3, R, R) only: ``(logits (B, Q, C),
    pred_boxes (B, Q, 4) cxcywh in [0, 1][, pred_masks (B, Q, R/4, R/4) logits])`` (what ONNX exports)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        out = self.model(pixel_values=pixel_values)
        masks = getattr(out, "pred_masks", None)
        return (out.logits, out.pred_boxes) + ((masks,) if masks is not None else ())


def load_student(model_dir: str | Path, *, device: torch.device | str = "cpu") -> Student:
    """A trained student folder as a :class:`Student` (eval mode, on ``device``)."""
    model_dir = Path(model_dir)
    info = load_info(model_dir)
    try:
        model = model_class(info.masks).from_pretrained(str(model_dir), local_files_only=True)
    except OSError as e:
        raise TeacherError(
            f"{model_dir}: cannot load the student weights ({e}); re-run `dvc repro train_student`"
        ) from e
    return Student(forward=StudentOutputs(model).to(device).eval(), info=info)


# --- tensors in, detections out --------------------------------------------------------------------


def preprocess(images: Sequence[np.ndarray], *, resolution: int) -> Tensor:
    """HxWx3 uint8 RGB images -> ``pixel_values`` (B, 3, R, R) float32: resized (bilinear,
    antialiased) to ``resolution`` squared, scaled to [0, 1], ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        x = nn.functional.interpolate(
            x[None],
            size=(resolution, resolution),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        out.append((x - mean) / std)
    return torch.stack(out) if out else torch.zeros((0, 3, resolution, resolution))


def decode(
    outputs: Sequence[Tensor],
    *,
    sizes: Sequence[tuple[int, int]],
    category_ids: Sequence[int],
    max_detections: int,
    score_threshold: float = 0.0,
) -> list[Detections]:
    """RF-DETR outputs -> per image ``Detections``: ``boxes`` (N, 4) COCO xywh px, ``scores``,
    ``category_ids`` (+ ``masks`` (N, H, W) bool when the outputs have mask logits).

    As RF-DETR's post-processing: sigmoid class scores, the top ``max_detections`` (query, class)
    pairs per image, boxes scaled to the image's ``sizes`` (width, height); masks upsampled
    (bilinear) to the image size and thresholded at logit 0.
    """
    logits, boxes = outputs[0].float(), outputs[1].float()
    masks = outputs[2].float() if len(outputs) > 2 else None
    prob = logits.sigmoid()
    b, q, c = prob.shape
    scores, flat = prob.reshape(b, -1).topk(min(max_detections, q * c), dim=1)
    query, label = flat // c, flat % c
    cats = np.asarray(category_ids, dtype=np.int64)
    dets = []
    for i, (w, h) in enumerate(sizes):
        keep = scores[i] >= score_threshold
        qi = query[i][keep]
        cxcywh = boxes[i, qi]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        xywh = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, 2:]], dim=1) * scale
        xywh[:, 0::2] = xywh[:, 0::2].clamp(0, w)
        xywh[:, 1::2] = xywh[:, 1::2].clamp(0, h)
        xywh[:, 2] = xywh[:, 2].clamp(max=w - xywh[:, 0])
        xywh[:, 3] = xywh[:, 3].clamp(max=h - xywh[:, 1])
        image_masks = None
        if masks is not None:
            image_masks = upsample_masks(masks[i, qi], height=h, width=w)
        dets.append(
            Detections(
                xywh.numpy(), scores[i][keep].numpy(), cats[label[i][keep].numpy()], image_masks
            )
        )
    return dets


MASK_CHUNK_PIXELS = 1 << 25  # float32 pixels upsampled at once (128 MiB), as SAM's scoring


def upsample_masks(logits: Tensor, *, height: int, width: int) -> np.ndarray:
    """(N, r, r) mask logits -> (N, height, width) bool: bilinear upsampling, threshold at 0,
    a few masks at a time so that the float image-size copies stay under
    :data:`MASK_CHUNK_PIXELS` (100 masks of a 4000x3000 image would take 4.8 GB at once)."""
    out = np.zeros((len(logits), height, width), dtype=bool)
    step = max(1, MASK_CHUNK_PIXELS // max(height * width, 1))
    for start in range(0, len(logits), step):
        up = nn.functional.interpolate(
            logits[start : start + step][None].float(),
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0]
        out[start : start + step] = (up > 0).numpy()
    return out


@torch.no_grad()
def predict(
    student: Student,
    images: Sequence[np.ndarray],
    *,
    max_detections: int,
    score_threshold: float = 0.0,
) -> list[Detections]:
    """The student on a batch of HxWx3 uint8 images: per image the decoded detections."""
    info = student.info
    device = _device_of(student.forward)
    raw = student.forward(preprocess(images, resolution=info.resolution).to(device))
    outputs = [o.detach().cpu() for o in raw]
    sizes = [(int(im.shape[1]), int(im.shape[0])) for im in images]
    return decode(
        outputs,
        sizes=sizes,
        category_ids=info.category_ids,
        max_detections=max_detections,
        score_threshold=score_threshold,
    )


def _device_of(forward: Any) -> torch.device:
    if isinstance(forward, nn.Module):
        return next(forward.parameters()).device
    return torch.device("cpu")


def _constant(table: Tensor) -> Callable[..., Tensor]:
    return lambda embeddings, height, width: table


@contextmanager
def fixed_position_embeddings(model: Any, resolution: int) -> Iterator[None]:
    """Within: the ViT position embeddings are a constant for ``resolution`` px inputs.

    transformers interpolates them on every traced call (bicubic with antialiasing), an operator
    ONNX has no export for. At a fixed input size the interpolation is a constant: computed once
    here, exactly as the model computes it eagerly, so the exported graph gives the same outputs.
    """
    embeddings: list[Any] = [
        m for m in model.modules() if type(m).__name__.endswith("Dinov2Embeddings")
    ]
    saved = []
    for emb in embeddings:
        n = (resolution // emb.patch_size) ** 2
        with torch.no_grad():
            table = emb.interpolate_pos_encoding(torch.zeros(1, n + 1, 1), resolution, resolution)
        saved.append(emb.__dict__.get("interpolate_pos_encoding"))
        emb.interpolate_pos_encoding = _constant(table.detach())
    try:
        yield
    finally:
        for emb, old in zip(embeddings, saved, strict=True):
            if old is None:
                del emb.interpolate_pos_encoding
            else:
                emb.interpolate_pos_encoding = old
