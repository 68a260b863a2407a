"""Benchmark Grounded-SAM prediction: seconds per image with 1 vs 20 boxes per image.

SAM embeds each image once and decodes all of its boxes in one call, so 20 boxes should cost
little more than 1 (target: ratio <= 1.3). DINO is ``tiny-random``; SAM is ``tiny-random`` and
the real ``vit_b`` architecture with random weights (no download).

    .venv/bin/python benchmarks/bench_predict.py [--images 50] [--sam tiny-random vit_b]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from teacher.core.params import DinoParams
from teacher.dino.labels import build_label_map
from teacher.dino.model import load_dino
from teacher.inference.predict import Filter, Teachers, predict_images
from teacher.sam.build import ARCHITECTURES, build_sam, build_tiny_random

CLASSES = [{"id": i + 1, "name": n} for i, n in enumerate(["cat", "dog", "car", "person"])]


def make_images(n: int, *, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def build_teachers(sam_name: str, device: torch.device) -> Teachers:
    dino = load_dino(DinoParams(model="tiny-random", shortest_edge=480, longest_edge=800))
    dino.model.to(device)
    torch.manual_seed(0)
    sam = build_tiny_random() if sam_name == "tiny-random" else build_sam(ARCHITECTURES[sam_name])
    label_map = build_label_map(CLASSES, tokenizer=dino.processor.tokenizer)
    return Teachers(dino=dino, sam=sam.to(device).eval(), label_map=label_map)


def seconds_per_image(
    teachers: Teachers, images: list[np.ndarray], *, boxes: int, batch: int
) -> float:
    keep = Filter(
        score_threshold=0.0, nms_iou=1.0, max_detections=boxes
    )  # exactly `boxes` per image
    predict_images(teachers, images[:1], keep=keep, text_threshold=0.0)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        dets = predict_images(teachers, images[i : i + batch], keep=keep, text_threshold=0.0)
        assert all(len(d.scores) == boxes for d in dets)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--sam", nargs="+", default=["tiny-random", "vit_b"])
    parser.add_argument("--batch", type=int, default=4, help="images per DINO forward")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    images = make_images(args.images, height=args.size[0], width=args.size[1])
    print(f"device: {name}; {args.images} images {args.size[0]}x{args.size[1]}, DINO tiny-random")
    print("| SAM | s/img, 1 box | s/img, 20 boxes | ratio (target <= 1.3) |")
    print("|---|---|---|---|")
    for sam_name in args.sam:
        teachers = build_teachers(sam_name, device)
        with torch.inference_mode():
            one = seconds_per_image(teachers, images, boxes=1, batch=args.batch)
            twenty = seconds_per_image(teachers, images, boxes=20, batch=args.batch)
        print(f"| {sam_name} | {one:.3f} | {twenty:.3f} | {twenty / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
