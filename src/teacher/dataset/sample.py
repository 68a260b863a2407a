"""The bundled sample dataset (``data/sample/``, made by ``scripts/make_sample.py``): the same
bytes on every run.

72 small JPEG images (128-256 px) of circles, squares, triangles and stars of varied size,
color and overlap on plain, gradient, striped and noisy backgrounds, drawn as outlines (a rim a
quarter of the shape's radius wide, the background inside; the shape stays opaque, and its
mask is the whole shape): an appearance the proving ground's pretrained SAM never saw, so
fine-tuning has something to learn; a few grayscale images,
two stored rotated with an EXIF orientation tag, a few with no objects. Instance masks are the
visible part of each shape: polygons where a shape is unoccluded, RLE (compressed or
uncompressed) where it is occluded or picked at random; a few ``iscrowd`` regions (clusters
of small dots) as uncompressed RLE, as COCO stores them. ``unlabeled/``: 24 more images of the
same world without annotations, the pool the teachers label for the student.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from teacher.coco.io import (
    annotation_rle,
    mask_to_rle,
    mask_to_uncompressed_rle,
    rle_area_bbox,
    save_coco,
)

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
]
N_IMAGES = 72
EMPTY = {5, 23, 41, 59}  # images without objects
GRAY = {11, 47}  # grayscale images
EXIF_ROTATED = {17, 53}  # stored transposed, EXIF orientation 6 (rotate 90° clockwise)
CROWD = {8, 30, 66}  # images with one iscrowd cluster
SIDES = (128, 160, 192, 224, 256)


def shape_points(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Outline of a shape as (x, y) vertices."""
    if kind == "circle":
        n, radii = 32, [r]
    elif kind == "square":
        n, radii, angle = 4, [r], angle + math.pi / 4
    elif kind == "triangle":
        n, radii = 3, [r]
    else:  # star: 5 points, inner radius 0.45 r
        n, radii = 10, [r, 0.45 * r]
    return [
        (
            cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / n),
            cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """HxWx3 uint8: plain, gradient, stripes or smooth noise."""
    style = rng.integers(4)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    if style == 0:
        t: np.ndarray = np.zeros((h, w))
    elif style == 1:
        t = (xx + yy) / (w + h)
    elif style == 2:
        t = ((xx // int(rng.integers(8, 24))) % 2).astype(float) * 0.5
    else:
        coarse = rng.random((h // 16 + 2, w // 16 + 2))
        t = np.kron(coarse, np.ones((16, 16)))[:h, :w]
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    return img.clip(0, 255).astype(np.uint8)


def draw_mask(points: list[tuple], w: int, h: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def make_objects(rng: np.random.Generator, w: int, h: int) -> list[dict]:
    """Random shapes in paint order: kind, vertices, color, mask (full, before occlusion)."""
    objects = []
    for _ in range(int(rng.integers(1, 6))):
        cat = CATEGORIES[int(rng.integers(4))]
        r = float(rng.uniform(6, min(w, h) * 0.3))
        cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
        pts = shape_points(cat["name"], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        pts = [(round(x, 1), round(y, 1)) for x, y in pts]
        objects.append(
            {
                "cat": cat["id"],
                "points": pts,
                "color": tuple(int(v) for v in rng.integers(0, 256, 3)),
                "mask": draw_mask(pts, w, h),
            }
        )
    return objects


RIM = 0.25  # outline width, as a share of the shape's equivalent radius


def rim_width(mask: np.ndarray) -> int:
    """Pixels of an outline: RIM x the radius of a disc of the shape's area, at least 1."""
    return max(1, round(RIM * math.sqrt(mask.sum() / math.pi)))


def eroded(mask: np.ndarray, k: int) -> np.ndarray:
    """``mask`` shrunk by ``k`` pixels (a (2k+1)-square minimum filter)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * k + 1))
    return np.asarray(img) > 0


def crowd_cluster(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, list[tuple]]:
    """A cluster of small circles: one iscrowd region (mask) and the dots to paint."""
    cx, cy = rng.uniform(30, w - 30), rng.uniform(30, h - 30)
    dots = [
        (cx + rng.uniform(-22, 22), cy + rng.uniform(-22, 22), rng.uniform(2.5, 4.5))
        for _ in range(12)
    ]
    mask = np.zeros((h, w), bool)
    for x, y, r in dots:
        mask |= draw_mask(shape_points("circle", x, y, r, 0.0), w, h)
    return mask, dots


def annotation(obj: dict, visible: np.ndarray, *, ann_id: int, image_id: int, kind: str) -> dict:
    """COCO annotation of a visible mask; ``kind`` picks polygon / compressed / uncompressed RLE."""
    rle = mask_to_rle(visible)
    area, bbox = rle_area_bbox({"size": rle["size"], "counts": rle["counts"].encode()})
    if kind == "polygon":  # area and bbox as pycocotools rasterises the polygon
        seg: Any = [[v for p in obj["points"] for v in p]]
        h, w = visible.shape
        area, bbox = rle_area_bbox(annotation_rle({"id": ann_id, "segmentation": seg}, h, w))
    elif kind == "rle_uncompressed":
        seg = mask_to_uncompressed_rle(visible)
    else:
        seg = rle
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["cat"],
        "iscrowd": 0,
        "bbox": [round(v, 2) for v in bbox],
        "area": area,
        "segmentation": seg,
    }


def render_image(rng: np.random.Generator, image_id: int, first_ann_id: int) -> tuple:
    """One image: (pixels HxWx3, annotations)."""
    w, h = int(rng.choice(SIDES)), int(rng.choice(SIDES))
    pixels = background(rng, w, h)
    objects = [] if image_id in EMPTY else make_objects(rng, w, h)
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    crowd = None
    if image_id in CROWD:  # painted first: objects may cover part of it
        crowd, dots = crowd_cluster(rng, w, h)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        for x, y, r in dots:
            draw.polygon(shape_points("circle", x, y, r, 0.0), fill=color)
    for obj in objects:
        draw.polygon(obj["points"], fill=obj["color"])
        # outlined: the inside shows the background again, the object stays opaque (what it
        # covers stays hidden, as its annotation says). Filled shapes are all the pretrained
        # SAM saw: its masks of these hug the rim (module docstring)
        inside = eroded(obj["mask"], rim_width(obj["mask"]))
        painted = np.asarray(canvas)
        canvas.paste(Image.fromarray(np.where(inside[..., None], pixels, painted)))
        draw = ImageDraw.Draw(canvas)
    anns: list[dict] = []
    for k, obj in enumerate(objects):
        later = np.zeros((h, w), bool)
        for other in objects[k + 1 :]:
            later |= other["mask"]
        visible = obj["mask"] & ~later
        if visible.sum() < 12:
            continue  # hidden: no annotation, as a labeler would do
        occluded = bool((obj["mask"] & later).any())
        kind = ["polygon", "polygon", "rle_compressed", "rle_uncompressed"][int(rng.integers(4))]
        kind = "rle_compressed" if occluded and kind == "polygon" else kind
        anns.append(
            annotation(obj, visible, ann_id=first_ann_id + len(anns), image_id=image_id, kind=kind)
        )
    if crowd is not None:
        for obj in objects:
            crowd &= ~obj["mask"]
        ann = annotation(
            {"cat": 1, "points": []},
            crowd,
            ann_id=first_ann_id + len(anns),
            image_id=image_id,
            kind="rle_uncompressed",
        )
        anns.append({**ann, "iscrowd": 1})
    return np.asarray(canvas), anns


def save_image(pixels: np.ndarray, path: Path, image_id: int) -> None:
    img = Image.fromarray(pixels)
    if image_id in GRAY:
        img = img.convert("L")
    if image_id in EXIF_ROTATED:  # store rotated; orientation 6 tells viewers to turn it back
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(path, quality=88, exif=exif.tobytes())
    else:
        img.save(path, quality=88)


def make_sample(out: Path, *, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    (out / "images").mkdir(parents=True)
    images: list[dict] = []
    anns: list[dict] = []
    for image_id in range(1, N_IMAGES + 1):
        pixels, image_anns = render_image(rng, image_id, len(anns) + 1)
        name = f"{image_id:04d}.jpg"
        save_image(pixels, out / "images" / name, image_id)
        images.append(
            {"id": image_id, "file_name": name, "width": pixels.shape[1], "height": pixels.shape[0]}
        )
        anns.extend(image_anns)
    coco = {
        "info": {
            "description": "teacher sample: shapes (generated by scripts/make_sample.py)",
            "version": "1.0",
        },
        "licenses": [{"id": 1, "name": "CC0-1.0"}],
        "images": images,
        "annotations": anns,
        "categories": CATEGORIES,
    }
    save_coco(coco, out / "annotations.json")
    return coco


N_UNLABELED = 24  # the unlabeled pool the teachers label for the student
UNLABELED_SEED = 1  # its own stream: the labeled sample above does not change


def make_unlabeled(out: Path, *, n: int = N_UNLABELED, seed: int = UNLABELED_SEED) -> list[Path]:
    """``out/unlabeled/``: ``n`` more images of the same world, without annotations."""
    rng = np.random.default_rng(seed)
    folder = out / "unlabeled"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = []
    for k in range(1, n + 1):
        pixels, _ = render_image(rng, 1000 + k, 1)
        paths.append(folder / f"pool_{k:04d}.jpg")
        save_image(pixels, paths[-1], 1000 + k)
    return paths
