"""What only a GPU can measure (training steps, peak memory, inference speed), in one table.

The real architectures with random weights (no download), built by the project's own code.

    make bench-gpu                                  # = python scripts/gpu_check.py
    (scripts/gpu_check.py runs this module, teacher.proving.gpu_check)
    python scripts/gpu_check.py --out gpu_check.json --budget 450 --steps 3
    python scripts/gpu_check.py --dry-run           # the tiny CPU run CI does, even with CUDA

Sections (``plan``):

- ``dino``: one Grounding DINO-T training step (Swin-T + BERT-base, 800x1333, batch 2 and 4):
  LoRA as train_dino wraps it (``dino.task.wrap_for_training``, the ``dino`` / ``lora`` defaults),
  the same + activation checkpointing, and full fine-tuning; ``dino.task.training_step`` on a
  ``collate_dino`` batch, AdamW, ``dino.clip_norm``.
- ``sam``: one SAM training step, ``vit_b`` and ``vit_h`` at 1024, batch 2, 16 box prompts per
  image (``sam.max_prompts``): LoRA on the encoder qkv (``sam.task.wrap_for_training``), the
  same + checkpointing, full, and decoder-only on cached embeddings (computed beforehand, as the
  embedding cache holds them: float32 on the host).
- ``predict``: Grounded-SAM (``inference.predict.predict_images``: Grounding DINO-T + SAM
  ``vit_b``, 20 boxes per image, one SAM encoder pass per image), ms per image at batch 1 and 8.
- ``student``: RF-DETR nano and seg-nano (``student.model.ARCHITECTURES``): training images/s
  (``student.task.training_step``, batch 8), inference ms per image through
  ``student.model.predict`` in PyTorch and, where onnxruntime has its CUDAExecutionProvider, in
  ONNX Runtime (``student.onnx``; the row says when it has not).

Training rows run under the autocast ``train.precision: auto`` picks (bf16 where supported);
inference rows in float32, as ``teacher predict`` runs. Times: the mean of ``--steps`` timed
steps (or calls) after one warm-up. Peak memory: ``torch.cuda.max_memory_allocated`` since the
model reached the GPU (weights included), or the process's peak RSS on the CPU dry run.

Every training measurement runs in its own process (the inference rows of one model share one,
the peak reset between them), so a CUDA out-of-memory error costs one row ("skipped: out of
memory"), not the run. Each section has a time cap: its share of ``--budget`` plus what earlier
sections left; what does not start in time is "skipped: time cap". Without CUDA, or with
``--dry-run``, every section runs once on the CPU at toy size (``tiny-random`` models, one step,
no warm-up): the rows say "dry run", and the comparison with the design we replace (``BARS``)
is printed as not applicable. Writes every row, with the GPU, torch and CUDA versions and the
dtype, as JSON (``--out``, default ``gpu_check.json`` in the working directory).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2]  # the src/ folder this package is in
RESULT = "GPU_CHECK_RESULT "  # prefix of the line a child process prints its results on
OUT_OF_MEMORY = "skipped: out of memory"
# what torch (CUDA, CPU) and onnxruntime say when an allocation fails
OOM_MARKERS = (
    "out of memory",
    "failed to allocate memory",
    "can't allocate memory",
    "alloc_failed",
)
CLASSES: list[dict[str, Any]] = [
    {"id": i + 1, "name": n} for i, n in enumerate(["cat", "dog", "car", "person"])
]
DECODER_ATTN = "sam-decoder-attention"  # teacher.core.params.LORA_PRESETS: decoder-only mode
IMAGE_HW = (480, 640)  # images given to the inference rows (resized by each model)
DRY_IMAGE_HW = (48, 64)
PREDICT_BOXES = 20  # kept detections per image SAM segments (bench_predict.py's 20)
STUDENT_TRAIN_BATCH = 8
MIB = 2**20


@dataclass(frozen=True)
class Measurement:
    """One row of the table: what runs, on which model, at which batch."""

    section: str  # key of SECTION_SHARES
    model: (
        str  # grounding-dino-tiny | vit_b | vit_h | grounded-sam | rf-detr-nano | rf-detr-seg-nano
    )
    mode: str  # lora | lora+ckpt | full | decoder | train | pytorch | onnxruntime | predict
    batch: int  # images per step (training) or per call (inference)


# each section's time cap, as a share of --budget (plus what earlier sections left unused)
SECTION_SHARES = {"dino": 0.25, "sam": 0.40, "predict": 0.10, "student": 0.25}
INFERENCE_MODES = ("predict", "pytorch", "onnxruntime")  # float32 rows; the others train


@dataclass(frozen=True)
class Bar:
    """A target of the design this one replaces, checked against the rows it names."""

    text: str
    sections: tuple[str, ...]
    modes: tuple[str, ...]
    key: str  # row field compared
    limit: float  # met when the row's value <= limit
    unit: str


BARS = (
    Bar("Grounding DINO LoRA peak <= 14 GiB", ("dino",), ("lora", "lora+ckpt"), "peak_mib", 14 * 1024, "MiB"),
    Bar("SAM LoRA peak <= 8 GiB", ("sam",), ("lora", "lora+ckpt"), "peak_mib", 8 * 1024, "MiB"),
    Bar("LoRA / full peak <= 0.5", ("dino", "sam"), ("lora", "lora+ckpt"), "vs_full", 0.5, "x"),
)  # fmt: skip


def plan(*, dry_run: bool) -> dict[str, list[list[Measurement]]]:
    """Per section its jobs (one child process each), each a list of measurements.

    On a GPU a training measurement is a job of its own (its own peak memory, its own OOM); a
    model's inference rows share one. The dry run runs each section as one job.
    """
    m = Measurement
    sections: dict[str, list[list[Measurement]]] = {
        "dino": [
            [m("dino", "grounding-dino-tiny", mode, batch)]
            for batch in (2, 4)
            for mode in ("lora", "lora+ckpt", "full")
        ],
        "sam": [
            [m("sam", arch, mode, 2)]
            for arch in ("vit_b", "vit_h")
            for mode in ("lora", "lora+ckpt", "full", "decoder")
        ],
        "predict": [[m("predict", "grounded-sam", "predict", b) for b in (1, 8)]],
        "student": [
            job
            for name in ("rf-detr-nano", "rf-detr-seg-nano")
            for job in (
                [m("student", name, "train", STUDENT_TRAIN_BATCH)],
                [m("student", name, "pytorch", b) for b in (1, 8)],
                [m("student", name, "onnxruntime", b) for b in (1, 8)],
            )
        ],
    }
    if dry_run:
        return {name: [[x for job in jobs for x in job]] for name, jobs in sections.items()}
    return sections


# --- the parent: plan, spawn, collect, compare, print ---------------------------------------------


def base_row(m: Measurement, env: dict[str, Any]) -> dict[str, Any]:
    """A row before its numbers: the measurement and where it ran."""
    return {
        **asdict(m),
        "gpu": env["gpu"],
        "torch": env["torch"],
        "cuda": env["cuda"],
        "peak_memory": env["peak_memory"],  # what peak_mib measures
        "dtype": "float32" if m.mode in INFERENCE_MODES else env["train_dtype"],
        "input": None,
        "step_ms": None,  # training rows
        "ms_per_image": None,  # inference rows
        "images_per_s": None,
        "peak_mib": None,
        "trainable": None,  # parameters that train (training rows)
        "vs_full": None,  # peak / the full fine-tuning peak of the same model and batch
        "status": None,
    }


def is_out_of_memory(text: str) -> bool:
    """Whether an error message (or a child's stderr) is an allocation failure."""
    low = text.lower()
    return any(marker in low for marker in OOM_MARKERS)


def failed_status(returncode: int, stderr: str) -> str:
    """The status of every row of a child process that ended without results."""
    if is_out_of_memory(stderr):
        return OUT_OF_MEMORY
    if returncode < 0:
        return f"failed: killed by signal {-returncode}"
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"failed: exit {returncode}: {last[-1][:160] if last else 'no message'}"


def spawn(args: list[str], *, dry_run: bool, timeout: float | None) -> subprocess.CompletedProcess:
    """This module as a child process, with this checkout's src/ first on PYTHONPATH."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU's, even where CUDA is
        env["OMP_NUM_THREADS"] = "1"  # toy sizes: more threads only contend on a shared CI box
    return subprocess.run(
        [sys.executable, "-m", "teacher.proving.gpu_check", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def child_results(proc: subprocess.CompletedProcess) -> Any | None:
    """The JSON a child printed on its RESULT line, or None."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :]) if lines else None


def probe(*, dry_run: bool) -> dict[str, Any]:
    """Where the measurements run: GPU name, versions, the training autocast dtype."""
    proc = spawn(["--probe"], dry_run=dry_run, timeout=300)
    env = child_results(proc)
    if env is None:
        raise SystemExit(f"gpu_check: the environment probe failed:\n{proc.stderr[-3000:]}")
    return env


def run_job(
    job: list[Measurement], *, env: dict[str, Any], steps: int, timeout: float
) -> list[dict[str, Any]]:
    """One child process measures ``job``; its rows, filled or with why not."""
    rows = [base_row(m, env) for m in job]
    if timeout <= 0:
        return [{**r, "status": "skipped: time cap"} for r in rows]
    spec = {"measurements": [asdict(m) for m in job], "dry_run": env["dry_run"], "steps": steps}
    try:
        proc = spawn(["--job", json.dumps(spec)], dry_run=env["dry_run"], timeout=timeout)
    except subprocess.TimeoutExpired:
        return [
            {**r, "status": f"skipped: time cap ({timeout:.0f} s left in the section)"}
            for r in rows
        ]
    results = child_results(proc)
    if proc.returncode != 0 or results is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        status = failed_status(proc.returncode, proc.stderr)
        return [{**r, "status": status} for r in rows]
    if any(str(res.get("status", "")).startswith("failed") for res in results):
        print(proc.stderr[-3000:], file=sys.stderr)
    return [{**r, **res} for r, res in zip(rows, results, strict=True)]


def add_full_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each non-full training row's peak over the full fine-tuning peak of its model and batch."""
    full = {
        (r["section"], r["model"], r["batch"]): r["peak_mib"]
        for r in rows
        if r["mode"] == "full" and r["peak_mib"]
    }
    out = []
    for r in rows:
        ref = full.get((r["section"], r["model"], r["batch"]))
        ratio = r["peak_mib"] / ref if ref and r["peak_mib"] and r["mode"] != "full" else None
        out.append({**r, "vs_full": ratio})
    return out


def check_bars(rows: list[dict[str, Any]], *, dry_run: bool) -> list[dict[str, Any]]:
    """Every ``BARS`` target against each row it names: measured value and verdict."""
    checks = []
    for bar in BARS:
        for r in rows:
            if r["section"] not in bar.sections or r["mode"] not in bar.modes:
                continue
            value = r[bar.key]
            if dry_run:
                verdict = "not applicable (dry run)"
            elif value is None:
                verdict = f"not measured ({r['status']})"
            else:
                verdict = "met" if value <= bar.limit else "NOT met"
            checks.append(
                {
                    "bar": bar.text,
                    "row": f"{r['model']} {r['mode']} batch {r['batch']}",
                    "value": value,
                    "limit": bar.limit,
                    "unit": bar.unit,
                    "verdict": verdict,
                }
            )
    return checks


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(header: Sequence[str], cells: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    width = [max(len(str(c)) for c in col) for col in zip(header, *cells, strict=True)]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, width, strict=True)) + " |"
        for line in (header, *cells)
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    return "\n".join(lines)


TABLE_HEADER = (
    "section", "model", "mode", "input", "batch", "dtype", "ms/step", "ms/image", "images/s",
    "peak MiB", "vs full", "status",
)  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table (GPU, versions and what the peak is in the title line:
    every row has them, the same)."""
    cells = [
        (
            r["section"], r["model"], r["mode"], r["input"] or "-", str(r["batch"]), r["dtype"],
            _num(r["step_ms"], 1), _num(r["ms_per_image"], 2), _num(r["images_per_s"], 1),
            _num(r["peak_mib"], 0), _num(r["vs_full"], 2), r["status"],
        )
        for r in rows
    ]  # fmt: skip
    where = sorted(
        {
            f"{r['gpu']}, torch {r['torch']}, CUDA {r['cuda']}; peak: {r['peak_memory']}"
            for r in rows
        }
    )
    return f"{'; '.join(where)}\n{markdown(TABLE_HEADER, cells)}"


def format_bars(checks: list[dict[str, Any]]) -> str:
    """The comparison with the design we replace, one line per bar and row."""
    cells = [
        (c["bar"], c["row"], _num(c["value"], 2 if c["unit"] == "x" else 0), c["verdict"])
        for c in checks
    ]
    return markdown(("bar (the design we replace)", "row", "measured", "verdict"), cells)


def run_all(*, dry_run: bool, budget: float, steps: int) -> dict[str, Any]:
    """Every section's jobs within its time cap; the report (sections, bars, environment)."""
    start = time.perf_counter()
    env = {**probe(dry_run=dry_run)}
    dry_run = env["dry_run"] = dry_run or not env["cuda_available"]
    steps = 1 if dry_run else steps
    sections: dict[str, list[dict[str, Any]]] = {}
    spare = 0.0  # seconds earlier sections left unused
    for name, jobs in plan(dry_run=dry_run).items():
        cap = SECTION_SHARES[name] * budget + spare
        section_start = time.perf_counter()
        rows: list[dict[str, Any]] = []
        for job in jobs:
            left = cap - (time.perf_counter() - section_start)
            rows += run_job(job, env=env, steps=steps, timeout=left)
            print(
                f"{name}: {rows[-1]['model']} {rows[-1]['mode']}: {rows[-1]['status']}",
                file=sys.stderr,
            )
        spare = max(0.0, cap - (time.perf_counter() - section_start))
        sections[name] = rows
    rows = add_full_ratios([r for rs in sections.values() for r in rs])
    sections = {name: [r for r in rows if r["section"] == name] for name in sections}
    return {
        "environment": env,
        "budget_s": budget,
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "sections": sections,
        "bars": check_bars(rows, dry_run=dry_run),
    }


# --- the child: measure ---------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """GPU name, torch and CUDA versions, and the dtype ``train.precision: auto`` trains in."""
    import torch

    from teacher.train.loop import resolve_precision

    cuda = torch.cuda.is_available()
    precision = resolve_precision("auto")
    return {
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "peak_memory": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
        "train_dtype": {"no": "float32"}.get(precision, f"{precision} autocast"),
    }


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    """CUDA max allocated since the last reset; on the CPU the process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # KiB on Linux


def seconds_each(run: Callable[[], Any], *, steps: int, warmup: int) -> float:
    """Mean seconds of ``run`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    synchronize()
    return (time.perf_counter() - start) / steps


def train_step_row(
    model, batch: Any, *, step: Callable, clip_norm: float, images: int, steps: int, warmup: int
) -> dict[str, Any]:
    """Time optimizer steps as the training loop runs them: autocast forward, backward,
    gradient clipping, AdamW."""
    import torch

    from teacher.train.loop import resolve_precision, set_train_mode

    dev = device()
    model.to(dev)
    set_train_mode(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    precision = resolve_precision("auto")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def one() -> None:
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = step(model, batch)["loss"]
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak()
    seconds = seconds_each(one, steps=steps, warmup=warmup)
    return {
        "step_ms": 1000 * seconds,
        "images_per_s": images / seconds,
        "peak_mib": peak_mib(),
        "trainable": sum(p.numel() for p in params),
    }


def inference_row(
    run: Callable[[list], Any], images: list, *, batch: int, steps: int, warmup: int
) -> dict[str, Any]:
    """ms per image of ``run`` over batches of ``batch`` images."""
    import torch

    chunk = images[:batch]
    reset_peak()
    with torch.inference_mode():
        seconds = seconds_each(lambda: run(chunk), steps=steps, warmup=warmup)
    return {
        "ms_per_image": 1000 * seconds / batch,
        "images_per_s": batch / seconds,
        "peak_mib": peak_mib(),
    }


def random_images(n: int, *, height: int, width: int, seed: int = 0) -> list:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def build_dino(*, dry_run: bool):
    """Grounding DINO-T (Swin-T + BERT-base: ``GroundingDinoConfig()``'s defaults), random
    weights, 800 / 1333 resize; the dry run's is ``tiny-random`` at 64 / 96."""
    import torch
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from teacher.core.params import DinoParams
    from teacher.dino.model import build_processor, load_dino, prepare_model, tiny_tokenizer

    torch.manual_seed(0)
    if dry_run:
        params = DinoParams(model="tiny-random", shortest_edge=64, longest_edge=96)
        bundle = load_dino(params)
        return bundle.model, bundle.processor, params
    params = DinoParams()
    model = prepare_model(GroundingDinoForObjectDetection(GroundingDinoConfig()))
    # bert-base-uncased's special ids, the class names one token each (as in BERT's vocabulary)
    tokenizer = tiny_tokenizer(tuple(c["name"] for c in CLASSES))
    return model, build_processor(tokenizer, dino=params), params


def measure_dino(m: Measurement, *, dry_run: bool, steps: int, warmup: int) -> dict[str, Any]:
    """One train_dino step: LoRA (+ checkpointing) or every weight, on a collate_dino batch."""
    import numpy as np

    from teacher.core.params import LoraParams
    from teacher.dino.data import collate_dino
    from teacher.dino.labels import build_label_map
    from teacher.dino.model import set_dropout
    from teacher.dino.task import training_step, with_denoising, wrap_for_training

    model, processor, params = build_dino(dry_run=dry_run)
    if m.mode == "full":
        set_dropout(model, params.dropout)
        model = with_denoising(model.requires_grad_(True), params)
    else:
        model = wrap_for_training(
            model, dino=params, lora=LoraParams(), activation_checkpointing=m.mode == "lora+ckpt"
        )
    label_map = build_label_map(CLASSES, tokenizer=processor.tokenizer)
    height, width = params.shortest_edge, params.longest_edge
    items = [
        {
            "image": image,
            "boxes": np.array([[0.1 * width, 0.1 * height, 0.3 * width, 0.2 * height],
                               [0.5 * width, 0.4 * height, 0.2 * width, 0.5 * height]], np.float32),
            "labels": np.array([0, 2]),
            "classes": label_map.chunks[0],
            "image_id": i,
            "size": (width, height),
        }
        for i, image in enumerate(random_images(m.batch, height=height, width=width))
    ]  # fmt: skip
    batch = collate_dino(items, processor=processor, label_map=label_map)
    row = train_step_row(
        model, batch, step=training_step, clip_norm=params.clip_norm, images=m.batch,
        steps=steps, warmup=warmup,
    )  # fmt: skip
    return {**row, "input": f"{'tiny-random ' if dry_run else ''}{height}x{width}"}


def sam_items(n: int, *, size: int, prompts: int) -> list[dict[str, Any]]:
    """``n`` SamDataset-like items: a size x size image, ``prompts`` boxes and their masks."""
    import numpy as np
    import torch

    from teacher.core.params import SamParams
    from teacher.sam.model import image_to_tensor
    from teacher.sam.prompts import choose_point_prompts, sample_mask_points

    rng = np.random.default_rng(0)
    items = []
    for i, image in enumerate(random_images(n, height=size, width=size)):
        xy = rng.uniform(0, size * 0.6, (prompts, 2))
        wh = rng.uniform(size * 0.1, size * 0.4, (prompts, 2))
        boxes = torch.as_tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
        masks = torch.zeros(prompts, size, size, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist(), strict=True):
            mask[y0:y1, x0:x1] = True
        # the prompt mix train_sam draws (sam.point_prompts of them a click, as SamDataset)
        is_point = choose_point_prompts(prompts, share=SamParams().point_prompts, rng=rng)
        points, found = sample_mask_points(masks, rng=rng)
        items.append(
            {
                "image": image_to_tensor(image),
                "boxes": boxes,
                "masks": masks,
                "points": points,
                "is_point": torch.from_numpy(is_point) & found,
                "extent": (size, size),
                "seed": i,
                "image_id": i,
            }
        )
    return items


def measure_sam(m: Measurement, *, dry_run: bool, steps: int, warmup: int) -> dict[str, Any]:
    """One train_sam step: encoder LoRA (+ checkpointing), every weight, or decoder-only on
    embeddings computed beforehand."""
    import torch

    from teacher.core.params import LoraParams, SamParams, TrainParams
    from teacher.sam.build import ARCHITECTURES, build_sam, build_tiny_random
    from teacher.sam.data import collate_sam
    from teacher.sam.model import embed_images, input_size, unwrap
    from teacher.sam.task import training_step, wrap_for_training

    torch.manual_seed(0)
    sam = build_tiny_random() if dry_run else build_sam(ARCHITECTURES[m.model])
    params = (
        SamParams(lora_targets=DECODER_ATTN, train_decoder=True)
        if m.mode == "decoder"
        else SamParams()
    )
    if m.mode == "full":
        model = sam.requires_grad_(True)
    else:
        model = wrap_for_training(
            sam,
            sam_params=params,
            lora=LoraParams(),
            activation_checkpointing=m.mode == "lora+ckpt",
        )
    size = input_size(unwrap(model))
    items = sam_items(m.batch, size=size, prompts=params.max_prompts)
    if m.mode == "decoder":  # the embedding cache: the frozen encoder's float32 output, on the host
        model.to(device())
        with torch.no_grad():
            embeddings = embed_images(unwrap(model), [it.pop("image") for it in items]).cpu()
        items = [{**it, "embedding": e} for it, e in zip(items, embeddings, strict=True)]
    row = train_step_row(
        model, collate_sam(items), step=lambda mdl, b: training_step(mdl, b, sam_params=params),
        clip_norm=TrainParams().clip_norm, images=m.batch, steps=steps, warmup=warmup,
    )  # fmt: skip
    return {
        **row,
        "input": f"{'tiny-random ' if dry_run else ''}{size}, {params.max_prompts} boxes",
    }


@functools.cache
def teachers(*, dry_run: bool):
    """Grounding DINO-T + SAM vit_b with random weights (dry run: both tiny-random)."""
    from teacher.core.params import DinoParams
    from teacher.dino.labels import build_label_map
    from teacher.dino.model import DinoBundle, load_dino
    from teacher.inference.predict import Teachers
    from teacher.sam.build import ARCHITECTURES, build_sam, build_tiny_random

    dev = device()
    if dry_run:
        bundle = load_dino(DinoParams(model="tiny-random", shortest_edge=64, longest_edge=96))
    else:
        model, processor, _ = build_dino(dry_run=False)
        bundle = DinoBundle(model=model, processor=processor)
    bundle.model.eval().to(dev)
    sam = build_tiny_random() if dry_run else build_sam(ARCHITECTURES["vit_b"])
    label_map = build_label_map(CLASSES, tokenizer=bundle.processor.tokenizer)
    return Teachers(dino=bundle, sam=sam.to(dev).eval(), label_map=label_map)


def measure_predict(m: Measurement, *, dry_run: bool, steps: int, warmup: int) -> dict[str, Any]:
    """Grounded-SAM on ``m.batch`` images per call: DINO on the batch, one SAM pass per image."""
    from teacher.inference.predict import Filter, predict_images

    boxes = 2 if dry_run else PREDICT_BOXES
    keep = Filter(score_threshold=0.0, nms_iou=1.0, max_detections=boxes)  # exactly `boxes`
    height, width = DRY_IMAGE_HW if dry_run else IMAGE_HW
    loaded = teachers(dry_run=dry_run)
    row = inference_row(
        lambda ims: predict_images(loaded, ims, keep=keep, text_threshold=0.0),
        random_images(m.batch, height=height, width=width),
        batch=m.batch, steps=steps, warmup=warmup,
    )  # fmt: skip
    sam = "tiny-random" if dry_run else "vit_b"
    return {**row, "input": f"{height}x{width}, {boxes} boxes, SAM {sam}"}


def build_student_model(name: str, *, dry_run: bool):
    """(model, StudentInfo) of a released RF-DETR architecture, random weights (dry run:
    ``tiny-random``, as ``student.model: tiny-random`` builds it)."""
    import torch

    from teacher.core.params import StudentParams
    from teacher.student import model as student

    masks = "seg" in name
    names = [c["name"] for c in CLASSES]
    if dry_run:
        model, resolution, _ = student.build_student(
            StudentParams(model="tiny-random"), names=names, masks=masks
        )
    else:
        torch.manual_seed(0)
        model = student.model_class(masks)(student.architecture_config(name, names=names))
        resolution = student.ARCHITECTURES[name][2]
    info = student.StudentInfo(
        source=name,
        masks=masks,
        resolution=resolution,
        category_ids=tuple(c["id"] for c in CLASSES),
        names=tuple(names),
    )
    return model, info


def measure_student_train(
    m: Measurement, *, dry_run: bool, steps: int, warmup: int
) -> dict[str, Any]:
    """One train_student step on a collate_student batch (every weight trains)."""
    import numpy as np

    from teacher.core.params import StudentParams
    from teacher.student.data import HUMAN, Instances, collate_student
    from teacher.student.loss import use_student_loss
    from teacher.student.task import BOX_TERMS, MASK_TERMS, training_step

    model, info = build_student_model(m.model, dry_run=dry_run)
    use_student_loss(model, masks=info.masks)
    height, width = DRY_IMAGE_HW if dry_run else IMAGE_HW
    boxes = np.array([[0.1 * width, 0.1 * height, 0.3 * width, 0.3 * height],
                      [0.5 * width, 0.4 * height, 0.3 * width, 0.5 * height]], np.float32)  # fmt: skip
    masks = np.zeros((2, height, width), bool)
    for mask, (x, y, w, h) in zip(masks, boxes.astype(int), strict=True):
        mask[y : y + h, x : x + w] = True
    instances = Instances(
        boxes, np.array([0, 1]), masks if info.masks else None, np.ones(2, bool),
        np.ones(2, np.float32), np.zeros(2, bool),
    )  # fmt: skip
    items = [
        {"image": image, "instances": instances, "weight": 1.0, "source": HUMAN, "image_id": i}
        for i, image in enumerate(random_images(m.batch, height=height, width=width))
    ]  # fmt: skip
    terms = BOX_TERMS + (MASK_TERMS if info.masks else ())
    row = train_step_row(
        model, collate_student(items, resolution=info.resolution),
        step=lambda mdl, b: training_step(mdl, b, terms=terms),
        clip_norm=StudentParams().clip_norm, images=m.batch, steps=steps, warmup=warmup,
    )  # fmt: skip
    return {**row, "input": f"{height}x{width} -> {info.resolution}"}


@functools.cache
def student_runtime(name: str, runtime: str, *, dry_run: bool):
    """The student as ``teacher predict --student`` runs it: the PyTorch module, or exported to
    ONNX and run by ONNX Runtime (``student.onnx``); its provider note."""
    import tempfile

    from teacher.student.model import Student, StudentOutputs, save_student

    model, info = build_student_model(name, dry_run=dry_run)
    if runtime == "pytorch":
        return Student(forward=StudentOutputs(model).to(device()).eval(), info=info), ""
    from teacher.student.onnx import OnnxStudent, export_onnx

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:  # the session holds the model
        save_student(model, Path(tmp) / "student", info=info)
        forward = OnnxStudent(export_onnx(Path(tmp) / "student", Path(tmp) / "onnx"))
    providers = [p for p in forward.session.get_providers() if p != "AzureExecutionProvider"]
    return Student(forward=forward, info=info), "+".join(providers)  # Azure: remote calls only


def measure_student_predict(
    m: Measurement, *, dry_run: bool, steps: int, warmup: int
) -> dict[str, Any]:
    """ms per image of ``student.model.predict`` (pre-processing, forward, decoding)."""
    from teacher.student.model import predict

    if m.mode == "onnxruntime" and not dry_run:
        import onnxruntime as ort  # type: ignore[import-untyped]

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return {
                "status": "skipped: onnxruntime has no CUDAExecutionProvider here "
                f"({', '.join(providers)}; install onnxruntime-gpu)"
            }
    student, provider = student_runtime(m.model, m.mode, dry_run=dry_run)
    if m.mode == "onnxruntime" and not dry_run and "CUDAExecutionProvider" not in provider:
        return {
            "status": f"skipped: the CUDAExecutionProvider did not load (session runs on {provider})"
        }
    height, width = DRY_IMAGE_HW if dry_run else IMAGE_HW
    row = inference_row(
        lambda ims: predict(student, ims, max_detections=100),
        random_images(m.batch, height=height, width=width),
        batch=m.batch, steps=steps, warmup=warmup,
    )  # fmt: skip
    if m.mode == "onnxruntime" and not dry_run:
        row["peak_mib"] = None  # ONNX Runtime allocates GPU memory itself, unseen by torch
    where = f", {provider}" if provider else ""
    return {**row, "input": f"{height}x{width} -> {student.info.resolution}{where}"}


MEASURE: dict[tuple[str, str | None], Callable[..., dict[str, Any]]] = {
    ("dino", None): measure_dino,
    ("sam", None): measure_sam,
    ("predict", None): measure_predict,
    ("student", "train"): measure_student_train,
    ("student", "pytorch"): measure_student_predict,
    ("student", "onnxruntime"): measure_student_predict,
}


def measure_safely(run: Callable[[], dict[str, Any]], *, dry_run: bool) -> dict[str, Any]:
    """``run()``'s numbers with the row's status; an allocation failure or any other error
    becomes the status of this row alone (the traceback goes to stderr)."""
    try:
        result = run()
    except Exception as e:  # one row's failure must not end its process's other rows
        traceback.print_exc()
        text = str(e).strip()
        message = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        result = {
            "status": OUT_OF_MEMORY if is_out_of_memory(message) else f"failed: {message[:160]}"
        }
    reset_peak()  # free what the failed or finished measurement held
    return {"status": "dry run" if dry_run else "ok", **result}


def run_measurements(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A job's measurements, one after the other, in this process."""
    dry_run, steps = bool(spec["dry_run"]), int(spec["steps"])
    results = []
    for raw in spec["measurements"]:
        m = Measurement(**raw)
        fn = MEASURE.get((m.section, m.mode)) or MEASURE[(m.section, None)]
        run = functools.partial(fn, m, dry_run=dry_run, steps=steps, warmup=0 if dry_run else 1)
        results.append(measure_safely(run, dry_run=dry_run))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument(
        "--budget",
        type=float,
        default=450,
        help="seconds for the whole run, shared by the sections (a cap per section)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per row, after one warm-up"
    )
    parser.add_argument("--dry-run", action="store_true", help="the tiny CPU run, even with CUDA")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--job", help=argparse.SUPPRESS)  # child process: JSON measurements
    args = parser.parse_args()
    if args.probe:
        print(RESULT + json.dumps(environment()), flush=True)
        return 0
    if args.job:
        print(RESULT + json.dumps(run_measurements(json.loads(args.job))), flush=True)
        return 0
    report = run_all(dry_run=args.dry_run, budget=args.budget, steps=args.steps)
    rows = [r for rs in report["sections"].values() for r in rs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print()
    print(format_bars(report["bars"]))
    print(f"\n{len(rows)} rows in {report['seconds']:.0f} s; written to {args.out}")
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
