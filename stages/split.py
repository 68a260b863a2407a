"""Stage ``split``: seeded, stratified train/val/test by image -> data/split/{train,val,test}.json.

python -m stages.split --params params.yaml --validated data/validated.json --out data/split
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teacher.coco.io import load_coco, save_coco
from teacher.core.errors import TeacherError
from teacher.core.params import ParamsError, load_params, to_dict
from teacher.dataset.splitting import split_coco


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.split", description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--validated", default="data/validated.json")
    parser.add_argument("--out", default="data/split")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        coco = load_coco(args.validated)
    except (ParamsError, TeacherError) as e:
        print(f"split: {e}", file=sys.stderr)
        return 1
    try:
        splits = split_coco(coco, fractions=to_dict(params["split"]), seed=params["seed"])
    except TeacherError as e:  # too few annotated images for the splits
        print(f"split: {args.validated}: {e}", file=sys.stderr)
        return 1
    for name, subset in splits.items():
        save_coco(subset, Path(args.out) / f"{name}.json")
    print(
        "split: "
        + ", ".join(
            f"{n} {len(s['images'])} images / {len(s['annotations'])} annotations"
            for n, s in splits.items()
        )
        + f" -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
