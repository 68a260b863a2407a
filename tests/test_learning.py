"""Learning tests on the proving ground: the tiny-pretrained SAM, fine-tuned by the project's own
training code on the shifted fine-tuning domain of teacher.synth."""

from __future__ import annotations

from pathlib import Path

import pytest

from teacher import synth
from teacher.augment import resolve_policy
from teacher.params import AugmentParams, LoraParams, SamParams, TrainParams
from teacher.sam import task as sam_task
from teacher.sam.model import TINY_PRETRAINED, load_base_sam, load_sam

NO_AUGMENT = resolve_policy(AugmentParams(policy="none"), {})
SAM = SamParams(  # as benchmarks/bench_finetune.py: the pretraining loss (BCE + dice)
    model=TINY_PRETRAINED,
    lora_targets="sam-encoder-qkv+sam-decoder-attention",
    train_decoder=True,
    multimask=False,
    box_jitter=0.05,
    focal_weight=2.0,
    focal_alpha=0.5,
    focal_gamma=0.0,
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
def test_sam_finetuning_learns_the_domain(finetune_domain, tmp_path, one_thread):
    """LoRA (encoder + decoder attention, decoder trained) on 48 fine-tuning-domain images: the
    training images' mIoU rises and held-out images of the domain do not get worse.

    Weak on purpose, and why: the tiny SAM's 64x64 masks bound what fine-tuning can add on
    this domain (benchmarks/bench_finetune.py: held-out gains of +0.001 to +0.02 over seeds), so a
    held-out margin that holds across seeds does not exist yet (issue #12, README).
    """
    d = finetune_domain
    base = load_base_sam(TINY_PRETRAINED)
    before_train = sam_task.validate_miou(
        base, d["train"], d["root"] / "train/images", multimask=False
    )
    before_val = sam_task.validate_miou(base, d["val"], d["root"] / "val/images", multimask=False)
    result = sam_task.train_sam(
        train_coco=d["train"],
        val_coco=d["train"],  # best epoch by training-set mIoU: val images live elsewhere
        image_root=d["root"] / "train/images",
        sam_params=SAM,
        lora=LoraParams(rank=8, alpha=16.0, dropout=0.0),
        train=TrainParams(epochs=6, batch_size=4, lr=1e-3, warmup_steps=5, patience=0),
        augment_policy=NO_AUGMENT,
        seed=0,
        cache_dir=tmp_path / "cache",
        **_out(tmp_path),
    )
    tuned = load_sam(SAM, adapter_dir=tmp_path / "model")
    after_val = sam_task.validate_miou(tuned, d["val"], d["root"] / "val/images", multimask=False)
    print(
        f"SAM train mIoU {before_train['val_miou']:.3f} -> {result['val_miou']:.3f}, "
        f"val {before_val['val_miou']:.3f} -> {after_val['val_miou']:.3f}"
    )
    assert result["val_miou"] >= before_train["val_miou"] + TRAIN_MARGIN
    assert after_val["val_miou"] >= before_val["val_miou"] - 0.01


TRAIN_MARGIN = 0.02
