"""Pretraining the ``tiny-pretrained`` presets on the synthetic pretraining domain, and probes.

The library behind ``scripts/pretrain_tiny.py`` (its docstring gives the commands): full
training of every weight (not LoRA) of the tiny architectures (``teacher.sam`` /
``teacher.dino``) on images of ``teacher.dataset.synth.PRETRAIN``, generated in memory from the
seed; a held-out test set (another seed) is scored at the end: SAM mean mask IoU from true boxes,
Grounding DINO COCO box mAP@50 prompted with the pretraining classes. Deterministic per seed on
one machine. :func:`dino_probe` / :func:`sam_probe` say where a weights file's score is lost.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from teacher.coco.boxes import xywh_to_xyxy
from teacher.coco.io import annotation_mask, index_by_image
from teacher.coco.metrics import mask_iou
from teacher.dataset import synth
from teacher.sam.losses import sam_loss

TEST_SEED_OFFSET = 10_000  # the held-out test set: same world, another seed


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, *, lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 5 % of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


# --- SAM ---------------------------------------------------------------------------------------


def objects(
    coco: dict, pixels: list[np.ndarray]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image with objects: the image, its xywh boxes (N, 4) and true masks (N, H, W)."""
    by_image = index_by_image(coco)
    for info, img in zip(coco["images"], pixels, strict=True):
        anns = by_image.get(info["id"], [])
        if anns:
            masks = np.stack([annotation_mask(a, *img.shape[:2]) for a in anns])
            yield img, np.asarray([a["bbox"] for a in anns], np.float64), masks


def sam_samples(coco: dict, pixels: list[np.ndarray], *, size: int) -> list[dict]:
    """Per image with objects: resized image tensor, xyxy boxes (input frame), masks (N, S, S)."""
    from teacher.sam.data import masks_to_input
    from teacher.sam.model import image_to_tensor, resize_image

    out = []
    for img, boxes, masks in objects(coco, pixels):
        h, w = img.shape[:2]
        xyxy = xywh_to_xyxy(boxes)
        out.append(
            {
                "image": image_to_tensor(resize_image(img, size=size)),
                "xyxy": xyxy,
                "hw": (h, w),
                "masks": masks_to_input(masks, size=size),
            }
        )
    return out


def sam_step_loss(
    sam, batch: list[dict], *, rng: np.random.Generator, jitter: float
) -> torch.Tensor:  # on the model's device
    """Loss of single-mask and best-of-3 outputs for every (jittered) box of the batch's images."""
    from teacher.sam.data import jitter_boxes_xyxy
    from teacher.sam.model import boxes_xyxy_to_input, decode_boxes, embed_images, input_size
    from teacher.sam.task import masks_to_low_res

    size = input_size(sam)
    embeddings = embed_images(sam, [s["image"] for s in batch])
    total: Any = 0.0  # a tensor once the first term is added
    for emb, s in zip(embeddings, batch, strict=True):
        h, w = s["hw"]
        jittered = jitter_boxes_xyxy(  # 20 px: SAM's cap; this world's boxes stay far below it
            s["xyxy"], fraction=jitter, max_shift=20.0, rng=rng, width=w, height=h
        )
        boxes = torch.as_tensor(
            boxes_xyxy_to_input(jittered, (h, w), size=size), dtype=torch.float32, device=sam.device
        )
        for multimask in (False, True):
            logits, iou = decode_boxes(sam, emb, boxes, multimask=multimask)
            target = masks_to_low_res(s["masks"].to(sam.device), logits.shape[-2:])
            terms = sam_loss(
                logits,
                iou,
                target,
                focal_weight=1.0,
                dice_weight=1.0,
                iou_weight=1.0,
                focal_alpha=-1.0,
                focal_gamma=0.0,
            )  # BCE + dice: stable from scratch
            total = total + terms["loss"]
    return total / (2 * len(batch))


@torch.no_grad()
def sam_test_miou(sam, coco: dict, pixels: list[np.ndarray], *, multimask: bool) -> float:
    """Mean mask IoU over the test set's instances, prompted with their true boxes."""
    from teacher.sam.predictor import segment

    ious = []
    for img, boxes, truth in objects(coco, pixels):
        masks, _ = segment(sam, img, boxes, multimask=multimask)
        ious.extend(mask_iou(masks, truth).tolist())
    return float(np.mean(ious))


SMALL = 400  # px²: objects below this are "small" in the probes' split


@torch.no_grad()
def sam_probe(sam, coco: dict, pixels: list[np.ndarray]) -> dict[str, float]:
    """A SAM's mask IoU from true boxes (single mask) beside the best its low-res masks allow:
    each object's true mask put through the model's own frames (resized to the input, area-
    averaged to the decoder's 4g x 4g grid, upscaled and thresholded as its logits are), overall
    and for objects under / over :data:`SMALL` px²."""
    import torch.nn.functional as F

    from teacher.sam.data import masks_to_input
    from teacher.sam.model import input_size, resized_shape
    from teacher.sam.predictor import segment

    size = input_size(sam)
    grid = 4 * sam.prompt_encoder.image_embedding_size[0]
    model, ceiling, areas = [], [], []
    for img, boxes, truth in objects(coco, pixels):
        h, w = img.shape[:2]
        masks, _ = segment(sam, img, boxes, multimask=False)
        model += mask_iou(masks, truth).tolist()
        low = F.interpolate(masks_to_input(truth, size=size).float()[:, None], grid, mode="area")
        best = sam.postprocess_masks(low - 0.5, resized_shape(h, w, size=size), (h, w))[:, 0] > 0
        ceiling += mask_iou(best.numpy(), truth).tolist()
        areas += truth.sum((1, 2)).tolist()
    got, top, small = np.asarray(model), np.asarray(ceiling), np.asarray(areas) < SMALL
    return {
        "miou": float(got.mean()),
        "ceiling": float(top.mean()),
        "miou_small": float(got[small].mean()) if small.any() else float("nan"),
        "ceiling_small": float(top[small].mean()) if small.any() else float("nan"),
        "miou_large": float(got[~small].mean()) if (~small).any() else float("nan"),
        "ceiling_large": float(top[~small].mean()) if (~small).any() else float("nan"),
        "small_share": float(small.mean()),
    }


def pretrain_sam(
    *,
    steps: int,
    seed: int,
    n_images: int,
    n_test: int,
    batch_size: int,
    lr: float,
    log_every: int = 50,
    device: str = "cpu",
    init: Path | None = None,
    world: synth.World = synth.PRETRAIN,
) -> tuple[dict, dict]:
    """Train the tiny SAM from random init (or from ``init``'s weights) on ``world``'s images
    on ``device``; returns (state dict on the CPU, scores on ``world``'s held-out set). With
    ``init`` the preset and ``world`` :data:`synth.FINETUNE` this measures what the
    architecture can gain on the fine-tuning domain given plenty of data (README)."""
    from teacher.sam.build import ARCHITECTURES, TINY_PRETRAINED, build_sam
    from teacher.sam.model import input_size

    seed_all(seed)
    sam = build_sam(ARCHITECTURES[TINY_PRETRAINED])
    if init is not None:
        sam.load_state_dict(load_file(str(init)))
    sam = sam.to(device).train()
    coco, pixels = synth.make_dataset(world, n_images=n_images, seed=seed)
    samples = sam_samples(coco, pixels, size=input_size(sam))
    optimizer = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    start, running = time.time(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, warmup=min(200, steps // 10), total=steps)
        batch = [samples[i] for i in rng.choice(len(samples), batch_size, replace=False)]
        loss = sam_step_loss(sam, batch, rng=rng, jitter=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optimizer.step()
        running.append(float(loss.detach()))
        if (step + 1) % log_every == 0:
            print(
                f"sam step {step + 1}/{steps} loss {np.mean(running[-log_every:]):.4f} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )
    sam.eval()
    test, test_pixels = synth.make_dataset(world, n_images=n_test, seed=seed + TEST_SEED_OFFSET)
    scores = {
        f"miou_multimask_{m}".lower(): sam_test_miou(sam, test, test_pixels, multimask=m)
        for m in (False, True)
    }
    return cpu_state(sam), scores


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict, every tensor a contiguous copy on the CPU (what safetensors saves)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# --- Grounding DINO ----------------------------------------------------------------------------

DINO_TERMS = ("loss_ce", "loss_bbox", "loss_giou")  # last decoder layer's, logged
DINO_SIZE: dict[str, Any] = {
    "shortest_edge": 128,
    "longest_edge": 160,
}  # as scripts/tiny-params.yaml


def dino_prompt(
    present: list[int], classes: tuple[str, ...], rng: np.random.Generator
) -> tuple[str, dict[int, int]]:
    """A prompt naming the image's classes and a random subset of the others, in random order;
    returns it and {category index: position in the prompt}."""
    others = [c for c in range(len(classes)) if c not in present]
    named = sorted(set(present)) + [c for c in others if rng.random() < 0.6]
    order = list(rng.permutation(named))
    return " . ".join(classes[c] for c in order) + " .", {int(c): k for k, c in enumerate(order)}


def dino_batch(
    batch: list[tuple[np.ndarray, list[dict]]],
    *,
    processor,
    classes: tuple[str, ...],
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
) -> dict:
    """Processor tensors and loss targets of (image, annotations) pairs, each with its own prompt,
    on ``device``."""
    from teacher.dino.data import box_targets

    prompts, labels = [], []
    for img, anns in batch:
        if rng.random() < 0.5:  # horizontal flip
            img = img[:, ::-1]
            anns = [
                {**a, "bbox": [img.shape[1] - a["bbox"][0] - a["bbox"][2], *a["bbox"][1:]]}
                for a in anns
            ]
        prompt, position = dino_prompt([a["category_id"] - 1 for a in anns], classes, rng)
        prompts.append(prompt)
        boxes = np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        cls = np.asarray([position[a["category_id"] - 1] for a in anns], np.int64)
        labels.append(box_targets(boxes, cls, width=img.shape[1], height=img.shape[0]))
    pixels = processor.image_processor(
        images=[np.ascontiguousarray(i) for i, _ in batch], return_tensors="pt"
    )
    text = processor.tokenizer(prompts, padding="longest", return_tensors="pt")
    return {
        **{k: v.to(device) for k, v in {**pixels, **text}.items()},
        "labels": [{k: v.to(device) for k, v in t.items()} for t in labels],
    }


@torch.no_grad()
def dino_test_map(model, processor, coco: dict, pixels: list[np.ndarray]) -> dict[str, float]:
    """COCO box mAP / mAP@50 on a test set, prompted with all its classes (fixed order)."""
    from teacher.dino.detect import labeling_box_map
    from teacher.dino.model import DinoBundle

    stats = labeling_box_map(DinoBundle(model=model, processor=processor), pixels, coco)
    return {"map": stats["map"], "map_50": stats["map_50"]}


@torch.no_grad()
def dino_probe(model, processor, coco: dict, pixels: list[np.ndarray]) -> dict[str, float]:
    """Where a detector's held-out box AP is lost (the labeling decode, no thresholds, prompted
    with every class as :func:`dino_test_map`). Shares of the test set's objects or predictions:

    - ``map_50``: the score; ``agnostic_map_50``: the same predictions with every class made one
      (what the boxes and their ranking alone are worth); ``nms_map_50``: after per-class NMS at
      IoU 0.5 (what duplicates cost);
    - ``covered_50`` / ``covered_75``: objects that some prediction overlaps at IoU >= 0.5 / 0.75;
    - ``top_near_50``: objects whose highest-scoring overlapping prediction (IoU > 0.1) is at
      IoU >= 0.5;
    - ``top_k_hit`` / ``top_k_loose`` / ``top_k_background``: of each image's k best predictions
      (k = its objects), those at IoU >= 0.5 with an object, in 0.1-0.5, below 0.1;
    - ``unoccluded_map_50``: the score with partly hidden objects ignored (COCO's ``iscrowd``: no
      credit, no penalty), what occlusion costs;
    - ``named_right``: objects whose highest-scoring prediction at IoU >= 0.5 names their class
      (of the objects that have one).
    """
    import copy

    import torchvision

    from teacher.coco.metrics import coco_eval
    from teacher.dino.detect import coco_results, labeling_detections
    from teacher.dino.model import DinoBundle

    found, results = labeling_detections(DinoBundle(model=model, processor=processor), pixels, coco)
    image_ids = [i["id"] for i in coco["images"]]
    one = copy.deepcopy(coco)
    one["categories"] = [{"id": 1, "name": "object"}]
    for a in one["annotations"]:
        a["category_id"] = 1
    by_image = index_by_image(coco)
    covered, top_near, top_k, kept, named = [], [], [], [], []
    for image_id, det in zip(image_ids, found, strict=True):
        boxes = torch.as_tensor(xywh_to_xyxy(np.asarray(det.boxes, np.float64).reshape(-1, 4)))
        scores = torch.as_tensor(np.asarray(det.scores, np.float64))
        keep = torchvision.ops.batched_nms(
            boxes, scores, torch.as_tensor(np.asarray(det.category_ids)), 0.5
        )
        kept += coco_results([det.take(keep.numpy())], [image_id])
        anns = by_image.get(image_id, [])
        if not anns or not len(boxes):
            covered += [0.0] * len(anns)
            continue
        truth = torch.as_tensor(xywh_to_xyxy(np.asarray([a["bbox"] for a in anns], np.float64)))
        iou = torchvision.ops.box_iou(truth, boxes)  # (objects, predictions)
        covered += iou.max(1).values.tolist()
        for ann, row in zip(anns, iou, strict=True):
            near = torch.nonzero(row > 0.1).flatten()
            if len(near):
                top_near.append(float(row[near[scores[near].argmax()]]))
            hits = torch.nonzero(row >= 0.5).flatten()
            if len(hits):
                best_hit = int(hits[scores[hits].argmax()])
                named.append(float(det.category_ids[best_hit] == ann["category_id"]))
        best = scores.argsort(descending=True)[: len(anns)]
        top_k += iou[:, best].max(0).values.tolist()
    hit, near_hit, k = np.asarray(covered), np.asarray(top_near), np.asarray(top_k)
    visible = copy.deepcopy(coco)
    for a in visible["annotations"]:
        a["iscrowd"] = int(bool(a.get("attributes", {}).get("occluded")))
    return {
        "map_50": coco_eval(coco, results, iou_type="bbox", per_class=False)["map_50"],
        "agnostic_map_50": coco_eval(
            one, [{**r, "category_id": 1} for r in results], iou_type="bbox", per_class=False
        )["map_50"],
        "nms_map_50": coco_eval(coco, kept, iou_type="bbox", per_class=False)["map_50"],
        "covered_50": float((hit >= 0.5).mean()),
        "covered_75": float((hit >= 0.75).mean()),
        "top_near_50": float((near_hit >= 0.5).sum() / len(hit)),
        "top_k_hit": float((k >= 0.5).mean()),
        "top_k_loose": float(((k >= 0.1) & (k < 0.5)).mean()),
        "top_k_background": float((k < 0.1).mean()),
        "unoccluded_map_50": coco_eval(visible, results, iou_type="bbox", per_class=False)[
            "map_50"
        ],
        "named_right": float(np.mean(named)) if named else 0.0,
    }


# the path from a prompt's words to the text features the class head compares queries with: BERT,
# the projection to d_model, the encoder's text self-attention layers, and the fusion layers'
# image-to-text update (its layer scale and output projection)
TEXT_PATH = re.compile(
    r"^model\.(text_backbone\.|text_projection\.|encoder\.layers\.\d+\.(text_enhancer_layer\.|"
    r"fusion_layer\.(text_param|attn\.out_text_proj\.)))"
)


def spread_words(model, *, std: float) -> None:
    """Word embeddings drawn with a standard deviation of ``std`` (BERT's init: 0.02), so that at
    the text encoder's output a token's identity outweighs its position and the class names start
    far apart. With BERT's init they start at a mean cosine of 0.68 and the grounded loss pulls
    them together (0.99 after 13k steps) before the image side has learnt what tells the shapes
    apart: the classes never separate. The references start from a pretrained BERT, whose
    words are far apart from the first step."""
    with torch.no_grad():
        model.model.text_backbone.embeddings.word_embeddings.weight.normal_(0.0, std)


def reference_init(model) -> None:
    """Grounding DINO's from-scratch initialisation of everything but the Swin and BERT, instead
    of transformers' (``GroundingDinoPreTrainedModel._init_weights``: every linear layer and
    embedding drawn with std 0.02, biases zero).

    What the reference does (IDEA-Research/GroundingDINO, ``groundingdino.py`` and
    ``transformer.py``; Open-GroundingDino builds the same modules):

    - ``Transformer._reset_parameters``: every weight of two or more dimensions inside the
      transformer (encoder with its text-enhancer and fusion layers, decoder with its query
      position MLP, ``enc_output``, the content queries ``tgt_embed``) drawn Xavier-uniform;
      biases keep PyTorch's default draw, except those the attention modules zero; then each
      deformable attention's own reset (sampling offsets on the heads' directions, attention
      weights zero, value / output projections Xavier) and ``level_embed`` normal;
    - the input projections: Xavier-uniform convolutions, zero biases; ``feat_map`` (the text
      projection): Xavier-uniform, zero bias;
    - the box MLPs (the decoder's, shared by its layers, and the two-stage proposals'): PyTorch's
      default draw, last layer zero (they are built outside the transformer).

    Not the default (``--init-scheme reference`` selects it): the committed preset was drawn by
    transformers, and the reference's draw did not score higher. What was looked for: in the
    committed preset the decoder's box MLP is dead (31 of 32 second-layer units never active) and
    refines nothing (every decoder layer returns the two-stage proposals' boxes within 0.001, and
    the proposals', first and last layers' box losses are equal), and two thirds of the
    decoder's feed-forward units are dead too. Under the reference's draw the box MLP died the
    same way, and the fresh detector on the committed Swin scored 0.131 held out against 0.144
    (docs/PROVING_GROUND.md). A pretrained checkpoint is unaffected either way: its weights
    replace the draw. One departure: transformers splits the attention projections that
    ``nn.MultiheadAttention`` keeps in one (3d, d) matrix into three (d, d) ones, each drawn
    Xavier for its own shape (a bound √2 wider)."""
    from transformers.models.grounding_dino import modeling_grounding_dino as gd

    m = model.model
    zero_bias = (gd.GroundingDinoMultiheadAttention, gd.GroundingDinoBiMultiHeadAttention)
    with torch.no_grad():
        transformer = [m.encoder, m.decoder.layers, m.decoder.reference_points_head, m.enc_output]
        for part in transformer:
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()  # PyTorch's draw: the bias keeps it
                    nn.init.xavier_uniform_(module.weight)
            for module in part.modules():
                if isinstance(module, zero_bias):
                    for lin in module.modules():
                        if isinstance(lin, nn.Linear) and lin.bias is not None:
                            nn.init.zeros_(lin.bias)
                if isinstance(module, gd.GroundingDinoMultiscaleDeformableAttention):
                    deformable_reset(module)
        nn.init.xavier_uniform_(m.query_position_embeddings.weight)
        nn.init.normal_(m.level_embed)
        for proj in m.input_proj_vision:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        nn.init.xavier_uniform_(m.text_projection.weight)
        nn.init.zeros_(m.text_projection.bias)
        for mlp in (model.bbox_embed[0], m.encoder_output_bbox_embed):
            for lin in mlp.layers[:-1]:
                lin.reset_parameters()
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)


def deformable_reset(module) -> None:
    """The reference's ``MultiScaleDeformableAttention._reset_parameters`` (Deformable DETR): head
    h's sampling offsets point along angle 2πh/heads, point i at i + 1 times that direction,
    attention weights zero, value and output projections Xavier-uniform with zero biases."""
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(heads, 1, 1, 2)
    grid = grid.repeat(1, levels, points, 1) * torch.arange(1, points + 1).view(1, 1, -1, 1)
    nn.init.zeros_(module.sampling_offsets.weight)
    module.sampling_offsets.bias.copy_(grid.reshape(-1))
    nn.init.zeros_(module.attention_weights.weight)
    nn.init.zeros_(module.attention_weights.bias)
    for lin in (module.value_proj, module.output_proj):
        nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)


def class_map(img: np.ndarray, anns: list[dict]) -> np.ndarray:
    """(H, W) int64: 1 + the class index of the object visible at each pixel, 0 for background."""
    h, w = img.shape[:2]
    out = np.zeros((h, w), np.int64)
    for a in anns:
        out[annotation_mask(a, h, w)] = a["category_id"]
    return out


def pretrain_backbone(
    model,
    processor,
    data: list[tuple[np.ndarray, list[dict]]],
    *,
    steps: int,
    lr: float,
    rng: np.random.Generator,
    batch_size: int = 8,
    background_weight: float = 1.0,
    levels: int = 2,
    log_every: int = 250,
    held_out: list[tuple[np.ndarray, list[dict]]] | None = None,
) -> None:
    """Phase 0: the image backbone (Swin) learns to tell the shapes apart where they are: every
    position of its ``levels`` finest output levels (2: strides 8 and 16) is classified as the shape
    visible there or background (a 1x1 linear head per level, thrown away afterwards).

    The detector's grounded loss alone never taught it that from random init: after 13 000 steps
    the decoder's features told the six shapes apart at chance (a linear probe, 19 %) while boxes
    were learned. Real Grounding DINO starts from an ImageNet-pretrained Swin; this is the
    synthetic world's ImageNet. Dense, not whole-crop, labels because the decoder reads the
    features at a few sampled points (deformable attention), not pooled over the box.

    Length matters: after 8000 detector steps, held-out box mAP@50 was 0.097 with 3000 steps of
    this phase, 0.175 with 12 000 (the default) and 0.170 with 24 000 (a lower loss). A Swin
    with two blocks in stages 2 and 3 (tiny-random has one per stage, so its windows never shift
    and a stride-8 feature sees one fixed 32-pixel window) reached a lower loss but scored 0.122
    held out, and 0.169 with ``background_weight`` 0.2 as well (31 % of shape positions
    classified right at the end of this phase, against 21 % unweighted).

    A better phase 0 does not make a better detector: with Swin windows of 8 (``--arch
    '{"window_size": 8}'``: a stride-8 feature sees 64 px) this phase ends at 23 % of held-out
    shape positions right, and with windows of 8 and two blocks per stage (windows shift) at
    24 %, against 4 % / 11 % / 15 % for the three after 3000 steps; after the same 8000 detector
    steps they scored 0.159 and 0.172 held out, against 0.175 for the committed architecture.
    ``held_out`` images are scored every fourth log line and at the end (train and held-out
    accuracy stay within 2 points: this phase underfits, it does not overfit).

    Nor does teaching the stride-32 level (``levels=3``, ``--dense-levels 3``): its windows see
    whole objects, yet after the same 12 000 + 8000 steps the detector scored 0.115 held out,
    against 0.175 with the two finest levels (2352 s on 1 thread beside other jobs).
    """
    encoder = model.model.backbone.conv_encoder
    n_classes = 1 + max(a["category_id"] for _, anns in data for a in anns)
    weight = torch.ones(n_classes, device=next(encoder.parameters()).device)
    weight[0] = background_weight
    heads = torch.nn.ModuleList()
    optimizer = None
    start, running = time.time(), []
    for step in range(steps):
        pick = rng.choice(len(data), batch_size, replace=False)
        images = [data[i][0] for i in pick]
        maps = [class_map(*data[i]) for i in pick]
        if rng.random() < 0.5:
            images, maps = [i[:, ::-1] for i in images], [m[:, ::-1] for m in maps]
        features, labels = dense_levels(encoder, processor, images, maps, levels=levels)
        if optimizer is None:
            heads.extend(torch.nn.Conv2d(f.shape[1], n_classes, 1) for f in features)
            heads.to(features[0].device)
            optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=lr)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, warmup=min(200, steps // 10), total=steps)
        loss: Any = 0.0  # a tensor once the first level is added
        hits, shapes = 0, 0
        for head, fmap, level_labels in zip(heads, features, labels, strict=True):
            logits = head(fmap)
            loss = loss + torch.nn.functional.cross_entropy(
                logits, level_labels, weight=weight, ignore_index=-100
            )
            hits, shapes = shape_hits(logits, level_labels, hits, shapes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append([float(loss.detach()), hits / max(shapes, 1)])
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean_loss, accuracy = np.mean(running[-log_every:], axis=0)
            line = (
                f"backbone step {step + 1}/{steps} dense shape loss {mean_loss:.3f}, "
                f"shape positions classified right {accuracy:.0%}"
            )
            if held_out and ((step + 1) % (4 * log_every) == 0 or step + 1 == steps):
                held = dense_accuracy(encoder, heads, processor, held_out, levels=levels)
                line += f", held out {held:.0%}"
            print(f"{line} ({time.time() - start:.0f} s)", flush=True)


def dense_levels(
    encoder, processor, images: list[np.ndarray], maps: list[np.ndarray], *, levels: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Phase 0's inputs: the Swin's ``levels`` finest feature maps of ``images`` (2: strides 8
    and 16; 3: and 32) and, per level, the class at each position's centre (``maps`` resized as
    the processor resized the images; -100 on padding)."""
    import torch.nn.functional as F

    enc = processor.image_processor(
        images=[np.ascontiguousarray(i) for i in images], return_tensors="pt"
    )
    device = next(encoder.parameters()).device
    pixels, mask = enc["pixel_values"].to(device), enc["pixel_mask"].to(device)
    target = torch.full(pixels.shape[-2:], -100, dtype=torch.long).repeat(len(images), 1, 1)
    for k, m in enumerate(maps):
        h, w = int(mask[k].sum(0).max()), int(mask[k].sum(1).max())  # resized size
        resized = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(m))[None, None].float(), size=(h, w)
        )
        target[k, :h, :w] = resized[0, 0].long()
    target = target.to(device)
    features = encoder(pixels, mask)
    out_features, out_labels = [], []
    for i in range(levels):  # strides 8, 16, 32
        fmap = features[i][0]
        stride = pixels.shape[-1] // fmap.shape[-1]
        labels = target[:, stride // 2 :: stride, stride // 2 :: stride]
        labels = labels[:, : fmap.shape[-2], : fmap.shape[-1]]
        out_features.append(fmap[:, :, : labels.shape[-2], : labels.shape[-1]])
        out_labels.append(labels)
    return out_features, out_labels


@torch.no_grad()
def dense_accuracy(
    encoder,
    heads,
    processor,
    data: list[tuple[np.ndarray, list[dict]]],
    batch_size: int = 8,
    *,
    levels: int = 2,
) -> float:
    """Phase 0's score on held-out images: the share of shape positions classified right."""
    hits = shapes = 0
    for k in range(0, len(data), batch_size):
        chunk = data[k : k + batch_size]
        features, labels = dense_levels(
            encoder,
            processor,
            [img for img, _ in chunk],
            [class_map(*d) for d in chunk],
            levels=levels,
        )
        for head, fmap, level_labels in zip(heads, features, labels, strict=True):
            hits, shapes = shape_hits(head(fmap), level_labels, hits, shapes)
    return hits / max(shapes, 1)


def shape_hits(
    logits: torch.Tensor, labels: torch.Tensor, hits: int, shapes: int
) -> tuple[int, int]:
    """``hits`` and ``shapes`` plus this level's shape positions classified right, and its shape
    positions (background and padding are not counted)."""
    on_shape = labels > 0
    return hits + int((logits.argmax(1) == labels)[on_shape].sum()), shapes + int(on_shape.sum())


BACKBONE = "model.backbone.conv_encoder."  # the Swin's weights in the detector's state dict


def pretrain_dino(
    *,
    steps: int,
    seed: int,
    n_images: int,
    n_test: int,
    batch_size: int,
    lr: float,
    log_every: int = 50,
    init: Path | None = None,
    init_backbone: Path | None = None,
    clip: float = 1.0,
    arch: dict | None = None,
    word_std: float = 1.0,
    lock_text: bool = True,
    backbone_steps: int = 12000,
    backbone_lr_scale: float = 0.1,
    background_weight: float = 1.0,
    varifocal: bool = False,
    phase0_levels: int = 2,
    device: str = "cpu",
    denoise: int = 0,
    init_scheme: str = "transformers",
) -> tuple[dict, dict]:
    """Train the tiny Grounding DINO from random init (or from ``init``'s weights: a second
    phase) on ``device``; returns (state dict on the CPU, test scores). Phase 0's batch is twice
    ``batch_size`` and it classifies the Swin's ``phase0_levels`` finest levels. ``varifocal``:
    the detector phase's class terms train each matched query towards its box's IoU
    (``teacher.dino.loss.varifocal_loss``), so that scores rank boxes by fit (the probe found
    the best-scoring box on an object loose for almost half of the objects). ``denoise`` > 0:
    the detector phase adds up to that many contrastive denoising queries per image
    (``teacher.dino.denoising``, MM-Grounding-DINO's CDN; their label embedding is not saved).
    ``init_scheme``: how a detector trained from scratch is drawn, ``"transformers"`` or
    ``"reference"`` (:func:`reference_init`)."""
    from teacher.core.params import DinoParams
    from teacher.dino.denoising import Denoiser
    from teacher.dino.loss import grounded_loss
    from teacher.dino.model import build_tiny_pretrained, prepare_model, set_dropout

    seed_all(seed)
    model, processor = build_tiny_pretrained(
        DinoParams(model="tiny-pretrained", **DINO_SIZE), weights=False, arch=arch
    )
    if init is not None:
        model.load_state_dict(load_file(str(init)))
    else:
        if init_scheme == "reference":  # else transformers' draw (see reference_init)
            reference_init(model)
        spread_words(model, std=word_std)
    if init_backbone is not None:  # another run's Swin (the same --arch Swin): phase 0 skipped
        swin = {k: v for k, v in load_file(str(init_backbone)).items() if k.startswith(BACKBONE)}
        missing = [k for k in model.state_dict() if k.startswith(BACKBONE) and k not in swin]
        if not swin or missing:
            raise SystemExit(f"--init-backbone {init_backbone}: no Swin of this --arch in it")
        model.load_state_dict(swin, strict=False)
        backbone_steps = 0
    model = prepare_model(model).to(device).train()  # type: ignore[arg-type]  # transformers types .to oddly
    if varifocal:
        model.loss_function = partial(grounded_loss, quality=True)
    set_dropout(model, 0.0)  # as fine-tuning (dino.dropout) and both references
    coco, pixels = synth.make_dataset(synth.PRETRAIN, n_images=n_images, seed=seed)
    by_image = index_by_image(coco)
    data = [
        (img, by_image.get(info["id"], []))
        for info, img in zip(coco["images"], pixels, strict=True)
    ]
    test, test_pixels = synth.make_dataset(
        synth.PRETRAIN, n_images=n_test, seed=seed + TEST_SEED_OFFSET
    )
    test_by_image = index_by_image(test)
    if backbone_steps:
        pretrain_backbone(
            model,
            processor,
            data,
            steps=backbone_steps,
            lr=lr,
            rng=np.random.default_rng(seed),
            batch_size=2 * batch_size,
            background_weight=background_weight,
            levels=phase0_levels,
            held_out=[
                (img, test_by_image.get(info["id"], []))
                for info, img in zip(test["images"][:100], test_pixels, strict=False)
            ],
        )
    if lock_text:
        for name, p in model.named_parameters():
            if TEXT_PATH.search(name):
                p.requires_grad_(False)
    denoiser = Denoiser(model, max_queries=denoise) if denoise else None  # on the model's device
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in trainable if n.startswith("model.backbone.")]
    rest = [p for n, p in trainable if not n.startswith("model.backbone.")]
    rest += list(denoiser.parameters()) if denoiser is not None else []
    optimizer = torch.optim.AdamW(
        [{"params": rest, "scale": 1.0}, {"params": backbone, "scale": backbone_lr_scale}],
        lr=lr,
        weight_decay=1e-4,
    )
    rng = np.random.default_rng(seed)
    start, running = time.time(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["scale"] * lr_at(
                step, lr=lr, warmup=min(300, steps // 10), total=steps
            )
        batch = dino_batch(
            [data[i] for i in rng.choice(len(data), batch_size, replace=False)],
            processor=processor,
            classes=synth.PRETRAIN.classes,
            rng=rng,
            device=device,
        )
        with denoiser.training_on(batch["labels"]) if denoiser else nullcontext():
            out = model(**batch)
        loss = out.loss  # every decoder layer and the two-stage proposals (teacher.dino.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        running.append(
            [float(loss.detach())] + [float(out.loss_dict[k].detach()) for k in DINO_TERMS]
        )
        if (step + 1) % log_every == 0:
            means = np.mean(running[-log_every:], axis=0)
            terms = " ".join(
                f"{k} {v:.3f}" for k, v in zip(("loss", *DINO_TERMS), means, strict=True)
            )
            print(f"dino step {step + 1}/{steps} {terms} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    return cpu_state(model), dino_test_map(model, processor, test, test_pixels)


def probe_file(path: Path, *, arch: dict | None, seed: int, n: int) -> dict[str, float]:
    """:func:`dino_probe` of a weights file on ``n`` held-out images of ``seed``'s test set."""
    from teacher.core.params import DinoParams
    from teacher.dino.model import build_tiny_pretrained

    model, processor = build_tiny_pretrained(
        DinoParams(model="tiny-pretrained", **DINO_SIZE), weights=False, arch=arch
    )
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"--probe {path}: not DINO weights of this --arch ({e})") from None
    test, pixels = synth.make_dataset(synth.PRETRAIN, n_images=n, seed=seed + TEST_SEED_OFFSET)
    return dino_probe(model.eval(), processor, test, pixels)


def probe_sam_file(path: Path, *, seed: int, n: int) -> dict[str, dict[str, float]]:
    """:func:`sam_probe` of a SAM weights file on ``n`` held-out images of each domain."""
    from teacher.sam.build import ARCHITECTURES, TINY_PRETRAINED, build_sam

    sam = build_sam(ARCHITECTURES[TINY_PRETRAINED])
    try:
        sam.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"--probe {path}: not tiny SAM weights ({e})") from None
    out = {}
    for name, world in synth.WORLDS.items():
        test, pixels = synth.make_dataset(world, n_images=n, seed=seed + TEST_SEED_OFFSET)
        out[name] = sam_probe(sam.eval(), test, pixels)
    return out
