"""Stage ``inspect``: facts about the raw data -> data/inspect.json (never fails on bad data).

python -m stages.inspect --params params.yaml --out data/inspect.json
"""

from __future__ import annotations

import argparse
import sys

from teacher.coco.io import CocoFormatError, read_json, save_json
from teacher.core.errors import TeacherError
from teacher.core.params import ParamsError, load_params
from teacher.dataset.inspection import inspect_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.inspect", description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/inspect.json")
    args = parser.parse_args(argv)
    try:
        data_params = load_params(args.params)["data"]
    except (ParamsError, TeacherError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 1
    try:
        data = read_json(data_params.annotations)
    except CocoFormatError as e:  # reported as a fact; validate stops on it
        data, error = None, str(e)
    else:
        error = None
    facts = inspect_dataset(data, image_root=data_params.images)
    facts["format_error"] = error or facts["format_error"]
    facts["source"] = {"annotations": data_params.annotations, "images": data_params.images}
    save_json(facts, args.out)
    counts = facts["counts"]
    print(
        f"inspect: {counts['images']} images, {counts['annotations']} annotations, "
        f"{counts['categories']} categories; teachers: dino={facts['teachers']['dino']} "
        f"sam={facts['teachers']['sam']} -> {args.out}"
    )
    if facts["format_error"]:
        print(f"inspect: warning: {facts['format_error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
