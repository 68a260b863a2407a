"""The SAM registry and its weights, as segment-anything's ``build_sam.py``; SAM 2.1's beside it.

The variants (:data:`ARCHITECTURES`: builder arguments, no config files), :func:`build_sam`,
Meta's checkpoints (URL, download into the user's cache, sha256 check), the tiny presets, and
loading weights (a base model, or a base model with a LoRA adapter merged) into an architecture.

Model names (``sam.model``), SAM: ``vit_b`` / ``vit_l`` / ``vit_h`` (Meta's checkpoints,
downloaded once into the user's cache (``~/.cache/teacher/sam``) and verified by sha256), a
local ``.pth`` state dict, ``tiny-random`` or ``tiny-pretrained``. SAM 2.1 (transformers'
``Sam2Model``, :mod:`teacher.sam.sam2`): a hub id of :data:`SAM2_HUB_IDS`
(``facebook/sam2.1-hiera-tiny`` ...), a local ``save_pretrained`` folder whose ``config.json``
says ``model_type: sam2``, or ``tiny-random-sam2``. Nothing else: an unknown name, or a folder
of another model, is an error, never a fallback to the other family.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    TwoWayTransformer,
)
from torch import Tensor, nn

from teacher.core.artifacts import PARAMS_FILE
from teacher.core.digest import file_sha256
from teacher.core.errors import TeacherError
from teacher.core.params import SamParams
from teacher.sam.model import BoxPromptSam

if TYPE_CHECKING:
    from teacher.sam.sam2 import BoxPromptSam2

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
            f"sam.model={path}: no such file or known name. SAM: vit_b, vit_l, vit_h, "
            f"{TINY_RANDOM}, {TINY_PRETRAINED} or the path of a SAM .pth state dict; SAM 2.1: "
            f"{', '.join(SAM2_HUB_IDS)}, {TINY_RANDOM_SAM2} or a save_pretrained folder"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherError(f"{path}: cannot load as a weights-only state dict: {e}") from e
    sam = build_sam(infer_architecture(state, str(path)))
    sam.load_state_dict(state)
    return sam.eval()


def load_base_sam(model: str) -> Any:
    """The pretrained (or preset) model named by ``sam.model``, in eval mode, on the CPU: a
    ``BoxPromptSam`` or, for a SAM 2 name (:func:`is_sam2`), a ``BoxPromptSam2``."""
    if model == TINY_RANDOM:
        return build_tiny_random()
    if model == TINY_PRETRAINED:
        return load_tiny_pretrained()
    if model in CHECKPOINTS:
        return load_state_dict_file(fetch_checkpoint(model))
    if is_sam2(model):
        return load_base_sam2(model)
    return load_state_dict_file(Path(model))


def load_sam(
    params: SamParams, *, adapter_dir: Path | None = None, adapter_scale: float = 1.0
) -> Any:
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


# --- SAM 2.1 (transformers) ----------------------------------------------------------------------

TINY_RANDOM_SAM2 = "tiny-random-sam2"
TINY_RANDOM_SAM2_SEED = 0  # fixed: train_sam and evaluate must build identical base weights


@dataclass(frozen=True)
class HieraSize:
    """One released SAM 2 image encoder: Hiera's arguments (transformers' conversion script,
    ``convert_sam2_to_hf.py``; SAM 2's ``sam2.1_hiera_*.yaml``). Prompt encoder, FPN neck and
    mask decoder are the same in every size (width 256, 1024 px input)."""

    hidden_size: int  # first stage width (doubles per stage)
    heads: int  # first stage heads (double per stage)
    blocks_per_stage: tuple[int, int, int, int]
    global_attention_blocks: tuple[int, int, int]
    window_background: int = 7  # window_positional_embedding_background_size
    window_size_per_stage: tuple[int, int, int, int] = (8, 4, 14, 7)


HIERA_SIZES: dict[str, HieraSize] = {
    "tiny": HieraSize(96, 1, (1, 2, 7, 2), (5, 7, 9)),
    "small": HieraSize(96, 1, (1, 2, 11, 2), (7, 10, 13)),
    "base-plus": HieraSize(112, 2, (2, 3, 16, 3), (12, 16, 20), window_background=14),
    "large": HieraSize(144, 2, (2, 6, 36, 4), (23, 33, 43), window_size_per_stage=(8, 4, 16, 8)),
}
# the hub ids sam.model takes for SAM 2 and SAM 2.1 (same image architecture per size)
SAM2_HUB_IDS: dict[str, str] = {
    f"facebook/sam{v}-hiera-{size}": size for v in ("2.1", "2") for size in HIERA_SIZES
}


def sam2_config(size: str) -> Any:
    """The ``Sam2Config`` of a released size (:data:`HIERA_SIZES`): the hub checkpoints'
    architecture, to build with random weights (benchmarks) without a download."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig

    h = HIERA_SIZES[size]
    widths = [h.hidden_size * 2**i for i in range(4)]
    backbone = Sam2HieraDetConfig(
        hidden_size=h.hidden_size,
        num_attention_heads=h.heads,
        embed_dim_per_stage=widths,
        num_attention_heads_per_stage=[h.heads * 2**i for i in range(4)],
        blocks_per_stage=list(h.blocks_per_stage),
        global_attention_blocks=list(h.global_attention_blocks),
        window_positional_embedding_background_size=[h.window_background] * 2,
        window_size_per_stage=list(h.window_size_per_stage),
    )
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=widths[::-1])
    return Sam2Config(vision_config=vision)


def tiny_sam2_config() -> Any:
    """SAM 2 at toy size, same modules: 128 px input, a 4-stage Hiera of widths 16..128
    (5 blocks), FPN width 64 -> an 8x8 image embedding, 32x32 low-res masks."""
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    backbone = Sam2HieraDetConfig(
        hidden_size=16,
        num_attention_heads=1,
        image_size=[128, 128],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 2],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[128, 64, 32, 16],
        backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        fpn_hidden_size=64,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=64, image_size=128, mask_input_channels=8)
    decoder = Sam2MaskDecoderConfig(
        hidden_size=64, mlp_dim=128, num_attention_heads=4, iou_head_hidden_dim=64
    )
    return Sam2Config(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )


def build_sam2(config: Any) -> BoxPromptSam2:
    """A randomly initialised ``BoxPromptSam2`` of ``config`` (torch's global RNG)."""
    from teacher.sam.sam2 import BoxPromptSam2

    return BoxPromptSam2(config).eval()


def build_tiny_random_sam2() -> BoxPromptSam2:
    """The ``tiny-random-sam2`` preset: identical weights on every call (fixed internal seed).

    Layers get torch's default initialisation (``reset_parameters``, as segment-anything's
    ``tiny-random``), not transformers' normal(0, 0.02): under that the random decoder's mask
    logits are ~1e-4 (SAM's tiny-random: ~3e-2), every mask is noise around the threshold and
    no test could see a gradient move it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SAM2_SEED)
        model = build_sam2(tiny_sam2_config())
        layers = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)
        for module in model.modules():
            if isinstance(module, layers):
                module.reset_parameters()
        return model


def is_sam2(model: str) -> bool:
    """Whether ``sam.model`` names SAM 2: the preset, a known hub id, or a local folder (its
    ``config.json`` decides which model it holds, :func:`load_sam2_folder`; a ``.pth`` file is
    SAM's)."""
    return model == TINY_RANDOM_SAM2 or model in SAM2_HUB_IDS or Path(model).is_dir()


def load_base_sam2(model: str) -> BoxPromptSam2:
    """SAM 2 named by ``sam.model`` (see :func:`is_sam2`), in eval mode, on the CPU."""
    if model == TINY_RANDOM_SAM2:
        return build_tiny_random_sam2()
    if Path(model).is_dir():
        return load_sam2_folder(Path(model))
    return load_sam2_hub(model)


def load_sam2_folder(folder: Path) -> BoxPromptSam2:
    """A ``save_pretrained`` folder of a SAM 2 model (``config.json``: ``model_type: sam2``)."""
    from teacher.sam.sam2 import BoxPromptSam2

    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise TeacherError(
            f"sam.model={folder}: a folder without a readable config.json; point sam.model at "
            f"a SAM 2 folder written by save_pretrained (e.g. by `teacher export`), a hub id "
            f"({', '.join(list(SAM2_HUB_IDS)[:4])}) or a SAM .pth file"
        ) from None
    if model_type != "sam2":
        raise TeacherError(
            f"sam.model={folder}: its config.json says model_type {model_type!r}, not a SAM 2 "
            f"checkpoint (model_type 'sam2'); point sam.model at a SAM 2 save_pretrained folder, "
            f"a SAM 2 hub id, or a SAM .pth file"
        )
    try:
        return BoxPromptSam2.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise TeacherError(
            f"sam.model={folder}: cannot load its SAM 2 weights ({str(e).splitlines()[0]}); "
            "write the folder again with save_pretrained"
        ) from e


def load_sam2_hub(model_id: str) -> BoxPromptSam2:
    """A SAM 2 hub checkpoint through ``Sam2Model.from_pretrained`` (the Hugging Face cache
    first; offline, a ``TeacherError`` saying how to supply it)."""
    from teacher.core.hub import hub_reachable
    from teacher.sam.sam2 import BoxPromptSam2

    try:
        return BoxPromptSam2.from_pretrained(model_id, local_files_only=True).eval()
    except OSError as e:
        err: OSError = e
    if hub_reachable():
        try:
            return BoxPromptSam2.from_pretrained(model_id).eval()
        except OSError as e:
            err = e
    raise TeacherError(
        f"sam.model {model_id!r} is not in the Hugging Face cache and the hub cannot be reached "
        f"({str(err).splitlines()[0]}). Fix: download it once where there is network "
        f"(python -c \"from transformers import Sam2Model; Sam2Model.from_pretrained('{model_id}')"
        f".save_pretrained('sam2')\") and set sam.model to that folder, or use sam.model: "
        f"{TINY_RANDOM_SAM2} for an offline run."
    ) from err
