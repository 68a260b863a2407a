"""Facts about a raw COCO dataset, as it is: never a crash on malformed input.

:func:`dataset_facts` is pure (the parsed JSON in, a dict of facts out);
:func:`color_facts` opens a deterministic sample of images; :func:`inspect_dataset` puts
them together for the ``inspect`` stage. Later stages read these facts (``teachers``,
``grayscale``, ``object_size``) instead of being told by hand.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from teacher.coco.boxes import is_xywh
from teacher.coco.images import file_name_problem, is_grayscale
from teacher.coco.io import MASK_KINDS, coco_format_problem, is_crowd, mask_kind
from teacher.core.errors import TeacherError

COCO_SMALL = 32**2  # COCO area ranges: small < 32², medium < 96², large
COCO_MEDIUM = 96**2
QUANTILES = {"p05": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95}
MAX_IDS = 50  # ids listed per fact; counts are always complete


def _records(data: Any, key: str) -> list[dict]:
    value = data.get(key) if isinstance(data, dict) else None
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _hashable(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    out = {"min": float(arr.min()), "max": float(arr.max())}
    out.update({k: float(np.percentile(arr, q)) for k, q in QUANTILES.items()})
    return out


def _has_box(ann: dict) -> bool:
    bbox: Any = ann.get("bbox")
    return is_xywh(bbox) and bbox[2] > 0 and bbox[3] > 0


MASKED = ("polygon", "rle_compressed", "rle_uncompressed")


def category_facts(cats: list[dict], anns: list[dict]) -> list[dict]:
    """Per declared category: original id, name, instance and image counts."""
    instances = Counter(_hashable(a.get("category_id")) for a in anns)
    images: dict[Any, set] = {}
    for a in anns:
        images.setdefault(_hashable(a.get("category_id")), set()).add(_hashable(a.get("image_id")))
    return [
        {
            "id": c.get("id"),
            "name": c.get("name"),
            "instances": instances.get(_hashable(c.get("id")), 0),
            "images": len(images.get(_hashable(c.get("id")), ())),
        }
        for c in cats
    ]


def annotation_kinds(anns: list[dict], kinds: list[str]) -> dict[str, int]:
    """How many annotations carry a box, each mask kind (``kinds[i]``: :func:`mask_kind` of
    ``anns[i]``; ``none``: no mask) and ``iscrowd``."""
    counts = Counter(kinds)
    out = {"bbox": sum(1 for a in anns if _has_box(a))}
    out.update({k: counts.get(k, 0) for k in MASK_KINDS})
    out["crowd"] = sum(1 for a in anns if is_crowd(a))
    return out


def size_facts(images: list[dict], anns: list[dict]) -> tuple[dict, dict]:
    """Image size spread, and object sizes: COCO small/medium/large counts and the spread of
    box area relative to its image (non-crowd annotations with a positive box)."""
    widths = [im["width"] for im in images if _positive(im.get("width"))]
    heights = [im["height"] for im in images if _positive(im.get("height"))]
    image_size = {
        "width": _spread(widths),
        "height": _spread(heights),
        "missing": len(images) - min(len(widths), len(heights)),
    }
    by_id = {_hashable(im.get("id")): im for im in images}
    bins = {"small": 0, "medium": 0, "large": 0}
    relative = []
    for a in anns:
        if is_crowd(a) or not _has_box(a):
            continue
        box_area = a["bbox"][2] * a["bbox"][3]
        area = a["area"] if _positive(a.get("area")) else box_area
        bins["small" if area < COCO_SMALL else "medium" if area < COCO_MEDIUM else "large"] += 1
        im = by_id.get(_hashable(a.get("image_id")), {})
        if _positive(im.get("width")) and _positive(im.get("height")):
            relative.append(min(box_area / (im["width"] * im["height"]), 1.0))
    objects = {"coco": bins, "count": sum(bins.values()), "relative_area": _spread(relative)}
    return image_size, objects


def teacher_facts(cats: list[dict], anns: list[dict], kinds: list[str]) -> dict[str, Any]:
    """Which teachers the data can train: boxes (or masks, boxes derive) -> dino; masks -> sam."""
    plain = [(a, k in MASKED) for a, k in zip(anns, kinds, strict=True) if not is_crowd(a)]
    boxes = sum(1 for a, masked in plain if masked or _has_box(a))
    masks = sum(1 for _, masked in plain if masked)
    if not cats:
        dino_reason = "no categories declared: nothing to prompt Grounding DINO with"
    elif boxes:
        dino_reason = f"{boxes} non-crowd annotations with a box or a mask"
    else:
        dino_reason = "no non-crowd annotation has a box or a mask"
    sam_reason = (
        f"{masks} non-crowd annotations with a mask (polygon or RLE)"
        if masks
        else "no non-crowd annotation has a mask (segmentation empty or missing): "
        "SAM needs instance masks"
    )
    return {
        "dino": bool(cats) and boxes > 0,
        "sam": masks > 0,
        "reasons": {"dino": dino_reason, "sam": sam_reason},
    }


def dataset_facts(data: Any) -> dict[str, Any]:
    """Facts of a parsed COCO file (pure; any JSON value is accepted and described)."""
    images, anns, cats = (_records(data, k) for k in ("images", "annotations", "categories"))
    annotated = {_hashable(a.get("image_id")) for a in anns}
    negatives = [im.get("id") for im in images if _hashable(im.get("id")) not in annotated]
    image_size, object_size = size_facts(images, anns)
    mask_kinds = [mask_kind(a) for a in anns]
    kinds = annotation_kinds(anns, mask_kinds)
    return {
        "format_error": coco_format_problem(data),
        "counts": {
            "images": len(images),
            "annotations": len(anns),
            "categories": len(cats),
            "crowd": kinds["crowd"],
            "images_without_annotations": len(negatives),
        },
        "categories": category_facts(cats, anns),
        "annotation_kinds": kinds,
        "images_without_annotations": {"count": len(negatives), "ids": negatives[:MAX_IDS]},
        "image_size": image_size,
        "object_size": object_size,
        "teachers": teacher_facts(cats, anns, mask_kinds),
    }


def color_facts(images: list[dict], image_root: str | Path | None, *, sample: int = 32) -> dict:
    """Open up to ``sample`` images, evenly spaced in file order: are they all grayscale?"""
    picked = images[:: max(1, len(images) // sample)][:sample] if images else []
    counts = {"sampled": 0, "grayscale": 0, "missing": 0, "unreadable": 0}
    for im in picked:
        name = im.get("file_name")
        if image_root is None or file_name_problem(name):
            counts["missing"] += 1
            continue
        assert isinstance(name, str)  # file_name_problem refuses anything else
        path = Path(image_root) / name.replace("\\", "/")
        if not path.is_file():
            counts["missing"] += 1
            continue
        try:
            gray = is_grayscale(path)
        except TeacherError:
            counts["unreadable"] += 1
            continue
        counts["sampled"] += 1
        counts["grayscale"] += int(gray)
    grayscale = counts["sampled"] > 0 and counts["grayscale"] == counts["sampled"]
    return {"color": counts, "grayscale": grayscale if counts["sampled"] else None}


def inspect_dataset(data: Any, *, image_root: str | Path | None, sample: int = 32) -> dict:
    """All facts for ``data/inspect.json``: :func:`dataset_facts` plus :func:`color_facts`."""
    facts = dataset_facts(data)
    facts.update(color_facts(_records(data, "images"), image_root, sample=sample))
    return facts
