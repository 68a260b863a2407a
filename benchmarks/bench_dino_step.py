"""One Grounding DINO training step: LoRA vs full fine-tuning, seconds and peak memory.

The real grounding-dino-tiny architecture (Swin-T + BERT-base, 6+6 layers, 900 queries) built
from its config with random weights (no download), one 800x1333 image, batch 1, the grounded
loss. Each mode runs in its own process so its peak memory is its own:

    python benchmarks/bench_dino_step.py            # both modes, the table
    python benchmarks/bench_dino_step.py --steps 3  # more steps per mode (first one is warm-up)
    python benchmarks/bench_dino_step.py --retain   # LoRA without and with dino.retain_weight

``--retain`` compares LoRA steps without and with the retention term (issue #37,
:mod:`teacher.dino.retain`): the same step function (``teacher.dino.task.training_step``), the
prompt with ``dino.retain_names`` (20) COCO names after its 4 classes, the base model's forward
without gradients sharing one pass of the frozen Swin and BERT. Bars: step time <= 1.3x, peak
memory <= 1.15x.

LoRA mode is what train_dino does: LoRA (dino.lora_targets) + the box heads, frozen image and
text encoders run without autograd, activation checkpointing of encoder and decoder layers,
bf16 autocast on CUDA. Full mode: every parameter trains, no checkpointing, same precision.
Peak memory: CUDA max allocated on a GPU; peak RSS of the process on CPU (glibc fragmentation
makes it vary run to run; MALLOC_MMAP_THRESHOLD_=131072 gives lower, steadier peaks).
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

PROMPT = "circle . square . triangle . star ."


RETAIN = "lora-retain"  # LoRA with dino.retain_weight on


def build(mode: str, *, preset: str, checkpointing: bool = True):
    import numpy as np
    import torch
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from teacher.core.params import DinoParams, LoraParams
    from teacher.dino.data import box_targets
    from teacher.dino.model import (
        build_processor,
        prepare_model,
        tiny_config,
        tiny_tokenizer,
    )

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()  # bert-base-uncased ids; the prompt's ids fit BERT's vocabulary
    config = (
        tiny_config(vocab_size=len(tokenizer)) if preset == "tiny-random" else GroundingDinoConfig()
    )  # the defaults are grounding-dino-tiny's architecture
    model = prepare_model(GroundingDinoForObjectDetection(config))
    processor = build_processor(tokenizer, dino=DinoParams())  # 800 / 1333
    retain = DinoParams().retain_names if mode == RETAIN else 0
    if mode in ("lora", RETAIN):
        from teacher.dino.task import wrap_for_training

        dino = DinoParams(retain_weight=1.0 if retain else 0.0)
        model = wrap_for_training(
            model, dino=dino, lora=LoraParams(), activation_checkpointing=checkpointing
        )
    image = np.random.default_rng(0).integers(0, 255, (800, 1333, 3), dtype=np.uint8)
    from teacher.coco.vocabulary import COCO_CLASSES
    from teacher.dino.labels import prompt_text

    prompt = PROMPT + (" " + prompt_text(COCO_CLASSES[:retain]) if retain else "")
    inputs = {
        **processor.image_processor(images=[image], return_tensors="pt"),
        **processor.tokenizer([prompt], return_tensors="pt"),
        "own": [4],  # PROMPT's classes, before the retention names
        "retained": retain,
    }
    labels = [
        box_targets(
            np.array([[100, 100, 300, 200], [600, 300, 200, 400]]),
            np.array([0, 2]),
            width=1333,
            height=800,
        )
    ]
    return model, inputs, labels


def adapter_bytes(model) -> int:
    from teacher.train.lora import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp))
        return sum(p.stat().st_size for p in Path(tmp).iterdir() if p.suffix == ".safetensors")


def run_mode(mode: str, steps: int, *, preset: str, checkpointing: bool = True) -> dict:
    """Build, then time ``steps`` optimizer steps; returns the measurements as a dict."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, inputs, labels = build(mode, preset=preset, checkpointing=checkpointing)
    from teacher.dino.task import training_step

    model.to(device).train()
    batch = {**inputs, "labels": labels}
    weight = 1.0 if mode == RETAIN else 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            # train_dino's step (the grounded loss; with RETAIN the retention term too); no
            # reference to the outputs is kept
            loss = training_step(model, batch, retain_weight=weight)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "mode": mode,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "step_s": times,
        "peak_bytes": peak,
        "rss_before_steps": rss_model,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "adapter_bytes": adapter_bytes(model) if mode != "full" else None,
    }


def table(lora: dict, full: dict) -> str:
    def secs(r: dict) -> float:
        t = r["step_s"][1:] or r["step_s"]  # the first step warms up
        return sum(t) / len(t)

    gb = 1024**3
    peak_name = "peak CUDA allocated" if lora["device"] != "cpu" else "peak RSS"
    rows = [
        ("", "LoRA", "full", "LoRA / full"),
        (
            "seconds per step",
            f"{secs(lora):.1f}",
            f"{secs(full):.1f}",
            f"{secs(lora) / secs(full):.2f}",
        ),
        (
            f"{peak_name} (GiB)",
            f"{lora['peak_bytes'] / gb:.2f}",
            f"{full['peak_bytes'] / gb:.2f}",
            f"{lora['peak_bytes'] / full['peak_bytes']:.2f}",
        ),
        (
            "trainable parameters",
            f"{lora['trainable']:,}",
            f"{full['trainable']:,}",
            f"{lora['trainable'] / full['trainable']:.4f}",
        ),
        (
            "saved weights (MB)",
            f"{lora['adapter_bytes'] / 1e6:.1f}",
            f"{full['total'] * 4 / 1e6:.1f}",
            f"{lora['adapter_bytes'] / (full['total'] * 4):.4f}",
        ),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, width, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    return "\n".join(lines)


def retain_table(off: dict, on: dict, *, preset: str) -> str:
    """LoRA steps without and with the retention term, the ratios against the bars."""

    def secs(r: dict) -> float:
        t = r["step_s"][1:] or r["step_s"]
        return sum(t) / len(t)

    gb = 1024**3
    peak_name = "peak CUDA allocated" if off["device"] != "cpu" else "peak RSS"
    time_ratio = secs(on) / secs(off)
    memory_ratio = on["peak_bytes"] / off["peak_bytes"]
    return "\n".join(
        [
            f"Grounding DINO ({preset} architecture, random weights), 800x1333, batch 1, "
            f"device {off['device']}, {off['threads']} threads; LoRA without / with "
            f"dino.retain_weight (20 retention names)",
            "| | term off | term on | on / off | bar |",
            "|---|---|---|---|---|",
            f"| seconds per step | {secs(off):.2f} | {secs(on):.2f} | {time_ratio:.2f} | "
            f"<= 1.30: {'met' if time_ratio <= 1.3 else 'NOT met'} |",
            f"| {peak_name} (GiB) | {off['peak_bytes'] / gb:.2f} | {on['peak_bytes'] / gb:.2f} "
            f"| {memory_ratio:.2f} | <= 1.15: {'met' if memory_ratio <= 1.15 else 'NOT met'} |",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="steps per mode; the first warms up")
    parser.add_argument(
        "--preset",
        choices=("grounding-dino-tiny", "tiny-random"),
        default="grounding-dino-tiny",
        help="tiny-random: a seconds-long smoke run",
    )
    parser.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="LoRA mode without activation checkpointing (to see what it costs)",
    )
    parser.add_argument(
        "--retain",
        action="store_true",
        help="compare LoRA steps without and with the retention term (dino.retain_weight)",
    )
    parser.add_argument("--mode", choices=("lora", "full", RETAIN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(
            json.dumps(
                run_mode(
                    args.mode,
                    args.steps,
                    preset=args.preset,
                    checkpointing=not args.no_checkpointing,
                )
            )
        )
        return 0
    results = {}
    for mode in ("lora", RETAIN) if args.retain else ("lora", "full"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--steps",
                str(args.steps),
                "--preset",
                args.preset,
            ]
            + (["--no-checkpointing"] if args.no_checkpointing else []),
            capture_output=True,
            text=True,
            env=os.environ,
        )
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]}", file=sys.stderr)
    if args.retain:
        print(retain_table(results["lora"], results[RETAIN], preset=args.preset))
        return 0
    lora, full = results["lora"], results["full"]
    print(
        f"Grounding DINO ({args.preset} architecture, random weights), 800x1333, batch 1, "
        f"device {lora['device']}, {lora['threads']} threads"
    )
    print(table(lora, full))
    ratio = lora["peak_bytes"] / full["peak_bytes"]
    print(f"target LoRA peak <= 50% of full: {'met' if ratio <= 0.5 else 'NOT met'} ({ratio:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
