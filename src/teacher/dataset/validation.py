"""Validation rules for a COCO dataset: named checks with a severity, and the fixes they apply.

``validate_coco(data, ...)`` never touches its input: it works on a copy and returns the
validated copy with its findings. Severities:

- ``error``: the record cannot be used (duplicate id, unknown image, missing file...). With
  ``on_error="drop"`` the offending record is removed (and an image's annotations with it);
  with ``"fail"`` the caller stops. Either way every error is reported.
- ``fix``: the record was repaired in the copy (bbox from mask, clipped bbox, size from file...).
- ``warning``: usable but worth a look (unused category, negative image, tiny box...).

A finding is one rule with every id it concerns: ``{"rule", "severity", "record", "count",
"ids", "message", "fix", "details"}``. Category ids are kept as they are (no remapping).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teacher.coco.boxes import clip_xywh_box, is_xywh
from teacher.coco.images import (
    MAX_PIXELS,
    decoded_size,
    downscale_factor,
    file_name_problem,
    probe_image,
)
from teacher.coco.io import (
    CocoFormatError,
    annotation_mask,
    annotation_rle,
    clean_name,
    geometry_problem,
    is_crowd,
    load_coco,
    mask_kind,
    mask_to_rle,
    mask_to_uncompressed_rle,
    polygons,
    rle_area_bbox,
    rle_problem,
    valid_polygons,
)
from teacher.core.errors import TeacherError

MAX_DETAILS = 20  # per finding: the first details (what changed); ids are always complete
AREA_TOLERANCE = 0.1  # relative; an area further from the mask/box area is recomputed
AREA_SLACK = 4.0  # px², absolute slack for tiny objects (rasterisation differences)
MISMATCH_MAJORITY = 0.5  # more than this share of box+mask annotations disagreeing: an error
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")  # BERT's; break a prompt


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str  # "error" | "fix" | "warning"
    record: str  # what the ids name: "file" | "image" | "annotation" | "category"
    message: str  # what is wrong
    fix: str  # what validate does about it (for errors: with on_error=drop)


def _rules(*rules: Rule) -> dict[str, Rule]:
    return {r.name: r for r in rules}


RULES: dict[str, Rule] = _rules(
    Rule(
        "not_json", "error", "file", "annotation file missing or not JSON", "none: export COCO JSON"
    ),
    Rule(
        "not_coco",
        "error",
        "file",
        "not a COCO dataset (images/annotations/categories lists)",
        "none: export the COCO instances format",
    ),
    Rule(
        "too_much_dropped",
        "error",
        "dataset",
        "errors would drop more than validate.max_drop_fraction of the images or annotations",
        "none: fix the rule named in the details first (dropping would leave too little)",
    ),
    Rule(
        "boxes_contradict_masks",
        "error",
        "dataset",
        "most boxes disagree with their own masks (IoU < 0.5)",
        "none: set validate.box_from_mask: true to recompute the boxes from the masks, or fix the export",
    ),
    Rule(
        "invalid_id",
        "error",
        "image/annotation/category",
        "id missing or not an integer",
        "record dropped",
    ),
    Rule(
        "duplicate_image_id",
        "error",
        "image",
        "several images share an id",
        "later duplicates dropped (first kept)",
    ),
    Rule(
        "duplicate_annotation_id",
        "error",
        "annotation",
        "several annotations share an id",
        "later duplicates dropped (first kept)",
    ),
    Rule(
        "duplicate_category_id",
        "error",
        "category",
        "several categories share an id",
        "later duplicates dropped (first kept)",
    ),
    Rule(
        "category_name_missing",
        "error",
        "category",
        "category without a name (the text prompt needs one)",
        "category and its annotations dropped",
    ),
    Rule(
        "category_name_special_token",
        "error",
        "category",
        "name holds a tokenizer token ([CLS], [SEP], [PAD], [MASK], [UNK]) that would break the text prompt",
        "category and its annotations dropped; rename it",
    ),
    Rule(
        "category_name_not_prompt",
        "error",
        "category",
        "name has no words once prompt delimiters ('.', '?') are removed",
        "category and its annotations dropped; rename it",
    ),
    Rule("file_name_missing", "error", "image", "image without a file_name", "image dropped"),
    Rule(
        "unsafe_file_name",
        "error",
        "image",
        "file_name unusable: absolute, with '..' (leaves the image root), or a part longer than 255 bytes",
        "image dropped",
    ),
    Rule(
        "image_missing",
        "error",
        "image",
        "image file not found under the image root",
        "image dropped",
    ),
    Rule(
        "image_unreadable",
        "error",
        "image",
        "image file cannot be decoded (truncated, damaged, too large or not an image)",
        "image dropped",
    ),
    Rule(
        "image_smaller_than_recorded",
        "error",
        "image",
        "image file smaller than its recorded width/height while annotations reach past the file's size: its boxes are out of scale",
        "image dropped; rescale its annotations or re-export the full-size image",
    ),
    Rule(
        "invalid_image_size",
        "error",
        "image",
        "width/height missing or <= 0 and no file to read them from",
        "image dropped",
    ),
    Rule(
        "unknown_image",
        "error",
        "annotation",
        "annotation's image_id names no image",
        "annotation dropped",
    ),
    Rule(
        "unknown_category",
        "error",
        "annotation",
        "annotation's category_id names no category",
        "annotation dropped",
    ),
    Rule(
        "non_finite_coordinates",
        "error",
        "annotation",
        "NaN or Infinity in bbox or polygon",
        "annotation dropped",
    ),
    Rule(
        "coordinates_far_outside",
        "error",
        "annotation",
        "bbox or polygon reaches more than 10 image sizes outside its image (absurd numbers)",
        "annotation dropped",
    ),
    Rule(
        "invalid_segmentation",
        "error",
        "annotation",
        "segmentation unreadable (bad RLE, size not the image's, wrong type)",
        "annotation dropped",
    ),
    Rule(
        "missing_geometry",
        "error",
        "annotation",
        "no usable bbox (missing, empty, zero or negative size) and no mask",
        "annotation dropped",
    ),
    Rule(
        "empty_mask",
        "error",
        "annotation",
        "mask with no pixels and no usable bbox",
        "annotation dropped",
    ),
    Rule(
        "bbox_outside_image",
        "error",
        "annotation",
        "bbox entirely outside its image",
        "annotation dropped",
    ),
    Rule(
        "annotations_of_dropped_image",
        "fix",
        "annotation",
        "annotations of an image that was dropped",
        "annotations dropped",
    ),
    Rule(
        "annotations_of_dropped_category",
        "fix",
        "annotation",
        "annotations of a category that was dropped",
        "annotations dropped",
    ),
    Rule(
        "category_name_number",
        "fix",
        "category",
        "category name stored as a number",
        "converted to text",
    ),
    Rule(
        "image_downscaled",
        "fix",
        "image",
        f"image larger than {MAX_PIXELS:,} pixels: training reads it downscaled",
        "width/height and its annotations scaled by the same factor",
    ),
    Rule(
        "string_id",
        "fix",
        "image/annotation/category",
        "numeric id stored as a string (or float)",
        "converted to int",
    ),
    Rule(
        "annotation_id_missing",
        "fix",
        "annotation",
        "annotation without an id",
        "new id assigned (max id + 1, ...)",
    ),
    Rule("file_name_backslash", "fix", "image", "backslashes in file_name", "replaced by '/'"),
    Rule(
        "image_size_from_file",
        "fix",
        "image",
        "width/height missing or disagreeing with the image file",
        "set from the file header (EXIF orientation applied)",
    ),
    Rule(
        "iscrowd_missing",
        "fix",
        "annotation",
        "iscrowd missing or not 0/1",
        "set to 0 (1 for true)",
    ),
    Rule(
        "polygon_flat",
        "fix",
        "annotation",
        "polygon stored as one flat list of numbers",
        "wrapped as a list of rings",
    ),
    Rule(
        "polygon_dropped",
        "fix",
        "annotation",
        "polygon ring with fewer than 3 points",
        "ring removed",
    ),
    Rule(
        "bbox_from_mask",
        "fix",
        "annotation",
        "bbox missing, empty or zero-area while a mask exists",
        "bbox computed from the mask",
    ),
    Rule(
        "bbox_clipped", "fix", "annotation", "bbox partly outside its image", "clipped to the image"
    ),
    Rule(
        "bbox_replaced_by_mask",
        "fix",
        "annotation",
        "bbox far from its mask's extent (IoU < 0.5) with validate.box_from_mask: true",
        "bbox recomputed from the mask",
    ),
    Rule(
        "area_recomputed",
        "fix",
        "annotation",
        f"area missing or more than {AREA_TOLERANCE:.0%} off the mask/box area",
        "recomputed from the mask (or the box)",
    ),
    Rule(
        "unused_category",
        "warning",
        "category",
        "category declared but no annotation uses it",
        "kept (the prompt includes it)",
    ),
    Rule(
        "image_without_annotations",
        "warning",
        "image",
        "image without annotations",
        "kept as a negative example",
    ),
    Rule(
        "small_box",
        "warning",
        "annotation",
        "box smaller than validate.min_box_size on a side",
        "kept",
    ),
    Rule(
        "rare_category",
        "warning",
        "category",
        "category with fewer than validate.min_instances instances",
        "kept",
    ),
    Rule(
        "category_name_no_letters",
        "warning",
        "category",
        "name has no letter or digit: the text encoder may read it as [UNK] only",
        "kept; rename it if classes cannot be told apart",
    ),
    Rule(
        "duplicate_category_name",
        "warning",
        "category",
        "several categories share a name, or names that become the same prompt text once cleaned ('.' '?' removed, case, spaces): an ambiguous prompt",
        "kept; rename one",
    ),
    Rule(
        "bbox_mask_mismatch",
        "warning",
        "annotation",
        "bbox far from the mask's extent (IoU < 0.5)",
        "kept (models train on the bbox; SAM on the mask)",
    ),
    Rule("shared_file_name", "warning", "image", "one file used by several image ids", "kept"),
)


class Findings:
    """Accumulates ids (and a few details) per rule while the checks run."""

    def __init__(self) -> None:
        self.ids: dict[str, list[Any]] = {}
        self.details: dict[str, list[str]] = {}
        # dropped images / categories: _key(id) -> the error rule that dropped it
        self.dropped: dict[str, dict[Any, str]] = {"images": {}, "categories": {}}
        self.removed: Counter = Counter()  # error rule -> annotations it removed, knock-on included
        self.box_and_mask = 0  # annotations with both a usable box and a mask

    def add(self, rule: str, record_id: Any, detail: str | None = None) -> None:
        assert rule in RULES, rule
        self.ids.setdefault(rule, []).append(record_id)
        if RULES[rule].severity == "error" and RULES[rule].record == "annotation":
            self.removed[rule] += 1
        if detail is not None and len(self.details.setdefault(rule, [])) < MAX_DETAILS:
            self.details[rule].append(detail)

    def count(self, severity: str) -> int:
        return sum(len(v) for k, v in self.ids.items() if RULES[k].severity == severity)

    def to_list(self, *, on_error: str) -> list[dict[str, Any]]:
        """Findings in rule order (errors, fixes, warnings as declared)."""
        out = []
        for name, rule in RULES.items():
            if name not in self.ids:
                continue
            fix = rule.fix
            if rule.severity == "error" and on_error != "drop":
                fix = f"none applied (on_error={on_error}); with on_error=drop: {rule.fix}"
            out.append(
                {
                    "rule": name,
                    "severity": rule.severity,
                    "record": rule.record,
                    "count": len(self.ids[name]),
                    "ids": self.ids[name],
                    "message": rule.message,
                    "fix": fix,
                    "details": self.details.get(name, []),
                }
            )
        return out


# --- ids -----------------------------------------------------------------------------------


def _int_id(value: Any) -> int | None:
    """An integer id from an int, an integral float or a numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return None


_INT_TEXT = re.compile(r"-?[0-9]{1,30}")  # ASCII digits only: "²" and "--5" are not ids


def _key(value: Any) -> Any:
    """``value`` usable in a set or dict (lists and dicts as their repr)."""
    return value if isinstance(value, (int, float, str, type(None))) else repr(value)


def _fix_ref(rec: dict, key: str, kind: str, found: Findings) -> None:
    value = rec.get(key)
    as_int = _int_id(value)
    if as_int is not None and (not isinstance(value, int) or isinstance(value, bool)):
        rec[key] = as_int
        found.add("string_id", _key(rec.get("id")), f"{kind} {key} {value!r} -> {as_int}")


def check_ids(coco: dict, found: Findings) -> None:
    """Ids and references to int (fix); records whose id is not an integer dropped (error)."""
    for key in ("images", "categories"):
        kept = []
        for rec in coco[key]:
            as_int = _int_id(rec.get("id"))
            if as_int is None:
                found.add("invalid_id", _key(rec.get("id")), f"{key[:-1]} id {rec.get('id')!r}")
                found.dropped[key][_key(rec.get("id"))] = "invalid_id"
                continue
            _fix_ref(rec, "id", key[:-1], found)
            kept.append(rec)
        coco[key] = kept
    anns = coco["annotations"]
    used = [i for i in (_int_id(a.get("id")) for a in anns) if i is not None]
    next_id = max(used, default=0) + 1
    for ann in anns:
        if ann.get("id") is None:
            ann["id"] = next_id
            found.add("annotation_id_missing", next_id, f"assigned id {next_id}")
            next_id += 1
        for key in ("id", "image_id", "category_id"):
            _fix_ref(ann, key, "annotation", found)
    bad = [a for a in anns if not isinstance(a["id"], int) or isinstance(a["id"], bool)]
    for ann in bad:
        found.add("invalid_id", _key(ann["id"]), f"annotation id {ann['id']!r}")
    drop = {id(a) for a in bad}
    coco["annotations"] = [a for a in anns if id(a) not in drop]


def check_duplicates(coco: dict, found: Findings) -> None:
    """Records whose id was seen before (error; the first record with the id is kept)."""
    for key, rule in (
        ("images", "duplicate_image_id"),
        ("annotations", "duplicate_annotation_id"),
        ("categories", "duplicate_category_id"),
    ):
        seen: set = set()
        kept = []
        for rec in coco[key]:
            if rec["id"] in seen:
                found.add(rule, rec["id"])
                continue
            seen.add(rec["id"])
            kept.append(rec)
        coco[key] = kept


def _number_name(name: Any) -> str | None:
    """A numeric name as text (``1.0`` -> ``"1"``, ``2.5`` -> ``"2.5"``); None otherwise."""
    if isinstance(name, bool) or not isinstance(name, (int, float)) or not math.isfinite(name):
        return None
    return str(int(name)) if float(name).is_integer() else repr(float(name))


def category_name_problem(name: str) -> str | None:
    """The rule a category name breaks in a text prompt, or None (pure: no tokenizer)."""
    if any(tok in name.upper() for tok in SPECIAL_TOKENS):
        return "category_name_special_token"
    if not " ".join(re.sub(r"[.?]", " ", name).split()):
        return "category_name_not_prompt"
    return None


def check_categories(coco: dict, found: Findings) -> None:
    """Categories need a name the prompt can carry (error); numbers become text (fix);
    shared names are ambiguous prompts, names without letters may read as [UNK] (warning).
    Linear in the number of categories."""
    kept = []
    for cat in coco["categories"]:
        name = cat.get("name")
        as_text = _number_name(name)
        if as_text is not None:
            found.add("category_name_number", cat["id"], f"{name!r} -> {as_text!r}")
            cat["name"] = name = as_text
        problem = (
            category_name_problem(name)
            if isinstance(name, str) and name.strip()
            else "category_name_missing"
        )
        if problem:
            found.add(problem, cat["id"], f"name {name!r}")
            found.dropped["categories"][cat["id"]] = problem
            continue
        if not any(ch.isalnum() for ch in name):
            found.add("category_name_no_letters", cat["id"], f"name {name!r}")
        kept.append(cat)
    coco["categories"] = kept
    # the text encoder lower-cases: "St. Bernard" / "st bernard", "dog?" / "dog" read the same
    names = Counter(clean_name(c["name"]).lower() for c in kept)
    for cat in kept:
        prompt = clean_name(cat["name"]).lower()
        if names[prompt] > 1:
            found.add(
                "duplicate_category_name",
                cat["id"],
                f"name {cat['name']!r} (prompt text {prompt!r})",
            )


# --- images --------------------------------------------------------------------------------

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
    """An image over :data:`MAX_PIXELS` is read downscaled: scale its record and annotations."""
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
    read, width/height must be positive and finite (error). Images over :data:`MAX_PIXELS` are
    read downscaled: their annotations are scaled alike (fix). ``probe=None`` skips files."""
    bad: dict[Any, str] = {}
    by_image: dict[Any, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(_key(ann.get("image_id")), []).append(ann)
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


def check_references(coco: dict, found: Findings) -> None:
    """Annotations must name a known image and category (error: dropped). References to a
    record validate dropped are reported under that record's rule (the cause), not here."""
    images = {im["id"] for im in coco["images"]}
    cats = {c["id"] for c in coco["categories"]}
    kept = []
    for ann in coco["annotations"]:
        image, cat = _key(ann.get("image_id")), _key(ann.get("category_id"))
        if image in found.dropped["images"]:
            found.add("annotations_of_dropped_image", ann["id"], f"image {ann.get('image_id')!r}")
            found.removed[found.dropped["images"][image]] += 1
        elif image not in images:
            found.add("unknown_image", ann["id"], f"image_id {ann.get('image_id')!r}")
        elif cat in found.dropped["categories"]:
            found.add(
                "annotations_of_dropped_category", ann["id"], f"category {ann.get('category_id')!r}"
            )
            found.removed[found.dropped["categories"][cat]] += 1
        elif cat not in cats:
            found.add("unknown_category", ann["id"], f"category_id {ann.get('category_id')!r}")
        else:
            kept.append(ann)
    coco["annotations"] = kept


# --- annotations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskGeometry:
    """Area and extent of an annotation's mask, computed without decoding it: polygons by
    their vertices (shoelace area and vertex extent, COCO's conventions), RLE by pycocotools."""

    area: float
    bbox: list[float]  # COCO xywh


def polygon_area(rings: list[list[float]]) -> float:
    """Sum of the rings' geometric (shoelace) areas: COCO's convention for polygon ``area``."""
    total = 0.0
    for r in rings:
        xs, ys = r[0::2], r[1::2]
        total += abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
    return total


def polygon_bbox(rings: list[list[float]], *, width: int, height: int) -> list[float]:
    """Vertex extent of the rings, clipped to the image, as COCO xywh."""
    xs = [v for r in rings for v in r[0::2]]
    ys = [v for r in rings for v in r[1::2]]
    return clip_xywh_box(
        [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], width=width, height=height
    )


def _fix_segmentation(
    ann: dict, height: int, width: int, found: Findings
) -> MaskGeometry | None | str:
    """Check and tidy ``segmentation`` in place: its geometry, None without a mask, or
    ``"invalid"`` (reported)."""
    kind = mask_kind(ann)
    if kind == "none":
        return None
    if kind == "invalid":
        found.add(
            "invalid_segmentation",
            ann["id"],
            f"segmentation of type {type(ann['segmentation']).__name__}",
        )
        return "invalid"
    if kind == "polygon":
        raw, rings = polygons(ann), valid_polygons(ann)
        if raw and not isinstance(ann["segmentation"][0], list):
            found.add("polygon_flat", ann["id"], "[x1, y1, ...] -> [[x1, y1, ...]]")
        if len(rings) < len(raw):
            found.add(
                "polygon_dropped", ann["id"], f"{len(raw) - len(rings)} ring(s) with < 3 points"
            )
        ann["segmentation"] = rings
        if not rings:
            return None
        return MaskGeometry(polygon_area(rings), polygon_bbox(rings, width=width, height=height))
    problem = rle_problem(ann["segmentation"])
    if problem is None and list(ann["segmentation"]["size"]) != [height, width]:
        problem = f"RLE size {ann['segmentation']['size']} is not the image's [{height}, {width}]"
    if problem:
        found.add("invalid_segmentation", ann["id"], problem)
        return "invalid"
    return MaskGeometry(*rle_area_bbox(annotation_rle(ann, height, width, check=False)))


def _fix_bbox(
    ann: dict, mask: MaskGeometry | None, height: int, width: int, found: Findings
) -> bool:
    """Repair the bbox in place; False when the annotation has no usable geometry."""
    bbox: Any = ann.get("bbox")
    if not (is_xywh(bbox) and bbox[2] > 0 and bbox[3] > 0):
        if mask is None:
            found.add("missing_geometry", ann["id"], f"bbox {bbox!r}, no mask")
            return False
        if mask.area <= 0 or mask.bbox[2] <= 0 or mask.bbox[3] <= 0:
            found.add("empty_mask", ann["id"], f"bbox {bbox!r}")
            return False
        ann["bbox"] = mask.bbox
        found.add("bbox_from_mask", ann["id"], f"{bbox!r} -> {mask.bbox}")
        return True
    clipped = clip_xywh_box(bbox, width=width, height=height)
    if clipped[2] <= 0 or clipped[3] <= 0:
        found.add("bbox_outside_image", ann["id"], f"{bbox} in {width}x{height}")
        return False
    if max(abs(a - b) for a, b in zip(clipped, bbox, strict=True)) > 1e-3:
        ann["bbox"] = clipped
        found.add("bbox_clipped", ann["id"], f"{bbox} -> {[round(v, 2) for v in clipped]}")
    return True


def _fix_area(ann: dict, mask: MaskGeometry | None, found: Findings) -> None:
    """Recompute a missing or inconsistent area: off the mask area (shoelace for polygons), or
    larger than the box when there is no mask. Crowd regions: only a missing one (COCO's own
    crowd areas come from full-resolution masks)."""
    area: Any = ann.get("area")
    ok = isinstance(area, (int, float)) and not isinstance(area, bool) and area > 0
    expected = mask.area if mask is not None else float(ann["bbox"][2] * ann["bbox"][3])
    if ok and ann["iscrowd"]:
        return
    slack = max(AREA_SLACK, AREA_TOLERANCE * expected)
    if ok and mask is None and area <= expected + slack:
        return  # box only: the object may fill part of its box (COCO-derived box files)
    if not ok or abs(area - expected) > slack:
        ann["area"] = float(expected)
        found.add("area_recomputed", ann["id"], f"{area!r} -> {expected:g}")


def _iou_xywh(a: list[float], b: list[float], *, slack: float = 1.0) -> float:
    """IoU of two xywh boxes, each grown by ``slack`` px per side (rasterisation of tiny boxes)."""
    a = [a[0] - slack, a[1] - slack, a[2] + 2 * slack, a[3] + 2 * slack]
    b = [b[0] - slack, b[1] - slack, b[2] + 2 * slack, b[3] + 2 * slack]
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def check_annotation(
    ann: dict, image: dict, found: Findings, *, min_box_size: float, box_from_mask: bool = False
) -> bool:
    """Fix one annotation in place against its image; False when it must be dropped.
    Numbers that cannot be geometry are caught before anything is computed from them."""
    height, width = int(image["height"]), int(image["width"])
    problem = geometry_problem(ann, width=width, height=height)
    if problem:
        found.add(problem[0], ann["id"], problem[1])
        return False
    if ann.get("iscrowd") not in (0, 1) or isinstance(ann.get("iscrowd"), bool):
        was = ann.get("iscrowd")
        ann["iscrowd"] = 1 if was in (1, True) else 0
        found.add("iscrowd_missing", ann["id"], f"{was!r} -> {ann['iscrowd']}")
    had_box = is_xywh(ann.get("bbox"))
    mask = _fix_segmentation(ann, height, width, found)
    if isinstance(mask, str) or not _fix_bbox(ann, mask, height, width, found):
        return False
    if mask is not None and had_box:
        found.box_and_mask += 1
        if _iou_xywh(ann["bbox"], mask.bbox) < 0.5:
            rule = "bbox_replaced_by_mask" if box_from_mask else "bbox_mask_mismatch"
            found.add(rule, ann["id"], f"bbox {ann['bbox']}, mask {mask.bbox}")
            if box_from_mask:
                ann["bbox"] = mask.bbox
    _fix_area(ann, mask, found)
    if not is_crowd(ann) and min(ann["bbox"][2], ann["bbox"][3]) < min_box_size:
        found.add("small_box", ann["id"], f"{ann['bbox'][2]:g}x{ann['bbox'][3]:g}")
    return True


def check_annotations(
    coco: dict, found: Findings, *, min_box_size: float, box_from_mask: bool = False
) -> None:
    """Per annotation: segmentation, bbox and area fixes; unusable ones dropped. When most
    boxes disagree with their masks that is an error (the export's boxes are wrong), unless
    ``box_from_mask`` recomputes them."""
    images = {im["id"]: im for im in coco["images"]}
    coco["annotations"] = [
        a
        for a in coco["annotations"]
        if check_annotation(
            a, images[a["image_id"]], found, min_box_size=min_box_size, box_from_mask=box_from_mask
        )
    ]
    mismatched = len(found.ids.get("bbox_mask_mismatch", ()))
    if mismatched and mismatched > MISMATCH_MAJORITY * found.box_and_mask:
        found.add(
            "boxes_contradict_masks",
            None,
            f"{mismatched} of {found.box_and_mask} boxes have IoU < 0.5 with their own "
            "mask (see bbox_mask_mismatch)",
        )


@dataclass(frozen=True)
class InputCounts:
    """What the user's file holds (after id normalisation), so that findings name causes:
    a category or image is "unused" / "without annotations" only when it was so in the file."""

    images: int
    annotations: int
    instances: Counter  # category id -> annotations referencing it
    annotated: set  # image ids referenced by an annotation

    @classmethod
    def of(cls, coco: dict) -> InputCounts:
        anns = coco["annotations"]
        return cls(
            images=len(coco["images"]),
            annotations=len(anns),
            instances=Counter(_key(a.get("category_id")) for a in anns),
            annotated={_key(a.get("image_id")) for a in anns},
        )


def check_coverage(
    coco: dict, found: Findings, *, min_instances: int, given: InputCounts | None = None
) -> None:
    """Warnings on what is left: unused / rare categories, images without annotations. With
    ``given`` (the file's own counts), records emptied by drops are not reported again: their
    annotations' findings already name the cause."""
    instances = Counter(a["category_id"] for a in coco["annotations"])
    for cat in coco["categories"]:
        n = instances.get(cat["id"], 0)
        in_file = given.instances.get(cat["id"], 0) if given else n
        if in_file == 0:
            found.add("unused_category", cat["id"], cat["name"])
        elif 0 < n < min_instances:
            found.add(
                "rare_category",
                cat["id"],
                f"{cat['name']}: {n}"
                + (f" ({in_file} in the file before drops)" if in_file != n else ""),
            )
    annotated = given.annotated if given else {a["image_id"] for a in coco["annotations"]}
    for im in coco["images"]:
        if im["id"] not in annotated:
            found.add("image_without_annotations", im["id"])


def _dominant_error(found: Findings) -> str | None:
    """The cause to fix first: the error rule that removed the most annotations (those of the
    images and categories it dropped included), else the one with the most ids."""
    if found.removed:
        return found.removed.most_common(1)[0][0]
    counts = {
        k: len(v)
        for k, v in found.ids.items()
        if RULES[k].severity == "error" and RULES[k].record != "dataset"
    }
    return max(counts, key=lambda k: counts[k]) if counts else None


def check_drop_share(
    coco: dict, found: Findings, given: InputCounts, *, max_drop_fraction: float
) -> None:
    """Errors that would drop more than ``max_drop_fraction`` of the images or annotations
    (or everything): one dataset error naming the dominant rule, whatever ``on_error``."""
    shares = []
    for what, before, after in (
        ("images", given.images, len(coco["images"])),
        ("annotations", given.annotations, len(coco["annotations"])),
    ):
        if before and (before - after) / before > max_drop_fraction or (before and not after):
            shares.append(f"{before - after} of {before} {what}")
    rule = _dominant_error(found)
    if not shares or rule is None:
        return
    hint = DROP_HINTS.get(rule, f"fix the records named by {rule}")
    found.add(
        "too_much_dropped",
        None,
        f"errors drop {' and '.join(shares)}; most by {rule} ({len(found.ids[rule])} "
        f"{RULES[rule].record} record(s): {RULES[rule].message}): {hint}",
    )


DROP_HINTS = {  # what to do when one rule drops most of the dataset
    "image_missing": "check that data.images (--images) is the folder the file_names are "
    "relative to",
    "image_unreadable": "re-export the images (PNG/JPEG) or check that data.images is the right folder",
    "unsafe_file_name": "re-export with file_names relative to the image folder",
    "invalid_id": "re-export with integer ids",
    "unknown_image": "the annotations name image ids the file does not declare: re-export both together",
    "unknown_category": "declare the categories the annotations use",
    "category_name_missing": "give every category a name",
}


# --- all together --------------------------------------------------------------------------


def working_copy(data: dict[str, Any]) -> dict[str, Any]:
    """A copy the checks may edit: new lists of new record dicts. Fixes replace a record's
    values (never edit nested lists in place), so nested values can be shared."""
    out = dict(data)
    for key in ("images", "annotations", "categories"):
        out[key] = [dict(r) for r in data[key]]
    return out


@dataclass(frozen=True)
class Validation:
    coco: dict[str, Any]  # the validated copy (offending records dropped, fixes applied)
    findings: list[dict[str, Any]]  # one entry per rule that fired, see module docstring
    counts: dict[str, int]  # ids per rule, every rule (0 when it did not fire)
    errors: int
    warnings: int
    fixes: int

    @property
    def ok(self) -> bool:
        return self.errors == 0

    @property
    def fatal(self) -> bool:
        """Errors that stop the stage whatever ``on_error`` (the file, the dataset as a whole)."""
        return any(
            f["severity"] == "error" and f["record"] in ("file", "dataset") for f in self.findings
        )


def validate_coco(
    data: dict[str, Any],
    *,
    probe: ImageProbe | None,
    on_error: str = "fail",
    min_box_size: float = 2.0,
    min_instances: int = 3,
    max_drop_fraction: float = 0.5,
    box_from_mask: bool = False,
) -> Validation:
    """Run every rule on a copy of ``data`` (a dict with the three COCO lists).

    ``probe(file_name)`` returns the image file's full ``(width, height)`` or the rule name
    ``"image_missing"`` / ``"image_unreadable"``; ``None`` skips the file checks.
    Errors are always reported; offending records are removed from the returned copy.
    """
    coco = working_copy(data)
    found = Findings()
    check_ids(coco, found)
    given = InputCounts.of(coco)
    check_duplicates(coco, found)
    check_categories(coco, found)
    check_references(coco, found)  # before image files: every bad reference is named at once
    check_file_names(coco, found)
    check_image_files(coco, found, probe)
    check_annotations(coco, found, min_box_size=min_box_size, box_from_mask=box_from_mask)
    check_coverage(coco, found, min_instances=min_instances, given=given)
    check_drop_share(coco, found, given, max_drop_fraction=max_drop_fraction)
    return _result(coco, found, on_error=on_error)


def _result(coco: dict, found: Findings, *, on_error: str) -> Validation:
    counts = {name: len(found.ids.get(name, ())) for name in RULES}
    return Validation(
        coco=coco,
        findings=found.to_list(on_error=on_error),
        counts=counts,
        errors=found.count("error"),
        warnings=found.count("warning"),
        fixes=found.count("fix"),
    )


def format_failure(data_error: str, rule: str, *, on_error: str) -> Validation:
    """The result for a file that is not JSON / not COCO (``rule`` "not_json" / "not_coco")."""
    found = Findings()
    found.add(rule, None, data_error)
    return _result({"images": [], "annotations": [], "categories": []}, found, on_error=on_error)


# --- edges: files in, report out -----------------------------------------------------------


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


def validate_file(
    annotations: str | Path,
    *,
    images: str | Path | None,
    on_error: str = "fail",
    min_box_size: float = 2.0,
    min_instances: int = 3,
    max_drop_fraction: float = 0.5,
    box_from_mask: bool = False,
    decode_images: bool = True,
) -> Validation:
    """Load ``annotations`` and validate it (file checks under ``images``; None skips them).
    A file that is not JSON or not COCO gives a result with that one error; a missing image
    folder raises ``TeacherError``."""
    if images is not None and not Path(images).is_dir():
        raise TeacherError(
            f"{images}: image folder not found; set data.images in params.yaml "
            "(or --images) to the folder that file_name is relative to"
        )
    try:
        data = load_coco(annotations)
    except CocoFormatError as e:
        return format_failure(str(e), e.rule, on_error=on_error)
    probe = file_probe(images, decode=decode_images) if images is not None else None
    return validate_coco(
        data,
        probe=probe,
        on_error=on_error,
        min_box_size=min_box_size,
        min_instances=min_instances,
        max_drop_fraction=max_drop_fraction,
        box_from_mask=box_from_mask,
    )


def validate_options(params: Any) -> dict[str, Any]:
    """:func:`validate_file`'s keyword arguments from params.yaml's ``validate`` section."""
    return {
        "on_error": params.on_error,
        "min_box_size": params.min_box_size,
        "min_instances": params.min_instances,
        "decode_images": params.decode_images,
        "max_drop_fraction": params.max_drop_fraction,
        "box_from_mask": params.box_from_mask,
    }


def validation_report(result: Validation, *, on_error: str, source: dict[str, Any]) -> dict:
    """``metrics/validate.json``: totals and one count per rule as flat keys (for ``dvc
    metrics``), then ``findings`` (every rule that fired, with all its ids)."""
    report: dict[str, Any] = {
        "ok": result.ok,
        "errors": result.errors,
        "warnings": result.warnings,
        "fixes": result.fixes,
        "images": len(result.coco["images"]),
        "annotations": len(result.coco["annotations"]),
        "categories": len(result.coco["categories"]),
    }
    report.update(result.counts)
    report.update({"on_error": on_error, "source": source, "findings": result.findings})
    return report


def summary_text(
    result: Validation, *, source: str, report_path: str | None = None, first: int = 5
) -> str:
    """What a person reads: each rule that fired, its count and first ids, and what to do."""
    where = f" (report: {report_path})" if report_path else ""
    lines = [
        f"validate {source}: {result.errors} error(s), {result.fixes} fix(es), "
        f"{result.warnings} warning(s){where}"
    ]
    for f in result.findings:
        ids = ", ".join(repr(i) for i in f["ids"][:first]) + (", ..." if f["count"] > first else "")
        lines.append(f"  {f['severity']:<7} {f['rule']:<28} {f['count']:>6}  {f['record']} {ids}")
        if f["severity"] == "error" and f["details"]:
            lines.append(f"  {'':<36}  e.g. {f['details'][0]}")
    if result.counts.get("not_json") or result.counts.get("not_coco"):  # nothing to drop
        lines.append(
            "Export the annotations as a COCO instances JSON file (images, annotations, "
            "categories lists) and point data.annotations at it."
        )
    elif result.fatal:  # dropping would not help
        for f in result.findings:
            if f["severity"] == "error" and f["record"] == "dataset":
                lines.append(
                    f"{f['rule']} stops validate whatever on_error; "
                    f"{RULES[f['rule']].fix.removeprefix('none: ')}"
                )
    elif result.errors:
        lines.append(
            "Fix these records in the export, or set validate.on_error: drop to drop "
            "them (every drop is listed in the report)."
        )
    return "\n".join(lines)
