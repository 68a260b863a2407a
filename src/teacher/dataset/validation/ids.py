"""Record ids: integer ids (numeric strings and floats converted), missing annotation ids
assigned, and duplicate ids dropped."""

from __future__ import annotations

import re
from typing import Any

from teacher.dataset.validation.findings import Findings, record_key


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


def _fix_ref(rec: dict, key: str, kind: str, found: Findings) -> None:
    value = rec.get(key)
    as_int = _int_id(value)
    if as_int is not None and (not isinstance(value, int) or isinstance(value, bool)):
        rec[key] = as_int
        found.add("string_id", record_key(rec.get("id")), f"{kind} {key} {value!r} -> {as_int}")


def check_ids(coco: dict, found: Findings) -> None:
    """Ids and references to int (fix); records whose id is not an integer dropped (error)."""
    for key in ("images", "categories"):
        kept = []
        for rec in coco[key]:
            as_int = _int_id(rec.get("id"))
            if as_int is None:
                found.add(
                    "invalid_id", record_key(rec.get("id")), f"{key[:-1]} id {rec.get('id')!r}"
                )
                found.dropped[key][record_key(rec.get("id"))] = "invalid_id"
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
        found.add("invalid_id", record_key(ann["id"]), f"annotation id {ann['id']!r}")
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
