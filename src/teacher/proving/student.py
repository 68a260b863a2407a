"""Pretraining the student's ``tiny-pretrained`` preset on the synthetic pretraining domain.

Our stand-in for a COCO-pretrained RF-DETR: :data:`teacher.student.model.TINY_PRETRAINED_ARCH`
(the segmenting RF-DETR, so one file serves both kinds), every weight trained from random init
on ``teacher.dataset.synth.PRETRAIN`` images generated in memory from the seed, with the
student's own targets (:mod:`teacher.student.data`) and loss (:mod:`teacher.student.loss`),
AdamW, warmup then cosine decay, horizontal flips. Deterministic per seed and thread count on one
machine. A held-out set (seed + 10 000) is scored at the end: COCO box mAP@50 and mask mAP of
the student's decode. ``scripts/pretrain_tiny.py student`` runs it and writes the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from teacher.coco.io import index_by_image
from teacher.coco.metrics import coco_eval, segm_ground_truth
from teacher.dataset import synth
from teacher.proving.pretrain import TEST_SEED_OFFSET, cpu_state, lr_at, seed_all
from teacher.student.data import instance_targets, label_index, model_targets
from teacher.student.loss import use_student_loss
from teacher.student.model import (
    TINY_PRETRAINED_RESOLUTION,
    decode,
    model_class,
    preprocess,
    tiny_pretrained_config,
)


def samples(coco: dict, pixels: list[np.ndarray]) -> list[tuple[np.ndarray, Any]]:
    """(image, Instances) per image, every instance with its mask."""
    label_of = label_index(coco["categories"])
    by_image = index_by_image(coco)
    out = []
    for info, img in zip(coco["images"], pixels, strict=True):
        h, w = img.shape[:2]
        inst = instance_targets(
            by_image.get(info["id"], []), height=h, width=w, label_of=label_of, masks=True
        )
        out.append((img, inst))
    return out


def _flip(img: np.ndarray, inst: Any) -> tuple[np.ndarray, Any]:
    w = img.shape[1]
    boxes = inst.boxes.copy()
    boxes[:, 0] = w - boxes[:, 0] - boxes[:, 2]
    masks = inst.masks[:, :, ::-1].copy() if inst.masks is not None else None
    return img[:, ::-1].copy(), inst.take(range(len(inst)), boxes=boxes, masks=masks)


def batch_of(
    items: list[tuple[np.ndarray, Any]], *, resolution: int
) -> tuple[torch.Tensor, list[dict]]:
    pixel_values = preprocess([img for img, _ in items], resolution=resolution)
    labels = [
        model_targets(inst, width=img.shape[1], height=img.shape[0], resolution=resolution)
        for img, inst in items
    ]
    return pixel_values, labels


@torch.no_grad()
def held_out_scores(model: Any, coco: dict, pixels: list[np.ndarray], *, resolution: int) -> dict:
    """Held-out COCO box mAP@50 / mAP and mask mAP of the student's decode (max 100 per image)."""
    from teacher.student.evaluate import results_of

    was = model.training
    model.eval()
    cats = [int(c["id"]) for c in sorted(coco["categories"], key=lambda c: int(c["id"]))]
    results: list[dict] = []
    for start in range(0, len(pixels), 16):
        chunk = pixels[start : start + 16]
        out = model(pixel_values=preprocess(chunk, resolution=resolution))
        outputs = [out.logits, out.pred_boxes] + (
            [out.pred_masks] if getattr(out, "pred_masks", None) is not None else []
        )
        sizes = [(im.shape[1], im.shape[0]) for im in chunk]
        dets = decode(outputs, sizes=sizes, category_ids=cats, max_detections=100)
        for info, det in zip(coco["images"][start : start + 16], dets, strict=True):
            results += results_of(det, image_id=info["id"])
    model.train(was)
    box = coco_eval(coco, results, iou_type="bbox", per_class=False)
    segm = coco_eval(segm_ground_truth(coco), results, iou_type="segm", per_class=False)
    return {"map_50": box["map_50"], "map": box["map"], "segm_map": segm["map"]}


def pretrain_student(
    *,
    steps: int,
    seed: int,
    n_images: int,
    n_test: int,
    batch_size: int,
    lr: float,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the tiny-pretrained student from random init; its weights (CPU) and held-out scores."""
    seed_all(seed)
    coco, pixels = synth.make_dataset(synth.PRETRAIN, n_images=n_images, seed=seed)
    names = [c["name"] for c in coco["categories"]]
    model = model_class(True)(tiny_pretrained_config(names=names))
    use_student_loss(model, masks=True)
    model.to(device).train()
    data = samples(coco, pixels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    res = TINY_PRETRAINED_RESOLUTION
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, warmup=min(200, steps // 10), total=steps)
        picks = rng.choice(len(data), size=batch_size, replace=False)
        items = [_flip(*data[i]) if rng.random() < 0.5 else data[i] for i in picks]
        pixel_values, labels = batch_of(items, resolution=res)
        labels = [{k: v.to(device) for k, v in t.items()} for t in labels]
        out = model(pixel_values=pixel_values.to(device), labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if (step + 1) % max(steps // 20, 1) == 0:
            terms = ", ".join(
                f"{k} {float(out.loss_dict[k]):.3f}" for k in ("loss_ce", "loss_giou")
            )
            log(
                f"step {step + 1}/{steps}: loss {float(out.loss):.3f} ({terms}), "
                f"{time.time() - started:.0f} s"
            )
    test_coco, test_pixels = synth.make_dataset(
        synth.PRETRAIN, n_images=n_test, seed=seed + TEST_SEED_OFFSET
    )
    model.cpu()
    scores = held_out_scores(model, test_coco, test_pixels, resolution=res)
    return cpu_state(model), scores
