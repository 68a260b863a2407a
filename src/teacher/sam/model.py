"""SAM's differentiable box-prompt path and its input geometry, shared by training and prediction;
the one interface both SAM families (SAM here, SAM 2 in :mod:`teacher.sam.sam2`) give the rest.

``Sam.forward`` runs under ``no_grad``, so :class:`BoxPromptSam` (built by
:mod:`teacher.sam.build`) overrides it, and training and inference call the image encoder,
prompt encoder and mask decoder directly. Geometry is segment-anything's own: images resized
with ``ResizeLongestSide`` (longest side = encoder size), normalised and padded by
``Sam.preprocess``; boxes go through ``ResizeLongestSide.apply_boxes`` into that input frame.

The family interface (methods of :class:`BoxPromptSam` and
:class:`teacher.sam.sam2.BoxPromptSam2`, so predictor, data, task, serve and export never
branch on the family): ``sam_family``; ``geometry`` (:mod:`teacher.sam.geometry`);
``embed`` (images -> an :data:`teacher.sam.embedding.Embedding`); ``decode`` (one image's
embedding + boxes / points -> low-res logits and predicted IoU); ``postprocess`` (low-res
logits -> the original size); ``mask_threshold``; ``encoder_parameters`` / ``encoder_state`` /
``encoder_blocks`` (what makes the embedding: freezing, cache fingerprints, checkpointing);
``decoder_modules`` (what ``sam.train_decoder`` trains fully).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from teacher.sam.embedding import Embedding
from teacher.sam.geometry import SamGeometry


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
        embeddings = self.embed(images=images, embeddings=embeddings)
        return [
            decode_boxes(self, emb, b.to(emb.device, torch.float32), multimask=multimask)
            for emb, b in zip(embeddings, boxes, strict=True)
        ]

    def embed(
        self, *, images: list[Tensor] | None = None, embeddings: Tensor | None = None
    ) -> Tensor:
        """(B, C, g, g): ``embeddings`` as given (the decoder-only cache), or the encoder on
        ``images`` (resized 3xhxw float 0..255), under no_grad when no encoder parameter trains."""
        if embeddings is not None:
            return embeddings
        if images is None:
            raise ValueError("BoxPromptSam: pass images or embeddings")
        encoder_trains = any(p.requires_grad for p in self.image_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            return embed_images(self, images)

    # --- the family interface (teacher.sam.sam2.BoxPromptSam2 has the same) ---------------------

    sam_family = "sam"
    decoder_modules = "mask_decoder"  # trained fully by sam.train_decoder

    @property
    def geometry(self) -> SamGeometry:
        return SamGeometry(self.image_encoder.img_size)

    def decode(
        self,
        embedding: Tensor,
        *,
        boxes: Tensor | None = None,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        multimask: bool,
    ) -> tuple[Tensor, Tensor]:
        """N prompts of one image in one decoder call: a box each, P points each, or both.

        embedding: (C, g, g); boxes: (N, 4) xyxy in the input frame; points: (N, P, 2) x, y in
        the input frame (pixel indexes: the prompt encoder adds 0.5) with labels (N, P) int (1
        positive, 0 negative, -1 not a point). Returns low-res logits (N, K, 4g, 4g) and
        predicted IoU (N, K), K = 3 if multimask else 1.
        """
        pairs = None
        if points is not None:
            if labels is None:
                raise ValueError("decode: points need their labels")
            pairs = (points.to(embedding.device, torch.float32), labels.to(embedding.device))
        sparse, dense = self.prompt_encoder(points=pairs, boxes=boxes, masks=None)
        return self.mask_decoder(
            image_embeddings=embedding.unsqueeze(0),
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    def postprocess(
        self, logits: Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int]
    ) -> Tensor:
        """(N, K, 4g, 4g) low-res logits -> (N, K, H, W) at the original size
        (``Sam.postprocess_masks``: upscale to the padded input, crop, resize)."""
        return self.postprocess_masks(logits, input_hw, original_hw)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the image embedding depends on."""
        return self.image_encoder.parameters()

    def encoder_state(self) -> dict[str, Tensor]:
        return self.image_encoder.state_dict()

    def encoder_blocks(self) -> nn.ModuleList:
        """The encoder's transformer blocks (activation checkpointing)."""
        return self.image_encoder.blocks


def sam_classes() -> tuple[type, ...]:
    """The model classes of both families (SAM 2's module imports transformers: on first use)."""
    from teacher.sam.sam2 import BoxPromptSam2

    return (Sam, BoxPromptSam2)


def unwrap(model: nn.Module) -> Any:
    """The SAM model of either family (``BoxPromptSam`` or ``BoxPromptSam2``) inside a peft /
    accelerate wrapper (or the model itself)."""
    classes = sam_classes()
    while not isinstance(model, classes):
        if hasattr(model, "module"):  # DDP
            model = cast(nn.Module, model.module)
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = cast(Any, model).get_base_model()
        else:
            raise TypeError(f"not a SAM model: {type(model).__name__}")
    return model


def input_size(sam: nn.Module) -> int:
    """Side of the square encoder input (1024 for Meta's models and SAM 2's), either family."""
    return int(unwrap(sam).geometry.size)


def resize_image(image: np.ndarray, *, size: int) -> np.ndarray:
    """HxWx3 uint8 -> hxwx3 uint8 with longest side ``size`` (segment-anything's resize)."""
    return SamGeometry(size).resize_image(image)


def resized_shape(height: int, width: int, *, size: int) -> tuple[int, int]:
    """(h, w) of an image of (height, width) after ``resize_image``."""
    return SamGeometry(size).resized_shape(height, width)


def boxes_xyxy_to_input(
    boxes_xyxy: np.ndarray, original_hw: tuple[int, int], *, size: int
) -> np.ndarray:
    """(N, 4) xyxy boxes in original pixels -> the model's input frame, as ``apply_boxes``."""
    return SamGeometry(size).boxes_to_input(boxes_xyxy, original_hw)


def points_xy_to_input(
    points_xy: np.ndarray, original_hw: tuple[int, int], *, size: int
) -> np.ndarray:
    """(..., 2) x, y points in original pixels -> the model's input frame, as ``apply_coords``."""
    return SamGeometry(size).points_to_input(points_xy, original_hw)


def image_to_tensor(image: np.ndarray) -> Tensor:
    """hxwx3 uint8 (already resized) -> 3xhxw float32 in 0..255, ready for ``Sam.preprocess``."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()


def embed_images(sam: Sam, images: list[Tensor]) -> Tensor:
    """Image embeddings (B, C, g, g) of B resized 3xhxw images (normalised and padded here)."""
    batch = torch.stack([sam.preprocess(img.to(sam.device)) for img in images])
    return sam.image_encoder(batch)


def decode_boxes(
    sam: Any, embedding: Embedding, boxes: Tensor, *, multimask: bool
) -> tuple[Tensor, Tensor]:
    """All box prompts of one image in one decoder call.

    embedding: (C, g, g) of one image; boxes: (N, 4) xyxy in the input frame.
    Returns low-res mask logits (N, K, 4g, 4g) and predicted IoU (N, K), K = 3 if multimask else 1.
    """
    return decode_prompts(sam, embedding, boxes=boxes, multimask=multimask)


def decode_prompts(
    sam: Any,
    embedding: Embedding,
    *,
    boxes: Tensor | None = None,
    points: Tensor | None = None,
    labels: Tensor | None = None,
    multimask: bool,
) -> tuple[Tensor, Tensor]:
    """``sam.decode``, either family: N prompts of one image in one decoder call
    (:meth:`BoxPromptSam.decode`). Returns low-res logits (N, K, 4g, 4g) and predicted IoU (N, K)."""
    return sam.decode(embedding, boxes=boxes, points=points, labels=labels, multimask=multimask)


def upscale_logits(sam: Sam, low_res: Tensor) -> Tensor:
    """(N, K, 4g, 4g) low-res logits -> (N, K, S, S) in the padded input frame (bilinear)."""
    size = input_size(sam)
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)


def select_best(masks: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Per prompt the candidate with the highest predicted IoU: (N, K, h, w), (N, K) -> (N, h, w), (N,)."""
    best = scores.argmax(dim=1)
    rows = torch.arange(len(best), device=best.device)
    return masks[rows, best], scores[rows, best]


def encoder_fingerprint(sam: nn.Module) -> str:
    """sha256 over the family, the input size and every weight the embedding depends on
    (``encoder_state``): names its embeddings in a cache, so an entry is never read by another
    encoder, nor by the other family. SAM's digest starts from the input size alone, as before
    SAM 2 existed (its caches stay valid); SAM 2's from ``sam2:<size>``."""
    model = unwrap(sam)
    size = str(input_size(model))
    digest = hashlib.sha256((size if model.sam_family == "sam" else f"sam2:{size}").encode())
    for name, tensor in sorted(model.encoder_state().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def embed(model: nn.Module, images: list[np.ndarray]) -> Embedding:
    """Embeddings of HxWx3 uint8 images (resized, normalised and encoded here), either family;
    under no_grad when no encoder parameter trains."""
    sam = unwrap(model)
    return sam.embed(images=[image_to_tensor(sam.geometry.resize_image(im)) for im in images])
