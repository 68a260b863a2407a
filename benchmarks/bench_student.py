"""Benchmark: per-image latency of the student (RF-DETR) vs the teachers (Grounded-SAM).

Real architectures with random weights (no download): Grounding DINO tiny (Swin-T + BERT-base,
800 x 1333 input) + SAM ``vit_b`` (1024 input) as the teachers, against RF-DETR nano (boxes,
384 px) and RF-DETR seg-nano (boxes + masks, 312 px). Each model labels the same images one at
a time, end to end (preprocessing, forward, post-processing; not disk decoding), after one
warm-up image. Target: the student at least 20x faster than the teachers.

    .venv/bin/python benchmarks/bench_student.py [--images 5] [--size 480 640] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

CLASSES = [{"id": i + 1, "name": n} for i, n in enumerate(["cat", "dog", "car", "person"])]


def make_images(n: int, *, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def build_teachers(device: torch.device):
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from teacher.core.params import DinoParams
    from teacher.dino.labels import build_label_map
    from teacher.dino.model import DinoBundle, build_processor, prepare_model, tiny_tokenizer
    from teacher.inference.predict import Teachers
    from teacher.sam.build import ARCHITECTURES, build_sam

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()  # bert-base-uncased ids; the prompt's ids fit BERT's vocabulary
    dino = prepare_model(GroundingDinoForObjectDetection(GroundingDinoConfig())).eval().to(device)
    bundle = DinoBundle(model=dino, processor=build_processor(tokenizer, dino=DinoParams()))
    sam = build_sam(ARCHITECTURES["vit_b"]).to(device).eval()
    return Teachers(dino=bundle, sam=sam, label_map=build_label_map(CLASSES, tokenizer=tokenizer))


def build_student(name: str, device: torch.device):
    from teacher.student.model import (
        ARCHITECTURES,
        Student,
        StudentInfo,
        StudentOutputs,
        architecture_config,
        model_class,
    )

    torch.manual_seed(0)
    masks = "seg" in name
    names = [c["name"] for c in CLASSES]
    model = model_class(masks)(architecture_config(name, names=names))
    info = StudentInfo(
        source=name,
        masks=masks,
        resolution=ARCHITECTURES[name][2],
        category_ids=tuple(c["id"] for c in CLASSES),
        names=tuple(names),
    )
    return Student(forward=StudentOutputs(model).to(device).eval(), info=info)


def ms_per_image(run, images: list[np.ndarray]) -> float:
    run(images[0])  # warm-up
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for image in images:
        run(image)
    sync()
    return 1000.0 * (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from teacher.inference.predict import Filter, predict_images
    from teacher.student.model import predict

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    images = make_images(args.images, height=args.size[0], width=args.size[1])
    print(f"device: {where}; {args.images} images {args.size[0]}x{args.size[1]}, random weights")
    keep = Filter(score_threshold=0.0, nms_iou=0.7, max_detections=20)  # 20 boxes for SAM per image
    with torch.inference_mode():
        teachers = build_teachers(device)
        teacher_ms = ms_per_image(
            lambda im, t=teachers: predict_images(t, [im], keep=keep, text_threshold=0.0), images
        )
        teachers = None  # free the teachers' memory before the students run
        print("| model | ms / image | teachers / student (target >= 20) |")
        print("|---|---|---|")
        print(
            f"| Grounded-SAM (Grounding DINO tiny 800x1333 + SAM vit_b, 20 boxes) | {teacher_ms:.0f} | 1 |"
        )
        for name in ("rf-detr-nano", "rf-detr-seg-nano"):
            student = build_student(name, device)
            ms = ms_per_image(lambda im, s=student: predict(s, [im], max_detections=100), images)
            print(
                f"| student {name} ({student.info.resolution} px) | {ms:.0f} | {teacher_ms / ms:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
