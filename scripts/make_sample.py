"""Generate the bundled sample dataset data/sample/ (deterministic: same bytes on every run).

    python scripts/make_sample.py [--out data/sample]

72 small JPEG images (128-256 px) of circles, squares, triangles and stars of varied size,
color and overlap on plain, gradient, striped and noisy backgrounds, drawn as outlines (a rim a
quarter of the shape's radius wide, the background inside; the shape stays opaque, and its
mask is the whole shape): an appearance the proving ground's pretrained SAM never saw, so
fine-tuning has something to learn; a few grayscale images,
two stored rotated with an EXIF orientation tag, a few with no objects. Instance masks are the
visible part of each shape: polygons where a shape is unoccluded, RLE (compressed or
uncompressed) where it is occluded or picked at random; a few ``iscrowd`` regions (clusters
of small dots) as uncompressed RLE, as COCO stores them. ``unlabeled/``: 24 more images of the
same world without annotations, the pool the teachers label for the student.
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
