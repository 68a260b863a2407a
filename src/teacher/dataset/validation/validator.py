"""Every rule in order on a working copy (``validate_coco``), from a file (``validate_file``),
and the result (``Validation``). See the package docstring for severities and findings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teacher.coco.io import CocoFormatError, load_coco
from teacher.core.errors import TeacherError
from teacher.dataset.validation.annotations import check_annotations
from teacher.dataset.validation.categories import check_categories
from teacher.dataset.validation.coverage import InputCounts, check_coverage, check_drop_share
from teacher.dataset.validation.findings import Findings
from teacher.dataset.validation.ids import check_duplicates, check_ids
from teacher.dataset.validation.images import (
    ImageProbe,
    check_file_names,
    check_image_files,
    file_probe,
)
from teacher.dataset.validation.references import check_references
from teacher.dataset.validation.registry import RULES


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
    findings: list[dict[str, Any]]  # one entry per rule that fired, see the package docstring
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
