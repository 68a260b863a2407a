"""References between records: each annotation names a known image and category; those of a
record validate dropped are credited to the rule that dropped it."""

from __future__ import annotations

from teacher.dataset.validation.findings import Findings, record_key


def check_references(coco: dict, found: Findings) -> None:
    """Annotations must name a known image and category (error: dropped). References to a
    record validate dropped are reported under that record's rule (the cause), not here."""
    images = {im["id"] for im in coco["images"]}
    cats = {c["id"] for c in coco["categories"]}
    kept = []
    for ann in coco["annotations"]:
        image, cat = record_key(ann.get("image_id")), record_key(ann.get("category_id"))
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
