"""Duplicate pre-labels of the labeling decode, per NMS setting, on the proving ground (issue 39).

    python benchmarks/bench_duplicates.py [--seeds 0 1] [--train-images 256] [--epochs 12]
        [--test-images 100] [--decodes 0.2/0.25 0.1/0.1 0.05/0.05] [--json out.json]

Per seed, the tiny-pretrained Grounding DINO is fine-tuned with LoRA on ``synth.FINETUNE``
(``bench_finetune.dino_run``: the project's training code), then labels held-out images of that
domain with the ``label`` stage's decode (``teacher.inference.predict``: 4 raw candidates per
kept detection) at each ``--decodes`` SCORE/TEXT threshold pair: the first is the stage's own
(``label.score_threshold`` / ``dino.text_threshold``); the tiny teacher's scores run far lower
than grounding-dino-tiny's, so the lower pairs give it the number of candidates per object a real
teacher has there. The raw detections are made once per decode; each NMS setting is
:func:`teacher.inference.predict.select` over them, exactly what ``predict_images`` keeps with
that :class:`Filter`.

Per setting (per-class NMS IoU x class-agnostic NMS IoU; 1 = off), summed over seeds:

- ``det/img``: kept detections per image;
- ``dup/obj``: duplicates per true object: a detection whose best-IoU true object (IoU >= 0.5,
  any class) is already matched by a higher-scoring kept detection; ``same`` / ``cross``: of
  those, the ones naming the object with the same class as the earlier match / another class;
- ``recall``: true objects with a kept detection of their class at IoU >= 0.5;
- ``precision``: kept detections that are the first (highest-scoring) match of a true object of
  their class at IoU >= 0.5 (COCO's greedy matching), over all kept detections.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import (  # noqa: E402
    DINO,
    TEST_SEED,
    TrainParams,
    dino_params,
    dino_run,
    train_val,
    write_world,
)

from teacher.coco.boxes import xywh_to_xyxy  # noqa: E402
from teacher.core.params import LabelParams  # noqa: E402
from teacher.dataset import synth  # noqa: E402
from teacher.inference.predict import (  # noqa: E402
    RAW_PER_KEPT,
    Filter,
    clip_detections,
    select,
)

PER_CLASS = (0.3, 0.5, 0.7, 1.0)  # per-class NMS IoU; 0.7 was the default, 1 = off
AGNOSTIC = (1.0, 0.9, 0.8, 0.7, 0.5)  # class-agnostic NMS IoU; 1 = off
MATCH_IOU = 0.5


def box_iou(a_xywh: np.ndarray, b_xywh: np.ndarray) -> np.ndarray:
    """(N, M) IoU of two sets of COCO xywh boxes."""
    from torchvision.ops import box_iou as tv_box_iou

    a = torch.as_tensor(xywh_to_xyxy(np.asarray(a_xywh, np.float32).reshape(-1, 4)))
    b = torch.as_tensor(xywh_to_xyxy(np.asarray(b_xywh, np.float32).reshape(-1, 4)))
    return tv_box_iou(a, b).numpy()


def image_counts(det, truth: list[dict]) -> dict[str, int]:
    """Counts of one image's kept detections (sorted by score) against its true objects."""
    gt_boxes = np.array([a["bbox"] for a in truth], np.float32).reshape(-1, 4)
    gt_cats = np.array([a["category_id"] for a in truth], np.int64)
    iou = box_iou(det.boxes, gt_boxes)  # (N dets, M objects)
    order = np.argsort(-det.scores, kind="stable")
    claimed: dict[int, int] = {}  # object -> class of its first (agnostic) match
    tp_taken: set[int] = set()
    counts = {"dets": len(det), "objects": len(truth), "tp": 0, "same": 0, "cross": 0}
    for i in order:
        cat = int(det.category_ids[i])
        if len(truth):
            best = int(np.argmax(iou[i]))
            if iou[i, best] >= MATCH_IOU:
                if best in claimed:
                    counts["same" if claimed[best] == cat else "cross"] += 1
                else:
                    claimed[best] = cat
        same_class = np.flatnonzero((gt_cats == cat) & (iou[i] >= MATCH_IOU))
        free = [j for j in same_class[np.argsort(-iou[i, same_class])] if j not in tp_taken]
        if free:
            tp_taken.add(int(free[0]))
            counts["tp"] += 1
    recalled = (
        (iou >= MATCH_IOU) & (det.category_ids[:, None] == gt_cats[None, :])
        if len(det)
        else np.zeros((0, len(truth)), bool)
    )
    counts["recalled"] = int(recalled.any(axis=0).sum())
    return counts


def raw_detections(adapter: Path, split: dict, *, score: float, text: float) -> list:
    """The labeling decode's raw candidates (clipped) per image, before NMS."""
    from teacher.coco.images import load_image
    from teacher.dino.labels import build_label_map
    from teacher.dino.model import load_dino
    from teacher.inference.predict import Teachers, detect_batch, merged

    bundle = merged(load_dino(dino_params({}), adapter_dir=adapter))
    label_map = build_label_map(split["coco"]["categories"], tokenizer=bundle.processor.tokenizer)
    teachers = Teachers(dino=bundle, sam=None, label_map=label_map)
    out = []
    images = split["coco"]["images"]
    for start in range(0, len(images), 8):
        pixels = [load_image(split["images"] / i["file_name"]) for i in images[start : start + 8]]
        raw = detect_batch(
            teachers,
            pixels,
            box_threshold=score,
            text_threshold=text,
            max_detections=RAW_PER_KEPT * LabelParams().max_detections,
        )
        out += [
            clip_detections(d, width=p.shape[1], height=p.shape[0])
            for d, p in zip(raw, pixels, strict=True)
        ]
    return out


def grid_counts(raw: list, coco: dict, *, score: float) -> dict[str, dict[str, int]]:
    """Per ``"<per-class>/<agnostic>"`` setting: counts summed over the images."""
    truth: dict = {i["id"]: [] for i in coco["images"]}
    for a in coco["annotations"]:
        truth[a["image_id"]].append(a)
    out = {}
    for nms in PER_CLASS:
        for agnostic in AGNOSTIC:
            keep = Filter(score_threshold=score, nms_iou=nms, agnostic_iou=agnostic)
            total: dict[str, int] = {}
            for det, image in zip(raw, coco["images"], strict=True):
                for k, v in image_counts(select(det, keep), truth[image["id"]]).items():
                    total[k] = total.get(k, 0) + v
            total["images"] = len(raw)
            out[f"{nms:g}/{agnostic:g}"] = total
    return out


def print_table(grid: dict[str, dict[str, int]]) -> None:
    print(
        "\n| per-class NMS IoU | agnostic NMS IoU | det/img | dup/obj (same + cross) | "
        "recall@0.5 | precision |"
    )
    print("|---|---|---|---|---|---|")
    for key, c in grid.items():
        nms, agnostic = key.split("/")
        dup = (c["same"] + c["cross"]) / c["objects"]
        print(
            f"| {'off' if nms == '1' else nms} | {'off' if agnostic == '1' else agnostic} | "
            f"{c['dets'] / c['images']:.2f} | {dup:.3f} ({c['same'] / c['objects']:.3f} + "
            f"{c['cross'] / c['objects']:.3f}) | {c['recalled'] / c['objects']:.3f} | "
            f"{c['tp'] / max(c['dets'], 1):.3f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--decodes",
        nargs="+",
        default=[
            f"{LabelParams().score_threshold:g}/{DINO.text_threshold:g}",
            "0.1/0.1",
            "0.05/0.05",
        ],
        help="SCORE/TEXT thresholds of the decodes measured: the first is the label stage's "
        "(label.score_threshold / dino.text_threshold); the lower ones give the tiny teacher "
        "the recall a real one has at the label stage's",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = TrainParams(epochs=args.epochs, batch_size=4, lr=1e-3, warmup_steps=5, patience=0)
    grids = {}
    with tempfile.TemporaryDirectory(prefix="bench_duplicates_") as tmp:
        root = Path(tmp)
        test = write_world(
            synth.FINETUNE, n_images=args.test_images, seed=TEST_SEED, out=root / "test"
        )
        for seed in args.seeds:
            start = time.time()
            tr, val = train_val(
                n_train=args.train_images, n_val=16, seed=seed, out=root / f"data{seed}"
            )
            data = {"train": tr, "val": val, "test": test, "retention": val}
            row = dino_run("lora", seed=seed, data=data, train=train, out=root / f"run{seed}")
            grids[seed] = {}
            for decode in args.decodes:
                score, text = map(float, decode.split("/"))
                raw = raw_detections(root / f"run{seed}" / "model", test, score=score, text=text)
                grids[seed][decode] = grid_counts(raw, test["coco"], score=score)
            print(
                f"seed {seed}: box mAP@50 {row['finetune']:.3f}, {time.time() - start:.0f} s",
                flush=True,
            )
    summed = {}
    for d in args.decodes:
        first = grids[args.seeds[0]][d]
        summed[d] = {
            key: {k: sum(g[d][key][k] for g in grids.values()) for k in first[key]} for key in first
        }
        print(f"\nSeeds {args.seeds} together, score / text threshold {d}:")
        print_table(summed[d])
    if args.json:
        args.json.write_text(json.dumps({"seeds": grids, "summed": summed}, indent=1))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
