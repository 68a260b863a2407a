"""Fine-tuning Grounding DINO: the training ``Task`` for DINO and the one call of train_dino.

LoRA on the attention projections and FFNs of the encoder, decoder and text-image fusion
layers, the text projection, the reference-point head and the image features' input projection
(``input_proj_vision``, which both references train: the first weights after the frozen Swin;
``dino.lora_targets``);
``dino.train_heads`` trains the box heads fully (the decoder's, tied across layers, and the
two-stage proposal head; saved beside the adapter). ``sampling_offsets`` and
``reference_points_head`` train at ``dino.offsets_lr_scale`` x the lr (Open-GroundingDino's
``lr_linear_proj_names``), gradients are clipped at ``dino.clip_norm`` and encoder/decoder
dropout is ``dino.dropout`` (both references: clip 0.1, dropout 0.0). Image and text encoders that no LoRA
reaches run under ``no_grad``; ``train.activation_checkpointing`` recomputes encoder and decoder
layers in backward. Training images are resized as both references resize them
(:mod:`teacher.dino.scales`). Validation: the grounded loss and COCO box mAP (pycocotools) on
the val split, decoded as Open-GroundingDino's COCO evaluation
(:func:`teacher.dino.detect.decode_reference`), in batches of one image size.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from teacher.coco.metrics import coco_eval
from teacher.coco.vocabulary import retention_classes
from teacher.core.artifacts import LABELS_FILE
from teacher.core.params import DinoParams, LoraParams, TrainParams
from teacher.dataset.augment import REFERENCE_BOXES, build_transform
from teacher.dino.data import DinoDataset, collate_dino
from teacher.dino.denoising import Denoiser
from teacher.dino.detect import (
    REFERENCE_TOP_K,
    coco_results,
    decode_reference,
    merge_detections,
    same_size_batches,
)
from teacher.dino.labels import LabelMap, build_label_map, save_labels
from teacher.dino.loss import grounded_loss
from teacher.dino.model import HEAD_MODULES, frozen_towers, load_dino, set_dropout
from teacher.dino.retain import (
    RetainNames,
    base_outputs,
    keep_pretrained_values,
    retain_loss,
    retain_names,
    retain_proposal_loss,
    retain_token_masks,
    shared_towers,
    user_tokens_only,
    weighted_total,
)
from teacher.dino.scales import TrainScales, train_scales
from teacher.train.loop import Task, fit, seed_everything
from teacher.train.lora import apply_lora, save_adapter
from teacher.train.memory import checkpoint_layers, run_without_grad

if TYPE_CHECKING:
    from peft import PeftModel

# logged per step beside the total (dvclive train/<term>): every weighted term of the grounded
# loss: each decoder layer's (loss_ce, loss_bbox, loss_giou for the last; loss_ce_0 ... for the
# others), the proposals' (_enc) and the denoising queries' (_dn, _dn_0 ...). Not the unweighted
# cardinality_error diagnostics.
LOGGED_TERM = re.compile(r"loss_(ce|bbox|giou)(_enc|_dn)?(_\d+)?")
# Open-GroundingDino lr_linear_proj_names (ref_point_head, sampling_offsets): dino.offsets_lr_scale
OFFSET_PARAMS = r"sampling_offsets|reference_points_head"
INPUT_KEYS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids")


def _base(model: nn.Module) -> Any:
    """The HF model inside a peft wrapper (Any: its submodules are reached by attribute)."""
    return cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model


def wrap_for_training(
    model: nn.Module, *, dino: DinoParams, lora: LoraParams, activation_checkpointing: bool
) -> nn.Module:
    """Dropout as ``dino.dropout``; LoRA (+ fully trained heads); frozen towers without autograd;
    optional checkpointing; ``dino.retain_weight`` > 0: the pretrained values of the fully trained
    heads kept for the base model's forward (:mod:`teacher.dino.retain`); ``dino.denoise_queries`` > 0: contrastive denoising queries in every
    training step (:mod:`teacher.dino.denoising`; their label embedding trains as ``denoiser.*``
    and is not saved with the adapter)."""
    set_dropout(model, dino.dropout)
    model = apply_lora(
        model,
        lora=lora,
        targets=dino.lora_targets,
        train_modules=HEAD_MODULES if dino.train_heads else None,
    )
    base = _base(model)
    for name in frozen_towers(model):
        run_without_grad(base.get_submodule(name))
    if activation_checkpointing:
        checkpoint_layers([*base.model.encoder.layers, *base.model.decoder.layers])
    if dino.retain_weight > 0:  # the base model's answers need the heads' pretrained values
        model = keep_pretrained_values(model)
    return with_denoising(model, dino)


def with_denoising(model: nn.Module, dino: DinoParams) -> nn.Module:
    """``model`` (LoRA-wrapped) with ``dino.denoise_queries`` contrastive denoising queries in
    its training steps (:func:`training_step`), when > 0."""
    if dino.denoise_queries:
        denoiser = Denoiser(_base(model), max_queries=dino.denoise_queries)
        model.add_module("denoiser", denoiser)
    return model


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    """The processor tensors of a ``collate_dino`` batch, on ``device``."""
    return {k: batch[k].to(device) for k in INPUT_KEYS if k in batch}


def training_step(
    model: nn.Module, batch: dict[str, Any], *, retain_weight: float = 0.0
) -> dict[str, Tensor]:
    """Forward with targets; the grounded loss and its main terms. ``retain_weight`` > 0 and
    retention names in the batch's prompts (:mod:`teacher.dino.retain`): the base model's
    answers for them first (adapter off, no gradients), then the fine-tuned forward, whose
    grounded loss leaves their tokens out, plus ``retain_weight`` x the retention terms
    (logged as ``loss_retain_*``)."""
    device = next(model.parameters()).device
    labels = [{k: v.to(device) for k, v in t.items()} for t in batch["labels"]]
    inputs = model_inputs(batch, device)
    retain = retain_weight > 0 and batch.get("retained", 0) > 0
    denoiser = model._modules.get("denoiser")  # dino.denoise_queries (wrap_for_training)
    with shared_towers(model) if retain else nullcontext():  # one Swin and BERT pass for both
        base = base_outputs(model, inputs) if retain else None
        tokens = None
        if base is not None:
            maps = build_label_maps(base.logits, cast(torch.LongTensor, inputs["input_ids"]))
            tokens = retain_token_masks(maps, batch["own"])
        with (
            denoiser.training_on(labels) if isinstance(denoiser, Denoiser) else nullcontext(),
            user_tokens_only(model, tokens) if tokens is not None else nullcontext(),
        ):
            out = model(**inputs, labels=labels)
    found = {"loss": out.loss, **logged_terms(out.loss_dict)}
    if base is not None and tokens is not None:
        skip = out.logits.shape[1] - base.logits.shape[1]  # denoising queries come first
        terms = retain_loss(
            out.logits[:, skip:],
            out.pred_boxes[:, skip:],
            base.logits,
            base.pred_boxes,
            tokens,
            config=_base(model).config,
        )
        terms |= retain_proposal_loss(
            out.enc_outputs_class,
            out.enc_outputs_coord_logits,
            base.enc_outputs_class,
            base.enc_outputs_coord_logits,
            tokens,
        )
        found["loss"] = out.loss + weighted_total(terms, retain_weight)
        found.update({k: v.detach() for k, v in terms.items()})
    return found


def logged_terms(loss_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The terms of ``loss_dict`` logged beside the total (:data:`LOGGED_TERM`), detached."""
    return {k: v.detach() for k, v in loss_dict.items() if LOGGED_TERM.fullmatch(k)}


@contextmanager
def loss_on_this_process(model: nn.Module):
    """Within: the model's loss normalises by this process's boxes only (no collective)."""
    base = _base(model)
    previous = base.loss_function
    base.loss_function = partial(grounded_loss, across_processes=False)
    try:
        yield
    finally:
        base.loss_function = previous


@torch.no_grad()
def validate_detection(
    model: nn.Module,
    *,
    loader: DataLoader,
    coco: dict[str, Any],
    label_map: LabelMap,
    top_k: int = REFERENCE_TOP_K,
) -> dict[str, float]:
    """Val loss and COCO box mAP: ``val_loss``, ``val_map``, ``val_map_50`` (-1: no boxes).

    Detections are decoded as ``box/*`` at test time (Open-GroundingDino's protocol).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, parts = [], defaultdict(list)
    for batch in loader:
        labels = [{k: v.to(device) for k, v in t.items()} for t in batch["labels"]]
        with loss_on_this_process(model):  # evaluation runs on the main process only
            out = model(**model_inputs(batch, device), labels=labels)
        losses.append(float(out.loss))
        cats = [[label_map.category_ids[i] for i in classes] for classes in batch["classes"]]
        dets = decode_reference(
            out.logits,
            out.pred_boxes,
            batch["input_ids"].to(device),
            sizes=batch["sizes"],
            category_ids=cats,
            top_k=top_k,
        )
        for image_id, det in zip(batch["image_ids"], dets, strict=True):
            parts[image_id].append(det)
    model.train(was_training)
    ids = list(parts)
    merged = [merge_detections(parts[i], max_detections=top_k) for i in ids]
    stats = coco_eval(coco, coco_results(merged, ids), iou_type="bbox", per_class=False)
    return {
        "val_loss": sum(losses) / max(len(losses), 1),
        "val_map": stats["map"],
        "val_map_50": stats["map_50"],
    }


def save_dino(model: nn.Module, out_dir: Path, *, label_map: LabelMap) -> None:
    """The adapter folder: peft adapter, trained heads, labels.json."""
    save_adapter(cast("PeftModel", model), out_dir)  # the model apply_lora wrapped
    save_labels(label_map, Path(out_dir) / LABELS_FILE)


def class_tokens(label_map: LabelMap, tokenizer: Any) -> list[int]:
    """Tokens of each class name (no special tokens, no '.'), in prompt-index order."""
    return [len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in label_map.names]


def build_task(
    model: nn.Module,
    *,
    processor: Any,
    label_map: LabelMap,
    train_coco: dict,
    val_coco: dict,
    image_root: Path,
    augment_policy: dict[str, Any],
    seed: int,
    batch_size: int,
    negatives: int = 0,
    offsets_lr_scale: float = 1.0,
    scales: TrainScales | None = None,
    retain: RetainNames | None = None,
    retain_weight: float = 0.0,
) -> Task:
    """The training Task: augmented train dataset (``negatives`` absent names per prompt;
    ``scales``: the references' multi-scale resize and crop; ``retain``: retention names after
    each prompt's classes, kept at ``retain_weight``), step, val loss + mAP, save, the offsets'
    lr multiplier.

    Validation batches hold images of one size only, as test-time scoring does
    (:func:`teacher.dino.detect.same_size_batches`): the Swin sees a batch's padding, which moved
    the same image's scores by up to 0.4, enough to pick another best epoch.
    """
    collate = partial(
        collate_dino,
        processor=processor,
        label_map=label_map,
        num_queries=int(cast(Any, model).config.num_queries),  # thin images: enough tokens
    )
    dataset = DinoDataset(
        train_coco,
        image_root,
        label_map=label_map,
        seed=seed,
        # every clipped box with positive area kept, as both references (teacher.dataset.augment)
        transform=build_transform(augment_policy, train=True, boxes=REFERENCE_BOXES),
        negatives=negatives,
        class_tokens=(
            class_tokens(label_map, processor.tokenizer) if negatives or retain else None
        ),
        scales=scales,
        retain=retain if retain_weight > 0 else None,
    )
    val = DinoDataset(val_coco, image_root, label_map=label_map, seed=seed, all_chunks=True)
    shapes = [val.image_shape(i) for i in range(len(val))]
    batches = same_size_batches(shapes, batch_size=batch_size)
    loader = DataLoader(val, batch_sampler=batches, collate_fn=collate)
    return Task(
        name="dino",
        model=model,
        train_dataset=dataset,
        collate_fn=collate,
        step=partial(training_step, retain_weight=retain_weight) if retain else training_step,
        validate=partial(validate_detection, loader=loader, coco=val_coco, label_map=label_map),
        monitor="val_map",
        save=partial(save_dino, label_map=label_map),
        lr_scales={OFFSET_PARAMS: offsets_lr_scale},
    )


def training_retain_names(
    configured: Sequence[str] | None, coco: dict, *, tokenizer: Any, dino: DinoParams
) -> RetainNames | None:
    """The retention names of a training run: ``configured`` (None = COCO-80) without the
    dataset's classes; None when ``dino.retain_weight`` or ``dino.retain_names`` is 0."""
    if dino.retain_weight <= 0:
        return None
    names, _ = retention_classes(configured, [str(c["name"]) for c in coco["categories"]])
    return retain_names(names, tokenizer=tokenizer, per_prompt=dino.retain_names)


def train_dino(
    *,
    train_coco: dict,
    val_coco: dict,
    image_root: Path,
    dino: DinoParams,
    lora: LoraParams,
    train: TrainParams,
    augment_policy: dict[str, Any],
    seed: int,
    out_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path,
    fingerprint: str,
    retention_classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Fine-tune Grounding DINO (``dino.model``) with LoRA; the best adapter goes to ``out_dir``.

    ``dino.retain_weight`` > 0: the base model's answers for ``retention_classes``
    (``evaluate.retention_classes``: None = COCO-80; the dataset's own classes left out) are
    kept while training (:mod:`teacher.dino.retain`).

    Writes ``adapter_model.safetensors`` (LoRA and the heads, when trained),
    ``adapter_config.json`` and ``labels.json``; dvclive logs in ``live_dir`` with the
    augmentation policy in its summary. Returns the best epoch's metrics from the training loop.
    Module-level and picklable arguments: runs under ``teacher.train.distributed.launch`` for several processes.
    """
    bundle = load_dino(dino)
    label_map = build_label_map(train_coco["categories"], tokenizer=bundle.processor.tokenizer)
    seed_everything(seed)  # LoRA's A matrices are drawn from the global RNG
    model = wrap_for_training(
        bundle.model, dino=dino, lora=lora, activation_checkpointing=train.activation_checkpointing
    )
    task = build_task(
        model,
        processor=bundle.processor,
        label_map=label_map,
        train_coco=train_coco,
        val_coco=val_coco,
        image_root=image_root,
        augment_policy=augment_policy,
        seed=seed,
        batch_size=train.batch_size,
        negatives=dino.negatives,
        offsets_lr_scale=dino.offsets_lr_scale,
        scales=train_scales(dino),
        retain=training_retain_names(
            retention_classes, train_coco, tokenizer=bundle.processor.tokenizer, dino=dino
        ),
        retain_weight=dino.retain_weight,
    )
    summary = {
        "prompt_chunks": len(label_map.chunks),
        "classes": len(label_map.category_ids),
        **{f"augment_{k}": v for k, v in augment_policy.items()},
    }
    train = dataclasses.replace(train, clip_norm=dino.clip_norm)  # DINO's clip: the references' 0.1
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
