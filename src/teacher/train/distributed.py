"""Processes: launch data-parallel training, know the main process, average across processes.

``launch`` spawns ``train.processes`` processes on this machine (gloo on CPU, nccl on GPUs) or
runs in place inside ``accelerate launch`` / torchrun. The model is not wrapped in DDP: the
gradients of the trainable parameters are averaged by one flat all-reduce per optimizer step.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from teacher.core.errors import TeacherError


def launch(
    fn: Callable[..., Any],
    *,
    processes: int,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``processes`` data-parallel processes (gloo on CPU, nccl on GPUs).

    With ``processes`` <= 1, or when already inside a distributed launch (``accelerate launch``,
    torchrun), calls ``fn`` directly. Otherwise spawns the processes on this machine and returns
    the main process's result; ``fn`` and ``args`` must be picklable (module-level function).
    A TeacherError in any process is raised again here with its message.
    """
    kwargs = dict(kwargs or {})
    if processes <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return fn(*args, **kwargs)
    import torch.multiprocessing as mp

    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise TeacherError(
            f"train.processes={processes} but only {torch.cuda.device_count()} "
            "GPU(s) are visible; lower train.processes"
        )
    # spawn, not fork: a forked child of a process that has run torch ops can deadlock on a
    # lock some thread held at the fork (seen here), and CUDA cannot be forked.
    method = "spawn"
    ctx = mp.get_context(method)
    results = ctx.SimpleQueue()
    port = _free_port()
    try:
        mp.start_processes(
            _worker,
            args=(fn, args, kwargs, processes, port, results),
            nprocs=processes,
            start_method=method,
            join=True,
        )
    except mp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1]
        if last.startswith("teacher.core.errors.TeacherError: "):
            raise TeacherError(last.removeprefix("teacher.core.errors.TeacherError: ")) from None
        raise
    return results.get() if not results.empty() else None


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of one (``launch``, ``accelerate launch``).

    Stages guard their own writes with it when ``accelerate launch`` runs the whole stage in
    every process.
    """
    return int(os.environ.get("RANK", "0")) == 0


def process_rank_and_count() -> tuple[int, int]:
    """(this process's rank, number of processes) of the current launch; (0, 1) outside one."""
    return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def _worker(
    rank: int, fn: Callable, args: tuple, kwargs: dict, world: int, port: int, results: Any
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    result = fn(*args, **kwargs)
    if rank == 0:
        results.put(result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast_parameters(params: list[tuple[str, nn.Parameter]], accelerator: Any) -> None:
    """Start every process from the main process's trainable weights."""
    if accelerator.num_processes > 1:
        for _, p in params:
            torch.distributed.broadcast(p.data, src=0)


def reduced_terms(terms: Mapping[str, Any], acc: Any) -> dict[str, float]:
    """Loss terms as floats, averaged over processes (every process sees the same values)."""
    keys = sorted(terms)
    stacked = torch.stack(
        [torch.as_tensor(terms[k], device=acc.device).detach().float().reshape(()) for k in keys]
    )
    if acc.num_processes > 1:
        torch.distributed.all_reduce(stacked)
        stacked = stacked / acc.num_processes
    return dict(zip(keys, stacked.tolist(), strict=True))


def all_reduce_grads(params: list[tuple[str, nn.Parameter]], acc: Any) -> None:
    """Average the trainable gradients over processes in one flat all-reduce."""
    if acc.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= acc.num_processes
    offset = 0
    for (_, p), g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
