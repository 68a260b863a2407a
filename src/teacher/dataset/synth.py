"""A seeded synthetic world of COCO datasets: the proving ground of the ``tiny-pretrained`` presets.

Images show named shapes (circle, square, triangle, star, ring, cross, hexagon, diamond, …) in
named colours and varied sizes, overlapping one another (masks are the visible part), among
unannotated clutter on plain, gradient, striped or noisy backgrounds. A :class:`World` fixes
what a domain looks like; two are defined:

- :data:`PRETRAIN`: the domain the tiny presets are pretrained on (its own class names, solid
  fills, calm backgrounds, larger objects).
- :data:`FINETUNE`: a shifted domain the presets handle badly: the class names of the bundled
  sample (circle, square, triangle, star: words the pretrained models never saw), textured
  fills, busy backgrounds, pixel noise, smaller objects.

Everything here is a pure function of its arguments (same seed → same pixels and annotations);
:func:`save_dataset` is the one function that writes files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from teacher.coco.io import mask_to_rle, rle_area_bbox, save_coco

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 180),
    "cyan": (40, 200, 210),
    "magenta": (220, 60, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "brown": (130, 80, 40),
    "grey": (128, 128, 128),
}
# shapes drawn as one polygon (polygon annotation possible) vs. as a mask with a hole
POLYGON_SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "diamond",
    "pentagon",
    "arrow",
)
HOLED_SHAPES = ("ring",)
SHAPES = (*POLYGON_SHAPES, *HOLED_SHAPES)


@dataclass(frozen=True)
class World:
    """What one domain looks like. Every range is (low, high), inclusive of low."""

    classes: tuple[str, ...]  # shape kinds drawn and annotated; category names, ids 1..N in order
    backgrounds: tuple[str, ...] = ("plain", "gradient")  # of "plain" "gradient" "stripes" "noise"
    fills: tuple[str, ...] = ("solid",)  # object fill styles, of "solid" "stripes" "speckle"
    sides: tuple[int, ...] = (128, 160, 192)  # image width / height choices, px
    radius: tuple[float, float] = (0.08, 0.28)  # object radius as a fraction of the shorter side
    objects: tuple[int, int] = (1, 5)  # annotated objects per image
    clutter: tuple[int, int] = (0, 3)  # unannotated distractors (lines, dots) per image
    noise: float = 0.0  # std of Gaussian pixel noise added last (0..255 scale)
    min_visible: int = 16  # px: objects hidden more than this get no annotation


PRETRAIN = World(classes=("ring", "cross", "hexagon", "diamond", "pentagon", "arrow"))
FINETUNE = World(
    classes=("circle", "square", "triangle", "star"),
    backgrounds=("plain", "gradient", "stripes", "noise"),
    fills=("solid", "stripes", "speckle"),
    sides=(128, 160, 192, 224, 256),
    radius=(0.04, 0.22),
    clutter=(1, 6),
    noise=12.0,
)
WORLDS: dict[str, World] = {"pretrain": PRETRAIN, "finetune": FINETUNE}


# --- shapes ------------------------------------------------------------------------------------


def shape_outline(
    kind: str, cx: float, cy: float, r: float, angle: float
) -> list[tuple[float, float]]:
    """Outer outline of a shape of radius ``r`` centred at (cx, cy), as (x, y) vertices."""
    if kind in ("circle", "ring"):
        radii, n = [r], 40
    elif kind == "square":
        radii, n, angle = [r], 4, angle + math.pi / 4
    elif kind == "triangle":
        radii, n = [r], 3
    elif kind == "pentagon":
        radii, n = [r], 5
    elif kind == "hexagon":
        radii, n = [r], 6
    elif kind == "diamond":  # a rhombus: long axis r, short axis 0.55 r
        return [
            _rotate(x, y, cx, cy, angle)
            for x, y in ((r, 0), (0, 0.55 * r), (-r, 0), (0, -0.55 * r))
        ]
    elif kind == "star":
        radii, n = [r, 0.45 * r], 10
    elif kind == "cross":
        a = 0.33 * r
        pts = [
            (a, r),
            (-a, r),
            (-a, a),
            (-r, a),
            (-r, -a),
            (-a, -a),
            (-a, -r),
            (a, -r),
            (a, -a),
            (r, -a),
            (r, a),
            (a, a),
        ]
        return [_rotate(x, y, cx, cy, angle) for x, y in pts]
    elif kind == "arrow":
        pts = [
            (r, 0),
            (0.1 * r, 0.7 * r),
            (0.1 * r, 0.3 * r),
            (-r, 0.3 * r),
            (-r, -0.3 * r),
            (0.1 * r, -0.3 * r),
            (0.1 * r, -0.7 * r),
        ]
        return [_rotate(x, y, cx, cy, angle) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    return [
        (
            cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / n),
            cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _rotate(x: float, y: float, cx: float, cy: float, angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return (cx + c * x - s * y, cy + s * x + c * y)


def polygon_mask(points: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """HxW bool mask of a filled polygon (PIL rasterisation)."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def shape_mask(
    kind: str, cx: float, cy: float, r: float, angle: float, *, width: int, height: int
) -> np.ndarray:
    """HxW bool mask of a whole shape (a ring is a disc less its inner 55 %)."""
    mask = polygon_mask(shape_outline(kind, cx, cy, r, angle), width, height)
    if kind == "ring":
        mask &= ~polygon_mask(shape_outline("circle", cx, cy, 0.55 * r, angle), width, height)
    return mask


# --- pixels ------------------------------------------------------------------------------------


def background(rng: np.random.Generator, style: str, width: int, height: int) -> np.ndarray:
    """HxWx3 float background in 0..255: plain, diagonal gradient, stripes or blotchy noise."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:height, 0:width]
    t: np.ndarray
    if style == "plain":
        t = np.zeros((height, width))
    elif style == "gradient":
        t = (xx + yy) / (width + height)
    elif style == "stripes":
        period = int(rng.integers(6, 20))
        t = ((xx + (yy if rng.random() < 0.5 else 0)) // period % 2).astype(float)
    elif style == "noise":
        coarse = rng.random((height // 8 + 2, width // 8 + 2))
        t = np.kron(coarse, np.ones((8, 8)))[:height, :width]
    else:
        raise ValueError(f"unknown background {style!r}")
    return c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]


def fill_pattern(
    rng: np.random.Generator, style: str, colour: tuple[int, int, int], width: int, height: int
) -> np.ndarray:
    """HxWx3 float paint for an object: solid colour, stripes of it and a second colour, or speckle."""
    base = np.broadcast_to(np.asarray(colour, float), (height, width, 3))
    if style == "solid":
        return base
    other = np.asarray(list(COLOURS.values())[int(rng.integers(len(COLOURS)))], float)
    if style == "stripes":
        yy, xx = np.mgrid[0:height, 0:width]
        t = ((xx - yy) // int(rng.integers(3, 8)) % 2).astype(float)[..., None]
    elif style == "speckle":
        t = (rng.random((height, width)) < 0.35).astype(float)[..., None]
    else:
        raise ValueError(f"unknown fill {style!r}")
    return base * (1 - t) + other * t


def clutter_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A distractor nobody annotates: a thin line or a small dot."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    if rng.random() < 0.5:
        x1, y1 = rng.uniform(0, width), rng.uniform(0, height)
        draw.line([(x0, y0), (x1, y1)], fill=1, width=int(rng.integers(1, 3)))
    else:
        r = rng.uniform(1.5, 3.5)
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=1)
    return np.asarray(canvas, dtype=bool)


# --- scenes ------------------------------------------------------------------------------------


def place_objects(rng: np.random.Generator, world: World, width: int, height: int) -> list[dict]:
    """Objects in paint order: ``category_id``, ``kind``, ``colour`` name, ``fill``, ``mask``,
    ``outline`` (vertices, None for holed shapes)."""
    objects = []
    side = min(width, height)
    for _ in range(int(rng.integers(world.objects[0], world.objects[1] + 1))):
        cat = int(rng.integers(len(world.classes)))
        kind = world.classes[cat]
        r = float(rng.uniform(*world.radius)) * side
        r = max(r, 5.0)
        cx, cy = rng.uniform(0.7 * r, width - 0.7 * r), rng.uniform(0.7 * r, height - 0.7 * r)
        angle = float(rng.uniform(0, 2 * math.pi))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        fill = world.fills[int(rng.integers(len(world.fills)))]
        outline = (
            None
            if kind in HOLED_SHAPES
            else [(round(x, 1), round(y, 1)) for x, y in shape_outline(kind, cx, cy, r, angle)]
        )
        mask = (
            polygon_mask(outline, width, height)
            if outline is not None
            else shape_mask(kind, cx, cy, r, angle, width=width, height=height)
        )
        objects.append(
            {
                "category_id": cat + 1,
                "kind": kind,
                "colour": colour,
                "fill": fill,
                "mask": mask,
                "outline": outline,
            }
        )
    return objects


def visible_masks(objects: list[dict]) -> list[np.ndarray]:
    """Per object the part not covered by objects painted after it."""
    if not objects:
        return []
    covered = np.zeros_like(objects[0]["mask"])
    out = []
    for obj in reversed(objects):
        out.append(obj["mask"] & ~covered)
        covered = covered | obj["mask"]
    return out[::-1]


def annotation(obj: dict, visible: np.ndarray, *, ann_id: int, image_id: int) -> dict[str, Any]:
    """COCO annotation of an object's visible mask: a polygon when whole and simple, else RLE."""
    rle = mask_to_rle(visible)
    area, bbox = rle_area_bbox({"size": rle["size"], "counts": rle["counts"].encode()})
    whole = obj["outline"] is not None and not (obj["mask"] & ~visible).any()
    seg = [[v for p in obj["outline"] for v in p]] if whole else rle
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["category_id"],
        "iscrowd": 0,
        "bbox": [round(float(v), 2) for v in bbox],
        "area": float(area),
        "segmentation": seg,
        "attributes": {
            "colour": obj["colour"],
            "fill": obj["fill"],
            "occluded": bool((obj["mask"] & ~visible).any()),
        },
    }


def render_scene(
    rng: np.random.Generator, world: World, *, image_id: int, first_ann_id: int
) -> tuple[np.ndarray, list[dict]]:
    """One image of ``world``: HxWx3 uint8 pixels and its COCO annotations."""
    width, height = int(rng.choice(world.sides)), int(rng.choice(world.sides))
    style = world.backgrounds[int(rng.integers(len(world.backgrounds)))]
    pixels = background(rng, style, width, height)
    for _ in range(int(rng.integers(world.clutter[0], world.clutter[1] + 1))):
        m = clutter_mask(rng, width, height)
        pixels[m] = rng.integers(0, 256, 3)
    objects = place_objects(rng, world, width, height)
    for obj in objects:
        paint = fill_pattern(rng, obj["fill"], COLOURS[obj["colour"]], width, height)
        pixels[obj["mask"]] = paint[obj["mask"]]
    if world.noise > 0:
        pixels = pixels + rng.normal(0.0, world.noise, pixels.shape)
    anns: list[dict] = []
    for obj, visible in zip(objects, visible_masks(objects), strict=True):
        if visible.sum() >= world.min_visible:
            anns.append(
                annotation(obj, visible, ann_id=first_ann_id + len(anns), image_id=image_id)
            )
    return pixels.clip(0, 255).astype(np.uint8), anns


def make_dataset(
    world: World, *, n_images: int, seed: int
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """``n_images`` scenes of ``world`` from ``seed``: a COCO dict (file names ``000001.png``, …)
    and the images as HxWx3 uint8 arrays in the same order. Deterministic per (world, n, seed)."""
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    anns: list[dict] = []
    pixels: list[np.ndarray] = []
    for image_id in range(1, n_images + 1):
        img, image_anns = render_scene(rng, world, image_id=image_id, first_ann_id=len(anns) + 1)
        images.append(
            {
                "id": image_id,
                "file_name": f"{image_id:06d}.png",
                "width": img.shape[1],
                "height": img.shape[0],
            }
        )
        anns.extend(image_anns)
        pixels.append(img)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(world.classes)
    ]
    coco = {
        "info": {"description": f"teacher synthetic world (teacher.dataset.synth), seed {seed}"},
        "images": images,
        "annotations": anns,
        "categories": categories,
    }
    return coco, pixels


def save_dataset(coco: dict[str, Any], pixels: list[np.ndarray], out_dir: str | Path) -> Path:
    """Write ``out_dir/annotations.json`` and ``out_dir/images/<file_name>``; returns the json path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for info, img in zip(coco["images"], pixels, strict=True):
        Image.fromarray(img).save(out / "images" / info["file_name"])
    save_coco(coco, out / "annotations.json")
    return out / "annotations.json"
