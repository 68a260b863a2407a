"""Stage ``label``: the fine-tuned teachers (Grounded-SAM) label the unlabeled pool.

    python -m stages.label --params params.yaml --pool data/sample/unlabeled \
        --dino models/dino --sam models/sam --shards checkpoints/label_shards \
        --out data/teacher_labels.json

Writes ``data/teacher_labels.json``: COCO with per detection a box, an RLE mask (when SAM was
trained) and a score; thresholds from the ``label`` section. Labeled in shards of
``label.shard_size`` images, kept in ``--shards`` (under ``checkpoints/``, like the training
stages' checkpoints: not a DVC output, so DVC never deletes it): a rerun after a crash labels only
what no shard holds. ``label.processes`` processes share the
work; inside ``accelerate launch`` / torchrun every rank does. Unreadable images are listed on
stderr and in ``info.unreadable``, and skipped. A pool folder without images gives a file
without images: the student then trains on the human labels alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teacher.core.errors import TeacherError
from teacher.core.params import ParamsError, load_params
from teacher.inference.labeling import label_pool


def run(args: argparse.Namespace) -> str | None:
    params = load_params(args.params)
    done = label_pool(
        args.pool,
        dino_dir=args.dino,
        sam_dir=args.sam,
        label=params["label"],
        dino=params["dino"],
        sam=params["sam"],
        out=args.out,
        shard_dir=args.shards,
    )
    if done is None:  # another rank of a distributed launch: the main process reports
        return None
    for item in done["unreadable"]:
        print(f"label: skipped unreadable image {item['file']}: {item['reason']}", file=sys.stderr)
    return (
        f"{done['annotations']} detections on {done['images']} images "
        f"({len(done['unreadable'])} unreadable skipped) -> {args.out}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stages.label",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument(
        "--pool", type=Path, required=True, help="folder of unlabeled images (data.unlabeled)"
    )
    p.add_argument("--dino", type=Path, default=Path("models/dino"))
    p.add_argument("--sam", type=Path, default=Path("models/sam"))
    p.add_argument(
        "--shards",
        type=Path,
        default=Path("checkpoints/label_shards"),
        help="finished shards (resume)",
    )
    p.add_argument("--out", type=Path, default=Path("data/teacher_labels.json"))
    args = p.parse_args(argv)
    try:
        summary = run(args)
        if summary is not None:
            print(f"label: {summary}")
    except (ParamsError, TeacherError) as e:
        print(f"label: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
