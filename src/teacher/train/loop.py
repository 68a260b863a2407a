"""One training loop for both teachers: Accelerate, AMP, accumulation, clipping, checkpoints.

``fit(task, ...)`` trains the parameters of ``task.model`` that require grad (LoRA + fully
trained modules) with AdamW, linear warmup then cosine decay per optimizer step, gradient
accumulation and clipping, autocast from ``train.precision``, frozen BatchNorm. Each epoch
ends with ``task.validate``; early stopping watches ``task.monitor`` (maximised); the best
weights are written once, at the end, by ``task.save`` into ``out_dir``.

Data parallel (``train.processes`` > 1 through :func:`launch`, or ``accelerate launch``): every
process runs ``task.step`` on its own share of each global batch and the gradients of the
trainable parameters are averaged by one all-reduce per optimizer step. The model is not
wrapped in DDP, so ``task.step`` may call submodules directly (SAM does); LoRA keeps the
all-reduce small. Only the main process evaluates, logs and writes files.

Resumable: a checkpoint per epoch (trainable weights, best weights, optimizer, scheduler,
RNG states, history) in ``checkpoint_dir/epoch-NNNN/`` written atomically; the two latest are
kept. Re-running resumes from the newest readable one whose fingerprint (params + data)
matches, replays the logged history into the fresh dvclive directory, and ends with the same
weights and metrics as an uninterrupted run (same seed, CPU). Removed after success.
"""

from __future__ import annotations

import functools
import math
import random
import re
import shutil
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from teacher.core.errors import TeacherError
from teacher.core.params import TrainParams
from teacher.train.checkpoints import (
    CHECKPOINT_VERSION,
    load_checkpoint,
    remove_partial,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from teacher.train.distributed import all_reduce_grads, broadcast_parameters, reduced_terms
from teacher.train.live import log_epoch, log_step, open_live


@dataclass
class Task:
    """What ``fit`` needs to know about one model; see docs/CONTRACTS.md."""

    name: str  # "dino" | "sam": prefixes progress bars
    model: nn.Module  # LoRA-wrapped; trains the params with requires_grad
    train_dataset: Dataset  # has set_epoch(epoch); per-sample RNG seeded by (seed, epoch, index)
    collate_fn: Callable[[list[Any]], Any]
    step: Callable[[nn.Module, Any], dict[str, Tensor]]  # forward + loss: {"loss": scalar, ...}
    validate: Callable[[nn.Module], dict[str, float]]  # val metrics, e.g. {"val_loss", "val_map"}
    monitor: str  # key of validate() maximised (early stopping, best weights)
    save: Callable[[nn.Module, Path], None]  # writes the adapter folder
    # learning-rate multipliers: a parameter whose name matches the regex (re.search) trains at
    # train.lr x the value (the first match counts); every other parameter at train.lr
    lr_scales: Mapping[str, float] = field(default_factory=dict)
    # the AdamW parameter groups ({"params", "lr", "weight_decay"}) instead of lr_scales' rule
    param_groups: Callable[[list[tuple[str, nn.Parameter]], TrainParams], list[dict]] | None = None
    # an exponential moving average of the weights: (decay, warm-up tau) as rf-detr's ModelEma;
    # validation scores both the EMA and the trained weights and keeps the better
    ema: tuple[float, float] | None = None


class Ema:
    """rf-detr's ``ModelEma`` (util/utils.py) over the trainable parameters: after optimizer
    step ``u`` (1, 2, ...) ``ema = d * ema + (1 - d) * weights`` with
    ``d = decay * (1 - exp(-u / tau))`` (``tau`` 0: ``d = decay``), so the early steps follow
    the weights and the average settles as training does. Frozen weights and buffers are the
    same in both (they do not change), so only the trainable ones are averaged."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], *, decay: float, tau: float):
        self.decay, self.tau, self.updates = decay, tau, 0
        self.shadow = {n: p.detach().clone() for n, p in params}

    def factor(self) -> float:
        u = self.updates + 1
        return self.decay * (1 - math.exp(-u / self.tau)) if self.tau else self.decay

    @torch.no_grad()
    def update(self, params: list[tuple[str, nn.Parameter]]) -> None:
        d = self.factor()
        for name, p in params:
            self.shadow[name].mul_(d).add_(p.detach(), alpha=1.0 - d)
        self.updates += 1


def resolve_precision(precision: str) -> str:
    """``train.precision`` -> Accelerate's mixed_precision ("no" | "bf16" | "fp16").

    auto: bf16 on CUDA GPUs that support it, fp16 (with a grad scaler) on other CUDA GPUs,
    fp32 on CPU.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise TeacherError("train.precision: fp16 needs a CUDA GPU; use auto, fp32 or bf16 on CPU")
    return {"fp32": "no"}.get(precision, precision)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step``: linear warmup, then cosine to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(
    n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This process's batches of dataset indexes for ``epoch``: a permutation seeded by (seed, epoch).

    The global batch list is the permutation cut into ``batch_size`` chunks (the last may be
    short), wrapped around to a multiple of ``world``; process ``rank`` takes every
    ``world``-th batch, so all processes run the same number of steps.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    batches = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    pad = (-len(batches)) % world
    batches += batches[:pad]
    return batches[rank::world]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode with frozen affine parameters; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            n += 1
    return n


def set_train_mode(model: nn.Module) -> None:
    """``model.train()`` with BatchNorm kept frozen (running statistics unchanged)."""
    model.train()
    freeze_batchnorm(model)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad, tied ones once, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class RunState:
    """Loop bookkeeping saved in every checkpoint (JSON)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best: float | None = None  # best value of task.monitor so far
    best_epoch: int = -1  # 0-based epoch of the best value
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    stopped: bool = False  # early stopping fired
    history: dict[str, list] = field(default_factory=lambda: {"steps": [], "epochs": []})
    best_state: dict[str, Tensor] | None = field(default=None, repr=False)  # in state.pt, not JSON
    ema_updates: int = 0  # optimizer steps the EMA has averaged (Task.ema)


@dataclass
class _Loop:
    """Objects one fit() call works with (not saved)."""

    task: Task
    train: TrainParams
    seed: int
    accelerator: Any
    params: list[tuple[str, nn.Parameter]]
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    live: Any  # dvclive.Live on the main process, else None
    steps_per_epoch: int
    ema: Ema | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def fit(
    task: Task,
    *,
    train: TrainParams,
    seed: int,
    out_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path,
    fingerprint: str,
    record: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Train ``task.model``; write the best weights with ``task.save`` into ``out_dir``.

    Returns the best epoch's ``validate()`` metrics plus ``best_epoch`` (1-based), ``epochs``
    (run) and ``steps`` (optimizer steps). ``record`` (optional, e.g. the augmentation policy
    chosen) is written into dvclive's metrics summary as-is (scalars; lists joined as text).
    The model ends holding the best weights.
    """
    out_dir, checkpoint_dir, live_dir = Path(out_dir), Path(checkpoint_dir), Path(live_dir)
    loop = _start(task, train=train, seed=seed)
    run = _resume(loop, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint)
    if loop.main:
        loop.live = open_live(live_dir, run.history, record)
    while run.epoch < train.epochs and not run.stopped:
        _train_epoch(loop, run)
        metrics = _validate(loop, run)
        _update_best(loop, run, metrics)
        if loop.main:
            tensors, meta = _snapshot(loop, run, fingerprint)
            save_checkpoint(checkpoint_dir, tensors=tensors, meta=meta)
        loop.accelerator.wait_for_everyone()
    return _finish(loop, run, out_dir=out_dir, checkpoint_dir=checkpoint_dir)


def _start(task: Task, *, train: TrainParams, seed: int) -> _Loop:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    # Accelerate keeps one global state and refuses a second fit() in the same process with
    # another precision (tests, notebooks): start it afresh; the process group is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # Accumulation is done here (gradient_accumulation_steps stays 1): the last group of an
    # epoch may be short, and gradients are all-reduced by hand (no DDP wrapper).
    accelerator = Accelerator(
        mixed_precision=resolve_precision(train.precision),
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )  # main validates alone
    if train.processes > 1 and accelerator.num_processes == 1:
        print(
            f"{task.name}: train.processes={train.processes} but this is a single process; "
            "the stage must start training through teacher.engine.launch (or accelerate launch)"
        )
    seed_everything(seed)
    model = task.model.to(accelerator.device)
    set_train_mode(model)
    params = trainable_parameters(model)
    if not params:
        raise TeacherError(f"{task.name}: the model has no trainable parameters (apply LoRA first)")
    broadcast_parameters(params, accelerator)
    n = len(cast(Sized, task.train_dataset))
    if n == 0:
        raise TeacherError(f"{task.name}: the training split is empty; check data/split/train.json")
    steps = _steps_per_epoch(n, train=train, world=accelerator.num_processes)
    groups = task.param_groups(params, train) if task.param_groups else None
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(groups, lr=train.lr)
        if groups
        else _adamw(params, train=train, lr_scales=task.lr_scales),
        device_placement=False,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer,
        functools.partial(lr_factor, warmup=train.warmup_steps, total=steps * train.epochs),
    )
    ema = Ema(params, decay=task.ema[0], tau=task.ema[1]) if task.ema else None
    return _Loop(task, train, seed, accelerator, params, optimizer, scheduler, None, steps, ema)


def _steps_per_epoch(n: int, *, train: TrainParams, world: int) -> int:
    batches = len(epoch_batches(n, batch_size=train.batch_size, seed=0, epoch=0, world=world))
    steps = math.ceil(batches / train.grad_accum)
    return min(steps, train.max_steps_per_epoch) if train.max_steps_per_epoch else steps


def lr_scale(name: str, lr_scales: Mapping[str, float]) -> float:
    """The learning-rate multiplier of parameter ``name``: the first regex that matches, else 1."""
    return next((float(v) for pattern, v in lr_scales.items() if re.search(pattern, name)), 1.0)


def _adamw(
    params: list[tuple[str, nn.Parameter]],
    *,
    train: TrainParams,
    lr_scales: Mapping[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW; biases and norm scales (1-D tensors) get no weight decay; ``lr_scales`` multiply
    the lr of the parameters they match. Groups at the plain lr come first (``lr`` is logged
    from group 0)."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in params:
        groups.setdefault((lr_scale(name, lr_scales or {}), p.ndim > 1), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, k[0], not k[1]))
    return torch.optim.AdamW(
        [
            {
                "params": groups[k],
                "lr": train.lr * k[0],
                "weight_decay": train.weight_decay if k[1] else 0.0,
            }
            for k in order
        ],
        lr=train.lr,
    )


def _resume(loop: _Loop, *, checkpoint_dir: Path, fingerprint: str) -> RunState:
    if loop.main:
        remove_partial(checkpoint_dir)
    loop.accelerator.wait_for_everyone()
    found = load_checkpoint(checkpoint_dir, fingerprint=fingerprint, verbose=loop.main)
    loop.accelerator.wait_for_everyone()
    if found is None:
        if loop.main and checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return RunState()
    tensors, meta = found
    _load_weights(loop.params, tensors["model"])
    loop.optimizer.load_state_dict(tensors["optimizer"])
    loop.scheduler.load_state_dict(tensors["scheduler"])
    if loop.accelerator.scaler is not None and tensors.get("scaler"):
        loop.accelerator.scaler.load_state_dict(tensors["scaler"])
    set_rng_state(meta["rng"], tensors)
    run = RunState(**meta["run"], best_state=tensors.get("best_model") or None)
    if loop.ema is not None and tensors.get("ema"):
        _load_weights(list(loop.ema.shadow.items()), tensors["ema"])  # type: ignore[arg-type]
        loop.ema.updates = run.ema_updates
    if loop.main:
        print(f"{loop.task.name}: resuming after epoch {run.epoch} (step {run.step})")
    return run


def _load_weights(params: list[tuple[str, nn.Parameter]], state: Mapping[str, Tensor]) -> None:
    missing = [n for n, _ in params if n not in state]
    if missing:
        raise TeacherError(
            f"checkpoint lacks trainable parameters {missing[:5]}; delete the "
            "checkpoint folder and re-run"
        )
    with torch.no_grad():
        for name, p in params:
            p.copy_(state[name].to(p.device, p.dtype))


def _snapshot(loop: _Loop, run: RunState, fp: str) -> tuple[dict, dict]:
    tensors = {
        "model": {n: p.detach().cpu().clone() for n, p in loop.params},
        "best_model": run.best_state or {},
        "ema": {n: t.detach().cpu().clone() for n, t in loop.ema.shadow.items()}
        if loop.ema
        else {},
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.accelerator.scaler.state_dict() if loop.accelerator.scaler else {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    run_json = {k: v for k, v in vars(run).items() if k != "best_state"}
    meta = {"version": CHECKPOINT_VERSION, "fingerprint": fp, "run": run_json, "rng": rng_state()}
    return tensors, meta


def _train_epoch(loop: _Loop, run: RunState) -> None:
    """One epoch of optimizer steps; logs loss terms and lr per step."""
    from tqdm.auto import tqdm

    train, acc = loop.train, loop.accelerator
    if hasattr(loop.task.train_dataset, "set_epoch"):
        loop.task.train_dataset.set_epoch(run.epoch)
    batches = epoch_batches(
        len(cast(Sized, loop.task.train_dataset)),
        batch_size=train.batch_size,
        seed=loop.seed,
        epoch=run.epoch,
        rank=acc.process_index,
        world=acc.num_processes,
    )[: loop.steps_per_epoch * train.grad_accum]
    loader = DataLoader(
        loop.task.train_dataset,
        batch_sampler=batches,
        collate_fn=loop.task.collate_fn,
        num_workers=train.num_workers,
    )
    set_train_mode(loop.task.model)
    bar = tqdm(
        total=loop.steps_per_epoch,
        disable=not loop.main,
        leave=False,
        desc=f"{loop.task.name} epoch {run.epoch + 1}/{train.epochs}",
    )
    group: list[dict[str, float]] = []
    for i, batch in enumerate(loader):
        start = i - i % train.grad_accum
        size = min(train.grad_accum, len(batches) - start)  # the last group may be short
        group.append(_micro_step(loop, run, batch, scale=1.0 / size, micro=i))
        if len(group) == size:
            logged = _optimizer_step(loop, run, group)
            group = []
            bar.update(1)
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
    bar.close()


def _micro_step(
    loop: _Loop, run: RunState, batch: Any, *, scale: float, micro: int
) -> dict[str, float]:
    """Forward + backward of one micro-batch; returns its loss terms averaged over processes."""
    from accelerate.utils import send_to_device

    acc = loop.accelerator
    batch = send_to_device(batch, acc.device)
    with acc.autocast():
        terms = loop.task.step(loop.task.model, batch)
    if "loss" not in terms:
        raise TeacherError(f"{loop.task.name}: step() must return a dict with a 'loss' entry")
    values = reduced_terms(terms, acc)
    if not all(math.isfinite(v) for v in values.values()):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise TeacherError(
            f"{loop.task.name}: non-finite loss at epoch {run.epoch + 1}, optimizer step "
            f"{run.step + 1} (micro-batch {micro + 1}): {shown}. Lower train.lr, raise "
            "train.warmup_steps, or set train.precision: fp32; check the data for degenerate boxes."
        )
    acc.backward(terms["loss"] * scale)
    return values


def _optimizer_step(loop: _Loop, run: RunState, group: list[dict[str, float]]) -> dict[str, float]:
    """Average gradients over processes, clip, step optimizer and schedule; log the step."""
    acc = loop.accelerator
    all_reduce_grads(loop.params, acc)
    if loop.train.clip_norm > 0:
        acc.clip_grad_norm_([p for _, p in loop.params], loop.train.clip_norm)
    lr = loop.scheduler.get_last_lr()[0]
    loop.optimizer.step()
    if not loop.optimizer.step_was_skipped:
        loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.ema is not None:
        loop.ema.update(loop.params)
        run.ema_updates = loop.ema.updates
    run.step += 1
    logged: dict[str, Any] = {k: sum(g[k] for g in group) / len(group) for k in group[0]}
    logged["lr"] = lr
    entry = {"step": run.step, **logged}
    run.history["steps"].append(entry)
    if loop.live is not None:
        log_step(loop.live, entry)
    return logged


def _validate(loop: _Loop, run: RunState) -> dict[str, float]:
    """Main process validates (eval mode, no grad); every process gets the metrics."""
    metrics: dict[str, float] = {}
    if loop.main:
        loop.task.model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in loop.task.validate(loop.task.model).items()}
            if loop.ema is not None:
                metrics = _with_ema(loop, metrics)
        set_train_mode(loop.task.model)
    if loop.accelerator.num_processes > 1:
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    if loop.task.monitor not in metrics:
        raise TeacherError(
            f"{loop.task.name}: validate() returned {sorted(metrics)}, "
            f"without the monitored key {loop.task.monitor!r}"
        )
    return metrics


def _with_ema(loop: _Loop, regular: dict[str, float]) -> dict[str, float]:
    """The EMA weights validated too; the better of the two (on ``task.monitor``) gives the
    epoch's metrics, with ``ema`` 1 when it is the EMA's, as rf-detr keeps the better of its
    regular and EMA checkpoints. Both monitored values are kept (``regular_*``, ``ema_*``)."""
    assert loop.ema is not None
    key = loop.task.monitor
    saved = {n: p.detach().clone() for n, p in loop.params}
    _load_weights(loop.params, loop.ema.shadow)
    try:
        averaged = {k: float(v) for k, v in loop.task.validate(loop.task.model).items()}
    finally:
        _load_weights(loop.params, saved)

    def score(m: dict[str, float]) -> float:
        v = m.get(key, -math.inf)
        return v if math.isfinite(v) else -math.inf

    use_ema = score(averaged) > score(regular)
    chosen = averaged if use_ema else regular
    return {
        **chosen,
        "ema": float(use_ema),
        f"regular_{key}": regular.get(key, math.nan),
        f"ema_{key}": averaged.get(key, math.nan),
    }


def _current_weights(loop: _Loop, metrics: dict[str, float]) -> dict[str, Tensor]:
    """The weights that scored ``metrics``: the EMA's when they won the epoch, else the model's."""
    if loop.ema is not None and metrics.get("ema") == 1.0:
        return {n: t.detach().cpu().clone() for n, t in loop.ema.shadow.items()}
    return {n: p.detach().cpu().clone() for n, p in loop.params}


def _update_best(loop: _Loop, run: RunState, metrics: dict[str, float]) -> None:
    """Record the epoch; keep the best weights; decide early stopping."""
    value = metrics[loop.task.monitor]
    value = value if math.isfinite(value) else -math.inf
    if run.best is None or value > run.best:
        run.best, run.best_epoch, run.best_metrics, run.bad_epochs = value, run.epoch, metrics, 0
        run.best_state = _current_weights(loop, metrics)
    else:
        run.bad_epochs += 1
    run.epoch += 1
    run.stopped = bool(loop.train.patience) and run.bad_epochs >= loop.train.patience
    entry = {"epoch": run.epoch, "step": run.step, **metrics}
    run.history["epochs"].append(entry)
    if loop.live is not None:
        log_epoch(loop.live, entry)
    if loop.main:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        stop = " (early stop)" if run.stopped else ""
        print(f"{loop.task.name} epoch {run.epoch}/{loop.train.epochs}: {shown}{stop}")


def _finish(loop: _Loop, run: RunState, *, out_dir: Path, checkpoint_dir: Path) -> dict[str, float]:
    """Load the best weights, save them with task.save, close the log, drop the checkpoints."""
    if run.best_state:
        _load_weights(loop.params, run.best_state)
    result = {
        **run.best_metrics,
        "best_epoch": run.best_epoch + 1,
        "epochs": run.epoch,
        "steps": run.step,
    }
    if loop.main:
        from safetensors import SafetensorError

        try:
            loop.task.save(loop.task.model, out_dir)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            raise TeacherError(
                f"{out_dir}: cannot write the trained model ({e}); free disk space "
                "or make it writable and re-run (training resumes from the "
                f"checkpoint in {checkpoint_dir})"
            ) from e
        live = loop.live
        live.log_metric(
            f"best/{loop.task.monitor}", run.best if run.best is not None else 0.0, plot=False
        )
        live.log_metric("best/epoch", run.best_epoch + 1, plot=False)
        live.end()
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    loop.accelerator.wait_for_everyone()
    return result
