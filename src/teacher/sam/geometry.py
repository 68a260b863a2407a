"""How each SAM family puts an image and its prompts into the model's input frame.

SAM (segment-anything's ``ResizeLongestSide``): the longest side resized to the encoder size,
the rest zero-padded to the square input; boxes and points scaled by the one resize factor.
SAM 2 (transformers' ``Sam2Processor``, as SAM 2's ``SAM2Transforms``): the image stretched to
the square input (aspect ratio not kept), x scaled by ``size / W`` and y by ``size / H``.

A geometry is a small frozen value (picklable: data-loader workers get it, not the model);
``model.geometry`` gives the model's own. Images are HxWx3 uint8, masks (N, H, W) bool, boxes
(N, 4) xyxy and points (..., 2) x, y in original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor


@dataclass(frozen=True)
class SamGeometry:
    """segment-anything's geometry: longest side = ``size``, padded right and bottom."""

    size: int  # side of the square encoder input (1024 for Meta's models)

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> hxwx3 uint8 with longest side ``size`` (``ResizeLongestSide``)."""
        return ResizeLongestSide(self.size).apply_image(image)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): the image's extent in the input frame (the rest is padding)."""
        return ResizeLongestSide.get_preprocess_shape(height, width, self.size)

    def boxes_to_input(self, boxes_xyxy: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """(N, 4) xyxy in original pixels -> the input frame (``apply_boxes``)."""
        return ResizeLongestSide(self.size).apply_boxes(boxes_xyxy, original_hw)

    def points_to_input(self, points_xy: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """(..., 2) x, y in original pixels -> the input frame (``apply_coords``)."""
        return ResizeLongestSide(self.size).apply_coords(
            np.asarray(points_xy, np.float64), original_hw
        )

    def masks_to_input(self, masks: np.ndarray) -> Tensor:
        """(N, H, W) bool -> (N, size, size) bool: resized as the image (bilinear, >0.5), padded."""
        n, height, width = masks.shape
        h, w = self.resized_shape(height, width)
        t = torch.from_numpy(np.ascontiguousarray(masks)).float()[None]
        t = F.interpolate(t, (h, w), mode="bilinear", align_corners=False)[0] > 0.5
        return F.pad(t, (0, self.size - w, 0, self.size - h))


@dataclass(frozen=True)
class Sam2Geometry:
    """SAM 2's geometry: the image stretched to ``size`` x ``size``, no padding."""

    size: int  # side of the square encoder input (1024 for the hub checkpoints)

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> size x size x 3 uint8: the image processor's own resize (torchvision,
        bilinear, antialiased, on uint8), so our pixels equal ``Sam2Processor``'s."""
        from torchvision.transforms.v2 import functional as tvF

        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        out = tvF.resize(
            chw,
            [self.size, self.size],
            interpolation=tvF.InterpolationMode.BILINEAR,
            antialias=True,
        )
        return out.permute(1, 2, 0).numpy()

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(size, size): the image fills the input frame."""
        return self.size, self.size

    def _scale(self, original_hw: tuple[int, int]) -> np.ndarray:
        return np.array([self.size / original_hw[1], self.size / original_hw[0]])

    def boxes_to_input(self, boxes_xyxy: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """(N, 4) xyxy in original pixels -> the input frame, as ``Sam2Processor`` normalises
        ``input_boxes`` (x * size / W, y * size / H)."""
        boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
        return boxes * np.tile(self._scale(original_hw), 2)

    def points_to_input(self, points_xy: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """(..., 2) x, y in original pixels -> the input frame (``Sam2Processor``'s points)."""
        return np.asarray(points_xy, np.float64) * self._scale(original_hw)

    def masks_to_input(self, masks: np.ndarray) -> Tensor:
        """(N, H, W) bool -> (N, size, size) bool: stretched as the image (bilinear, >0.5)."""
        t = torch.from_numpy(np.ascontiguousarray(masks)).float()[None]
        return (
            F.interpolate(t, (self.size, self.size), mode="bilinear", align_corners=False)[0] > 0.5
        )


Geometry = SamGeometry | Sam2Geometry
