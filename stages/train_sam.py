"""Stage ``train_sam``: fine-tune SAM with LoRA from box prompts -> models/sam, metrics/train_sam.

    python -m stages.train_sam --params params.yaml --inspect data/inspect.json \
        --train data/split/train.json --val data/split/val.json --images data/sample/images \
        --out models/sam --metrics metrics/train_sam --checkpoints checkpoints/train_sam \
        --cache checkpoints/sam_embeddings

When data/inspect.json says the data has no instance masks, writes only ``models/sam/SKIPPED``
(the reason) and ``metrics/train_sam/metrics.json`` (``{"skipped": true}``), and exits 0.
Otherwise models/sam gets the adapter (adapter_model.safetensors, adapter_config.json, and
trained_modules.safetensors when the decoder trains fully) and params.json (the params used).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from teacher.augment import resolve_policy
from teacher.coco import load_coco, read_json, save_json
from teacher.digest import fingerprint
from teacher.engine import is_main_process, launch
from teacher.errors import TeacherError
from teacher.params import ParamsError, load_params, to_dict
from teacher.sam_task import skip_reason, train_sam

SECTIONS = ("lora", "train", "augment", "sam")  # + seed: exactly the params in dvc.yaml


def write_skipped(reason: str, *, out: Path, metrics: Path) -> None:
    """models/sam holds only SKIPPED (the reason); metrics/train_sam says skipped (and has the
    declared, empty, plots folder)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "SKIPPED").write_text(reason + "\n")
    shutil.rmtree(metrics, ignore_errors=True)
    (metrics / "plots" / "metrics").mkdir(parents=True)
    save_json({"skipped": True}, metrics / "metrics.json")


def run(args: argparse.Namespace) -> str:
    params = load_params(args.params)
    facts = read_json(args.inspect)
    reason = skip_reason(facts) or skip_reason(facts, train_coco=load_coco(args.train))
    if reason:
        if is_main_process():
            write_skipped(reason, out=args.out, metrics=args.metrics)
        return f"SKIPPED: {reason} -> {args.out / 'SKIPPED'}"
    used = {"seed": params["seed"], **{k: to_dict(params[k]) for k in SECTIONS}}
    policy = resolve_policy(params["augment"], facts)
    if is_main_process():
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.rmtree(args.metrics, ignore_errors=True)  # dvclive starts fresh; resume replays
    metrics = launch(train_sam, processes=params["train"].processes, kwargs=dict(
        train_coco=load_coco(args.train), val_coco=load_coco(args.val), image_root=args.images,
        sam_params=params["sam"], lora=params["lora"], train=params["train"],
        augment_policy=policy, seed=params["seed"], out_dir=args.out,
        checkpoint_dir=args.checkpoints, live_dir=args.metrics, cache_dir=args.cache,
        fingerprint=fingerprint(used, args.train, args.val, str(args.images)),
    ))
    if is_main_process():
        save_json({**used, "augment_policy": policy}, args.out / "params.json")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"{shown} -> {args.out}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train_sam", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--inspect", type=Path, default=Path("data/inspect.json"))
    parser.add_argument("--train", type=Path, default=Path("data/split/train.json"))
    parser.add_argument("--val", type=Path, default=Path("data/split/val.json"))
    parser.add_argument("--images", type=Path, required=True, help="image root (data.images)")
    parser.add_argument("--out", type=Path, default=Path("models/sam"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train_sam"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/train_sam"))
    parser.add_argument("--cache", type=Path, default=Path("checkpoints/sam_embeddings"),
                        help="image-embedding cache of decoder-only training")
    args = parser.parse_args(argv)
    try:
        print(f"train_sam: {run(args)}")
    except (ParamsError, TeacherError) as e:
        print(f"train_sam: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
