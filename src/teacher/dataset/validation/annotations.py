"""One annotation against its image: absurd numbers, segmentation, bbox (from the mask, clipped,
or replaced), area, iscrowd and small boxes; and boxes that contradict their masks."""

from __future__ import annotations

from typing import Any

from teacher.coco.boxes import clip_xywh_box, is_xywh
from teacher.coco.io import (
    annotation_rle,
    geometry_problem,
    is_crowd,
    mask_kind,
    polygons,
    rle_area_bbox,
    rle_problem,
    valid_polygons,
)
from teacher.dataset.validation.findings import Findings
from teacher.dataset.validation.geometry import (
    MaskGeometry,
    iou_xywh,
    polygon_area,
    polygon_bbox,
)
from teacher.dataset.validation.registry import AREA_TOLERANCE

AREA_SLACK = 4.0  # px², absolute slack for tiny objects (rasterisation differences)
MISMATCH_MAJORITY = 0.5  # more than this share of box+mask annotations disagreeing: an error


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
        if iou_xywh(ann["bbox"], mask.bbox) < 0.5:
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
