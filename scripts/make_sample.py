"""Generate the bundled sample dataset data/sample/ (deterministic: same bytes on every run).

    python scripts/make_sample.py [--out data/sample]

What it draws and why: ``teacher.dataset.sample``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from teacher.dataset.sample import make_sample, make_unlabeled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample")
    args = parser.parse_args()
    coco = make_sample(Path(args.out))
    pool = make_unlabeled(Path(args.out))
    print(
        f"{args.out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations; "
        f"{len(pool)} unlabeled images in {Path(args.out) / 'unlabeled'}"
    )


if __name__ == "__main__":
    main()
