"""Training the student: the ``Task`` for RF-DETR and the one call of train_student.

Every weight trains (RF-DETR is small), through the shared loop (:func:`teacher.train.loop.fit`):
resume, early stopping on val box mAP, dvclive, several processes. rf-detr's fine-tuning recipe
(``rfdetr/main.py``, ``config.py``, ``util/get_param_dicts.py``): layer-wise learning rates
(:func:`rf_detr_param_groups`), an EMA of the weights kept when it validates better, gradient
clipping at 0.1, no dropout, class heads started from the pretrained rows
(:func:`teacher.student.model.reinitialize_class_heads`). A batch runs one forward; each image's
loss counts at its source's weight (``student.teacher_weight`` for the teachers' labels, 1 for
human ones), teacher labels as evidence (:mod:`teacher.student.loss`).
"""

from __future__ import annotations

import dataclasses
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from teacher.coco.metrics import coco_eval, segm_ground_truth
from teacher.core.params import StudentParams, TrainParams
from teacher.dataset.augment import build_transform
from teacher.student.data import (
    HUMAN,
    Source,
    StudentDataset,
    collate_student,
    label_index,
)
from teacher.student.loss import use_student_loss
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


def training_step(
    model: nn.Module, batch: dict[str, Any], *, terms: tuple[str, ...]
) -> dict[str, Tensor]:
    """The batch's loss (:mod:`teacher.student.loss`: one forward, every image at its source's
    weight) and the last decoder layer's ``terms`` for the log."""
    device = next(model.parameters()).device
    labels = [{k: v.to(device) for k, v in t.items()} for t in batch["labels"]]
    out = model(pixel_values=batch["pixel_values"].to(device), labels=labels)
    return {"loss": out.loss, **{k: out.loss_dict[k].detach() for k in terms}}


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
    if masks:  # box-only objects are ignore regions, as in the test scores
        out["val_segm_map"] = coco_eval(
            segm_ground_truth(coco), results, iou_type="segm", per_class=False
        )["map"]
    return out


def _backbone_layer(name: str, num_layers: int) -> int:
    """rf-detr's ``get_dinov2_lr_decay_rate`` layer id: 0 for the embeddings, ``i + 1`` for ViT
    block ``i``, ``num_layers + 1`` for the rest of the backbone (its last norm)."""
    if "embeddings" in name:
        return 0
    found = re.search(r"\.layer\.(\d+)\.", name)
    return int(found.group(1)) + 1 if found else num_layers + 1


BACKBONE = re.compile(r"(^|\.)backbone\.backbone\.")  # the DINOv2 ViT (rf-detr: backbone.0.encoder)
DECODER = re.compile(r"(^|\.)model\.decoder\.")  # rf-detr: transformer.decoder
# rf-detr's get_dinov2_weight_decay_rate: none on these backbone parameters ("gamma" is its
# name for the layer scales transformers calls layer_scale*.lambda1)
NO_DECAY = ("gamma", "layer_scale", "pos_embed", "rel_pos", "bias", "norm", "embeddings")


def rf_detr_param_groups(
    params: list[tuple[str, nn.Parameter]],
    train: TrainParams,
    *,
    num_layers: int,
    lr_encoder: float,
    layer_decay: float,
    component_decay: float,
) -> list[dict[str, Any]]:
    """AdamW groups as rf-detr's ``get_param_dict`` (util/get_param_dicts.py, backbone.py):

    - the ViT backbone at ``lr_encoder x layer_decay ** (num_layers + 1 - layer_id) x
      component_decay ** 2`` (:func:`_backbone_layer`), no weight decay on :data:`NO_DECAY`;
    - the decoder at ``train.lr x component_decay``;
    - everything else (projector, query embeddings, heads, two-stage proposals, mask head) at
      ``train.lr``; both with ``train.weight_decay`` on every tensor, biases included, as rf-detr.

    ``num_layers``: rf-detr's ``out_feature_indexes[-1] + 1`` (13 for nano: its top block
    trains at 0.8 ** 2 of lr_encoder, as in rf-detr). Groups of equal settings are merged; the
    heads' group comes first (the loop logs group 0's lr)."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in params:
        if BACKBONE.search(name):
            layer = _backbone_layer(name, num_layers)
            lr = lr_encoder * layer_decay ** (num_layers + 1 - layer) * component_decay**2
            wd = 0.0 if any(k in name for k in NO_DECAY) else train.weight_decay
        elif DECODER.search(name):
            lr, wd = train.lr * component_decay, train.weight_decay
        else:
            lr, wd = train.lr, train.weight_decay
        groups.setdefault((lr, wd), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != train.lr, -k[0], -k[1]))
    return [{"params": groups[k], "lr": k[0], "weight_decay": k[1]} for k in order]


def num_vit_layers(config: Any) -> int:
    """rf-detr's ``out_feature_indexes[-1] + 1`` from transformers' ``out_features`` (stageN)."""
    stages = [int(s.removeprefix("stage")) for s in config.backbone_config.out_features]
    return max(stages) + 1


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
    student: StudentParams | None = None,
) -> Task:
    """The training Task: augmented human + teacher images, weighted step, val mAP, save;
    rf-detr's parameter groups and EMA (``student``'s settings)."""
    student = student or StudentParams()
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
        param_groups=partial(
            _student_groups, num_layers=num_vit_layers(model.config), student=student
        ),
        ema=(student.ema_decay, student.ema_tau) if student.ema_decay > 0 else None,
    )


def _student_groups(
    params: list[tuple[str, nn.Parameter]],
    train: TrainParams,
    *,
    num_layers: int,
    student: StudentParams,
) -> list[dict[str, Any]]:
    return rf_detr_param_groups(
        params,
        train,
        num_layers=num_layers,
        lr_encoder=student.lr_encoder or 1.5 * train.lr,
        layer_decay=student.layer_decay,
        component_decay=student.component_decay,
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
    use_student_loss(model, masks=masks)
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
        student=student,
    )
    # rf-detr trains batch 4 x 4 accumulation for 100 epochs (no early stopping by default);
    # the student keeps the pipeline's train.* (batch, accumulation, epochs, patience) so one
    # setting sizes every stage for the user's machine. Its lr and clipping are rf-detr's.
    train = dataclasses.replace(train, lr=student.lr or train.lr, clip_norm=student.clip_norm)
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
