"""Benchmark the data stages (inspect, validate, split) on a generated COCO export.

    .venv/bin/python benchmarks/bench_data.py [--images 20000] [--annotations 200000] [--keep DIR]

Writes a synthetic dataset (tiny JPEG files; 70% polygons, 20% compressed RLE, 10% box-only,
some crowd regions, 1% negative images) to a temporary folder, then runs each stage exactly
as ``dvc repro`` does (``python -m stages.<name>``, a fresh process each) and prints its wall
time and peak resident memory. Image checks read file headers only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from teacher.coco.io import mask_to_rle  # noqa: E402

SIZES = [(64, 48), (48, 64), (80, 60), (60, 80)]  # (w, h) of the generated JPEGs


def jpeg_bytes(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def make_annotation(
    rng: np.random.Generator, ann_id: int, image_id: int, w: int, h: int, rles: dict
) -> dict:
    x, y = float(rng.uniform(0, w - 12)), float(rng.uniform(0, h - 12))
    bw, bh = float(rng.uniform(4, w - x)), float(rng.uniform(4, h - y))
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(rng.integers(1, 81)),
        "iscrowd": 0,
        "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
        "area": round(bw * bh, 2),
        "segmentation": [],
    }
    kind = rng.random()
    if kind < 0.7:
        ann["segmentation"] = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
    elif kind < 0.9:
        rle, area, box = rles[(w, h)][int(rng.integers(len(rles[(w, h)])))]
        ann.update(segmentation=rle, area=area, bbox=box, iscrowd=int(rng.random() < 0.05))
    return ann


def make_dataset(root: Path, *, n_images: int, n_annotations: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    blobs = {s: jpeg_bytes(*s, k) for k, s in enumerate(SIZES)}
    rles = {}
    for w, h in SIZES:
        rles[(w, h)] = []
        for k in range(8):
            m = np.zeros((h, w), bool)
            m[5 + k : 20 + k, 3 + 2 * k : 30 + k] = True
            ys, xs = np.nonzero(m)
            box = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
            rles[(w, h)].append((mask_to_rle(m), float(m.sum()), box))
    images, anns = [], []
    positives = n_images - n_images // 100
    per_image, extra = divmod(n_annotations, positives)
    for i in range(1, n_images + 1):
        w, h = SIZES[i % len(SIZES)]
        name = f"{i % 100:02d}/{i:06d}.jpg"
        path = root / "images" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(blobs[(w, h)])
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        if i % 100 == 0:
            continue  # 1% negatives
        for _ in range(per_image + (1 if len(images) - len(images) // 100 <= extra else 0)):
            anns.append(make_annotation(rng, len(anns) + 1, i, w, h, rles))
    cats = [{"id": c, "name": f"class {c}"} for c in range(1, 81)]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def run_stage(name: str, args: list[str], cwd: Path) -> tuple[float, float, float]:
    """Run ``python -m stages.<name>``: (wall seconds, CPU seconds, peak RSS in MiB). CPU time
    is the stage's own work; wall time also counts waiting on a busy machine."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"stages.{name}", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage {name} failed:\n{out}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--annotations", type=int, default=200_000)
    parser.add_argument("--keep", type=Path, help="generate here and keep it")
    parser.add_argument(
        "--header-only",
        action="store_true",
        help="validate.decode_images: false (read image headers only)",
    )
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(tmp.name) if tmp else args.keep
    t0 = time.perf_counter()
    ann_path = make_dataset(root / "data", n_images=args.images, n_annotations=args.annotations)
    coco = json.loads(ann_path.read_text())
    print(
        f"generated {len(coco['images'])} images, {len(coco['annotations'])} annotations "
        f"({ann_path.stat().st_size / 2**20:.0f} MiB json) in {time.perf_counter() - t0:.1f} s"
    )
    del coco
    (root / "params.yaml").write_text(
        f"data:\n  annotations: {ann_path}\n  images: {root / 'data/images'}\n"
        f"validate:\n  on_error: fail\n  decode_images: {str(not args.header_only).lower()}\n"
    )
    stages = [
        ("inspect", ["--out", "inspect.json"]),
        (
            "validate",
            ["--inspect", "inspect.json", "--out", "validated.json", "--report", "validate.json"],
        ),
        ("split", ["--validated", "validated.json", "--out", "split"]),
    ]
    total, cpu_total, peak = 0.0, 0.0, 0.0
    for name, stage_args in stages:
        wall, cpu, rss = run_stage(name, ["--params", "params.yaml", *stage_args], root)
        total, cpu_total, peak = total + wall, cpu_total + cpu, max(peak, rss)
        print(f"{name:<9} wall {wall:6.1f} s   cpu {cpu:6.1f} s   peak RSS {rss:6.0f} MiB")
    print(
        f"{'total':<9} wall {total:6.1f} s   cpu {cpu_total:6.1f} s   peak RSS {peak:6.0f} MiB "
        "(max over stages)"
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
