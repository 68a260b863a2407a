"""train_sam end to end: tiny-random learns the sample shapes, an interrupted run resumes to the
same adapter, the stage runs under ``dvc repro``, and data without masks gives SKIPPED."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_in_repo, set_params
from safetensors.torch import load_file

import stages.train_sam as stage
from teacher.coco.io import load_coco, read_json
from teacher.core.errors import TeacherError
from teacher.core.params import AugmentParams, LoraParams, SamParams, TrainParams
from teacher.dataset.augment import resolve_policy
from teacher.dataset.inspection import dataset_facts
from teacher.dataset.splitting import split_coco
from teacher.sam import task as sam_task
from teacher.sam.build import TINY_RANDOM, build_tiny_random, load_sam

SAMPLE = REPO_ROOT / "data" / "sample"
BOXES_ONLY = Path(
    "review_object_detection_metrics/data/database/gts/coco_format_v1/instances_default.json"
)
DECODER_ATTN = "sam-decoder-attention"  # teacher.core.params.LORA_PRESETS


@pytest.fixture(scope="module")
def sample_splits() -> dict[str, dict]:
    coco = load_coco(SAMPLE / "annotations.json")
    return split_coco(coco, fractions={"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)


def run_training(
    splits: dict,
    tmp: Path,
    *,
    sam: SamParams,
    train: TrainParams,
    policy: str = "none",
    fingerprint: str = "test",
) -> dict[str, float]:
    return sam_task.train_sam(
        train_coco=splits["train"],
        val_coco=splits["val"],
        image_root=SAMPLE / "images",
        sam=sam,
        lora=LoraParams(rank=8, alpha=16.0, dropout=0.0),
        train=train,
        augment_policy=resolve_policy(AugmentParams(policy=policy), {}),
        seed=0,
        out_dir=tmp / "models",
        checkpoint_dir=tmp / "checkpoints",
        live_dir=tmp / "live",
        cache_dir=tmp / "cache",
        fingerprint=fingerprint,
    )


def test_skip_reason_from_inspect_facts():
    assert sam_task.untrainable_reason({"teachers": {"sam": True, "dino": True}}) is None
    reason = sam_task.untrainable_reason(
        {"teachers": {"sam": False, "reasons": {"sam": "no masks here"}}}
    )
    assert reason == "no masks here"
    with pytest.raises(TeacherError, match="re-run the inspect stage"):
        sam_task.untrainable_reason({"counts": {}})


@pytest.mark.slow
def test_tiny_random_learns_sample_shapes(sample_splits, tmp_path):
    # Decoder-only (cached embeddings): the cheap path, so enough steps fit the test budget.
    # A decoder trained from random init collapses to background under SAM's 20:1 focal
    # weighting (made for fine-tuning a pretrained SAM), so this run weighs focal 1:1. It pins
    # learning from box prompts (what val_miou scores); clicks are pinned in test_prompts.py.
    sam = SamParams(
        model=TINY_RANDOM,
        lora_targets=DECODER_ATTN,
        train_decoder=True,
        max_prompts=16,
        multimask=False,
        box_jitter=0.05,
        focal_weight=1.0,
        focal_alpha=0.75,
        point_prompts=0.0,
        correction_points=0,
    )
    train = TrainParams(epochs=16, batch_size=8, lr=3e-3, warmup_steps=10, patience=0)
    untrained = sam_task.validate_miou(
        build_tiny_random(), sample_splits["val"], SAMPLE / "images", multimask=False
    )["val_miou"]
    result = run_training(sample_splits, tmp_path, sam=sam, train=train)
    print(f"val mIoU: untrained {untrained:.3f} -> trained {result['val_miou']:.3f}")
    assert result["val_miou"] > max(2 * untrained, untrained + 0.08)

    # what was saved is the best epoch's model: reloaded (merged) it scores the same
    out = tmp_path / "models"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in out.iterdir()}
    assert any(  # the fully trained decoder, stored once: in peft's file
        k.startswith("base_model.model.mask_decoder.") and "lora_" not in k
        for k in load_file(out / "adapter_model.safetensors")
    )
    reloaded = load_sam(sam, adapter_dir=out)
    again = sam_task.validate_miou(
        reloaded, sample_splits["val"], SAMPLE / "images", multimask=False
    )
    assert again["val_miou"] == pytest.approx(result["val_miou"], abs=2e-3)
    logged = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert logged["best"]["val_miou"] == pytest.approx(result["val_miou"])
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").exists()
    assert not (tmp_path / "checkpoints").exists()  # removed after success


@pytest.mark.slow
def test_tiny_random_sam2_trains_decoder_only_on_its_cache(sample_splits, tmp_path):
    """train_sam with sam.model: tiny-random-sam2, decoder-only on the embedding cache (with the
    high-res maps): it learns, saves the best epoch, and the saved adapter scores the same."""
    sam = SamParams(
        model="tiny-random-sam2",
        lora_targets=DECODER_ATTN,
        train_decoder=True,
        max_prompts=16,
        box_jitter=0.05,
        focal_weight=1.0,
        focal_alpha=0.75,
        point_prompts=0.0,
        correction_points=0,
    )
    train = TrainParams(epochs=16, batch_size=8, lr=1e-2, warmup_steps=10, patience=0)
    untrained = sam_task.validate_miou(
        load_sam(sam), sample_splits["val"], SAMPLE / "images", multimask=False
    )["val_miou"]
    result = run_training(sample_splits, tmp_path, sam=sam, train=train)
    print(f"val mIoU: untrained {untrained:.3f} -> trained {result['val_miou']:.3f}")
    # a random 128 px encoder is a poor feature extractor: 0.036 -> 0.083 here (SAM's: > 2x)
    assert result["val_miou"] > 1.8 * untrained
    assert [p.name[:5] for p in (tmp_path / "cache").iterdir()] == ["sam2-"]
    saved = load_file(tmp_path / "models" / "adapter_model.safetensors")
    trained = {k for k in saved if "lora_" not in k}
    assert any(".mask_decoder.transformer." in k for k in trained)
    assert not any("conv_s" in k for k in trained)  # they belong to the cached features
    again = sam_task.validate_miou(
        load_sam(sam, adapter_dir=tmp_path / "models"),
        sample_splits["val"],
        SAMPLE / "images",
        multimask=False,
    )
    assert again["val_miou"] == pytest.approx(result["val_miou"], abs=2e-3)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_adapter(sample_splits, tmp_path, monkeypatch, capsys):
    # the full path: LoRA in the encoder (checkpointed blocks) + trained decoder, augmentation on
    sam = SamParams(model=TINY_RANDOM, train_decoder=True, max_prompts=4)
    train = TrainParams(
        epochs=2,
        batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        max_steps_per_epoch=2,
        patience=0,
        activation_checkpointing=True,
    )
    reference = run_training(sample_splits, tmp_path / "a", sam=sam, train=train, policy="auto")

    real_evaluate = sam_task.validate_miou
    calls = []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sam_task, "validate_miou", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_training(sample_splits, tmp_path / "b", sam=sam, train=train, policy="auto")
    assert (tmp_path / "b" / "checkpoints").is_dir() and not (tmp_path / "b" / "models").exists()
    monkeypatch.setattr(sam_task, "validate_miou", real_evaluate)
    resumed = run_training(sample_splits, tmp_path / "b", sam=sam, train=train, policy="auto")
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert resumed == reference
    a, b = (load_file(tmp_path / run / "models" / "adapter_model.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adapter = load_file(tmp_path / "a" / "models" / "adapter_model.safetensors")
    encoder_b = [k for k in adapter if "image_encoder" in k and "lora_B" in k]
    assert encoder_b and all(adapter[k].abs().sum() > 0 for k in encoder_b)  # encoder LoRA trained


def test_boxes_only_dataset_gives_skipped(realworld, tmp_path, capsys):
    annotations = realworld / BOXES_ONLY
    if not annotations.is_file():
        pytest.skip(f"boxes-only conformance file not found at {annotations}")
    (tmp_path / "inspect.json").write_text(json.dumps(dataset_facts(read_json(annotations))))
    out, metrics = tmp_path / "models" / "sam", tmp_path / "metrics" / "train_sam"
    code = stage.main(
        [
            "--params",
            str(REPO_ROOT / "params.yaml"),
            "--inspect",
            str(tmp_path / "inspect.json"),
            "--train",
            "absent.json",
            "--val",
            "absent.json",
            "--images",
            str(tmp_path),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert [p.name for p in out.iterdir()] == ["SKIPPED"]
    reason = (out / "SKIPPED").read_text()
    assert "mask" in reason and "SKIPPED" in printed and reason.strip() in printed
    assert json.loads((metrics / "metrics.json").read_text()) == {"skipped": True}


@pytest.mark.slow
def test_stage_through_dvc_repro(repo_copy, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    set_params(
        repo_copy,
        {
            "sam.model": TINY_RANDOM,
            "sam.train_decoder": True,
            "sam.max_prompts": 4,
            "train.epochs": 1,
            "train.batch_size": 2,
            "train.max_steps_per_epoch": 2,
            "train.warmup_steps": 1,
        },
    )
    # dvclive reads the git HEAD: give the fresh copy a first commit, as a user's repo has
    run_in_repo(repo_copy, "git", "add", "-A")
    run_in_repo(repo_copy, "git", "commit", "-q", "-m", "copy")
    proc = run_in_repo(repo_copy, "dvc", "repro", "train_sam")
    assert "train_sam:" in proc.stdout
    out = repo_copy / "models" / "sam"
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "params.json",
    } <= {p.name for p in out.iterdir()}
    used = json.loads((out / "params.json").read_text())
    assert used["sam"]["model"] == TINY_RANDOM and used["train"]["epochs"] == 1
    assert "val_miou" in json.loads(
        (repo_copy / "metrics" / "train_sam" / "metrics.json").read_text()
    )
    status = run_in_repo(repo_copy, "dvc", "status", "train_sam")
    assert "up to date" in status.stdout


def test_train_split_without_masks_gives_skipped(tmp_path, capsys):
    """The dataset has a mask (inspect says SAM can train) but none landed in the train split."""
    train = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1, 1, 4, 4],
                "segmentation": [],
                "area": 16,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1, 1, 4, 4],
                "segmentation": [[1, 1, 5, 1, 5, 5]],
                "area": 8,
                "iscrowd": 1,
            },
        ],
        "categories": [{"id": 1, "name": "cat"}],
    }
    facts = {"teachers": {"sam": True, "dino": True}}
    reason = sam_task.untrainable_reason(facts, train_coco=train)
    assert reason and "train split" in reason and "mask" in reason
    train["annotations"][1]["iscrowd"] = 0
    assert sam_task.untrainable_reason(facts, train_coco=train) is None
    train["annotations"][1]["iscrowd"] = 1
    (tmp_path / "inspect.json").write_text(json.dumps(facts))
    (tmp_path / "train.json").write_text(json.dumps(train))
    out, metrics = tmp_path / "models" / "sam", tmp_path / "metrics" / "train_sam"
    code = stage.main(
        [
            "--params",
            str(REPO_ROOT / "params.yaml"),
            "--inspect",
            str(tmp_path / "inspect.json"),
            "--train",
            str(tmp_path / "train.json"),
            "--val",
            "absent.json",
            "--images",
            str(tmp_path),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
        ]
    )
    assert code == 0 and (out / "SKIPPED").read_text().strip() == reason
    assert "SKIPPED" in capsys.readouterr().out
