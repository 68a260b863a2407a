"""Stage ``train_dino``: fine-tune Grounding DINO with LoRA -> models/dino, metrics/train_dino.

    python -m stages.train_dino --params params.yaml --inspect data/inspect.json \
        --train data/split/train.json --val data/split/val.json --images data/sample/images \
        --out models/dino --metrics metrics/train_dino --checkpoints checkpoints/train_dino

Writes ``models/dino/`` (adapter_model.safetensors, adapter_config.json,
trained_modules.safetensors when dino.train_heads, labels.json, params.json) and dvclive's
``metrics/train_dino/`` (metrics.json with the chosen augmentation policy, plots). Re-running
after an interruption resumes from the last epoch checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from teacher.augment import resolve_policy
from teacher.coco import load_coco, read_json, save_json
from teacher.digest import fingerprint
from teacher.dino_task import train_dino
from teacher.engine import is_main_process, launch
from teacher.errors import TeacherError
from teacher.params import ParamsError, load_params, to_dict

SECTIONS = ("lora", "train", "augment", "dino")  # + seed: exactly the params in dvc.yaml


def run(args: argparse.Namespace) -> str:
    params = load_params(args.params)
    used = {"seed": params["seed"], **{k: to_dict(params[k]) for k in SECTIONS}}
    policy = resolve_policy(params["augment"], read_json(args.inspect))
    if is_main_process():
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.rmtree(args.metrics, ignore_errors=True)  # dvclive starts fresh; resume replays
    metrics = launch(train_dino, processes=params["train"].processes, kwargs=dict(
        train_coco=load_coco(args.train), val_coco=load_coco(args.val), image_root=args.images,
        dino=params["dino"], lora=params["lora"], train=params["train"], augment_policy=policy,
        seed=params["seed"], out_dir=args.out, checkpoint_dir=args.checkpoints,
        live_dir=args.metrics, fingerprint=fingerprint(used, args.train, args.val, str(args.images)),
    ))
    if is_main_process():
        save_json({**used, "augment_policy": policy}, args.out / "params.json")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"{shown} -> {args.out}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train_dino", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--inspect", type=Path, default=Path("data/inspect.json"))
    parser.add_argument("--train", type=Path, default=Path("data/split/train.json"))
    parser.add_argument("--val", type=Path, default=Path("data/split/val.json"))
    parser.add_argument("--images", type=Path, required=True, help="image root (data.images)")
    parser.add_argument("--out", type=Path, default=Path("models/dino"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train_dino"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/train_dino"))
    args = parser.parse_args(argv)
    try:
        print(f"train_dino: {run(args)}")
    except (ParamsError, TeacherError) as e:
        print(f"train_dino: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
