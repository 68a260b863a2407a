"""Box formats. COCO ``xywh`` in absolute pixels is the one format at rest.

Every function is pure and works on a ``numpy`` array or a ``torch`` tensor of shape
``(..., 4)`` (a single box or a batch ``Nx4``), returning the same type, dtype family and
device; a plain list or tuple is treated as a numpy array. Names say both formats:

- ``xywh``: COCO, ``[x_min, y_min, width, height]`` in pixels.
- ``xyxy``: ``[x_min, y_min, x_max, y_max]`` in pixels.
- ``cxcywh_norm``: ``[center_x, center_y, width, height]`` divided by the image size
  (what Grounding DINO predicts and its loss takes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Boxes = Any  # np.ndarray | torch.Tensor of shape (..., 4)


def _is_torch(b: Any) -> bool:
    return type(b).__module__.split(".")[0] == "torch"


def _as_array(b: Any) -> Any:
    if _is_torch(b) or isinstance(b, np.ndarray):
        return b
    return np.asarray(b, dtype=np.float64)


def _unbind(b: Any) -> tuple[Any, Any, Any, Any]:
    return b[..., 0], b[..., 1], b[..., 2], b[..., 3]


def _stack(parts: list[Any], like: Any) -> Any:
    if _is_torch(like):
        import torch

        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def _float(b: Any) -> Any:
    if _is_torch(b):
        return b if b.is_floating_point() else b.float()
    return b if np.issubdtype(b.dtype, np.floating) else b.astype(np.float64)


def xywh_to_xyxy(boxes: Boxes) -> Boxes:
    """``(..., 4)`` COCO xywh -> xyxy, same units."""
    b = _float(_as_array(boxes))
    x, y, w, h = _unbind(b)
    return _stack([x, y, x + w, y + h], b)


def xyxy_to_xywh(boxes: Boxes) -> Boxes:
    """``(..., 4)`` xyxy -> COCO xywh, same units."""
    b = _float(_as_array(boxes))
    x0, y0, x1, y1 = _unbind(b)
    return _stack([x0, y0, x1 - x0, y1 - y0], b)


def xywh_to_cxcywh_norm(boxes: Boxes, *, width: float, height: float) -> Boxes:
    """``(..., 4)`` COCO xywh in pixels -> center-size normalised by the image ``width, height``."""
    b = _float(_as_array(boxes))
    x, y, w, h = _unbind(b)
    return _stack([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height], b)


def cxcywh_norm_to_xyxy(boxes: Boxes, *, width: float, height: float) -> Boxes:
    """``(..., 4)`` normalised center-size -> xyxy in pixels of an image ``width x height``."""
    b = _float(_as_array(boxes))
    cx, cy, w, h = _unbind(b)
    cx, cy, w, h = cx * width, cy * height, w * width, h * height
    return _stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], b)


def cxcywh_norm_to_xywh(boxes: Boxes, *, width: float, height: float) -> Boxes:
    """``(..., 4)`` normalised center-size -> COCO xywh in pixels."""
    return xyxy_to_xywh(cxcywh_norm_to_xyxy(boxes, width=width, height=height))


def xyxy_to_cxcywh_norm(boxes: Boxes, *, width: float, height: float) -> Boxes:
    """``(..., 4)`` xyxy in pixels -> normalised center-size."""
    return xywh_to_cxcywh_norm(xyxy_to_xywh(boxes), width=width, height=height)


def clip_xyxy(boxes: Boxes, *, width: float, height: float) -> Boxes:
    """``(..., 4)`` xyxy clipped to the image ``[0, width] x [0, height]``."""
    b = _float(_as_array(boxes))
    x0, y0, x1, y1 = _unbind(b)
    if _is_torch(b):
        return _stack(
            [x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)], b
        )
    return _stack(
        [
            np.clip(x0, 0, width),
            np.clip(y0, 0, height),
            np.clip(x1, 0, width),
            np.clip(y1, 0, height),
        ],
        b,
    )


def clip_xywh(boxes: Boxes, *, width: float, height: float) -> Boxes:
    """``(..., 4)`` COCO xywh clipped to the image; a box fully outside gets width or height 0."""
    return xyxy_to_xywh(clip_xyxy(xywh_to_xyxy(boxes), width=width, height=height))


def clip_xywh_box(box: Any, *, width: float, height: float) -> list[float]:
    """One COCO xywh box (4 numbers) clipped to the image, as a list of floats. Plain Python,
    for per-record checks over many annotations (no array overhead)."""
    x0, y0 = min(max(float(box[0]), 0.0), width), min(max(float(box[1]), 0.0), height)
    x1 = min(max(float(box[0]) + float(box[2]), 0.0), width)
    y1 = min(max(float(box[1]) + float(box[3]), 0.0), height)
    return [x0, y0, x1 - x0, y1 - y0]


def area_xywh(boxes: Boxes) -> Boxes:
    """``(...)`` area ``w * h`` of COCO xywh boxes (negative sizes count as 0)."""
    b = _float(_as_array(boxes))
    _, _, w, h = _unbind(b)
    if _is_torch(b):
        return w.clamp(min=0) * h.clamp(min=0)
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def is_xywh(value: Any) -> bool:
    """True when ``value`` is a list of 4 finite numbers (a COCO bbox, any size, not a check of sign)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return False
    for v in value:
        if type(v) is int:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
    return True
