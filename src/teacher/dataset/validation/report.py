"""What validate reports: ``metrics/validate.json`` (``validation_report``) and the text a
person reads (``summary_text``)."""

from __future__ import annotations

from typing import Any

from teacher.dataset.validation.registry import RULES
from teacher.dataset.validation.validator import Validation


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
