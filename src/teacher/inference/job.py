"""A labeling job: plan the shards, label this process's share, wait for the rest, merge.

One code path for ``label``, ``teacher predict`` and ``teacher predict --student``: what labels
is a :class:`Detector` made by a picklable ``loader`` in each process (the models are loaded
where they run). The shard files and the merge are :mod:`teacher.inference.shards`'.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from teacher.coco.images import display_path
from teacher.core.errors import TeacherError
from teacher.inference.predict import (
    Detector,
    Unreadable,
    list_images,
    read_batches,
    to_annotations,
)
from teacher.inference.shards import (
    SHARD_GLOB,
    PoolImage,
    Shard,
    plan_shards,
    pool_images,
    read_progress,
    scan_shards,
    share_of,
    wait_for_shards,
    write_progress,
    write_shard,
)
from teacher.train.distributed import launch, process_rank_and_count


@dataclass(frozen=True)
class Job:
    """Everything a process needs to take part (picklable: it crosses to spawned processes)."""

    folder: Path  # the pool: every image under it
    shard_dir: Path  # where shards and progress files live
    loader: Callable[[Any], Detector]  # device -> Detector (module-level function or partial)
    settings: dict[str, Any]  # what made the shards: a shard made otherwise is not reused
    shard_size: int = 1000
    batch_size: int = 4
    processes: int = 1
    progress: bool = True
    log: Callable[[str], None] = print


@dataclass
class Plan:
    """The main process's plan, broadcast to every process."""

    images: list[PoolImage]  # the whole pool, in order
    reused: list[Path]  # shards of an earlier run that this one keeps
    todo: list[Shard]  # shards to label now
    discarded: list[str] = field(default_factory=list)


@dataclass
class Labeled:
    """What the job made: the pool's images, the shards holding their records, the detector's
    categories and description."""

    images: list[PoolImage]
    shards: list[Path]
    categories: list[tuple[int, str]]
    description: str
    shard_dir: Path


def run_job(job: Job) -> Labeled | None:
    """Label every image of ``job.folder`` into shards, in ``job.processes`` processes on this
    machine (or every rank of an ``accelerate launch`` / torchrun); returns on the main process
    once every shard is written (None on the other ranks of a distributed launch). A process
    that dies takes only its current shard with it."""
    job.shard_dir.mkdir(parents=True, exist_ok=True)
    if process_rank_and_count()[1] > 1:  # every rank of a distributed launch is here
        return _take_part(job, None)
    plan = make_plan(job)  # here, so that its log lines come from this process
    if job.processes <= 1:
        return _take_part(job, plan)
    spawned = replace(job, log=print)  # what crosses to the processes must pickle
    categories, description = launch(_spawned_part, processes=job.processes, args=(spawned, plan))
    return Labeled(plan.images, _shards_of(job, plan), categories, description, job.shard_dir)


def _spawned_part(job: Job, plan: Plan) -> tuple[list[tuple[int, str]], str] | None:
    """A spawned process's part: what only the detector knows goes back to the parent (small:
    a large result would fill the pipe to a parent that reads it only after every exit)."""
    done = _take_part(job, plan)
    return None if done is None else (done.categories, done.description)


def _shards_of(job: Job, plan: Plan) -> list[Path]:
    """The shard files the finished job consists of: the reused ones and the new ones."""
    return [*plan.reused, *(job.shard_dir / s.name for s in plan.todo)]


def _take_part(job: Job, plan: Plan | None) -> Labeled | None:
    """One process's part of the job; the main process's result, None elsewhere. ``plan`` is
    None inside a distributed launch: the main process makes it and broadcasts it."""
    rank, world = process_rank_and_count()
    if plan is None:
        plan = _broadcast(make_plan(job) if rank == 0 else None)
    if world > 1:
        _one_share_of_the_cores(world)
    mine = share_of(plan.todo, rank=rank, processes=world)
    detector = job.loader(_device()) if mine or rank == 0 else None
    bar = _bar(job, plan) if rank == 0 else None
    if mine:
        assert detector is not None
        label_shards(job, mine, detector, rank=rank, on_batch=lambda: _refresh(bar, job))
    if rank != 0:
        return None
    assert detector is not None and bar is not None
    wait_for_shards(job.shard_dir, [s.name for s in plan.todo], on_poll=lambda: _refresh(bar, job))
    _refresh(bar, job)
    bar.close()
    shards = _shards_of(job, plan)
    _remove_unused(job.shard_dir, keep=shards)
    return Labeled(plan.images, shards, detector.categories, detector.description, job.shard_dir)


def make_plan(job: Job) -> Plan:
    """List and hash the pool, keep the shards of earlier runs made the same way, and cut the
    rest into new shards (said in the log: what is reused, what discarded)."""
    for stale in job.shard_dir.glob("progress-*.json"):  # an interrupted run's counts
        stale.unlink()  # (the other processes start labeling only once they have the plan)
    paths = list_images(job.folder)
    images = pool_images(job.folder, paths)
    existing = scan_shards(job.shard_dir, job.settings)
    for line in existing.discarded:
        job.log(f"discarded shard {line}")
    todo = plan_shards(images, existing.done, shard_size=job.shard_size)
    reused = len(images) - sum(len(s.images) for s in todo)
    if existing.shards:
        job.log(
            f"resuming: {reused} of {len(images)} images already labeled in "
            f"{len(existing.shards)} shards of {job.shard_dir}"
        )
    return Plan(images, existing.shards, todo, existing.discarded)


def label_shards(
    job: Job, shards: Sequence[Shard], detector: Detector, *, rank: int, on_batch: Callable
) -> None:
    """Label ``shards`` one after another, each written when done and then freed."""
    done = unreadable = 0
    for shard in shards:
        records, bad = label_shard(job, shard, detector)
        write_shard(job.shard_dir, shard, job.settings, records)
        done += len(records)
        unreadable += bad
        write_progress(job.shard_dir, rank, done=done, unreadable=unreadable)
        on_batch()


def label_shard(job: Job, shard: Shard, detector: Detector) -> tuple[list[dict], int]:
    """One shard's image records, in shard order, and how many of them were unreadable."""
    by_path = {job.folder / im.file_name: im for im in shard.images}
    records: dict[str, dict] = {}
    unreadable = Unreadable([(str(p), im.problem) for p, im in by_path.items() if im.problem])
    for batch in read_batches(
        [p for p, im in by_path.items() if not im.problem],
        batch_size=job.batch_size,
        unreadable=unreadable,
        max_edge=detector.max_edge,
    ):
        dets = detector.detect([pixels for _, pixels, _ in batch])
        for (path, pixels, full), det in zip(batch, dets, strict=True):
            im = by_path[path]
            anns = to_annotations(
                det, image_id=0, first_id=0, size=full, detected_size=pixels.shape[1::-1]
            )
            records[im.file_name] = {
                "file_name": im.file_name,
                "sha256": im.sha256,
                "width": int(full[0]),
                "height": int(full[1]),
                "annotations": [_without_ids(a) for a in anns],
            }
    for path_text, reason in unreadable.items:
        im = by_path[Path(path_text)]
        records[im.file_name] = {
            "file_name": im.file_name,
            "sha256": im.sha256,
            "path": display_path(path_text),
            "unreadable": display_path(reason),  # valid UTF-8 whatever the file names
        }
    return [records[im.file_name] for im in shard.images], len(unreadable.items)


def _without_ids(ann: dict) -> dict:
    """An annotation as a shard keeps it: ids are given at the merge."""
    return {k: v for k, v in ann.items() if k not in ("id", "image_id")}


def _broadcast(plan: Plan | None) -> Plan:
    """The main process's plan, in every process (accelerate's object broadcast over gloo/nccl)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # joins the process group the launcher described (env://); on CPUs accelerate needs cpu=True
    # to see the other processes (gloo)
    PartialState(cpu=not torch.cuda.is_available())
    return broadcast_object_list([plan])[0]


def _one_share_of_the_cores(world: int) -> None:
    """Several CPU processes on one machine: each takes its share of the cores, not all."""
    import torch

    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _device() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _bar(job: Job, plan: Plan) -> tqdm:
    total = sum(len(s.images) for s in plan.todo)
    return tqdm(total=total, desc="label", unit="img", disable=not job.progress or total == 0)


def _refresh(bar: tqdm | None, job: Job) -> None:
    """The main process's bar: images done by every process, and unreadable ones so far."""
    if bar is None:
        return
    done, unreadable = read_progress(job.shard_dir)
    bar.set_postfix(unreadable=unreadable, refresh=False)
    bar.update(done - bar.n)


def _remove_unused(folder: Path, *, keep: Sequence[Path]) -> None:
    """After a complete run: shards this run does not use (other settings, removed images'
    shards wholly gone), progress files and temporary files of writes that never finished are
    removed; what it uses stays for the next run."""
    kept = {p.name for p in keep}
    for path in [
        *folder.glob(SHARD_GLOB),
        *folder.glob("progress-*.json"),
        *folder.glob(".shard-*"),
    ]:
        if path.name not in kept:
            path.unlink(missing_ok=True)


def clear_shards(folder: Path) -> None:
    """Start over: remove a shard folder this code made (only its own files)."""
    if folder.is_dir():
        _remove_unused(folder, keep=())
        if not any(folder.iterdir()):
            folder.rmdir()


def no_image_error(folder: Path, unreadable: int) -> TeacherError:
    from teacher.inference.predict import IMAGE_SUFFIXES

    return TeacherError(
        f"{folder}: no image could be read ({unreadable} unreadable, listed above); "
        "pass a folder of PNG/JPEG/TIFF images"
        if unreadable
        else f"{folder}: no image files found (suffixes {', '.join(IMAGE_SUFFIXES)})"
    )
