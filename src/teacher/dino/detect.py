"""Grounding DINO inference: logits -> detections, prompt chunks merged, COCO results.

Two decodes of the same outputs:

- :func:`decode_reference` scores AP the way Open-GroundingDino's COCO evaluation does
  (``PostProcess`` with ``num_select = 300``, ``nms_iou_threshold = -1``): a class scores the mean
  of its tokens' probabilities (the positive map normalised per class), the best 300
  (query, class) pairs of an image are kept, no threshold, no NMS. ``box/*``, ``base/box/*`` and
  validation mAP use it (:func:`score`), so they compare with published figures.
- :func:`decode` is the labeling decode of ``teacher predict``, the gallery and Grounded-SAM:
  one class per query (its best token), box and text thresholds; ``teacher.inference.predict`` then applies
  per-class NMS and a cap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import cast

import numpy as np
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from teacher.coco.boxes import clip_xywh, cxcywh_norm_to_xywh
from teacher.coco.detections import Detections
from teacher.dino.labels import LabelMap
from teacher.dino.model import DinoBundle, padded_for

REFERENCE_TOP_K = 300  # Open-GroundingDino cfg_odvg.py num_select: (query, class) pairs per image


def decode_reference(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    sizes: list[tuple[int, int]],
    category_ids: list[list[int]],
    top_k: int = REFERENCE_TOP_K,
) -> list[Detections]:
    """Open-GroundingDino's ``PostProcess`` (COCO evaluation): per image :class:`Detections`, best first.

    ``logits`` (B, Q, 256), ``pred_boxes`` (B, Q, 4) cxcywh normalised to the unpadded image,
    ``sizes`` per image ``(width, height)``, ``category_ids[b]`` the COCO ids of image b's prompt
    classes in prompt order. Score of (query, class) = sigmoid token probabilities @ the class's
    positive map normalised to sum 1 (the mean over its tokens); the ``top_k`` best pairs over
    all queries and classes are kept (a query may appear under several classes); no NMS.
    """
    probs = logits.float().sigmoid()
    out = []
    for prob, boxes, label_map, (w, h), cats in zip(
        probs,
        pred_boxes.float(),
        build_label_maps(logits, cast(torch.LongTensor, input_ids)),
        sizes,
        category_ids,
        strict=True,
    ):
        pos = label_map.to(prob)
        pos = pos / pos.sum(-1, keepdim=True).clamp(min=1)  # (n_classes, 256), rows sum to 1
        per_class = prob @ pos.T  # (Q, n_classes)
        n_classes = per_class.shape[1]
        score, flat = per_class.flatten().topk(min(top_k, per_class.numel()))
        query, cls = flat // n_classes, flat % n_classes
        out.append(
            Detections(
                boxes=cxcywh_norm_to_xywh(boxes[query].cpu().numpy(), width=w, height=h).reshape(
                    -1, 4
                ),
                scores=score.cpu().numpy(),
                category_ids=np.asarray(cats, dtype=np.int64)[cls.cpu().numpy()],
            )
        )
    return out


def decode(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    sizes: list[tuple[int, int]],
    category_ids: list[list[int]],
    box_threshold: float,
    text_threshold: float,
    max_detections: int = 100,
) -> list[Detections]:
    """Model outputs -> per image :class:`Detections` (COCO xywh pixels, original ids).

    ``logits`` (B, Q, 256), ``pred_boxes`` (B, Q, 4) cxcywh normalised to the unpadded image,
    ``sizes`` per image ``(width, height)``, ``category_ids[b]`` the COCO ids of image b's prompt
    classes in prompt order. A query's class is the prompt class whose tokens score highest (max
    token probability); it is kept when its best token over the whole prompt reaches
    ``box_threshold`` and its class score reaches ``text_threshold``.
    """
    probs = logits.float().sigmoid()
    out = []
    for prob, boxes, label_map, (w, h), cats in zip(
        probs,
        pred_boxes.float(),
        build_label_maps(logits, cast(torch.LongTensor, input_ids)),
        sizes,
        category_ids,
        strict=True,
    ):
        per_class = (prob[:, None, :] * label_map[None].to(prob)).amax(-1)  # (Q, n_classes)
        score, cls = per_class.max(-1)
        keep = (prob.amax(-1) >= box_threshold) & (score >= text_threshold)
        order = score[keep].argsort(descending=True)[:max_detections]
        score, cls, boxes = score[keep][order], cls[keep][order], boxes[keep][order]
        out.append(
            Detections(
                boxes=cxcywh_norm_to_xywh(boxes.cpu().numpy(), width=w, height=h).reshape(-1, 4),
                scores=score.cpu().numpy(),
                category_ids=np.asarray(cats, dtype=np.int64)[cls.cpu().numpy()],
            )
        )
    return out


def merge_detections(parts: list[Detections], *, max_detections: int = 100) -> Detections:
    """One image's detections from several prompt chunks, best ``max_detections`` by score."""
    return Detections.concat(parts).best(max_detections)


def detect(
    bundle: DinoBundle,
    images: list[np.ndarray],
    label_map: LabelMap,
    *,
    box_threshold: float,
    text_threshold: float,
    max_detections: int = 100,
    batch_size: int = 4,
) -> list[Detections]:
    """Labeling decode of ``label_map``'s classes in RGB ``images`` (HxWx3 uint8), every prompt
    chunk run.

    Returns per image :class:`Detections` (COCO xywh absolute pixels, original COCO ids), best
    first, at most ``max_detections``. Runs ``batch_size`` images at a time.
    """
    return _run(
        bundle,
        images,
        label_map,
        batch_size=batch_size,
        keep=max_detections,
        decoder=partial(
            decode,
            box_threshold=box_threshold,
            text_threshold=text_threshold,
            max_detections=max_detections,
        ),
    )


def score(
    bundle: DinoBundle,
    images: list[np.ndarray],
    label_map: LabelMap,
    *,
    top_k: int = REFERENCE_TOP_K,
    batch_size: int = 4,
) -> list[Detections]:
    """Detections for COCO AP, Open-GroundingDino's protocol (:func:`decode_reference`).

    Class lists split into prompt chunks (which the reference never has) are decoded per chunk
    and the best ``top_k`` pairs over all chunks kept.
    """
    return _run(
        bundle,
        images,
        label_map,
        batch_size=batch_size,
        keep=top_k,
        decoder=partial(decode_reference, top_k=top_k),
    )


@torch.no_grad()
def _run(
    bundle: DinoBundle,
    images: list[np.ndarray],
    label_map: LabelMap,
    *,
    batch_size: int,
    keep: int,
    decoder: Callable[..., list[Detections]],
) -> list[Detections]:
    model = bundle.model
    was_training = model.training
    model.eval()
    out: dict[int, Detections] = {}
    for batch in same_size_batches([im.shape for im in images], batch_size=batch_size):
        dets = _detect_batch(
            bundle, [images[i] for i in batch], label_map, decoder=decoder, keep=keep
        )
        out.update(zip(batch, dets, strict=True))
    model.train(was_training)
    return [out[i] for i in range(len(images))]


def same_size_batches(shapes: Sequence[tuple[int, ...]], *, batch_size: int) -> list[list[int]]:
    """Indexes of images grouped by shape (in order of first appearance), ``batch_size`` at most
    per group. A batch of mixed sizes is padded to its largest image, and the Swin backbone's
    window attention sees the padding (the pixel mask does not reach it): scores of the same
    image moved by up to 0.4 with its batch-mates on the tiny model. Same-size batches have no
    padding, so batching changes results only by float rounding."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return [
        idxs[k : k + batch_size]
        for idxs in groups.values()
        for k in range(0, len(idxs), batch_size)
    ]


def _detect_batch(
    bundle: DinoBundle,
    images: list[np.ndarray],
    label_map: LabelMap,
    *,
    decoder: Callable[..., list[Detections]],
    keep: int,
) -> list[Detections]:
    model, processor = bundle.model, bundle.processor
    device = next(model.parameters()).device
    originals = [(im.shape[1], im.shape[0]) for im in images]
    images = [padded_for(bundle, im) for im in images]  # thin images: enough tokens
    sizes = [(im.shape[1], im.shape[0]) for im in images]
    pixels = processor.image_processor(
        images=images, return_tensors="pt", input_data_format="channels_last"
    ).to(device)  # never guessed
    per_chunk = []
    for prompt, chunk in zip(label_map.prompts, label_map.chunks, strict=True):
        text = processor.tokenizer([prompt] * len(images), return_tensors="pt").to(device)
        out = model(pixel_values=pixels["pixel_values"], pixel_mask=pixels["pixel_mask"], **text)
        cats = [[label_map.category_ids[i] for i in chunk]] * len(images)
        per_chunk.append(
            decoder(out.logits, out.pred_boxes, text["input_ids"], sizes=sizes, category_ids=cats)
        )
    merged = [
        merge_detections(list(parts), max_detections=keep) for parts in zip(*per_chunk, strict=True)
    ]
    return [
        replace(det, boxes=clip_xywh(det.boxes, width=w, height=h))
        for det, (w, h) in zip(merged, originals, strict=True)
    ]


def labeling_detections(
    bundle: DinoBundle, images: list[np.ndarray], coco: dict
) -> tuple[list[Detections], list[dict]]:
    """The labeling decode with no thresholds, prompted with every category of ``coco``, on
    ``images`` (``coco``'s images, in order): per-image detections and their COCO results."""
    from teacher.dino.labels import build_label_map

    label_map = build_label_map(coco["categories"], tokenizer=bundle.processor.tokenizer)
    dets = detect(bundle, images, label_map, box_threshold=0.0, text_threshold=0.0)
    return dets, coco_results(dets, [i["id"] for i in coco["images"]])


def labeling_box_map(bundle: DinoBundle, images: list[np.ndarray], coco: dict) -> dict[str, float]:
    """COCO box AP (``map``, ``map_50``, ...) of :func:`labeling_detections`: the proving
    ground's detector score (scripts/pretrain_tiny.py, benchmarks/bench_finetune.py, the preset and
    learning tests)."""
    from teacher.coco.metrics import coco_eval

    _, results = labeling_detections(bundle, images, coco)
    return coco_eval(coco, results, iou_type="bbox", per_class=False)


def coco_results(detections: list[Detections], image_ids: list) -> list[dict]:
    """Detections of :func:`detect` as a COCO results list (``bbox`` xywh pixels)."""
    return [
        {
            "image_id": image_id,
            "category_id": int(c),
            "bbox": [float(v) for v in box],
            "score": float(s),
        }
        for image_id, det in zip(image_ids, detections, strict=True)
        for box, s, c in zip(det.boxes, det.scores, det.category_ids, strict=True)
    ]
