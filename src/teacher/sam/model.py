"""Build/load SAM (Meta's segment-anything) and run it from box prompts.

``Sam.forward`` runs under ``no_grad``, so training and inference here call the image encoder,
prompt encoder and mask decoder directly. Geometry is segment-anything's own: images resized
with ``ResizeLongestSide`` (longest side = encoder size), normalised and padded by
``Sam.preprocess``; boxes go through ``ResizeLongestSide.apply_boxes`` into that input frame.

Model names: ``vit_b`` / ``vit_l`` / ``vit_h`` (Meta's checkpoints, downloaded once into the
user's cache (``~/.cache/teacher/sam``) and verified by sha256), a local ``.pth`` state dict, or ``tiny-random``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

from teacher.coco.boxes import xywh_to_xyxy
from teacher.core.artifacts import PARAMS_FILE
from teacher.core.digest import file_sha256
from teacher.core.errors import TeacherError
from teacher.core.params import SamParams

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


class BoxPromptSam(Sam):
    """``Sam`` whose ``forward`` is the differentiable box-prompt path (``Sam.forward`` is no_grad).

    Same modules and state-dict keys as ``Sam``; peft, DDP and accelerate wrap it as usual and
    training calls it through ``model(...)``. The image encoder runs under no_grad when none of
    its parameters is trainable (frozen encoder: no activations kept for backward).
    """

    def forward(  # type: ignore[override]
        self,
        *,
        boxes: list[Tensor],
        multimask: bool,
        images: list[Tensor] | None = None,
        embeddings: Tensor | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image (low-res logits (N, K, 4g, 4g), predicted IoU (N, K)).

        boxes: per image (N_i, 4) xyxy in the input frame; images: per image a resized
        3xhxw float tensor in 0..255 (see ``image_to_tensor``), or embeddings (B, C, g, g)
        computed beforehand (decoder-only training with cached embeddings).
        """
        if embeddings is None:
            if images is None:
                raise ValueError("BoxPromptSam.forward: pass images or embeddings")
            encoder_trains = any(p.requires_grad for p in self.image_encoder.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
                embeddings = embed_images(self, images)
        return [
            decode_boxes(self, emb, b.to(emb.device, torch.float32), multimask=multimask)
            for emb, b in zip(embeddings, boxes, strict=True)
        ]


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


def unwrap(model: nn.Module) -> Sam:
    """The ``Sam`` inside a peft / accelerate wrapper (or the model itself)."""
    while not isinstance(model, Sam):
        if hasattr(model, "module"):  # DDP
            model = cast(nn.Module, model.module)
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = cast(Any, model).get_base_model()
        else:
            raise TypeError(f"not a SAM model: {type(model).__name__}")
    return model


def input_size(sam: Sam) -> int:
    """Side of the square encoder input (1024 for Meta's models)."""
    return sam.image_encoder.img_size


def resize_image(image: np.ndarray, *, size: int) -> np.ndarray:
    """HxWx3 uint8 -> hxwx3 uint8 with longest side ``size`` (segment-anything's resize)."""
    return ResizeLongestSide(size).apply_image(image)


def resized_shape(height: int, width: int, *, size: int) -> tuple[int, int]:
    """(h, w) of an image of (height, width) after ``resize_image``."""
    return ResizeLongestSide.get_preprocess_shape(height, width, size)


def boxes_xyxy_to_input(
    boxes_xyxy: np.ndarray, original_hw: tuple[int, int], *, size: int
) -> np.ndarray:
    """(N, 4) xyxy boxes in original pixels -> the model's input frame, as ``apply_boxes``."""
    return ResizeLongestSide(size).apply_boxes(boxes_xyxy, original_hw)


def image_to_tensor(image: np.ndarray) -> Tensor:
    """hxwx3 uint8 (already resized) -> 3xhxw float32 in 0..255, ready for ``Sam.preprocess``."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()


def embed_images(sam: Sam, images: list[Tensor]) -> Tensor:
    """Image embeddings (B, C, g, g) of B resized 3xhxw images (normalised and padded here)."""
    batch = torch.stack([sam.preprocess(img.to(sam.device)) for img in images])
    return sam.image_encoder(batch)


def decode_boxes(
    sam: Sam, embedding: Tensor, boxes: Tensor, *, multimask: bool
) -> tuple[Tensor, Tensor]:
    """All box prompts of one image in one decoder call.

    embedding: (C, g, g) of one image; boxes: (N, 4) xyxy in the input frame.
    Returns low-res mask logits (N, K, 4g, 4g) and predicted IoU (N, K), K = 3 if multimask else 1.
    """
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    return sam.mask_decoder(
        image_embeddings=embedding.unsqueeze(0),
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


def upscale_logits(sam: Sam, low_res: Tensor) -> Tensor:
    """(N, K, 4g, 4g) low-res logits -> (N, K, S, S) in the padded input frame (bilinear)."""
    size = input_size(sam)
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)


def select_best(masks: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Per prompt the candidate with the highest predicted IoU: (N, K, h, w), (N, K) -> (N, h, w), (N,)."""
    best = scores.argmax(dim=1)
    rows = torch.arange(len(best), device=best.device)
    return masks[rows, best], scores[rows, best]


SAM_CHUNK = 16  # box prompts decoded and upscaled at a time: bounds the (chunk, H, W) float logits


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for box prompts: segment-anything's ``SamPredictor.set_image`` state.

    The encoder ran once (:func:`prepare_image`); :meth:`predict` answers any number of box
    prompts against the embedding, ``chunk`` boxes per decoder call, so the full-size float
    logits in memory are (chunk, H, W) however many boxes an image has.
    """

    sam: Sam  # the (unwrapped) model whose encoder computed ``embedding``
    embedding: Tensor  # (C, g, g) on the model's device
    original_size: tuple[int, int]  # (H, W) of the image as given
    input_size: tuple[int, int]  # (h, w) after ResizeLongestSide, before padding

    def boxes_to_input(self, boxes_xywh: np.ndarray) -> Tensor:
        """(N, 4) COCO xywh in original pixels -> (N, 4) float32 xyxy in the input frame."""
        xyxy = xywh_to_xyxy(np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4))
        size = input_size(self.sam)
        return torch.as_tensor(
            boxes_xyxy_to_input(xyxy, self.original_size, size=size),
            dtype=torch.float32,
            device=self.embedding.device,
        )

    @torch.no_grad()
    def predict_chunks(
        self, boxes_xywh: np.ndarray, *, multimask: bool = False, chunk: int = SAM_CHUNK
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Masks bool (n, H, W) and predicted IoU float32 (n,) of consecutive chunks of at most
        ``chunk`` boxes (COCO xywh, original pixels); multimask: the best of 3 by predicted IoU."""
        boxes = self.boxes_to_input(boxes_xywh)
        for start in range(0, len(boxes), chunk):
            low_res, scores = decode_boxes(
                self.sam, self.embedding, boxes[start : start + chunk], multimask=multimask
            )
            best, best_scores = select_best(low_res, scores)  # before upscaling: 1 mask per box
            logits = self.sam.postprocess_masks(best[:, None], self.input_size, self.original_size)
            yield (
                (logits[:, 0] > self.sam.mask_threshold).cpu().numpy(),
                best_scores.float().cpu().numpy(),
            )

    def predict(
        self, boxes_xywh: np.ndarray, *, multimask: bool = False, chunk: int = SAM_CHUNK
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks bool (N, H, W) and predicted IoU float32 (N,) of all boxes (see predict_chunks)."""
        parts = list(self.predict_chunks(boxes_xywh, multimask=multimask, chunk=chunk))
        if not parts:
            return np.zeros((0, *self.original_size), bool), np.zeros((0,), np.float32)
        return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])


@torch.no_grad()
def prepare_image(
    model: nn.Module,
    image: np.ndarray | None = None,
    *,
    embedding: Tensor | None = None,
    original_size: tuple[int, int] | None = None,
) -> PreparedImage:
    """Run the image encoder once on ``image`` (HxWx3 uint8 RGB), as ``SamPredictor.set_image``.

    Or wrap an ``embedding`` (C, g, g) computed before (the decoder-only cache) of an image of
    ``original_size`` (H, W): then the image is not needed.
    """
    sam = unwrap(model)
    size = input_size(sam)
    if embedding is None:
        if image is None:
            raise ValueError("prepare_image: pass an image, or an embedding and its original_size")
        original_size = (int(image.shape[0]), int(image.shape[1]))
        embedding = embed_images(sam, [image_to_tensor(resize_image(image, size=size))])[0]
    elif original_size is None:
        if image is None:
            raise ValueError("prepare_image: an embedding needs the image's original_size")
        original_size = (int(image.shape[0]), int(image.shape[1]))
    resized = resized_shape(*original_size, size=size)
    return PreparedImage(
        sam=sam,
        embedding=embedding.to(sam.device),
        original_size=(int(original_size[0]), int(original_size[1])),
        input_size=(int(resized[0]), int(resized[1])),
    )


def segment(
    model: nn.Module,
    image: np.ndarray,
    boxes_xywh: np.ndarray,
    *,
    multimask: bool = False,
    embedding: Tensor | None = None,
    chunk: int = SAM_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the objects in ``boxes_xywh`` (COCO xywh, absolute pixels) of one image.

    image: HxWx3 uint8 RGB. One embedding (``embedding`` (C, g, g) when already computed), the
    boxes decoded ``chunk`` at a time. multimask: False (default) uses SAM's single-mask output,
    what a box prompt calls for; True keeps the best of three by predicted IoU.
    Returns masks bool (N, H, W) and predicted IoU float32 (N,). No boxes: no encoder pass.
    """
    if len(np.asarray(boxes_xywh).reshape(-1, 4)) == 0:
        return np.zeros((0, *image.shape[:2]), bool), np.zeros((0,), np.float32)
    prepared = prepare_image(model, image, embedding=embedding)
    return prepared.predict(boxes_xywh, multimask=multimask, chunk=chunk)


def encoder_fingerprint(sam: Sam) -> str:
    """sha256 over the image encoder's weights and input size: names its embeddings in a cache."""
    digest = hashlib.sha256(str(input_size(sam)).encode())
    for name, tensor in sorted(unwrap(sam).image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]
