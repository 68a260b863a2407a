"""Grounding DINO (transformers): load or build, targets for its loss, post-processing.

``dino.model`` names a hub id (pinned by ``dino.revision``), a local ``save_pretrained``
folder, or ``tiny-random``: the same architecture at toy size with a locally written
bert-base-uncased-compatible vocabulary, built in code with a fixed seed (no network, and the
same weights in every stage).

Loss: transformers' grounded loss (``GroundingDinoForObjectDetectionLoss``) offsets each
image's class labels by *that image's* label-map length instead of the running total, so for
batches of 3+ images with different prompts the one-hot targets come from the wrong image's
label map. :func:`grounded_loss` is the same loss with the running offset; :func:`load_dino`
installs it as the model's ``loss_function``.
"""

from __future__ import annotations

import math
import os
import socket
import string
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)
from transformers.loss.loss_for_object_detection import _set_aux_loss
from transformers.loss.loss_grounding_dino import (
    GroundingDinoHungarianMatcher,
    GroundingDinoImageLoss,
)
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from teacher.boxes import cxcywh_norm_to_xywh, xywh_to_cxcywh_norm
from teacher.errors import TeacherError
from teacher.labels import LabelMap, load_labels
from teacher.params import DinoParams

TINY_RANDOM = "tiny-random"
TINY_SEED = 20240607  # fixed: train and evaluate build identical tiny-random base weights
# bert-base-uncased ids that Grounding DINO's code hard-codes ([PAD] is 0)
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
                    ".": 1012, "?": 1029}
# fully trained heads (dino.train_heads): the box MLPs of the decoder layers (tied: one set of
# weights). The class heads are parameter-free dot products with the text features. The
# two-stage proposal heads (enc_output, encoder_output_bbox_embed) are left alone: transformers
# detaches the proposals before the "_enc" loss terms, so no loss reaches them.
HEAD_MODULES = r"(model\.decoder\.)?bbox_embed\.\d+"
TOWERS = ("model.backbone", "model.text_backbone")  # image and text encoders


@dataclass
class DinoBundle:
    """A loaded detector: model (adapter applied when one was given), processor, labels."""

    model: nn.Module  # GroundingDinoForObjectDetection, or a PeftModel around it
    processor: GroundingDinoProcessor
    label_map: LabelMap | None = None  # from the adapter folder's labels.json


# --- building and loading ----------------------------------------------------------------------


def tiny_vocab() -> list[str]:
    """A WordPiece vocabulary with the bert-base-uncased special ids, letters and digits."""
    slots: dict[int, str] = {i: tok for tok, i in BERT_SPECIAL_IDS.items()}
    chars = string.ascii_lowercase + string.digits
    pieces = [*chars, *(f"##{c}" for c in chars), "-", "_", "/", ",", "'", "(", ")"]
    size = max(slots) + 1 + len(pieces)
    free = (i for i in range(max(slots) + 1, size))
    slots.update({next(free): p for p in pieces})
    return [slots.get(i, f"[unused{i}]") for i in range(size)]


def tiny_tokenizer() -> BertTokenizerFast:
    """The tiny-random tokenizer: the vocabulary above, lower-casing like bert-base-uncased."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(tiny_vocab()) + "\n")
        return BertTokenizerFast(vocab=str(path), do_lower_case=True)  # vocab_file= is ignored in 5.x


def tiny_config(*, vocab_size: int) -> GroundingDinoConfig:
    """Grounding DINO at toy size: 4-stage Swin, 1-layer BERT, d_model 32, 2 decoder layers."""
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage2", "stage3", "stage4"], image_size=64)
    text = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=256)
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32,  # d_model: a multiple of 32
        encoder_layers=1, decoder_layers=2,  # decoder_layers=1 fails to construct
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2, num_queries=64,
        auxiliary_loss=True,
    )


def build_processor(tokenizer, *, params: DinoParams) -> GroundingDinoProcessor:
    """Processor resizing to ``params.shortest_edge`` / ``params.longest_edge``."""
    size = {"shortest_edge": params.shortest_edge, "longest_edge": params.longest_edge}
    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=size),
                                  tokenizer=tokenizer)


def build_tiny_random(params: DinoParams) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """The tiny-random model and processor; identical weights on every call (fixed seed)."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = GroundingDinoForObjectDetection(config)
    return model, build_processor(tokenizer, params=params)


def _hub_reachable(*, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_error(params: DinoParams, err: Exception) -> TeacherError:
    return TeacherError(
        f"dino.model {params.model!r} (revision {params.revision!r}) is not a local folder, not in "
        f"the Hugging Face cache, and the hub cannot be reached ({str(err).splitlines()[0]}). "
        f"Fix: download it once "
        f"where there is network (python -c \"from transformers import AutoProcessor, "
        f"GroundingDinoForObjectDetection as M; M.from_pretrained('{params.model}'); "
        f"AutoProcessor.from_pretrained('{params.model}')\"), or set dino.model in params.yaml "
        f"to a local folder written by save_pretrained, or use dino.model: {TINY_RANDOM}."
    )


def load_pretrained(params: DinoParams) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """Model and processor from a local folder or the hub (cache first; fails fast offline)."""
    local = Path(params.model).is_dir()
    kwargs = {} if local else {"revision": params.revision}
    try:
        return _from_pretrained(params, local_files_only=True, **kwargs)
    except OSError as err:
        if local:
            raise TeacherError(f"dino.model {params.model!r}: not a Grounding DINO folder "
                               f"written by save_pretrained ({err})") from err
        if not _hub_reachable():
            raise _offline_error(params, err) from err
    try:
        return _from_pretrained(params, local_files_only=False, **kwargs)
    except OSError as err:
        raise _offline_error(params, err) from err


def _from_pretrained(params: DinoParams, **kwargs):
    model = GroundingDinoForObjectDetection.from_pretrained(params.model, **kwargs)
    processor = GroundingDinoProcessor.from_pretrained(params.model, **kwargs)
    size = {"shortest_edge": params.shortest_edge, "longest_edge": params.longest_edge}
    processor.image_processor.size = size  # resize from params, not the hub default
    return model, processor


def _positions(side: int) -> int:
    """Encoder feature positions of a square ``side`` px image (strides 8, 16, 32, 64)."""
    return sum(math.ceil(side / s) ** 2 for s in (8, 16, 32, 64))


def check_image_size(model: GroundingDinoForObjectDetection, params: DinoParams) -> None:
    """Fail early when images resized to ``dino.shortest_edge`` give the encoder fewer feature
    positions than the model has queries (its top-k proposal selection would crash)."""
    queries, need = model.config.num_queries, params.shortest_edge
    if _positions(need) >= queries:
        return
    while _positions(need) < queries:
        need += 8
    raise TeacherError(f"dino.shortest_edge {params.shortest_edge} is too small for "
                       f"{params.model!r}: its {queries} queries need images of at least {need} px; "
                       "raise dino.shortest_edge in params.yaml")


def _text_input_embeddings(self) -> nn.Module:
    return self.model.text_backbone.get_input_embeddings()


def prepare_model(model: GroundingDinoForObjectDetection) -> GroundingDinoForObjectDetection:
    """Make a loaded model ready for peft and for our training.

    peft calls ``get_input_embeddings``, which transformers leaves unimplemented for this model:
    return the text encoder's. (Setting ``tie_word_embeddings=False`` instead would make
    reloaded models re-initialise the tied box heads.) Installs :func:`grounded_loss`.
    """
    model.get_input_embeddings = types.MethodType(_text_input_embeddings, model)
    model.loss_function = grounded_loss
    return model


def load_dino(params: DinoParams, *, adapter_dir: Path | None = None,
              trainable: bool = False) -> DinoBundle:
    """Load ``params.model`` (hub id / folder / tiny-random) and, if given, an adapter folder.

    With ``adapter_dir`` the LoRA adapter and fully trained heads are applied and
    ``labels.json`` is read into ``bundle.label_map``.
    """
    if params.model == TINY_RANDOM:
        model, processor = build_tiny_random(params)
    else:
        model, processor = load_pretrained(params)
    check_image_size(model, params)
    model = prepare_model(model)
    if adapter_dir is None:
        return DinoBundle(model=model, processor=processor)
    from teacher.lora import load_adapter  # peft import only when an adapter is used

    label_map = load_labels(Path(adapter_dir) / "labels.json")
    return DinoBundle(model=load_adapter(model, adapter_dir, trainable=trainable),
                      processor=processor, label_map=label_map)


def frozen_towers(model: nn.Module) -> list[str]:
    """The image/text encoders none of whose parameters train (no LoRA, not unfrozen).

    Their inputs (pixels, token ids) need no gradient and their weights are frozen, so autograd
    records nothing inside them: they run without saving activations for backward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [name for name in TOWERS
            if not any(p.requires_grad for p in base.get_submodule(name).parameters())]


# --- targets and loss --------------------------------------------------------------------------


def annotation_boxes(anns: list[dict], *, label_map: LabelMap, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and chunk-local labels of the annotations the loss sees.

    Crowd annotations, boxes without area and classes outside prompt chunk ``chunk`` are left
    out. Returns ``boxes`` (n, 4) float32 COCO xywh pixels and ``labels`` (n,) int64.
    """
    in_chunk = {label_map.category_ids[i]: j for j, i in enumerate(label_map.chunks[chunk])}
    kept = [a for a in anns if not a.get("iscrowd", 0) and a.get("bbox") is not None
            and a["category_id"] in in_chunk and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    boxes = np.array([a["bbox"] for a in kept], dtype=np.float32).reshape(-1, 4)
    labels = np.array([in_chunk[a["category_id"]] for a in kept], dtype=np.int64)
    return boxes, labels


def box_targets(boxes: np.ndarray, labels: np.ndarray, *, width: int, height: int) -> dict[str, torch.Tensor]:
    """One image's loss target: ``class_labels`` (n,) long, ``boxes`` (n, 4) float cxcywh in [0, 1].

    ``boxes`` are COCO xywh pixels of an image ``width x height`` (after augmentation);
    normalised boxes do not change when the processor resizes the image.
    """
    norm = xywh_to_cxcywh_norm(np.asarray(boxes, np.float32).reshape(-1, 4), width=width, height=height)
    return {"class_labels": torch.as_tensor(np.asarray(labels), dtype=torch.long),
            "boxes": torch.as_tensor(np.clip(norm, 0.0, 1.0), dtype=torch.float32)}


class GroundedImageLoss(GroundingDinoImageLoss):
    """transformers' criterion with the per-image label-map offset fixed (running total).

    The box count that normalises the loss is averaged over processes (as transformers does)
    only when ``across_processes``: evaluation runs on the main process alone and must not wait
    in a collective the other processes never join.
    """

    def __init__(self, *, matcher, focal_alpha: float, losses: list[str],
                 across_processes: bool = True):
        super().__init__(matcher, focal_alpha, losses)
        self.across_processes = across_processes

    def _get_target_classes_one_hot(self, outputs, targets, indices):
        logits, label_maps = outputs["logits"], outputs["label_maps"]
        offsets = np.cumsum([0] + [len(m) for m in label_maps[:-1]])
        class_labels = torch.cat([t["class_labels"][j] + int(off)
                                  for t, (_, j), off in zip(targets, indices, offsets, strict=True)])
        idx = self._get_source_permutation_idx(indices)
        onehot = torch.zeros_like(logits, dtype=torch.long)  # (batch, queries, 256)
        onehot[idx] = torch.cat(label_maps, dim=0)[class_labels].to(torch.long)
        return onehot

    def _num_boxes(self, targets, device) -> float:
        n = torch.tensor([float(sum(len(t["class_labels"]) for t in targets))], device=device)
        dist = torch.distributed
        if self.across_processes and dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return torch.clamp(n, min=1).item()

    def forward(self, outputs, targets):
        """Loss terms of the last layer, then of each auxiliary layer (suffix ``_i``)."""
        num_boxes = self._num_boxes(targets, outputs["logits"].device)
        layers = [("", outputs), *((f"_{i}", aux) for i, aux in
                                   enumerate(outputs.get("auxiliary_outputs") or []))]
        losses = {}
        for suffix, out in layers:
            indices = self.matcher({k: v for k, v in out.items() if k != "auxiliary_outputs"}, targets)
            for loss in self.losses:
                terms = self.get_loss(loss, out, targets, indices, num_boxes)
                losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        return losses


def grounded_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask,
                  outputs_class=None, outputs_coord=None, encoder_logits=None,
                  encoder_pred_boxes=None, *, across_processes: bool = True):
    """``GroundingDinoForObjectDetectionLoss`` (transformers 5.x) using :class:`GroundedImageLoss`.

    Same signature, terms and weights; returns ``(loss, loss_dict, auxiliary_outputs)``.
    """
    matcher = GroundingDinoHungarianMatcher(class_cost=config.class_cost,
                                            bbox_cost=config.bbox_cost, giou_cost=config.giou_cost)
    criterion = GroundedImageLoss(matcher=matcher, focal_alpha=config.focal_alpha,
                                  losses=["labels", "boxes", "cardinality"],
                                  across_processes=across_processes).to(device)
    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps,
               "text_mask": text_mask}
    auxiliary = None
    if config.auxiliary_loss:
        auxiliary = _set_aux_loss(outputs_class, outputs_coord)
        for aux in auxiliary:
            aux.update(label_maps=label_maps, text_mask=text_mask)
        outputs["auxiliary_outputs"] = auxiliary
    loss_dict = criterion(outputs, labels)
    weights = {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient,
               "loss_giou": config.giou_loss_coefficient}
    if config.two_stage:
        enc = {"logits": encoder_logits, "pred_boxes": encoder_pred_boxes,
               "label_maps": label_maps, "text_mask": text_mask}
        loss_dict.update({f"{k}_enc": v for k, v in criterion(enc, labels).items()})
        weights.update({f"{k}_enc": v for k, v in list(weights.items())})
    if config.auxiliary_loss:
        base = {k: v for k, v in weights.items() if not k.endswith("_enc")}
        for i in range(config.decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    return loss, loss_dict, auxiliary


# --- post-processing and inference -------------------------------------------------------------


def decode(logits: torch.Tensor, pred_boxes: torch.Tensor, input_ids: torch.Tensor, *,
           sizes: list[tuple[int, int]], category_ids: list[list[int]], box_threshold: float,
           text_threshold: float, max_detections: int = 100) -> list[dict]:
    """Model outputs -> per image ``boxes`` (N, 4) COCO xywh pixels, ``scores``, ``category_ids``.

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
        out.append({"boxes": cxcywh_norm_to_xywh(boxes.cpu().numpy(), width=w, height=h).reshape(-1, 4),
                    "scores": score.cpu().numpy(),
                    "category_ids": np.asarray(cats, dtype=np.int64)[cls.cpu().numpy()]})
    return out


def merge_detections(parts: list[dict], *, max_detections: int = 100) -> dict:
    """One image's detections from several prompt chunks, best ``max_detections`` by score."""
    scores = np.concatenate([p["scores"] for p in parts])
    order = np.argsort(-scores, kind="stable")[:max_detections]
    return {"boxes": np.concatenate([p["boxes"] for p in parts]).reshape(-1, 4)[order],
            "scores": scores[order],
            "category_ids": np.concatenate([p["category_ids"] for p in parts])[order]}


@torch.no_grad()
def detect(bundle: DinoBundle, images: list[np.ndarray], label_map: LabelMap, *,
           box_threshold: float, text_threshold: float, max_detections: int = 100,
           batch_size: int = 4) -> list[dict]:
    """Detect ``label_map``'s classes in RGB ``images`` (HxWx3 uint8), every prompt chunk run.

    Returns per image ``boxes`` (N, 4) float COCO xywh absolute pixels, ``scores`` (N,),
    ``category_ids`` (N,) original COCO ids, best first. Runs ``batch_size`` images at a time.
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
                  box_threshold: float, text_threshold: float, max_detections: int) -> list[dict]:
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


def coco_results(detections: list[dict], image_ids: list) -> list[dict]:
    """Detections of :func:`detect` as a COCO results list (``bbox`` xywh pixels)."""
    return [{"image_id": image_id, "category_id": int(c), "bbox": [float(v) for v in box],
             "score": float(s)}
            for image_id, det in zip(image_ids, detections, strict=True)
            for box, s, c in zip(det["boxes"], det["scores"], det["category_ids"], strict=True)]
