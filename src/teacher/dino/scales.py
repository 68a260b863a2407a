"""Multi-scale training of Grounding DINO, as both references train it.

Open-GroundingDino (``datasets/odvg.py`` ``make_coco_transforms``, ``datasets/transforms.py``)
and MM-Grounding-DINO (``configs/mm_grounding_dino/*``: ``RandomChoice`` of a
``RandomChoiceResize``, or a ``RandomChoiceResize`` + ``RandomCrop`` + ``RandomChoiceResize``)
resize each training image so that its shortest edge is one of 480, 512, ..., 800 px (its
longest at most 1333); half the time they first resize it to a shortest edge of 400, 500 or 600
and cut a random window of 384-600 px per side. Evaluation resizes to 800 / 1333, as
``dino.shortest_edge`` / ``dino.longest_edge`` do.

Those sizes are for ``dino.shortest_edge`` 800 (real images). For another ``shortest_edge``
every size is multiplied by ``shortest_edge / 800`` (truncated), as Open-GroundingDino's
``data_aug_scale_overlap`` does: the tiny presets' 128 px train at 76-128 px and crop windows of
61-96 px after resizing to 64 / 80 / 96. What share of the image a window keeps does not depend
on that factor. ``dino.train_scale_min`` drops the sizes under that fraction of
``shortest_edge`` (1: one training size); ``dino.train_crop`` is the crop branch's probability.

Departure, same result: the window is cut from the image at its own resolution (its corners
rounded to pixels) and the processor resizes once, to the drawn size, where the references
resize, crop and resize again. Boxes are clipped to the window and every box with positive
area is kept, as both references do (Open-GroundingDino ``crop``: ``x2 > x1 and y2 > y1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teacher.core.params import DinoParams

REFERENCE_EDGE = 800  # the references' evaluation shortest edge: the sizes below are for it
TRAIN_EDGES = tuple(range(480, 801, 32))  # both references' training shortest edges (px)
CROP_EDGES = (400, 500, 600)  # crop branch: shortest edge before the window is cut (px)
CROP_SIDES = (384, 600)  # crop branch: window height and width, each drawn in this range (px)


@dataclass(frozen=True)
class TrainScales:
    """What one training image's scale is drawn from (sizes in px at the processor's frame)."""

    edges: tuple[int, ...]  # shortest edges the processor resizes to, one drawn per image
    longest_edge: int  # cap on the longest edge (dino.longest_edge)
    crop: float  # probability of the resize-then-crop branch
    crop_edges: tuple[int, ...]  # crop branch: the shortest edge the window is measured at
    crop_sides: tuple[int, int]  # crop branch: window side range at that size


def scaled(sizes: tuple[int, ...], shortest_edge: int) -> tuple[int, ...]:
    """Reference sizes (for 800) at ``shortest_edge``: ``int(size * shortest_edge / 800)``."""
    return tuple(s * shortest_edge // REFERENCE_EDGE for s in sizes)


def train_scales(dino: DinoParams) -> TrainScales | None:
    """The training scales of ``dino``; None when there is one size and no crop (the processor's
    own resize, to ``dino.shortest_edge``)."""
    kept = tuple(e for e in TRAIN_EDGES if e >= dino.train_scale_min * REFERENCE_EDGE - 1e-9)
    edges = tuple(sorted(set(scaled(kept or (REFERENCE_EDGE,), dino.shortest_edge))))
    if edges == (dino.shortest_edge,) and dino.train_crop == 0:
        return None
    return TrainScales(
        edges=edges,
        longest_edge=dino.longest_edge,
        crop=dino.train_crop,
        crop_edges=scaled(CROP_EDGES, dino.shortest_edge),
        crop_sides=(
            CROP_SIDES[0] * dino.shortest_edge // REFERENCE_EDGE,
            CROP_SIDES[1] * dino.shortest_edge // REFERENCE_EDGE,
        ),
    )


def resized_shape(height: int, width: int, *, edge: int) -> tuple[int, int]:
    """(height, width) after the references' resize of the shortest edge to ``edge`` with no cap
    on the longest (Open-GroundingDino ``get_size_with_aspect_ratio``, ``max_size=None``)."""
    if width < height:
        return int(edge * height / width), edge
    return edge, int(edge * width / height)


def crop_window(
    height: int, width: int, *, edge: int, sides: tuple[int, int], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A window ``(x, y, w, h)`` in the image's pixels, drawn as the references draw it: the
    image resized to a shortest edge of ``edge``, a window of height and width each drawn in
    ``sides`` (at most the resized side: MMDetection's ``absolute_range``, which also takes a
    side shorter than ``sides[0]`` whole), placed uniformly; mapped back to the image."""
    rh, rw = resized_shape(height, width, edge=edge)
    lo, hi = sides
    ch = int(rng.integers(min(rh, lo), min(rh, hi) + 1))
    cw = int(rng.integers(min(rw, lo), min(rw, hi) + 1))
    top, left = int(rng.integers(0, rh - ch + 1)), int(rng.integers(0, rw - cw + 1))
    sy, sx = height / rh, width / rw
    x0, y0 = min(round(left * sx), width - 1), min(round(top * sy), height - 1)
    x1, y1 = max(round((left + cw) * sx), x0 + 1), max(round((top + ch) * sy), y0 + 1)
    return x0, y0, min(x1, width) - x0, min(y1, height) - y0


def crop_boxes(
    boxes: np.ndarray, window: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``boxes`` (n, 4) COCO xywh clipped to ``window`` (x, y, w, h), in its frame; and which
    boxes keep a positive area (the references' rule: no minimum visible share)."""
    x, y, w, h = window
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    x0 = np.clip(b[:, 0] - x, 0, w)
    y0 = np.clip(b[:, 1] - y, 0, h)
    x1 = np.clip(b[:, 0] + b[:, 2] - x, 0, w)
    y1 = np.clip(b[:, 1] + b[:, 3] - y, 0, h)
    keep = (x1 > x0) & (y1 > y0)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)[keep], keep


def apply_scale(
    scales: TrainScales,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    *,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One training image's draw: with probability ``scales.crop`` the crop branch's window
    (image, xywh boxes and labels cropped); then the shortest edge the processor resizes it to.
    Returns ``(image, boxes, labels, shortest_edge)``."""
    if scales.crop > 0 and rng.random() < scales.crop:
        edge = int(rng.choice(scales.crop_edges))
        x, y, w, h = crop_window(*image.shape[:2], edge=edge, sides=scales.crop_sides, rng=rng)
        image = image[y : y + h, x : x + w]
        boxes, keep = crop_boxes(boxes, (x, y, w, h))
        labels = np.asarray(labels)[keep]
    return image, boxes, labels, int(rng.choice(scales.edges))
