"""Learning tests on the proving ground: the tiny-pretrained teachers, fine-tuned by the
project's own training code on the shifted fine-tuning domain of teacher.synth, get better by a
margin that held for every seed of benchmarks/bench_finetune.py (its README table)."""

from __future__ import annotations

from pathlib import Path

import pytest

from teacher import synth
from teacher.augment import resolve_policy
from teacher.params import AugmentParams, DinoParams, LoraParams, SamParams, TrainParams
from teacher.sam import task as sam_task
from teacher.sam.model import TINY_PRETRAINED, load_base_sam, load_sam

NO_AUGMENT = resolve_policy(AugmentParams(policy="none"), {})
DINO = DinoParams(model=TINY_PRETRAINED, shortest_edge=128, longest_edge=160)
SAM = SamParams(
    model=TINY_PRETRAINED,
    multimask=False,
    box_jitter=0.05,
    focal_weight=1.0,
    focal_alpha=0.75,
    max_prompts=16,
)


@pytest.fixture(scope="module")
def finetune_domain(tmp_path_factory) -> dict:
    """Train (48 images) and val (24, another seed) splits of the fine-tuning domain on disk."""
    root = tmp_path_factory.mktemp("finetune")
    train, train_px = synth.make_dataset(synth.FINETUNE, n_images=48, seed=1)
    val, val_px = synth.make_dataset(synth.FINETUNE, n_images=24, seed=2)
    synth.save_dataset(train, train_px, root / "train")
    synth.save_dataset(val, val_px, root / "val")
    return {"root": root, "train": train, "val": val}


def _out(tmp: Path) -> dict:
    return {
        "out_dir": tmp / "model",
        "checkpoint_dir": tmp / "checkpoints",
        "live_dir": tmp / "live",
        "fingerprint": "test",
    }


@pytest.mark.slow
def test_sam_finetuning_gains_mask_iou(finetune_domain, tmp_path, one_thread):
    d = finetune_domain
    before = sam_task.evaluate_miou(
        load_base_sam(TINY_PRETRAINED), d["val"], d["root"] / "val/images", multimask=False
    )["val_miou"]
    # the val split's images live in their own folder: train on train, score val separately
    result = sam_task.train_sam(
        train_coco=d["train"],
        val_coco=d["train"],
        image_root=d["root"] / "train/images",
        sam_params=SAM,
        lora=LoraParams(rank=8, alpha=16.0, dropout=0.0),
        train=TrainParams(epochs=6, batch_size=4, lr=1e-3, warmup_steps=5, patience=0),
        augment_policy=NO_AUGMENT,
        seed=0,
        cache_dir=tmp_path / "cache",
        **_out(tmp_path),
    )
    after = sam_task.evaluate_miou(
        load_sam(SAM, adapter_dir=tmp_path / "model"),
        d["val"],
        d["root"] / "val/images",
        multimask=False,
    )["val_miou"]
    print(f"SAM val mIoU {before:.3f} -> {after:.3f} (train {result['val_miou']:.3f})")
    assert after >= before + SAM_MARGIN


SAM_MARGIN = 0.05
