"""The rule table: every validation rule by name, with its severity, the record it names,
what is wrong and what validate does about it. Data only; the checks live beside it, by theme."""

from __future__ import annotations

from dataclasses import dataclass

from teacher.coco.images import MAX_PIXELS
from teacher.coco.io import SPECIAL_TOKENS

AREA_TOLERANCE = 0.1  # relative; an area further from the mask/box area is recomputed


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
        f"name holds a tokenizer token ({', '.join(SPECIAL_TOKENS)}) that would break the text prompt",
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
