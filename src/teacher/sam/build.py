"""The SAM registry and its weights, as segment-anything's ``build_sam.py``.

The variants (:data:`ARCHITECTURES`: builder arguments, no config files), :func:`build_sam`,
Meta's checkpoints (URL, download into the user's cache, sha256 check), the tiny presets, and
loading weights (a base model, or a base model with a LoRA adapter merged) into an architecture.

Model names: ``vit_b`` / ``vit_l`` / ``vit_h`` (Meta's checkpoints, downloaded once into the
user's cache (``~/.cache/teacher/sam``) and verified by sha256), a local ``.pth`` state dict,
``tiny-random`` or ``tiny-pretrained``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import Tensor, nn

from teacher.core.artifacts import PARAMS_FILE
from teacher.core.digest import file_sha256
from teacher.core.errors import TeacherError
from teacher.core.params import SamParams
from teacher.sam.model import BoxPromptSam

TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0  # fixed: train_sam and evaluate must build identical base weights
# the tiny architecture pretrained on teacher.dataset.synth's pretraining domain by scripts/pretrain_tiny.py
TINY_PRETRAINED = "tiny-pretrained"
TINY_PRETRAINED_WEIGHTS = (
    Path(__file__).resolve().parent.parent / "weights" / "sam-tiny-pretrained.safetensors"
)


@dataclass(frozen=True)
class Architecture:
    """Builder arguments of one SAM size (segment-anything's ``_build_sam`` plus the small preset)."""

    embed_dim: int  # image encoder width
    depth: int  # image encoder blocks
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024  # encoder input side (longest image side after resize)
    patch_size: int = 16
    window_size: int = 14
    prompt_dim: int = 256  # prompt / decoder width
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16


@dataclass(frozen=True)
class Checkpoint:
    url: str
    sha256: str


ARCHITECTURES: dict[str, Architecture] = {
    "vit_b": Architecture(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": Architecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": Architecture(1280, 32, 16, (7, 15, 23, 31)),
    # small, same modules: 128 px input, 8 px patches -> 16x16 embedding, 64x64 low-res masks
    TINY_RANDOM: Architecture(
        64,
        2,
        2,
        (1,),
        img_size=128,
        patch_size=8,
        window_size=8,
        prompt_dim=64,
        decoder_mlp_dim=128,
        decoder_heads=4,
        mask_in_chans=8,
    ),
}
ARCHITECTURES[TINY_PRETRAINED] = ARCHITECTURES[TINY_RANDOM]  # same modules, pretrained weights

_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"
# sha256 of Meta's files. Meta publishes only the URLs (the names carry the md5 prefix: 01ec64..,
# 0b3195.., 4b8939..); these digests are the ones computational-cell-analytics/micro-sam
# (micro_sam/util.py, _CHECKSUMS) checks every download against, and several other projects pin
# the same values. Not re-verified here: the build machines have no access to dl.fbaipublicfiles.com.
CHECKPOINTS: dict[str, Checkpoint] = {
    "vit_b": Checkpoint(
        f"{_BASE_URL}/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": Checkpoint(
        f"{_BASE_URL}/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": Checkpoint(
        f"{_BASE_URL}/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
}


def build_sam(arch: Architecture) -> BoxPromptSam:
    """A randomly initialised ``Sam`` of ``arch``, exactly as segment-anything's ``_build_sam``."""
    grid = arch.img_size // arch.patch_size
    encoder = ImageEncoderViT(
        depth=arch.depth,
        embed_dim=arch.embed_dim,
        img_size=arch.img_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=arch.num_heads,
        patch_size=arch.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=arch.global_attn_indexes,
        window_size=arch.window_size,
        out_chans=arch.prompt_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=arch.prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(arch.img_size, arch.img_size),
        mask_in_chans=arch.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2,
            embedding_dim=arch.prompt_dim,
            mlp_dim=arch.decoder_mlp_dim,
            num_heads=arch.decoder_heads,
        ),
        transformer_dim=arch.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=arch.prompt_dim,
    )
    sam = BoxPromptSam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_tiny_random() -> BoxPromptSam:
    """The ``tiny-random`` preset: identical weights on every call (fixed internal seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        return build_sam(ARCHITECTURES[TINY_RANDOM])


def load_tiny_pretrained() -> BoxPromptSam:
    """The ``tiny-pretrained`` preset: the committed weights (safetensors), no download."""
    from safetensors.torch import load_file

    if not TINY_PRETRAINED_WEIGHTS.is_file():
        raise TeacherError(
            f"sam.model={TINY_PRETRAINED}: {TINY_PRETRAINED_WEIGHTS} is missing; restore it "
            "from git or run `python scripts/pretrain_tiny.py sam`"
        )
    sam = build_sam(ARCHITECTURES[TINY_PRETRAINED])
    sam.load_state_dict(load_file(str(TINY_PRETRAINED_WEIGHTS)))
    return sam.eval()


def cache_dir() -> Path:
    """Where official checkpoints are kept: ``$XDG_CACHE_HOME/teacher/sam`` (``~/.cache/...``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "teacher" / "sam"


def fetch_checkpoint(name: str) -> Path:
    """Path of Meta's checkpoint ``name`` in the cache, downloading and verifying it once."""
    ckpt = CHECKPOINTS[name]
    path = cache_dir() / ckpt.url.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(ckpt.url, str(path), progress=True)
        except Exception as e:  # URLError, HTTPError, timeouts: all mean "not reachable"
            raise TeacherError(
                f"sam.model={name}: cannot download {ckpt.url} ({e}). Download it on a machine "
                f"with internet access and put it at {path}, or set sam.model to a local .pth "
                f"path, or to {TINY_RANDOM} for an offline demo."
            ) from e
    actual = file_sha256(path)
    if actual != ckpt.sha256:
        raise TeacherError(
            f"{path}: sha256 {actual} does not match {ckpt.sha256} of {ckpt.url}; the file is "
            f"corrupt or incomplete: delete it and run again to download it afresh."
        )
    return path


def infer_architecture(state_dict: dict[str, Tensor], source: str) -> Architecture:
    """The architecture whose encoder width, depth and input size match a state dict."""
    try:
        embed_dim = state_dict["image_encoder.patch_embed.proj.weight"].shape[0]
        grid = state_dict["image_encoder.pos_embed"].shape[1]
    except KeyError as e:
        raise TeacherError(
            f"{source}: not a segment-anything SAM state dict (missing {e}); save one with "
            f"torch.save(sam.state_dict(), path)"
        ) from None
    depth = 1 + max(
        int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")
    )
    for arch in ARCHITECTURES.values():
        if (arch.embed_dim, arch.depth, arch.img_size // arch.patch_size) == (
            embed_dim,
            depth,
            grid,
        ):
            return arch
    raise TeacherError(
        f"{source}: encoder width {embed_dim}, depth {depth}, grid {grid} match none of "
        f"{', '.join(ARCHITECTURES)}"
    )


def load_state_dict_file(path: Path) -> BoxPromptSam:
    """A ``Sam`` from a local ``.pth`` state dict (loaded with ``weights_only=True``)."""
    if not path.is_file():
        raise TeacherError(
            f"sam.model={path}: no such file; use vit_b, vit_l, vit_h, {TINY_RANDOM} or the "
            f"path of a SAM .pth state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherError(f"{path}: cannot load as a weights-only state dict: {e}") from e
    sam = build_sam(infer_architecture(state, str(path)))
    sam.load_state_dict(state)
    return sam.eval()


def load_base_sam(model: str) -> BoxPromptSam:
    """The pretrained (or preset) SAM named by ``sam.model``, in eval mode, on the CPU."""
    if model == TINY_RANDOM:
        return build_tiny_random()
    if model == TINY_PRETRAINED:
        return load_tiny_pretrained()
    if model in CHECKPOINTS:
        return load_state_dict_file(fetch_checkpoint(model))
    return load_state_dict_file(Path(model))


def load_sam(
    params: SamParams, *, adapter_dir: Path | None = None, adapter_scale: float = 1.0
) -> Sam:
    """SAM for inference: the base model, with the adapter of ``adapter_dir`` merged when given
    (at ``adapter_scale``: :func:`teacher.train.lora.load_adapter`)."""
    if adapter_dir is not None:
        check_adapter_base(Path(adapter_dir), params.model)
    sam = load_base_sam(params.model)
    if adapter_dir is None:
        return sam
    from teacher.train.lora import load_adapter  # lora imports peft: only when an adapter is used

    return load_adapter(sam, Path(adapter_dir), scale=adapter_scale).merge_and_unload().eval()


def check_adapter_base(adapter_dir: Path, model: str) -> None:
    """Refuse an adapter trained on another base model (its ``params.json`` names it)."""
    used = adapter_dir / PARAMS_FILE
    if not used.is_file():
        return
    try:
        doc = json.loads(used.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TeacherError(f"{used}: not JSON; re-run train_sam (dvc repro)") from None
    section = doc.get("sam") if isinstance(doc, dict) else None
    if not isinstance(section, dict) and section is not None:
        raise TeacherError(f"{used}: 'sam' is not a mapping of params; re-run train_sam")
    trained_on = (section or {}).get("model")
    if trained_on is not None and trained_on != model:
        raise TeacherError(
            f"{adapter_dir}: the adapter was trained on sam.model={trained_on}, but sam.model is "
            f"{model}; set sam.model to {trained_on} or re-run train_sam (dvc repro)"
        )
