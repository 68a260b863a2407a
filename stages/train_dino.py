"""Stage ``train_dino``: fine-tune Grounding DINO with LoRA -> models/dino, metrics/train_dino.

    python -m stages.train_dino --params params.yaml --inspect data/inspect.json \
        --train data/split/train.json --val data/split/val.json --images data/sample/images \
        --out models/dino --metrics metrics/train_dino --checkpoints checkpoints/train_dino

Writes ``models/dino/`` (adapter_model.safetensors: LoRA and, when dino.train_heads, the heads;
adapter_config.json, labels.json, params.json) and dvclive's
``metrics/train_dino/`` (metrics.json with the chosen augmentation policy, plots). Re-running
after an interruption resumes from the last epoch checkpoint.
"""

from __future__ import annotations

import sys

from teacher.dino.task import train_dino
from teacher.train.stage import run_training_stage, stage_main, training_parser


def main(argv: list[str] | None = None) -> int:
    parser = training_parser("train_dino", __doc__, teacher="dino")
    return stage_main(
        "train_dino",
        parser,
        lambda args: run_training_stage(
            args,
            teacher="dino",
            train_fn=train_dino,
            # dino.retain_weight keeps the names evaluate measures retention on
            borrowed=("evaluate.retention_classes",),
        ),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
