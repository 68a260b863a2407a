"""Fine-tuning SAM from box and click prompts: the training ``Task`` for SAM and the one call of
train_sam. Clicks follow SAM's iterative recipe, cut short (:func:`prompt_rounds` says where).

LoRA on the image encoder attention (``sam.lora_targets``, optionally decoder attention too);
``sam.train_decoder`` trains the mask decoder fully (saved beside the adapter, never through
peft's ``modules_to_save``). When no encoder parameter trains (decoder-only mode), image
embeddings are computed once into a disk cache and every epoch reads them from there. Either
family (SAM, SAM 2): the model's family interface (:mod:`teacher.sam.model`) gives geometry,
embedding, decoder, encoder parameters and the fully trained decoder modules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from teacher.coco.images import image_path, load_image
from teacher.coco.io import images_by_id
from teacher.coco.metrics import mean_mask_iou
from teacher.core.errors import TeacherError
from teacher.core.params import LoraParams, SamParams, TrainParams
from teacher.dataset.augment import build_transform
from teacher.sam.build import load_base_sam
from teacher.sam.data import SamDataset, cache_split_embeddings, collate_sam, sam_instances
from teacher.sam.embedding import Embedding, embedding_from_tensors
from teacher.sam.losses import sam_loss
from teacher.sam.model import decode_prompts, input_size, select_best, unwrap
from teacher.sam.predictor import prepare_image
from teacher.sam.prompts import correction_points
from teacher.sam.scoring import score_gt_boxes
from teacher.train.distributed import process_rank_and_count
from teacher.train.loop import Task, fit
from teacher.train.lora import apply_lora, save_adapter
from teacher.train.memory import checkpoint_layers

log = logging.getLogger(__name__)


def untrainable_reason(
    facts: dict[str, Any], *, train_coco: dict[str, Any] | None = None
) -> str | None:
    """Why SAM cannot train on this data (from data/inspect.json's ``teachers``; then, when
    given, the train split: its few masks may all have fallen in val/test), or None."""
    teachers = facts.get("teachers") if isinstance(facts, dict) else None
    if not isinstance(teachers, dict) or "sam" not in teachers:
        raise TeacherError(
            "data/inspect.json: no teachers.sam fact; re-run the inspect stage (dvc repro inspect)"
        )
    if not teachers["sam"]:
        return (teachers.get("reasons") or {}).get("sam") or "the data has no instance masks"
    if train_coco is not None and not sam_instances(train_coco):
        return (
            "the train split has no non-crowd annotation with a mask (the dataset's masks "
            "all fell in val/test): SAM needs instance masks to train on; add masks"
        )
    return None


def wrap_for_training(
    sam: nn.Module, *, sam_params: SamParams, lora: LoraParams, activation_checkpointing: bool
) -> nn.Module:
    """LoRA from params (+ the fully trained decoder: the family's ``decoder_modules``);
    checkpointing of encoder blocks if asked and the encoder trains."""
    model = apply_lora(
        sam,
        lora=lora,
        targets=sam_params.lora_targets,
        train_modules=unwrap(sam).decoder_modules if sam_params.train_decoder else None,
    )
    if activation_checkpointing and encoder_trains(model):
        checkpoint_layers(unwrap(model).encoder_blocks())
    return model


def encoder_trains(model: nn.Module) -> bool:
    """Whether any parameter the image embedding depends on requires grad (False:
    decoder-only mode)."""
    return any(p.requires_grad for p in unwrap(model).encoder_parameters())


def masks_to_low_res(masks: Tensor, size: tuple[int, ...]) -> Tensor:
    """(N, S, S) bool masks in the input frame -> (N, h, w) float 0/1 at the decoder's resolution
    (area average, then >= 0.5)."""
    area = F.interpolate(masks[:, None].float(), size, mode="area")[:, 0]
    return (area >= 0.5).float()


def training_step(
    model: nn.Module, batch: dict[str, Any], *, sam_params: SamParams
) -> dict[str, Tensor]:
    """SAM's loss over every prompt of the batch, at the decoder's low-res mask resolution.

    Per image, the box prompts and the point prompts (``is_point``) each go through the decoder
    (one call per group), then ``sam.correction_points`` rounds add a correction click each
    (:func:`prompt_rounds`). Each term is the prompt-weighted mean of :func:`sam_loss` over
    every (group, round).
    """
    sam = unwrap(model)
    embeddings = batch["embeddings"]
    embeddings = sam.embed(
        images=batch["images"],
        embeddings=None if embeddings is None else embeddings.to(sam.device),
    )
    size = input_size(sam)
    parts: list[tuple[dict[str, Tensor], int]] = []
    for i, embedding in enumerate(embeddings):
        low_res = (4 * embedding.shape[-1],) * 2  # the decoder upscales the embedding 4x
        target = masks_to_low_res(batch["masks"][i].to(sam.device), low_res)
        is_point = batch["is_point"][i].to(sam.device)
        low_h, low_w = target.shape[-2:]
        extent = tuple(math.ceil(v * low_h / size) for v in batch["extents"][i])
        rng = np.random.default_rng(batch["seeds"][i])
        for kind, chosen in (("box", ~is_point), ("point", is_point)):
            if not bool(chosen.any()):
                continue
            first = (
                Prompts(boxes=batch["boxes"][i].to(sam.device)[chosen])
                if kind == "box"
                else Prompts.clicks(batch["points"][i].to(sam.device)[chosen])
            )
            for logits, iou_pred in prompt_rounds(
                sam,
                embedding,
                first,
                target[chosen],
                first_multimask=sam_params.multimask if kind == "box" else True,
                corrections=sam_params.correction_points,
                extent=(int(extent[0]), int(extent[1])),
                scale=size / low_w,
                rng=rng,
            ):
                terms = sam_loss(
                    logits.float(),
                    iou_pred.float(),
                    target[chosen],
                    focal_weight=sam_params.focal_weight,
                    dice_weight=sam_params.dice_weight,
                    iou_weight=sam_params.iou_weight,
                    focal_alpha=sam_params.focal_alpha,
                    focal_gamma=sam_params.focal_gamma,
                )
                parts.append((terms, len(logits)))
    return merge_losses(parts)


@dataclass(frozen=True)
class Prompts:
    """Prompts of one group of an image in the input frame: a box each, or clicks each."""

    boxes: Tensor | None = None  # (N, 4) xyxy
    points: Tensor | None = None  # (N, P, 2) x, y
    labels: Tensor | None = None  # (N, P) 1 positive, 0 negative, -1 not a point

    @classmethod
    def clicks(cls, points: Tensor) -> Prompts:
        """One positive click per prompt: points (N, 2)."""
        ones = torch.ones(len(points), 1, dtype=torch.int64, device=points.device)
        return cls(points=points[:, None], labels=ones)

    def add(self, points: Tensor, labels: Tensor) -> Prompts:
        """These prompts with one more click each: points (N, 2), labels (N,)."""
        device = (self.boxes if self.boxes is not None else self.points).device  # type: ignore[union-attr]
        points, labels = points.to(device)[:, None], labels.to(device)[:, None]
        if self.points is None or self.labels is None:
            return Prompts(boxes=self.boxes, points=points, labels=labels)
        return Prompts(
            boxes=self.boxes,
            points=torch.cat([self.points, points], 1),
            labels=torch.cat([self.labels, labels], 1),
        )


def prompt_rounds(
    sam: Any,
    embedding: Embedding,
    first: Prompts,
    target: Tensor,
    *,
    first_multimask: bool,
    corrections: int,
    extent: tuple[int, int],
    scale: float,
    rng: np.random.Generator,
) -> list[tuple[Tensor, Tensor]]:
    """SAM's iterative training, cut short: the first prompt, then ``corrections`` rounds that
    each add one click from the error region of the previous round's mask.

    target: (N, h, w) 0/1 at the decoder's resolution; extent: the image's part of it; scale:
    input pixels per low-res cell. Returns each round's (logits (N, K, h, w), IoU (N, K)).

    As SAM (appendix A): the first prompt's loss takes the best of 3 masks for a single click
    (``first_multimask``), later rounds (more than one prompt) the single-mask output; the click
    comes from the candidate with the highest predicted IoU, chosen without gradient; every
    round's loss counts. Departures: 1 correction round by default instead of 8 (+ 2 without a
    new click), since each costs a decoder pass and the smart tool's clicks rarely go past a
    few; and the previous round's logits are not fed back as a mask prompt, because neither
    ``teacher serve`` nor ``teacher predict`` ever sends one: training the path they use.
    """
    rounds: list[tuple[Tensor, Tensor]] = []
    prompts, multimask = first, first_multimask
    for _ in range(corrections + 1):
        if rounds:
            with torch.no_grad():
                best, _ = select_best(rounds[-1][0].detach(), rounds[-1][1].detach())
                points, labels = correction_points(
                    best > sam.mask_threshold, target > 0.5, extent=extent, scale=scale, rng=rng
                )
            prompts, multimask = prompts.add(points, labels), False
        rounds.append(
            decode_prompts(
                sam,
                embedding,
                boxes=prompts.boxes,
                points=prompts.points,
                labels=prompts.labels,
                multimask=multimask,
            )
        )
    return rounds


def merge_losses(parts: list[tuple[dict[str, Tensor], int]]) -> dict[str, Tensor]:
    """The prompt-weighted mean of each term over (terms, prompts) parts."""
    total = sum(n for _, n in parts)
    return {k: torch.stack([t[k] * n for t, n in parts]).sum() / total for k in parts[0][0]}


def validate_miou(
    model: nn.Module,
    coco: dict[str, Any],
    image_root: Path,
    *,
    multimask: bool,
    embeddings: dict[Any, Path] | None = None,
) -> dict[str, float]:
    """Mean mask IoU over every SAM instance, prompted with its ground-truth box, at the
    original image size (:func:`teacher.sam.scoring.score_gt_boxes`, as the test split's
    ``mask/miou``): ``{"val_miou": float, "val_instances": int}``; no instance: -1.

    With ``embeddings`` (decoder-only mode) the cached embedding is used and the image is not
    read; its record's size was checked against the file when the cache was built.
    """
    from safetensors.torch import load_file

    was_training = model.training
    model.eval()
    images, ious, cats = images_by_id(coco), [], []
    for image_id, anns in sam_instances(coco).items():
        record = images[image_id]
        if embeddings:
            prepared = prepare_image(
                model,
                embedding=embedding_from_tensors(load_file(str(embeddings[image_id]))),
                original_size=(int(record["height"]), int(record["width"])),
            )
        else:
            prepared = prepare_image(model, load_image(image_path(image_root, record["file_name"])))
        iou, det = score_gt_boxes(prepared, anns, multimask=multimask)
        ious.append(iou)
        cats += det.category_ids.tolist()
    model.train(was_training)
    all_ious = np.concatenate(ious) if ious else np.zeros((0,))
    return {
        "val_miou": mean_mask_iou(all_ious, cats)["mask_miou"],
        "val_instances": float(len(all_ious)),
    }


def build_task(
    model: nn.Module,
    *,
    train_coco: dict[str, Any],
    val_coco: dict[str, Any],
    image_root: Path,
    sam_params: SamParams,
    augment_policy: dict[str, Any],
    seed: int,
    cache_dir: Path | None,
) -> Task:
    """The training Task: dataset (cached embeddings in decoder-only mode), step, val mIoU, save."""
    train_cache = val_cache = None
    transform: Callable | None = build_transform(augment_policy, train=True)
    if not encoder_trains(model):
        if cache_dir is None:
            raise ValueError("decoder-only SAM training needs a cache_dir for image embeddings")
        sam = unwrap(model).to("cuda" if torch.cuda.is_available() else "cpu")
        rank, world = process_rank_and_count()  # each process embeds its share; all read all
        train_cache, val_cache = cache_split_embeddings(
            sam,
            [train_coco, val_coco],
            image_root,
            cache_dir,
            max_bytes=int(sam_params.embedding_cache_gib * 2**30),
            rank=rank,
            world=world,
        )
        transform = None  # an embedding is of the plain image: no image augmentation
        log.info(
            "SAM decoder-only: %d + %d image embeddings cached in %s; image augmentation "
            "off (box jitter kept)",
            len(train_cache),
            len(val_cache),
            cache_dir,
        )
    dataset = SamDataset(
        train_coco,
        image_root,
        geometry=unwrap(model).geometry,
        max_prompts=sam_params.max_prompts,
        box_jitter=sam_params.box_jitter,
        box_jitter_max=sam_params.box_jitter_max,
        point_prompts=sam_params.point_prompts,
        seed=seed,
        transform=transform,
        embeddings=train_cache,
    )
    return Task(
        name="sam",
        model=model,
        train_dataset=dataset,
        collate_fn=collate_sam,
        step=partial(training_step, sam_params=sam_params),
        validate=partial(
            validate_miou,
            coco=val_coco,
            image_root=image_root,
            multimask=sam_params.multimask,
            embeddings=val_cache,
        ),
        monitor="val_miou",
        # the model is the PeftModel apply_lora returned
        save=cast(Callable[[nn.Module, Path], None], save_adapter),
    )


def train_sam(
    *,
    train_coco: dict[str, Any],
    val_coco: dict[str, Any],
    image_root: Path,
    sam: SamParams,
    lora: LoraParams,
    train: TrainParams,
    augment_policy: dict[str, Any],
    seed: int,
    out_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path,
    cache_dir: Path,
    fingerprint: str,
) -> dict[str, float]:
    """Fine-tune SAM (``sam.model``) with LoRA; the best adapter goes to ``out_dir``.

    Returns the best epoch's metrics (``val_miou``, ...) from the training loop.
    """
    with torch.random.fork_rng(devices=[]):  # LoRA's random init follows `seed`, nothing else
        torch.manual_seed(seed)
        model = wrap_for_training(
            load_base_sam(sam.model),
            sam_params=sam,
            lora=lora,
            activation_checkpointing=train.activation_checkpointing,
        )
    task = build_task(
        model,
        train_coco=train_coco,
        val_coco=val_coco,
        image_root=image_root,
        sam_params=sam,
        augment_policy=augment_policy,
        seed=seed,
        cache_dir=cache_dir,
    )
    record = {
        "decoder_only": not encoder_trains(model),
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
        record=record,
    )
