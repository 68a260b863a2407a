"""Base vs LoRA vs full fine-tuning of the tiny-pretrained teachers, on the proving ground.

    python benchmarks/bench_finetune.py [--seeds 0 1 2] [--train-images 64] [--models sam dino]
        [--scales 0 0.5 1] [--denoise 100] [--train-scale-min 1 --train-crop 0]
        [--input-proj lora|full|off]

Fine-tuning domain: ``teacher.dataset.synth.FINETUNE`` (train images from each seed, a fixed held-out
test set); retention: the same models on a held-out set of the pretraining domain
(``teacher.dataset.synth.PRETRAIN``), where fine-tuning can only lose. Each run uses the project's own
training code (task builders + ``teacher.train.loop.fit``) in a child process, so its peak memory
(max RSS on CPU, max allocated on CUDA) is its own. Prints one table (min / median over seeds)
and LoRA's gain as a share of full fine-tuning's; ``--json`` writes the raw runs.

LoRA: SAM: encoder qkv + every linear layer of the decoder (``make demo``'s); DINO:
``dino.lora_targets`` + box heads. Full fine-tuning: every weight of the model trains
(a LoRA is still attached, its B matrices start at zero: the same starting point).

``--train-scale-min`` / ``--train-crop``: DINO's training scales (``dino.train_scale_min`` /
``dino.train_crop``; ``1`` / ``0``: one scale, no crop). ``--input-proj``: what trains in DINO's
``input_proj_vision`` (issue #35): ``lora`` (LoRA on its convolutions: ``dino.lora_targets``),
``full`` (trained fully with the box heads, no LoRA there) or ``off`` (frozen, as before #35).

``--scales``: the forgetting guard's curve (issue 13). Each trained model is also scored with its
adapter at those scales (``teacher.train.lora.load_adapter``: LoRA deltas x s, fully trained weights
blended; for "full" that is WiSE-FT of every weight): both domains, and for DINO the retention of
the pretraining classes as ``evaluate`` measures it (AP against the base model's detections
scoring >= 0.15 on the held-out pretraining-domain images, ``teacher.evaluation.retention``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from teacher.core.params import (
    AugmentParams,
    DinoParams,
    LoraParams,
    SamParams,
    TrainParams,
    lora_pattern,
)
from teacher.dataset import synth
from teacher.dataset.augment import resolve_policy
from teacher.dino.scales import train_scales

TINY = "tiny-pretrained"
DINO = DinoParams(model=TINY, shortest_edge=128, longest_edge=160)
SAM = SamParams(  # the loss scripts/pretrain_tiny.py pretrained with: BCE (focal, gamma 0) + dice
    model=TINY,
    # LoRA on the encoder's qkv and every linear layer of the decoder, no weight trained fully:
    # 114 % of full fine-tuning's gain (64 images, seeds 0-2), where training the decoder fully
    # beside LoRA on its attention gave 68 % and forgot more (docs/PROVING_GROUND.md)
    lora_targets="sam-encoder-qkv+sam-decoder-linear",
    train_decoder=False,
    multimask=False,
    box_jitter=0.05,
    focal_weight=2.0,
    focal_alpha=0.5,
    focal_gamma=0.0,
    max_prompts=16,
)
LORA = LoraParams(rank=8, alpha=16.0, dropout=0.0)
FULL = {"sam": r"image_encoder|prompt_encoder|mask_decoder", "dino": r"model"}  # every weight
NO_AUGMENT = resolve_policy(AugmentParams(policy="none"), {})
TEST_SEED, RETENTION_SEED = 777_777, 888_888
# "confident" for the retention reference: few of the DINO preset's scores reach 0.3 (max 0.42)
RETENTION_THRESHOLD = 0.15


# --- data --------------------------------------------------------------------------------------


def write_world(world: synth.World, *, n_images: int, seed: int, out: Path) -> dict[str, Any]:
    coco, pixels = synth.make_dataset(world, n_images=n_images, seed=seed)
    synth.save_dataset(coco, pixels, out)
    return {"coco": coco, "images": out / "images"}


def train_val(*, n_train: int, n_val: int, seed: int, out: Path) -> tuple[dict, dict]:
    """Train and val splits of the fine-tuning domain from one seed, images in one folder."""
    from teacher.coco.io import subset_coco

    both = write_world(synth.FINETUNE, n_images=n_train + n_val, seed=seed, out=out)
    ids = [i["id"] for i in both["coco"]["images"]]
    return (
        {"coco": subset_coco(both["coco"], ids[:n_train]), "images": both["images"]},
        {"coco": subset_coco(both["coco"], ids[n_train:]), "images": both["images"]},
    )


# --- scores ------------------------------------------------------------------------------------


def sam_miou(model, split: dict[str, Any]) -> float:
    from teacher.sam.task import validate_miou

    return validate_miou(model, split["coco"], split["images"], multimask=False)["val_miou"]


def dino_map_50(bundle, split: dict[str, Any]) -> float:
    from teacher.coco.images import load_image
    from teacher.dino.detect import labeling_box_map

    coco = split["coco"]
    pixels = [load_image(split["images"] / i["file_name"]) for i in coco["images"]]
    return labeling_box_map(bundle, pixels, coco)["map_50"]


def retention_detections(bundle, split: dict[str, Any], classes: list[dict]) -> dict:
    """Image id -> DINO's detections of ``classes`` (the pretraining classes) on the images of
    ``split`` (evaluate's labeling decode)."""
    from teacher.coco.images import load_image
    from teacher.dino.labels import build_label_map
    from teacher.inference.predict import Filter, Teachers, predict_images

    coco = split["coco"]
    label_map = build_label_map(classes, tokenizer=bundle.processor.tokenizer)
    pixels = [load_image(split["images"] / i["file_name"]) for i in coco["images"]]
    found = predict_images(
        Teachers(dino=bundle, sam=None, label_map=label_map),
        pixels,
        keep=Filter(score_threshold=0.05),
        text_threshold=0.05,
    )
    return dict(zip([i["id"] for i in coco["images"]], found, strict=True))


def dino_curve(adapter: Path, data: dict, scales: list[float]) -> dict[float, dict[str, float]]:
    """Per adapter scale: box mAP@50 on both domains and the retention of the pretraining
    classes: on the held-out pretraining-domain images (``retention``) and, as ``evaluate``
    measures it in the pipeline, on the fine-tuning domain's test images (``retention_test``)."""
    from teacher.dino.model import load_dino
    from teacher.evaluation.retention import reference_ground_truth, retention_scores
    from teacher.inference.predict import merged

    cats = sorted(data["retention"]["coco"]["categories"], key=lambda c: c["id"])
    where = {"retention": "retention", "retention_test": "test"}
    rows: dict[float, dict[str, float]] = {}
    found: dict[str, dict[float, dict]] = {key: {} for key in where}
    for s in sorted({0.0, *scales}):
        bundle = merged(load_dino(DINO, adapter_dir=adapter, adapter_scale=s))
        rows[s] = {
            "finetune": dino_map_50(bundle, data["test"]),
            "pretrain": dino_map_50(bundle, data["retention"]),
        }
        for key, split in where.items():
            found[key][s] = retention_detections(bundle, data[split], cats)
    for key, split in where.items():
        reference = reference_ground_truth(
            data[split]["coco"]["images"],
            found[key][0.0],
            threshold=RETENTION_THRESHOLD,
            category_ids=[c["id"] for c in cats],
            names=[c["name"] for c in cats],
        )
        for s in rows:
            rows[s][key] = retention_scores(reference, found[key][s], max_detections=100)["map"]
    return {s: rows[s] for s in scales}


def sam_curve(adapter: Path, data: dict, scales: list[float]) -> dict[float, dict[str, float]]:
    """Per adapter scale: mask mIoU from true boxes on both domains."""
    from teacher.sam.build import load_sam

    out = {}
    for s in scales:
        sam = load_sam(SAM, adapter_dir=adapter, adapter_scale=s)
        out[s] = {
            "finetune": sam_miou(sam, data["test"]),
            "pretrain": sam_miou(sam, data["retention"]),
        }
    return out


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


# --- one run (child process) -------------------------------------------------------------------


def train_sam(method: str, *, seed: int, data: dict, train: TrainParams, out: Path) -> Path:
    """SAM fine-tuned by ``method`` (lora | full) on ``data["train"]`` (val: ``data["val"]``)
    with the project's training code; returns the adapter folder."""
    from teacher.sam import task as sam_task
    from teacher.sam.build import load_base_sam
    from teacher.train.loop import fit
    from teacher.train.lora import apply_lora

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "lora":
            model = sam_task.wrap_for_training(
                load_base_sam(TINY), sam_params=SAM, lora=LORA, activation_checkpointing=False
            )
        else:
            model = apply_lora(
                load_base_sam(TINY),
                lora=LORA,
                targets=lora_pattern(SAM.lora_targets),
                train_modules=FULL["sam"],
            )
    task = sam_task.build_task(
        model,
        train_coco=data["train"]["coco"],
        val_coco=data["val"]["coco"],
        image_root=data["train"]["images"],
        sam_params=SAM,
        augment_policy=NO_AUGMENT,
        seed=seed,
        cache_dir=out / "cache",
    )
    fit(
        task,
        train=train,
        seed=seed,
        out_dir=out / "model",
        checkpoint_dir=out / "ckpt",
        live_dir=out / "live",
        fingerprint=f"bench-{method}-{seed}",
    )
    return out / "model"


def sam_run(
    method: str, *, seed: int, data: dict, train: TrainParams, out: Path
) -> dict[str, float]:
    from teacher.sam.build import load_base_sam, load_sam

    if method == "base":
        sam = load_base_sam(TINY)
        return {
            "finetune": sam_miou(sam, data["test"]),
            "pretrain": sam_miou(sam, data["retention"]),
        }
    adapter = train_sam(method, seed=seed, data=data, train=train, out=out)
    tuned = load_sam(SAM, adapter_dir=adapter)
    return {
        "finetune": sam_miou(tuned, data["test"]),
        "pretrain": sam_miou(tuned, data["retention"]),
        "adapter_mb": folder_mb(adapter),
    }


INPUT_PROJ_LORA = r"|model\.input_proj_vision\.\d+\.0"  # in dino.lora_targets: its convolutions
INPUT_PROJ_FULL = r"|model\.input_proj_vision"


def dino_params(overrides: dict[str, Any]) -> DinoParams:
    """The benchmark's DINO with ``overrides`` (DinoParams fields, and ``input_proj``)."""
    overrides = dict(overrides)
    input_proj = overrides.pop("input_proj", "lora")
    dino = dataclasses.replace(DINO, **overrides)
    if input_proj != "lora":  # no LoRA on input_proj_vision
        targets = str(dino.lora_targets).replace(INPUT_PROJ_LORA, "")
        dino = dataclasses.replace(dino, lora_targets=targets)
    return dino


def retention_names(data: dict) -> list[str] | None:
    """The retention set's class names (None without a retention set: COCO-80)."""
    if "retention" not in data:
        return None
    return [str(c["name"]) for c in data["retention"]["coco"]["categories"]]


def train_dino(
    method: str,
    *,
    seed: int,
    data: dict,
    train: TrainParams,
    out: Path,
    overrides: dict[str, Any] | None = None,
) -> tuple[Path, DinoParams]:
    """Grounding DINO fine-tuned by ``method`` (lora | full) on ``data["train"]`` (val:
    ``data["val"]``) with the project's training code, train_dino's multi-scale included;
    returns the adapter folder and the DinoParams it was trained with."""
    from teacher.dino import task as dino_task
    from teacher.dino.labels import build_label_map
    from teacher.dino.model import load_dino
    from teacher.dino.task import training_retain_names
    from teacher.train.loop import fit, seed_everything
    from teacher.train.lora import apply_lora

    bundle = load_dino(DINO)
    label_map = build_label_map(
        data["train"]["coco"]["categories"], tokenizer=bundle.processor.tokenizer
    )
    seed_everything(seed)
    dino = dino_params(overrides or {})
    if (overrides or {}).get("input_proj") == "full":
        dino_task.HEAD_MODULES += INPUT_PROJ_FULL  # this child process only
    if method == "lora":
        model = dino_task.wrap_for_training(
            bundle.model, dino=dino, lora=LORA, activation_checkpointing=False
        )
    else:
        model = apply_lora(
            bundle.model, lora=LORA, targets=DINO.lora_targets, train_modules=FULL["dino"]
        )
        model = dino_task.with_denoising(model, dino)
    task = dino_task.build_task(
        model,
        processor=bundle.processor,
        label_map=label_map,
        train_coco=data["train"]["coco"],
        val_coco=data["val"]["coco"],
        image_root=data["train"]["images"],
        augment_policy=NO_AUGMENT,
        seed=seed,
        batch_size=train.batch_size,
        scales=train_scales(dino),
        # what the retention score measures: the pretraining domain's names (as make demo's
        # evaluate.retention_classes); COCO-80 (the pipeline's default) when there is none
        retain=training_retain_names(
            retention_names(data),
            data["train"]["coco"],
            tokenizer=bundle.processor.tokenizer,
            dino=dino,
        ),
        retain_weight=dino.retain_weight,
    )
    fit(
        task,
        # DINO's clip, as train_dino clips (the references' 0.1; train.clip_norm is SAM's)
        train=dataclasses.replace(train, clip_norm=dino.clip_norm),
        seed=seed,
        out_dir=out / "model",
        checkpoint_dir=out / "ckpt",
        live_dir=out / "live",
        fingerprint=f"bench-{method}-{seed}",
    )
    return out / "model", dino


def dino_run(
    method: str,
    *,
    seed: int,
    data: dict,
    train: TrainParams,
    out: Path,
    overrides: dict[str, Any] | None = None,
) -> dict[str, float]:
    from teacher.dino.model import load_dino

    if method == "base":
        bundle = load_dino(DINO)
        return {
            "finetune": dino_map_50(bundle, data["test"]),
            "pretrain": dino_map_50(bundle, data["retention"]),
        }
    adapter, dino = train_dino(
        method, seed=seed, data=data, train=train, out=out, overrides=overrides
    )
    tuned = load_dino(dino, adapter_dir=adapter)
    return {
        "finetune": dino_map_50(tuned, data["test"]),
        "pretrain": dino_map_50(tuned, data["retention"]),
        "adapter_mb": folder_mb(adapter),
    }


RUNS = {"sam": sam_run, "dino": dino_run}
CURVES = {"sam": sam_curve, "dino": dino_curve}


def child(
    queue,
    name: str,
    method: str,
    seed: int,
    data: dict,
    train: TrainParams,
    out: Path,
    threads: int,
    scales: list[float],
    overrides: dict[str, Any],
) -> None:
    torch.set_num_threads(threads)
    start = time.time()
    extra = {"overrides": overrides} if name == "dino" else {}
    row = RUNS[name](method, seed=seed, data=data, train=train, out=out, **extra)
    row = {**row, "seconds": time.time() - start, "peak_mb": peak_memory_mb()}
    if scales and method != "base":  # after the timing: the curve is not the run's cost
        row["curve"] = CURVES[name](out / "model", data, scales)
    queue.put(row)


def run_isolated(
    name: str,
    method: str,
    seed: int,
    data: dict,
    train: TrainParams,
    out: Path,
    threads: int,
    scales: Sequence[float] = (),
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=child,
        args=(queue, name, method, seed, data, train, out, threads, list(scales), overrides or {}),
    )
    proc.start()
    row = queue.get()
    proc.join()
    return row


# --- the table ---------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> list[dict]:
    """Per (model, method): min / median of each number over seeds, gain and retention vs base."""
    out = []
    for name in sorted({r["model"] for r in runs}):
        base = statistics.median(
            r["finetune"] for r in runs if r["model"] == name and r["method"] == "base"
        )
        base_pre = statistics.median(
            r["pretrain"] for r in runs if r["model"] == name and r["method"] == "base"
        )
        for method in sorted({r["method"] for r in runs if r["model"] == name}, key=method_order):
            rows = [r for r in runs if r["model"] == name and r["method"] == method]
            stats = {"model": name, "method": method, "seeds": len(rows)}
            for key in ("finetune", "pretrain", "peak_mb", "adapter_mb", "seconds"):
                vals = [r[key] for r in rows if key in r]
                if vals:
                    stats[key] = (min(vals), statistics.median(vals))
            stats["gain"] = tuple(v - base for v in stats["finetune"])
            stats["forgetting"] = tuple(v - base_pre for v in stats["pretrain"])
            out.append(stats)
    return out


def print_table(summary: list[dict]) -> None:
    metric = {"sam": "mask mIoU", "dino": "box mAP@50"}
    print(
        "\n| model | method | fine-tuning domain (min / median) | gain | pretraining domain "
        "(retention) | change | peak memory MB | adapter MB | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda pair, d=3: f"{pair[0]:.{d}f} / {pair[1]:.{d}f}" if pair else "-"  # noqa: E731
    for s in summary:
        print(
            f"| {s['model']} ({metric[s['model']]}) | {s['method']} | {fmt(s['finetune'])} | "
            f"{fmt(s['gain'], 3)} | {fmt(s['pretrain'])} | {fmt(s['forgetting'])} | "
            f"{fmt(s.get('peak_mb'), 0)} | {fmt(s.get('adapter_mb'), 2)} | {fmt(s.get('seconds'), 0)} |"
        )
    for name in sorted({s["model"] for s in summary}):
        gains = {s["method"]: s["gain"][1] for s in summary if s["model"] == name}
        if "lora" in gains and "full" in gains and gains["full"] > 0:
            print(
                f"{name}: LoRA gain / full fine-tuning gain (medians) = "
                f"{gains['lora'] / gains['full']:.0%} (target >= 90%)"
            )


def print_curve(runs: list[dict], scales: list[float]) -> None:
    """The forgetting guard's curve: per (model, method, scale) medians over seeds."""
    metric = {"sam": "mask mIoU", "dino": "box mAP@50"}
    print(
        "\nAdapter scale (medians over seeds; gain and change against the base model; retention: "
        f"AP against the base DINO's detections of the pretraining classes scoring >= "
        f"{RETENTION_THRESHOLD}, 1 = nothing forgotten)"
    )
    print(
        "| model | method | scale | fine-tuning domain | gain | pretraining domain | change "
        "| retention (pretraining domain) | retention (test images) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in sorted({r["model"] for r in runs}):
        base = [r for r in runs if r["model"] == name and r["method"] == "base"]
        b_fine = statistics.median(r["finetune"] for r in base)
        b_pre = statistics.median(r["pretrain"] for r in base)
        methods = sorted({r["method"] for r in runs if r["model"] == name}, key=method_order)
        for method in (m for m in methods if m != "base"):
            rows = [r for r in runs if r["model"] == name and r["method"] == method]
            for s in scales:
                points = [r["curve"][s] for r in rows if s in r.get("curve", {})]
                if not points:
                    continue
                med = {k: statistics.median(p[k] for p in points) for k in points[0]}
                kept = [
                    f"{med[k]:.3f}" if k in med else "-" for k in ("retention", "retention_test")
                ]
                print(
                    f"| {name} ({metric[name]}) | {method} | {s:g} | {med['finetune']:.3f} | "
                    f"{med['finetune'] - b_fine:+.3f} | {med['pretrain']:.3f} | "
                    f"{med['pretrain'] - b_pre:+.3f} | {kept[0]} | {kept[1]} |"
                )


def method_order(label: str) -> tuple:
    """base, lora, full, then each method with the retention term by weight."""
    method, _, weight = label.partition(" retain ")
    return (label != "base", method != "lora", method, float(weight or 0))


def merge_runs(paths: Sequence[Path]) -> list[dict]:
    """The runs of several ``--json`` files; one base row per model (the base is the same)."""
    runs: list[dict] = []
    for path in paths:
        for run in json.loads(path.read_text()):
            for r in run.get("curve", {}).copy():  # JSON keys are strings
                run["curve"][float(r)] = run["curve"].pop(r)
            if run["method"] == "base" and any(
                r["model"] == run["model"] and r["method"] == "base" for r in runs
            ):
                continue
            runs.append(run)
    return runs


def plot_tradeoff(runs: list[dict], scales: list[float], path: Path) -> None:
    """The forgetting guard's trade-off as ``evaluate`` plots it (gain vs retention, a point per
    adapter scale, scale 0 = the base model), one curve per DINO method (medians over seeds):
    with ``--retain-weights``, the curve without the term beside those with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dino = [r for r in runs if r["model"] == "dino"]
    base = statistics.median(r["finetune"] for r in dino if r["method"] == "base")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, where in (
        (axes[0], "retention_test", "the fine-tuning domain's test images (evaluate's protocol)"),
        (axes[1], "retention", "held-out pretraining-domain images"),
    ):
        for method in sorted(
            {r["method"] for r in dino if r["method"] != "base"}, key=method_order
        ):
            rows = [r for r in dino if r["method"] == method and "curve" in r]
            points = [(0.0, 1.0, 0.0)]  # scale 0: the base model, retention 1 by construction
            for s in scales:
                curve = [r["curve"][s] for r in rows if s in r["curve"]]
                if curve:
                    kept = statistics.median(c[key] for c in curve)
                    gain = statistics.median(c["finetune"] for c in curve) - base
                    points.append((s, kept, gain))
            line = ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label=method)
            for s, x, y in points[1:]:
                ax.annotate(
                    f"s={s:g}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=line[0].get_color(),
                )
        ax.set_xlabel(f"retention on {where}")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("box mAP@50 gain on the fine-tuning domain")
    axes[0].legend(fontsize=8)
    seeds = len({r["seed"] for r in dino if r["method"] != "base"})
    fig.suptitle(
        f"DINO tiny-pretrained, LoRA: gain vs retention per adapter scale (median of {seeds} seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["sam", "dino"], choices=sorted(RUNS))
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--scales",
        type=float,
        nargs="*",
        default=[],
        help="also score each trained model with its adapter at these scales (e.g. 0 0.5 1)",
    )
    parser.add_argument(
        "--denoise",
        type=int,
        default=0,
        help="dino: contrastive denoising queries per training image (dino.denoise_queries)",
    )
    parser.add_argument(
        "--train-scale-min",
        type=float,
        default=DINO.train_scale_min,
        help="dino.train_scale_min (1 = one training scale)",
    )
    parser.add_argument(
        "--train-crop", type=float, default=DINO.train_crop, help="dino.train_crop (0 = no crop)"
    )
    parser.add_argument(
        "--input-proj",
        choices=["off", "lora", "full"],
        default="lora",
        help="dino: what trains in input_proj_vision",
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="dino with --scales: the trade-off plot (PNG)"
    )
    parser.add_argument(
        "--retain-weights",
        type=float,
        nargs="+",
        default=[0.0],
        help="dino: dino.retain_weight of each trained run (0 = off; several: a run per weight, "
        "labelled 'lora retain W')",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="no training: the tables (and --plot) of runs saved with --json (several: merged)",
    )
    args = parser.parse_args()
    if args.from_json:
        runs = merge_runs(args.from_json)
        print_table(summarise(runs))
        if args.scales:
            print_curve(runs, args.scales)
            if args.plot:
                plot_tradeoff(runs, args.scales, args.plot)
        return 0
    train = TrainParams(epochs=args.epochs, batch_size=4, lr=args.lr, warmup_steps=5, patience=0)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        root = Path(tmp)
        fixed = {
            "test": write_world(
                synth.FINETUNE, n_images=args.test_images, seed=TEST_SEED, out=root / "test"
            ),
            "retention": write_world(
                synth.PRETRAIN,
                n_images=args.test_images,
                seed=RETENTION_SEED,
                out=root / "retention",
            ),
        }
        for name in args.models:
            runs.append(
                {
                    "model": name,
                    "method": "base",
                    "seed": -1,
                    **run_isolated(
                        name, "base", 0, fixed, train, root / f"{name}-base", args.threads
                    ),
                }
            )
            print(f"{name} base: {runs[-1]}", flush=True)
        for seed in args.seeds:
            train_split, val_split = train_val(
                n_train=args.train_images, n_val=16, seed=seed, out=root / f"data{seed}"
            )
            data = {**fixed, "train": train_split, "val": val_split}
            for name, method, weight in (
                (n, m, w)
                for n in args.models
                for m in args.methods
                for w in (args.retain_weights if n == "dino" else [0.0])
            ):
                label = method if weight == 0 else f"{method} retain {weight:g}"
                row = run_isolated(
                    name,
                    method,
                    seed,
                    data,
                    train,
                    root / f"{name}-{label.replace(' ', '-')}-{seed}",
                    args.threads,
                    args.scales,
                    {
                        "denoise_queries": args.denoise,
                        "train_scale_min": args.train_scale_min,
                        "train_crop": args.train_crop,
                        "input_proj": args.input_proj,
                        "retain_weight": weight,
                    },
                )
                runs.append({"model": name, "method": label, "seed": seed, **row})
                print(f"{name} {label} seed {seed}: {row}", flush=True)
    print_table(summarise(runs))
    if args.scales:
        print_curve(runs, args.scales)
        if args.plot and "dino" in args.models:
            plot_tradeoff(runs, args.scales, args.plot)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
