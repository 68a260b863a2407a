"""Memory of SAM scored from ground-truth boxes (training's validation, the test split's mIoU):
16 vs 200 objects on one 12 MP photo. Target: peak ratio (200 / 16) <= 1.3.

The real ``vit_b`` architecture (segment-anything's builder arguments) with random weights (no
download), one 4000x3000 RGB image with N polygon objects, the path both validation and
``evaluate`` take: ``prepare_image`` (one encoder pass) then ``score_gt_boxes`` (ground-truth
masks decoded and boxes decoded ``chunk`` at a time, IoU per chunk). Each N runs in its own
process; memory is that process's peak RSS (``ru_maxrss``: weights, image and the encoder's
activations included), and apart the growth of the peak during scoring (above the peak that
embedding the image reached). Peak RSS, not tracemalloc: torch's allocations are not Python
objects and tracemalloc does not see them. On a GPU the same figures are CUDA max allocated.

    python benchmarks/bench_sam_memory.py                     # 16 and 200 objects, the table
    python benchmarks/bench_sam_memory.py --objects 16 100    # other counts
    python benchmarks/bench_sam_memory.py --chunk 200         # one decoder call per image (the old path)
    BENCH_SAM_ARCH=tiny-random python benchmarks/bench_sam_memory.py   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH = os.environ.get("BENCH_SAM_ARCH", "vit_b")
HEIGHT, WIDTH = 3000, 4000


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_gib(torch) -> float:
    return (
        torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else peak_rss_gib()
    )


def objects(n: int, rng) -> list[dict]:
    """n polygon annotations (octagons, 150-600 px across) spread over the image."""
    import numpy as np

    anns = []
    for i in range(n):
        w, h = rng.uniform(150, 600, 2)
        x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
        ring = np.stack([x + w / 2 * (1 + np.cos(angles)), y + h / 2 * (1 + np.sin(angles))], 1)
        anns.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1 + i % 3,
                "iscrowd": 0,
                "bbox": [float(x), float(y), float(w), float(h)],
                "segmentation": [ring.ravel().tolist()],
            }
        )
    return anns


def run_one(n: int, chunk: int) -> dict:
    """In this process: embed one 12 MP image, score n ground-truth boxes; the figures."""
    import numpy as np
    import torch

    from teacher.sam.build import ARCHITECTURES
    from teacher.sam.predictor import prepare_image
    from teacher.sam.scoring import score_gt_boxes

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from teacher.sam.build import build_sam

    sam = build_sam(ARCHITECTURES[ARCH]).to(device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    anns = objects(n, rng)
    start = time.perf_counter()
    prepared = prepare_image(sam, image)
    embedded = peak_gib(torch)
    t_embed = time.perf_counter() - start
    ious, _ = score_gt_boxes(prepared, anns, multimask=False, chunk=chunk)
    t_score = time.perf_counter() - start - t_embed
    peak = peak_gib(torch)
    return {
        "objects": n,
        "chunk": chunk,
        "peak_gib": round(peak, 3),
        "scoring_growth_gib": round(max(peak - embedded, 0.0), 3),
        "embed_s": round(t_embed, 1),
        "score_s": round(t_score, 1),
        "instances": len(ious),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, nargs="+", default=[16, 200])
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="boxes per decoder call (default: teacher.sam.predictor.SAM_CHUNK)",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one count
    args = parser.parse_args()
    if args.chunk is None:
        from teacher.sam.predictor import SAM_CHUNK

        args.chunk = SAM_CHUNK
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.chunk)))
        return 0
    rows = []
    for n in args.objects:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--chunk", str(args.chunk)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nSAM {ARCH} (random weights), {WIDTH}x{HEIGHT} image, ground-truth boxes, chunk {args.chunk}"
    )
    print("| objects | peak | growth while scoring | embed s | score s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['objects']} | {r['peak_gib']:.2f} GiB | {r['scoring_growth_gib']:.2f} GiB | "
            f"{r['embed_s']} | {r['score_s']} |"
        )
    if len(rows) >= 2:
        ratio = rows[-1]["peak_gib"] / rows[0]["peak_gib"]
        print(
            f"peak ratio {rows[-1]['objects']} / {rows[0]['objects']} objects: {ratio:.2f} "
            f"(target <= 1.3): {'ok' if ratio <= 1.3 else 'OVER'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
