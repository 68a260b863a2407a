"""SAM 2.1 (transformers' ``Sam2Model``) behind the family interface of :mod:`teacher.sam.model`.

:class:`BoxPromptSam2` *is* a ``Sam2Model`` (same modules, state-dict keys, config,
``save_pretrained`` / ``from_pretrained``; transformers' ``forward`` is left as it is, the
parity reference), plus the methods the rest of the code calls. The prompt path is
transformers' own, split where SAM 2's predictor splits it: ``embed`` is
``Sam2Model.get_image_embeddings`` with gradients (features of the Hiera encoder + FPN neck,
levels 0 and 1 projected by the decoder's ``conv_s0`` / ``conv_s1``, ``no_memory_embedding``
added to the image embedding); ``decode`` is the rest of ``Sam2Model.forward`` for one image's
prompts. Geometry is ``Sam2Processor``'s (:class:`teacher.sam.geometry.Sam2Geometry`): the image
stretched to the square input, ImageNet mean / std; boxes and points scaled per axis; low-res
logits resized straight to the original size (``post_process_masks``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Sam2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from teacher.sam.embedding import Sam2Features
from teacher.sam.geometry import Sam2Geometry

# Sam2ImageProcessor's defaults (rescale 1/255, then these): applied to 0..255 pixels here
PIXEL_MEAN = tuple(255 * m for m in IMAGENET_DEFAULT_MEAN)
PIXEL_STD = tuple(255 * s for s in IMAGENET_DEFAULT_STD)


class BoxPromptSam2(Sam2Model):
    """``Sam2Model`` with the family interface of ``BoxPromptSam`` (see the module docstring)."""

    sam_family = "sam2"
    mask_threshold = 0.0  # Sam2ImageProcessor.post_process_masks' default
    # sam.train_decoder: every child of the mask decoder but conv_s0 / conv_s1, which project the
    # encoder's high-res features once per image (inside get_image_features): they belong to
    # the embedding, so decoder-only training can read them from the cache.
    decoder_modules = r"mask_decoder\.(?!conv_s[01]$)\w+"

    @property
    def geometry(self) -> Sam2Geometry:
        prompt_config: Any = self.config.prompt_encoder_config
        return Sam2Geometry(int(prompt_config.image_size))

    def preprocess(self, image: Tensor) -> Tensor:
        """3xSxS float 0..255 (resized by ``geometry``) -> normalised as Sam2ImageProcessor."""
        mean = torch.tensor(PIXEL_MEAN, device=image.device).view(3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=image.device).view(3, 1, 1)
        return (image - mean) / std

    def embed(
        self, *, images: list[Tensor] | None = None, embeddings: Sam2Features | None = None
    ) -> Sam2Features:
        """``embeddings`` as given (the decoder-only cache), or the encoder on ``images``
        (resized 3xSxS float 0..255), under no_grad when no encoder parameter trains."""
        if embeddings is not None:
            return embeddings
        if images is None:
            raise ValueError("BoxPromptSam2: pass images or embeddings")
        trains = any(p.requires_grad for p in self.encoder_parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            device = self.no_memory_embedding.device
            batch = torch.stack([self.preprocess(img.to(device)) for img in images])
            return self._features(batch)

    def _features(self, pixel_values: Tensor) -> Sam2Features:
        """Sam2Model.get_image_embeddings without its no_grad: (B, C/8, 4g, 4g), (B, C/4, 2g,
        2g) and (B, C, g, g) with the no-memory embedding added."""
        batch = pixel_values.shape[0]
        maps = self.get_image_features(pixel_values, return_dict=True).fpn_hidden_states
        maps = list(maps)
        maps[-1] = maps[-1] + self.no_memory_embedding
        s0, s1, image = (
            feat.permute(1, 2, 0).reshape(batch, -1, *size)
            for feat, size in zip(maps, self.backbone_feature_sizes, strict=True)
        )
        return Sam2Features(image=image, s0=s0, s1=s1)

    def decode(
        self,
        embedding: Sam2Features,
        *,
        boxes: Tensor | None = None,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        multimask: bool,
    ) -> tuple[Tensor, Tensor]:
        """N prompts of one image in one decoder call (``Sam2Model.forward`` after the encoder).

        embedding: one image's (C, g, g) + high-res maps; boxes: (N, 4) xyxy in the input frame;
        points: (N, P, 2) x, y in the input frame with labels (N, P) (1 positive, 0 negative,
        -1 not a point). Returns low-res logits (N, K, 4g, 4g) and predicted IoU (N, K). Like
        transformers (and SAM 2), the single-mask output of a model in eval mode falls back to
        the best multimask candidate when unstable (``dynamic_multimask_via_stability``).
        """
        device = embedding.device
        if points is not None:
            if labels is None:
                raise ValueError("decode: points need their labels")
            points, labels = points.to(device, torch.float32)[None], labels.to(device)[None]
        if boxes is not None:
            boxes = boxes.to(device, torch.float32)[None]
        sparse, dense = self.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=boxes, input_masks=None
        )
        low_res, iou, _, _ = self.mask_decoder(
            image_embeddings=embedding.image[None],
            image_positional_embeddings=self.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            high_resolution_features=[embedding.s0[None], embedding.s1[None]],
        )
        return low_res[0], iou[0]

    def postprocess(
        self, logits: Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int]
    ) -> Tensor:
        """(N, K, 4g, 4g) low-res logits -> (N, K, H, W): bilinear straight to the original size
        (``Sam2ImageProcessor.post_process_masks``; no padding to remove)."""
        return F.interpolate(logits, original_hw, mode="bilinear", align_corners=False)

    # what the embedding is computed by: the vision encoder, the high-res projections, and the
    # no-memory embedding added to the image embedding
    ENCODER_MODULES = ("vision_encoder", "mask_decoder.conv_s0", "mask_decoder.conv_s1")

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        for name in self.ENCODER_MODULES:
            yield from self.get_submodule(name).parameters()
        yield self.no_memory_embedding

    def encoder_state(self) -> dict[str, Tensor]:
        """The weights of :meth:`encoder_parameters` by name (the cache fingerprint hashes them)."""
        state = {
            f"{name}.{key}": value
            for name in self.ENCODER_MODULES
            for key, value in self.get_submodule(name).state_dict().items()
        }
        return state | {"no_memory_embedding": self.no_memory_embedding}

    def encoder_blocks(self) -> nn.ModuleList:
        """Hiera's multi-scale blocks (activation checkpointing)."""
        return self.vision_encoder.backbone.blocks
