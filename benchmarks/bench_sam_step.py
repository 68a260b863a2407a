"""SAM training cost, SAM and SAM 2.1 side by side: one step LoRA vs full fine-tuning, the image
encoder's time per image; decoder-only with cached embeddings vs the encoder in the loop; the
LoRA adapter's size.

Real architectures with random weights (no download): SAM ``vit_b`` (segment-anything's builder
arguments) and SAM 2.1 ``sam2.1-hiera-tiny`` / ``sam2.1-hiera-base-plus`` (the hub checkpoints'
Sam2Config, teacher.sam.build.sam2_config), a 1024x1024 input, 8 box prompts, batch 1, SAM's
loss (multimask, best of 3: ``sam.multimask: true``, as the figures in docs/BENCHMARKS.md were
measured). Every measurement runs in its own process, so its peak memory is its own:

    python benchmarks/bench_sam_step.py                    # everything, the tables
    python benchmarks/bench_sam_step.py --only steps       # the step / encoder table alone
    python benchmarks/bench_sam_step.py --models vit_b,sam2.1-hiera-tiny  # which models
    python benchmarks/bench_sam_step.py --steps 3          # steps per mode (the first is warm-up)
    python benchmarks/bench_sam_step.py --epoch-images 72  # images per epoch (0: whole sample)
    python benchmarks/bench_sam_step.py --models tiny-random,tiny-random-sam2  # a quick smoke run

Modes: ``full`` (every parameter trains), ``lora`` (r=8 on the encoder's qkv: what train_sam
does by default), ``lora_ckpt`` (the same + activation checkpointing of the encoder blocks,
``train.activation_checkpointing``). bf16 autocast on CUDA, fp32 on CPU. Peak memory: CUDA max
allocated on a GPU; peak RSS of the process on CPU (model weights included). The bar: LoRA with
checkpointing at most 0.45 of full fine-tuning's peak. Encoder: ms per image of the frozen
encoder (eval, no grad, batch 1), the mean of ``--steps`` passes after one warm-up.

Epochs: decoder-only training (LoRA on decoder attention + the decoder trained fully, encoder
frozen) over the sample images, batch 2, either reading cached embeddings (computed once
beforehand, time reported apart) or running the frozen encoder every step (the first model of
``--models``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
DECODER_ATTN = "sam-decoder-attention"  # teacher.core.params.LORA_PRESETS


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


MODELS = "vit_b,sam2.1-hiera-tiny,sam2.1-hiera-base-plus"
SAM2_PREFIX = "sam2.1-hiera-"  # + a size of teacher.sam.build.HIERA_SIZES


def build_random(name: str):
    """``name`` with random weights: a SAM architecture (vit_b, tiny-random), a SAM 2.1 size
    (``sam2.1-hiera-tiny`` ...) or ``tiny-random-sam2``."""
    from teacher.sam import build as B

    if name.startswith(SAM2_PREFIX):
        return B.build_sam2(B.sam2_config(name.removeprefix(SAM2_PREFIX)))
    if name == B.TINY_RANDOM_SAM2:
        return B.build_tiny_random_sam2()
    return B.build_sam(B.ARCHITECTURES[name])


def build_model(name: str, mode: str):
    """``name`` (:func:`build_random`) for ``mode``: full | lora | lora_ckpt | decoder."""
    import torch

    from teacher.core.params import LoraParams, SamParams
    from teacher.sam.task import wrap_for_training

    torch.manual_seed(0)
    sam = build_random(name)
    if mode == "full":
        return sam.requires_grad_(True)
    params = (
        SamParams(lora_targets=DECODER_ATTN, train_decoder=True)
        if mode == "decoder"
        else SamParams()
    )
    return wrap_for_training(
        sam,
        sam_params=params,
        lora=LoraParams(dropout=0.0),
        activation_checkpointing=mode == "lora_ckpt",
    )


def synthetic_batch(*, prompts: int, size: int) -> dict:
    """One 1024x1024 image (already at the encoder size) with ``prompts`` boxes and masks."""
    import numpy as np
    import torch

    from teacher.sam.model import image_to_tensor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    xy = rng.uniform(0, size * 0.6, (prompts, 2))
    wh = rng.uniform(size * 0.1, size * 0.4, (prompts, 2))
    boxes = torch.as_tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
    masks = torch.zeros(prompts, size, size, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist(), strict=True):
        m[y0:y1, x0:x1] = True
    return {
        "images": [image_to_tensor(image)],
        "embeddings": None,
        "boxes": [boxes],
        "masks": [masks],
        # box prompts only (what the figures measure): no click prompts, no correction rounds
        "points": [torch.zeros(prompts, 2)],
        "is_point": [torch.zeros(prompts, dtype=torch.bool)],
        "extents": [(size, size)],
        "seeds": [0],
        "image_ids": [0],
    }


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_steps(model, batches, *, lr: float = 1e-4) -> list[float]:
    """Seconds of each optimizer step (forward, backward, AdamW) over ``batches``."""
    import torch

    from teacher.core.params import SamParams
    from teacher.sam.task import training_step

    # box prompts, best of 3 (the documented figures), no correction rounds: the encoder's cost
    params = SamParams(multimask=True, correction_points=0)
    dev = device()
    model.to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    times = []
    for batch in batches:
        start = time.perf_counter()
        with torch.autocast(dev, dtype=dtype, enabled=dev == "cuda"):
            loss = training_step(model, batch, sam_params=params)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def worker_step(name: str, mode: str, *, steps: int, prompts: int) -> dict:
    from teacher.sam.model import input_size, unwrap
    from teacher.sam.task import training_step  # noqa: F401  (imported before base_mb is read)
    from teacher.train.lora import count_parameters

    base_mb = peak_memory_mb()  # the process before any model: torch, transformers, teacher
    model = build_model(name, mode)
    trainable, total = count_parameters(model)
    batch = synthetic_batch(prompts=prompts, size=input_size(unwrap(model)))
    times = train_steps(model, [batch] * steps)
    timed = times[1:] or times
    return {
        "mode": mode,
        "seconds": sum(timed) / len(timed),
        "peak_mb": peak_memory_mb(),
        "base_mb": base_mb,
        "trainable": trainable,
        "total": total,
    }


def worker_encoder(name: str, *, passes: int) -> dict:
    """ms per image of the frozen encoder (embedding a 1024 px image, batch 1, no grad)."""
    import numpy as np
    import torch

    from teacher.sam.model import embed, input_size

    model = build_random(name).to(device()).eval()
    size = input_size(model)
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    times = []
    with torch.no_grad():
        for _ in range(passes + 1):  # the first is warm-up
            start = time.perf_counter()
            embed(model, [image])
            if device() == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    encoder = sum(p.numel() for p in model.encoder_parameters())
    return {"ms": 1000 * sum(times[1:]) / passes, "encoder_params": encoder}


def worker_epoch(name: str, mode: str, *, images: int, cache_dir: str) -> dict:
    """One decoder-only epoch over the sample images: cached embeddings or encoder in the loop."""
    from torch.utils.data import DataLoader

    from teacher.coco.io import load_coco, subset_coco
    from teacher.sam.data import SamDataset, cache_sam_embeddings, collate_sam
    from teacher.sam.model import unwrap

    coco = load_coco(SAMPLE / "annotations.json")
    if images:
        coco = subset_coco(coco, [im["id"] for im in coco["images"][:images]])
    model = build_model(name, "decoder").to(device())
    cache_seconds, embeddings = 0.0, None
    if mode == "cached":
        start = time.perf_counter()
        embeddings = cache_sam_embeddings(model, coco, SAMPLE / "images", Path(cache_dir))
        cache_seconds = time.perf_counter() - start
    dataset = SamDataset(
        coco,
        SAMPLE / "images",
        geometry=unwrap(model).geometry,
        max_prompts=16,
        box_jitter=0.1,
        seed=0,
        embeddings=embeddings,
    )
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_sam)
    start = time.perf_counter()
    steps = train_steps(model, loader)
    return {
        "mode": mode,
        "epoch_seconds": time.perf_counter() - start,
        "steps": len(steps),
        "images": len(dataset),
        "cache_seconds": cache_seconds,
        "peak_mb": peak_memory_mb(),
    }


def adapter_size_kb(name: str) -> float:
    from teacher.train.lora import save_adapter

    model = build_model(name, "lora")
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp))
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size / 1024


def spawn(*args: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace) -> None:
    import torch

    where = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores)"
    )
    print(f"SAM / SAM 2.1 (random weights), {args.prompts} box prompts, batch 1 - {where}")
    if args.only != "epochs":
        report_steps(args)
    if args.only != "steps":
        report_epochs(args)


BAR = 0.45  # LoRA (+ checkpointing) peak memory at most this share of full fine-tuning's


def report_steps(args: argparse.Namespace) -> None:
    import torch

    print(
        f"{'model':<24}{'mode':<11}{'trainable':>12}{'s/step':>9}{'peak MB':>10}"
        f"{'time x':>8}{'mem x':>7}"
    )
    encoders = {}
    for name in args.models.split(","):
        steps = {
            m: spawn(
                "--worker",
                "step",
                "--model",
                name,
                "--mode",
                m,
                "--steps",
                str(args.steps),
                "--prompts",
                str(args.prompts),
            )  # fmt: skip
            for m in ("full", "lora", "lora_ckpt")
        }
        full = steps["full"]
        for m, r in steps.items():
            print(
                f"{name:<24}{m:<11}{r['trainable']:>12,}{r['seconds']:>9.2f}{r['peak_mb']:>10.0f}"
                f"{r['seconds'] / full['seconds']:>8.2f}{r['peak_mb'] / full['peak_mb']:>7.2f}"
            )
        ratio = steps["lora_ckpt"]["peak_mb"] / full["peak_mb"]
        verdict = "meets" if ratio <= BAR else "misses"
        print(f"{name:<24}LoRA + checkpointing peak / full = {ratio:.2f}: {verdict} the {BAR} bar")
        if not torch.cuda.is_available():  # RSS counts the runtime too: the ratio above it
            base = full["base_mb"]
            net = (steps["lora_ckpt"]["peak_mb"] - base) / (full["peak_mb"] - base)
            print(f"{name:<24}  the same above the {base:.0f} MB of an idle process: {net:.2f}")
        encoders[name] = spawn("--worker", "encoder", "--model", name, "--steps", str(args.steps))
        print(f"{name:<24}LoRA adapter (r=8, encoder qkv): {adapter_size_kb(name) / 1024:.2f} MB")
    print(f"{'model':<24}{'encoder params':>15}{'encoder ms/image':>18}")
    for name, r in encoders.items():
        print(f"{name:<24}{r['encoder_params'] / 1e6:>14.1f}M{r['ms']:>18.0f}")


def report_epochs(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as cache:
        epochs = {
            m: spawn(
                "--worker",
                "epoch",
                "--model",
                args.models.split(",")[0],
                "--mode",
                m,
                "--images",
                str(args.epoch_images),
                "--cache",
                cache,
            )
            for m in ("loop", "cached")
        }
    loop, cached = epochs["loop"], epochs["cached"]
    print(f"decoder-only epoch, {loop['images']} sample images, batch 2 ({loop['steps']} steps):")
    print(
        f"  encoder in the loop {loop['epoch_seconds']:.1f} s; cached embeddings "
        f"{cached['epoch_seconds']:.1f} s (cache built once in {cached['cache_seconds']:.1f} s); "
        f"ratio {loop['epoch_seconds'] / cached['epoch_seconds']:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="steps per mode; the first is warm-up")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--models", default=MODELS, help=f"comma-separated (default {MODELS})")
    parser.add_argument("--epoch-images", type=int, default=0, help="images per epoch; 0: all")
    parser.add_argument("--only", choices=("steps", "epochs"), help="run one of the two parts")
    parser.add_argument("--worker", choices=("step", "epoch", "encoder"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "step":
        print(
            json.dumps(worker_step(args.model, args.mode, steps=args.steps, prompts=args.prompts))
        )
    elif args.worker == "encoder":
        print(json.dumps(worker_encoder(args.model, passes=args.steps)))
    elif args.worker == "epoch":
        epoch = worker_epoch(args.model, args.mode, images=args.images, cache_dir=args.cache)
        print(json.dumps(epoch))
    else:
        report(args)


if __name__ == "__main__":
    main()
