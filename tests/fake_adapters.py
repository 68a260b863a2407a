"""Test helpers: adapters as the training stages write them, with random (non-zero) LoRA weights.

A fresh LoRA adapter changes no output (lora_B starts at zero); these perturb every LoRA
weight so that adapted and base models differ and merge/export tests can fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from teacher.core.params import DinoParams, LoraParams, SamParams
from teacher.dino.labels import build_label_map, save_labels
from teacher.dino.model import HEAD_MODULES, load_dino
from teacher.sam.build import load_base_sam
from teacher.train.lora import apply_lora, save_adapter

TINY_DINO = DinoParams(model="tiny-random", shortest_edge=64, longest_edge=96)
TINY_SAM = SamParams(model="tiny-random")


def write_tiny_params(path: Path, *, sam_model: str = TINY_SAM.model, **dino: Any) -> Path:
    """A params.yaml at ``path`` naming TINY_DINO and TINY_SAM (``dino`` adds dino keys;
    ``sam_model`` replaces TINY_SAM's model)."""
    tiny = {
        "model": TINY_DINO.model,
        "shortest_edge": TINY_DINO.shortest_edge,
        "longest_edge": TINY_DINO.longest_edge,
    }
    path.write_text(yaml.safe_dump({"dino": {**tiny, **dino}, "sam": {"model": sam_model}}))
    return path


def _perturb(model: torch.nn.Module, *, seed: int, scale: float, trained: bool = False) -> None:
    """Random LoRA weights; with ``trained``, the fully trained parameters moved too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif trained and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def write_dino_adapter(
    out: Path, categories: list[dict], *, seed: int = 0, heads: bool = False
) -> Path:
    """With ``heads``, the fully trained box heads differ from the base model's too."""
    bundle = load_dino(TINY_DINO)
    peft = apply_lora(
        bundle.model,
        lora=LoraParams(rank=4),
        targets=TINY_DINO.lora_targets,
        train_modules=HEAD_MODULES,
    )
    _perturb(peft, seed=seed, scale=0.05, trained=heads)
    save_adapter(peft, out)
    save_labels(
        build_label_map(categories, tokenizer=bundle.processor.tokenizer), out / "labels.json"
    )
    return out


def write_sam_adapter(
    out: Path, *, seed: int = 0, decoder: bool = False, model: str = TINY_SAM.model
) -> Path:
    """With ``decoder``, the mask decoder is trained fully (moved) as with sam.train_decoder;
    ``model``: the base (``tiny-random-sam2``: a SAM 2 adapter)."""
    base = load_base_sam(model)
    peft = apply_lora(
        base,
        lora=LoraParams(rank=4),
        targets=TINY_SAM.lora_targets,
        train_modules=base.decoder_modules if decoder else None,
    )
    _perturb(peft, seed=seed, scale=0.05, trained=decoder)
    save_adapter(peft, out)
    return out


def write_skipped(out: Path, reason: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "SKIPPED").write_text(reason + "\n")
    return out


def write_tiny_coco(root: Path, *, n_images: int = 3, size: tuple[int, int] = (48, 64)) -> dict:
    """Images with a bright rectangle and a disc on noise, COCO with polygons; returns the dict."""
    rng = np.random.default_rng(0)
    h, w = size
    root.mkdir(parents=True, exist_ok=True)
    doc = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "box"}, {"id": 5, "name": "round thing"}],
    }
    for i in range(n_images):
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        x, y = 4 + 3 * i, 6 + i
        img[y : y + 16, x : x + 20] = (230, 40, 40)
        cy, cx, r = 30, 44, 8
        yy, xx = np.mgrid[:h, :w]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (40, 200, 60)
        name = f"img_{i}.png"
        Image.fromarray(img).save(root / name)
        doc["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
        doc["annotations"] += [
            {
                "id": 2 * i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [x, y, 20, 16],
                "area": 320,
                "iscrowd": 0,
                "segmentation": [[x, y, x + 20, y, x + 20, y + 16, x, y + 16]],
            },
            {
                "id": 2 * i + 2,
                "image_id": i + 1,
                "category_id": 5,
                "bbox": [cx - r, cy - r, 2 * r, 2 * r],
                "area": 200,
                "iscrowd": 0,
                "segmentation": [[cx - r, cy, cx, cy - r, cx + r, cy, cx, cy + r]],
            },
        ]
    return doc
