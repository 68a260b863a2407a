"""Image records and their files: safe file names, files that exist and decode, width/height
from the file, and images read downscaled (their annotations scaled alike)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teacher.coco.images import (
    decoded_size,
    downscale_factor,
    file_name_problem,
    probe_image,
)
from teacher.coco.io import (
    annotation_mask,
    mask_kind,
    mask_to_rle,
    mask_to_uncompressed_rle,
    polygons,
    rle_problem,
)
from teacher.core.errors import TeacherError
from teacher.dataset.validation.findings import Findings, record_key

ImageProbe = Callable[[str], "tuple[int, int] | str"]  # file_name -> (w, h) or an error rule


def _drop_images(coco: dict, ids: dict[Any, str], found: Findings) -> None:
    """Drop the images ``ids`` (id -> the rule that dropped it) and their annotations, each
    annotation credited to its image's rule."""
    if not ids:
        return
    found.dropped["images"].update(ids)
    coco["images"] = [im for im in coco["images"] if im["id"] not in ids]
    kept = []
    for ann in coco["annotations"]:
        if ann.get("image_id") in ids:
            found.add("annotations_of_dropped_image", ann["id"], f"image {ann['image_id']}")
            found.removed[ids[ann["image_id"]]] += 1
        else:
            kept.append(ann)
    coco["annotations"] = kept


def check_file_names(coco: dict, found: Findings) -> None:
    """Backslashes to '/' (fix); names leaving the image root dropped (error)."""
    bad: dict[Any, str] = {}
    for im in coco["images"]:
        name = im.get("file_name")
        if isinstance(name, str) and "\\" in name:
            im["file_name"] = name.replace("\\", "/")
            found.add("file_name_backslash", im["id"], f"{name!r} -> {im['file_name']!r}")
        if not isinstance(im.get("file_name"), str) or not im["file_name"].strip():
            found.add("file_name_missing", im["id"], f"file_name {im.get('file_name')!r}")
            bad[im["id"]] = "file_name_missing"
            continue
        problem = file_name_problem(im.get("file_name"))
        if problem:
            found.add("unsafe_file_name", im["id"], f"{im.get('file_name')!r}: {problem}")
            bad[im["id"]] = "unsafe_file_name"
    _drop_images(coco, bad, found)
    users = Counter(im["file_name"] for im in coco["images"])
    for im in coco["images"]:
        if users[im["file_name"]] > 1:
            found.add("shared_file_name", im["id"], im["file_name"])


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _finite_numbers(values: Any) -> list[float]:
    return (
        [
            float(v)
            for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        if isinstance(values, list)
        else []
    )


def annotation_reach(ann: dict) -> tuple[float, float]:
    """How far right and down the annotation's bbox and polygon vertices reach (finite
    numbers only; 0 without geometry)."""
    xs, ys = [0.0], [0.0]
    box = _finite_numbers(ann.get("bbox"))
    if len(box) == 4:
        xs.append(box[0] + box[2])
        ys.append(box[1] + box[3])
    if mask_kind(ann) == "polygon":
        for ring in polygons(ann):
            nums = _finite_numbers(ring)
            xs += nums[0::2]
            ys += nums[1::2]
    return max(xs), max(ys)


def scale_annotation(ann: dict, k: int, *, height: int, width: int) -> None:
    """Divide the annotation's geometry by ``k`` in place (bbox, polygons, area; an RLE of the
    full ``height x width`` image is subsampled to the downscaled image's grid)."""
    box = ann.get("bbox")
    if isinstance(box, list) and len(_finite_numbers(box)) == len(box):
        ann["bbox"] = [v / k for v in box]
    kind = mask_kind(ann)
    if kind == "polygon":
        ann["segmentation"] = [
            [v / k for v in ring]
            for ring in polygons(ann)
            if len(_finite_numbers(ring)) == len(ring)
        ]
    elif (
        kind in ("rle_compressed", "rle_uncompressed")
        and rle_problem(ann["segmentation"]) is None
        and list(ann["segmentation"]["size"]) == [height, width]
    ):
        small = annotation_mask(ann, height, width)[::k, ::k]
        ann["segmentation"] = (
            mask_to_rle(small) if kind == "rle_compressed" else mask_to_uncompressed_rle(small)
        )
    if _positive_int(ann.get("area")):
        ann["area"] = ann["area"] / (k * k)


def _file_size_finding(im: dict, size: tuple[int, int], anns: list[dict], found: Findings) -> bool:
    """Compare the recorded size with the file's: True when the image must be dropped (the
    file is smaller and annotations reach past it: out of scale); a plain disagreement is
    fixed from the file."""
    was = (im.get("width"), im.get("height"))
    if was == size:
        return False
    recorded = _positive_int(was[0]) and _positive_int(was[1])
    w0, h0 = (float(was[0] or 0), float(was[1] or 0)) if recorded else (0.0, 0.0)
    if recorded and size[0] * size[1] < w0 * h0 and size != (was[1], was[0]):
        reach = [annotation_reach(a) for a in anns]
        far_x = max((r[0] for r in reach), default=0.0)
        far_y = max((r[1] for r in reach), default=0.0)
        if far_x > size[0] + 1 or far_y > size[1] + 1:
            found.add(
                "image_smaller_than_recorded",
                im["id"],
                f"{im['file_name']}: recorded {was[0]}x{was[1]}, file {size[0]}x{size[1]}; "
                f"annotations reach {far_x:g}x{far_y:g}: boxes out of scale "
                f"(x{size[0] / w0:.3g})",
            )
            return True
    im["width"], im["height"] = size
    found.add("image_size_from_file", im["id"], f"{was} -> {size}")
    return False


def _downscale(im: dict, anns: list[dict], found: Findings) -> None:
    """An image over ``coco.images.MAX_PIXELS`` is read downscaled: scale its record and
    annotations."""
    width, height = int(im["width"]), int(im["height"])
    k = downscale_factor(width, height)
    if k == 1:
        return
    im["width"], im["height"] = decoded_size(width, height)
    for ann in anns:
        scale_annotation(ann, k, height=height, width=width)
    found.add(
        "image_downscaled",
        im["id"],
        f"{im['file_name']}: {width}x{height} -> {im['width']}x{im['height']} (1/{k})",
    )


def check_image_files(coco: dict, found: Findings, probe: ImageProbe | None) -> None:
    """Each file exists and decodes (error); its size wins over width/height (fix) unless the
    file is smaller and the annotations reach past it (error: out of scale); without a file to
    read, width/height must be positive and finite (error). Images over
    ``coco.images.MAX_PIXELS`` are read downscaled: their annotations are scaled alike (fix).
    ``probe=None`` skips files."""
    bad: dict[Any, str] = {}
    by_image: dict[Any, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(record_key(ann.get("image_id")), []).append(ann)
    for im in coco["images"]:
        anns = by_image.get(im["id"], [])
        size = probe(im["file_name"]) if probe is not None else None
        if isinstance(size, str):
            found.add(size, im["id"], im["file_name"])
            bad[im["id"]] = size
            continue
        if size is not None and _file_size_finding(im, (size[0], size[1]), anns, found):
            bad[im["id"]] = "image_smaller_than_recorded"
            continue
        if not (_positive_int(im.get("width")) and _positive_int(im.get("height"))):
            found.add(
                "invalid_image_size",
                im["id"],
                f"width {im.get('width')!r}, height {im.get('height')!r}",
            )
            bad[im["id"]] = "invalid_image_size"
            continue
        if size is not None:
            _downscale(im, anns, found)
    _drop_images(coco, bad, found)


def file_probe(image_root: str | Path, *, decode: bool = True) -> ImageProbe:
    """A probe of the files under ``image_root``: each image decoded as training will decode
    it (``decode=False``: its header only, for very large datasets)."""
    root = Path(image_root)

    def probe(file_name: str) -> tuple[int, int] | str:
        path = root / file_name
        try:
            if not path.is_file():
                return "image_missing"
        except OSError:  # a name the file system refuses (too long...)
            return "image_missing"
        try:
            return probe_image(path, decode=decode)
        except TeacherError:
            return "image_unreadable"

    return probe
