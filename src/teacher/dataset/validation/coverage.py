"""The dataset as a whole: what the file held (``InputCounts``), unused and rare categories,
images without annotations, and errors that would drop too much of it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from teacher.dataset.validation.findings import Findings, record_key
from teacher.dataset.validation.registry import RULES


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
            instances=Counter(record_key(a.get("category_id")) for a in anns),
            annotated={record_key(a.get("image_id")) for a in anns},
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
