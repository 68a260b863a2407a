"""Stage ``validate``: named checks and fixes -> data/validated.json + metrics/validate.json.

    python -m stages.validate --params params.yaml --inspect data/inspect.json \
        --out data/validated.json --report metrics/validate.json

The user's annotation file is never modified. With ``validate.on_error: fail`` any error stops
the stage (exit 1) after writing the report; with ``drop`` offending records are removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from teacher.coco.io import save_coco, save_json
from teacher.core.errors import TeacherError
from teacher.core.params import ParamsError, load_params
from teacher.dataset.validation.report import summary_text, validation_report
from teacher.dataset.validation.validator import validate_file, validate_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--inspect", default="data/inspect.json", help="facts from inspect")
    parser.add_argument("--out", default="data/validated.json")
    parser.add_argument("--report", default="metrics/validate.json")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        data, checks = params["data"], params["validate"]
        facts = json.loads(Path(args.inspect).read_text())
    except (ParamsError, TeacherError, OSError, ValueError) as e:
        print(f"validate: {e}", file=sys.stderr)
        return 1
    try:
        result = validate_file(data.annotations, images=data.images, **validate_options(checks))
    except TeacherError as e:
        print(f"validate: {e}", file=sys.stderr)
        return 1
    teachers = facts.get("teachers") or {}
    source = {
        "annotations": data.annotations,
        "images": data.images,
        "teachers": {k: teachers.get(k) for k in ("dino", "sam")},
    }  # as inspect saw them
    save_json(validation_report(result, on_error=checks.on_error, source=source), args.report)
    print(summary_text(result, source=data.annotations, report_path=args.report))
    if result.fatal or (result.errors and checks.on_error == "fail"):
        Path(args.out).unlink(missing_ok=True)  # no stale validated file for later stages
        return 1
    save_coco(result.coco, args.out)
    print(
        f"validate: {len(result.coco['images'])} images, {len(result.coco['annotations'])} "
        f"annotations -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
