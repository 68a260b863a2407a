"""The bookkeeping every training stage shares: params used, fingerprint, clean outputs, launch,
``params.json``, a SKIPPED note when the data cannot train the teacher, one-line summary.

A training stage script is argparse (:func:`training_parser`) plus one call of
:func:`run_training_stage` through :func:`stage_main`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from teacher.coco.io import load_coco, read_json, save_json
from teacher.core.artifacts import PARAMS_FILE, write_skipped
from teacher.core.digest import fingerprint, images_digest
from teacher.core.errors import TeacherError
from teacher.core.params import ParamsError, load_params, to_dict
from teacher.dataset.augment import resolve_policy
from teacher.train.checkpoints import training_lock
from teacher.train.distributed import is_main_process, launch

SHARED_SECTIONS = ("lora", "train", "augment")  # + seed + the teacher's own section (dvc.yaml)


def training_parser(
    stage: str, description: str | None, *, teacher: str, cache: bool = False
) -> argparse.ArgumentParser:
    """The arguments of ``python -m stages.<stage>``; defaults are the paths in dvc.yaml."""
    p = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--inspect", type=Path, default=Path("data/inspect.json"))
    p.add_argument("--train", type=Path, default=Path("data/split/train.json"))
    p.add_argument("--val", type=Path, default=Path("data/split/val.json"))
    p.add_argument("--images", type=Path, required=True, help="image root (data.images)")
    p.add_argument("--out", type=Path, default=Path(f"models/{teacher}"))
    p.add_argument("--metrics", type=Path, default=Path(f"metrics/{stage}"))
    p.add_argument("--checkpoints", type=Path, default=Path(f"checkpoints/{stage}"))
    if cache:
        p.add_argument(
            "--cache",
            type=Path,
            default=Path(f"checkpoints/{teacher}_embeddings"),
            help="image-embedding cache of decoder-only training",
        )
    return p


def write_skipped_stage(reason: str, *, out: Path, metrics: Path) -> None:
    """``out`` holds only SKIPPED (the reason); ``metrics`` says skipped (and has the declared,
    empty, plots folder)."""
    write_skipped(out, reason)
    shutil.rmtree(metrics, ignore_errors=True)
    (metrics / "plots" / "metrics").mkdir(parents=True)
    save_json({"skipped": True}, metrics / "metrics.json")


def run_training_stage(
    args: argparse.Namespace,
    *,
    teacher: str,
    train_fn: Callable[..., dict[str, Any]],
    extra: dict[str, Any] | None = None,
    skip: Callable[[dict, Path], str | None] | None = None,
    borrowed: Sequence[str] = (),
) -> str:
    """Train one teacher as a stage; returns the line the stage prints.

    ``train_fn`` (module-level: it may run in spawned processes) gets the splits, image root,
    ``lora``/``train`` params, augmentation policy, seed, output folders and fingerprint, its
    own params section by the section's name (``teacher``: ``dino=``, ``sam=``) and ``extra``.
    ``skip(facts, train_path)`` may return a reason the data cannot train this teacher: then
    only a SKIPPED note is written. ``borrowed``: params of other sections the training reads
    (``"evaluate.retention_classes"``): passed to ``train_fn`` by their field name, and part of the
    run's fingerprint and recorded params.
    """
    params = load_params(args.params)
    facts = read_json(args.inspect)
    reason = skip(facts, args.train) if skip else None
    if reason:
        if is_main_process():
            write_skipped_stage(reason, out=args.out, metrics=args.metrics)
        return f"SKIPPED: {reason} -> {args.out}"
    used = {"seed": params["seed"], **{k: to_dict(params[k]) for k in (*SHARED_SECTIONS, teacher)}}
    lent = {key: getattr(params[key.split(".")[0]], key.split(".")[1]) for key in borrowed}
    used.update({key: list(v) if isinstance(v, tuple) else v for key, v in lent.items()})
    policy = resolve_policy(params["augment"], facts)
    train_coco, val_coco = load_coco(args.train), load_coco(args.val)
    with training_lock(args.checkpoints) if is_main_process() else nullcontext():
        if is_main_process():  # a second training of this stage was refused before this
            shutil.rmtree(args.out, ignore_errors=True)
            shutil.rmtree(args.metrics, ignore_errors=True)  # dvclive starts fresh; resume replays
        run_id = fingerprint(
            used, args.train, args.val, images_digest(args.images, train_coco, val_coco)
        )
        metrics = launch(
            train_fn,
            processes=params["train"].processes,
            kwargs=dict(
                train_coco=train_coco,
                val_coco=val_coco,
                image_root=args.images,
                lora=params["lora"],
                train=params["train"],
                augment_policy=policy,
                seed=params["seed"],
                out_dir=args.out,
                checkpoint_dir=args.checkpoints,
                live_dir=args.metrics,
                fingerprint=run_id,
                **{teacher: params[teacher]},
                **{key.split(".")[1]: v for key, v in lent.items()},
                **(extra or {}),
            ),
        )
        if is_main_process():
            save_json({**used, "augment_policy": policy}, args.out / PARAMS_FILE)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"{shown} -> {args.out}"


def stage_main(
    stage: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], str],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run, print ``<stage>: <line>``; a params or data error is one line on
    stderr and exit code 1."""
    args = parser.parse_args(argv)
    try:
        print(f"{stage}: {run(args)}")
    except (ParamsError, TeacherError) as e:
        print(f"{stage}: {e}", file=sys.stderr)
        return 1
    return 0
