"""Training the student: the ``Task`` for RF-DETR and the one call of train_student.

Every weight trains (RF-DETR is small), through the shared loop (:func:`teacher.train.loop.fit`):
resume, early stopping on val box mAP, dvclive, several processes. A batch mixing human and
teacher-labeled images runs one forward per source and weighs each source's loss by its weight
(``student.teacher_weight`` for the teachers' labels, 1 for human ones) and its share of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from teacher.coco.metrics import coco_eval
from teacher.core.params import StudentParams, TrainParams
from teacher.dataset.augment import build_transform
from teacher.student.data import (
    HUMAN,
    Source,
    StudentDataset,
    collate_student,
    label_index,
)
from teacher.student.model import (
    StudentInfo,
    StudentOutputs,
    build_student,
    decode,
    save_student,
)
from teacher.train.loop import Task, fit, seed_everything

BOX_TERMS = ("loss_ce", "loss_bbox", "loss_giou")  # last decoder layer's terms, logged per step
MASK_TERMS = ("loss_mask_ce", "loss_mask_dice")


@contextmanager
def rf_detr_loss_fixes() -> Iterator[None]:
    """Within: two fixes to transformers 5.24's RF-DETR losses, for training on our batches.

    - The box count the loss normalises by is this process's (no collective): a step runs one
      forward per source present in its share of the batch, which differs between processes,
      so the all-reduce inside the loss would hang. The loop still averages the gradients.
    - A forward whose images hold no instance at all (a pool image the teachers found nothing
      on) makes ``loss_masks`` return empty tensors instead of zeros, which turns the summed
      loss into an empty tensor; here they are zero scalars (still on the graph).
    """
    from transformers.loss import loss_lw_detr, loss_rf_detr

    saved = (
        loss_lw_detr._is_torch_distributed_initialized,
        loss_rf_detr._is_torch_distributed_initialized,
        loss_rf_detr.RfDetrImageLoss.loss_masks,
    )
    stock_masks = saved[2]

    def loss_masks(self, outputs, targets, indices, num_boxes):
        terms = stock_masks(self, outputs, targets, indices, num_boxes)
        return {k: v if v.numel() == 1 else v.sum() * 0.0 for k, v in terms.items()}

    loss_lw_detr._is_torch_distributed_initialized = (
        loss_rf_detr._is_torch_distributed_initialized
    ) = lambda: False
    loss_rf_detr.RfDetrImageLoss.loss_masks = loss_masks
    try:
        yield
    finally:
        (
            loss_lw_detr._is_torch_distributed_initialized,
            loss_rf_detr._is_torch_distributed_initialized,
            loss_rf_detr.RfDetrImageLoss.loss_masks,
        ) = saved


def training_step(
    model: nn.Module, batch: dict[str, Any], *, terms: tuple[str, ...]
) -> dict[str, Tensor]:
    """Weighted loss of a batch: one forward per loss weight, each weighted by its batch share."""
    with rf_detr_loss_fixes():
        return _weighted_loss(model, batch, terms=terms)


def _weighted_loss(
    model: nn.Module, batch: dict[str, Any], *, terms: tuple[str, ...]
) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    weights = batch["weights"].tolist()
    total: dict[str, Tensor] = {}
    for w in sorted(set(weights)):
        idx = [i for i, v in enumerate(weights) if v == w]
        labels = [{k: v.to(device) for k, v in batch["labels"][i].items()} for i in idx]
        out = model(pixel_values=batch["pixel_values"][idx].to(device), labels=labels)
        share = w * len(idx) / len(weights)
        parts = {"loss": out.loss, **{k: out.loss_dict[k].detach() for k in terms}}
        for k, v in parts.items():
            total[k] = total.get(k, 0.0) + share * v
    return total


@torch.no_grad()
def validate_student(
    model: nn.Module,
    *,
    loader: DataLoader,
    coco: dict[str, Any],
    category_ids: tuple[int, ...],
    masks: bool,
    max_detections: int = 100,
) -> dict[str, float]:
    """Val COCO box mAP (``val_map``, ``val_map_50``) and, with masks, ``val_segm_map``."""
    from teacher.student.evaluate import results_of

    was_training = model.training
    model.eval()
    forward = StudentOutputs(model)
    device = next(model.parameters()).device
    results: list[dict] = []
    for batch in loader:
        outputs = [o.cpu() for o in forward(batch["pixel_values"].to(device))]
        dets = decode(
            outputs, sizes=batch["sizes"], category_ids=category_ids, max_detections=max_detections
        )
        for image_id, det in zip(batch["image_ids"], dets, strict=True):
            results += results_of(det, image_id=image_id)
    model.train(was_training)
    stats = coco_eval(coco, results, iou_type="bbox", per_class=False)
    out = {"val_map": stats["map"], "val_map_50": stats["map_50"]}
    if masks:
        with_masks = {
            **coco,
            "annotations": [a for a in coco["annotations"] if a.get("segmentation")],
        }
        out["val_segm_map"] = coco_eval(with_masks, results, iou_type="segm", per_class=False)[
            "map"
        ]
    return out


def build_task(
    model: nn.Module,
    *,
    info: StudentInfo,
    sources: list[Source],
    val_coco: dict,
    image_root: Path,
    augment_policy: dict[str, Any],
    seed: int,
    batch_size: int,
) -> Task:
    """The training Task: augmented human + teacher images, weighted step, val mAP, save."""
    label_of = dict(zip(info.category_ids, range(len(info.category_ids)), strict=True))
    dataset = StudentDataset(
        sources,
        label_of=label_of,
        masks=info.masks,
        seed=seed,
        transform=build_transform(augment_policy, train=True),
    )
    val = StudentDataset(
        [Source(HUMAN, val_coco, Path(image_root), 1.0)], label_of=label_of, masks=False, seed=seed
    )
    collate = partial(collate_student, resolution=info.resolution)
    loader = DataLoader(val, batch_size=batch_size, shuffle=False, collate_fn=collate)
    terms = BOX_TERMS + (MASK_TERMS if info.masks else ())
    return Task(
        name="student",
        model=model,
        train_dataset=dataset,
        collate_fn=collate,
        step=partial(training_step, terms=terms),
        validate=partial(
            validate_student,
            loader=loader,
            coco=val_coco,
            category_ids=info.category_ids,
            masks=info.masks,
        ),
        monitor="val_map",
        save=partial(save_student, info=info),
    )


def train_student(
    *,
    train_coco: dict,
    val_coco: dict,
    image_root: Path,
    teacher: Source | None,
    masks: bool,
    student: StudentParams,
    train: TrainParams,
    augment_policy: dict[str, Any],
    seed: int,
    out_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path,
    fingerprint: str,
) -> dict[str, float]:
    """Train RF-DETR (``student.model``) on the human train split plus ``teacher`` (the teachers'
    labels of the pool, or None); the best weights go to ``out_dir``. Module-level and picklable
    arguments: runs under ``teacher.train.distributed.launch``."""
    cats = sorted(train_coco["categories"], key=lambda c: int(c["id"]))
    names = [str(c["name"]) for c in cats]
    seed_everything(seed)
    model, resolution, source = build_student(student, names=names, masks=masks)
    info = StudentInfo(
        source=source,
        masks=masks,
        resolution=resolution,
        category_ids=tuple(label_index(cats)),
        names=tuple(names),
    )
    sources = [Source(HUMAN, train_coco, Path(image_root), 1.0)]
    if teacher is not None and teacher.weight > 0 and teacher.coco["images"]:
        sources.append(teacher)
    task = build_task(
        model,
        info=info,
        sources=sources,
        val_coco=val_coco,
        image_root=image_root,
        augment_policy=augment_policy,
        seed=seed,
        batch_size=train.batch_size,
    )
    if student.lr is not None:
        train = dataclasses.replace(train, lr=student.lr)
    n_teacher = len(sources[1].coco["images"]) if len(sources) > 1 else 0
    summary = {
        "model": source,
        "masks": masks,
        "resolution": resolution,
        "human_images": len(train_coco["images"]),
        "teacher_images": n_teacher,
        "teacher_labels": len(sources[1].coco["annotations"]) if n_teacher else 0,
        **{f"augment_{k}": v for k, v in augment_policy.items()},
    }
    return fit(
        task,
        train=train,
        seed=seed,
        out_dir=out_dir,
        checkpoint_dir=checkpoint_dir,
        live_dir=live_dir,
        fingerprint=fingerprint,
        record=summary,
    )
