"""Grounding DINO inference: logits -> detections, prompt chunks merged, COCO results."""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from teacher.boxes import cxcywh_norm_to_xywh
from teacher.detections import Detections
from teacher.dino.labels import LabelMap
from teacher.dino.model import DinoBundle


def decode(logits: torch.Tensor, pred_boxes: torch.Tensor, input_ids: torch.Tensor, *,
           sizes: list[tuple[int, int]], category_ids: list[list[int]], box_threshold: float,
           text_threshold: float, max_detections: int = 100) -> list[Detections]:
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
            probs, pred_boxes.float(), build_label_maps(logits, input_ids), sizes, category_ids,
            strict=True):
        per_class = (prob[:, None, :] * label_map[None].to(prob)).amax(-1)  # (Q, n_classes)
        score, cls = per_class.max(-1)
        keep = (prob.amax(-1) >= box_threshold) & (score >= text_threshold)
        order = score[keep].argsort(descending=True)[:max_detections]
        score, cls, boxes = score[keep][order], cls[keep][order], boxes[keep][order]
        out.append(Detections(
            boxes=cxcywh_norm_to_xywh(boxes.cpu().numpy(), width=w, height=h).reshape(-1, 4),
            scores=score.cpu().numpy(),
            category_ids=np.asarray(cats, dtype=np.int64)[cls.cpu().numpy()]))
    return out


def merge_detections(parts: list[Detections], *, max_detections: int = 100) -> Detections:
    """One image's detections from several prompt chunks, best ``max_detections`` by score."""
    return Detections.concat(parts).best(max_detections)


@torch.no_grad()
def detect(bundle: DinoBundle, images: list[np.ndarray], label_map: LabelMap, *,
           box_threshold: float, text_threshold: float, max_detections: int = 100,
           batch_size: int = 4) -> list[Detections]:
    """Detect ``label_map``'s classes in RGB ``images`` (HxWx3 uint8), every prompt chunk run.

    Returns per image :class:`Detections` (COCO xywh absolute pixels, original COCO ids), best
    first. Runs ``batch_size`` images at a time.
    """
    model = bundle.model
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        out += _detect_batch(bundle, list(images[start:start + batch_size]), label_map,
                             box_threshold=box_threshold, text_threshold=text_threshold,
                             max_detections=max_detections)
    model.train(was_training)
    return out


def _detect_batch(bundle: DinoBundle, images: list[np.ndarray], label_map: LabelMap, *,
                  box_threshold: float, text_threshold: float, max_detections: int) -> list[Detections]:
    model, processor = bundle.model, bundle.processor
    device = next(model.parameters()).device
    sizes = [(im.shape[1], im.shape[0]) for im in images]
    pixels = processor.image_processor(images=images, return_tensors="pt").to(device)
    per_chunk = []
    for prompt, chunk in zip(label_map.prompts, label_map.chunks, strict=True):
        text = processor.tokenizer([prompt] * len(images), return_tensors="pt").to(device)
        out = model(pixel_values=pixels["pixel_values"], pixel_mask=pixels["pixel_mask"], **text)
        cats = [[label_map.category_ids[i] for i in chunk]] * len(images)
        per_chunk.append(decode(out.logits, out.pred_boxes, text["input_ids"], sizes=sizes,
                                category_ids=cats, box_threshold=box_threshold,
                                text_threshold=text_threshold, max_detections=max_detections))
    return [merge_detections(list(parts), max_detections=max_detections)
            for parts in zip(*per_chunk, strict=True)]


def coco_results(detections: list[Detections], image_ids: list) -> list[dict]:
    """Detections of :func:`detect` as a COCO results list (``bbox`` xywh pixels)."""
    return [{"image_id": image_id, "category_id": int(c), "bbox": [float(v) for v in box],
             "score": float(s)}
            for image_id, det in zip(image_ids, detections, strict=True)
            for box, s, c in zip(det.boxes, det.scores, det.category_ids, strict=True)]
