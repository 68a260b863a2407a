"""Gallery images: an image with boxes and masks drawn, ground truth beside the prediction.

Pure drawing over numpy arrays with PIL (no display, no global state); ``save_panel`` is the
only function that writes a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array(
    [  # tab10: one colour per category (by position in the category list)
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    dtype=np.uint8,
)


def colour(index: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[index % len(PALETTE)]
    return int(r), int(g), int(b)


def draw_instances(
    image: np.ndarray,
    boxes_xywh: np.ndarray,
    labels: Sequence[str],
    colours: Sequence[tuple[int, int, int]],
    *,
    masks: np.ndarray | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """HxWx3 uint8 with masks (N, H, W) blended in and boxes (N, 4 xywh) outlined and labelled."""
    out = image.astype(np.float32).copy()
    if masks is not None:
        for mask, c in zip(masks, colours, strict=True):
            out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(c, np.float32)
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for (x, y, w, h), text, c in zip(
        np.asarray(boxes_xywh).reshape(-1, 4), labels, colours, strict=True
    ):
        draw.rectangle(
            [x, y, x + w, y + h], outline=c, width=max(1, round(min(image.shape[:2]) / 200))
        )
        draw.text((x + 2, y + 1), text, fill=c)
    return np.asarray(pil)


def side_by_side(
    left: np.ndarray, right: np.ndarray, *, titles: tuple[str, str], gap: int = 8
) -> np.ndarray:
    """Two HxWx3 images next to each other on white, each with a title line above it."""
    h, w = left.shape[:2]
    band = 14
    canvas = Image.new("RGB", (2 * w + gap, h + band), "white")
    canvas.paste(Image.fromarray(left), (0, band))
    canvas.paste(Image.fromarray(right), (w + gap, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), titles[0], fill="black")
    draw.text((w + gap + 2, 1), titles[1], fill="black")
    return np.asarray(canvas)


def save_panel(panel: np.ndarray, path: str | Path) -> None:
    """Write a HxWx3 uint8 panel as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(path, format="PNG")
