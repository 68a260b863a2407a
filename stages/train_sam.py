"""Stage ``train_sam``: fine-tune SAM with LoRA from box prompts -> models/sam, metrics/train_sam.

    python -m stages.train_sam --params params.yaml --inspect data/inspect.json \
        --train data/split/train.json --val data/split/val.json --images data/sample/images \
        --out models/sam --metrics metrics/train_sam --checkpoints checkpoints/train_sam \
        --cache checkpoints/sam_embeddings

When data/inspect.json says the data has no instance masks (or the train split has none),
writes only ``models/sam/SKIPPED`` (the reason) and ``metrics/train_sam/metrics.json``
(``{"skipped": true}``), and exits 0. Otherwise models/sam gets the adapter
(adapter_model.safetensors: LoRA and, when it trains fully, the decoder; adapter_config.json) and params.json (the params used).
"""

from __future__ import annotations

import sys

from teacher.coco.io import load_coco
from teacher.sam.task import train_sam, untrainable_reason
from teacher.train.stage import run_training_stage, stage_main, training_parser


def main(argv: list[str] | None = None) -> int:
    parser = training_parser("train_sam", __doc__, teacher="sam", cache=True)
    return stage_main(
        "train_sam",
        parser,
        lambda args: run_training_stage(
            args,
            teacher="sam",
            train_fn=train_sam,
            extra={"cache_dir": args.cache},
            skip=lambda facts, train: (
                untrainable_reason(facts) or untrainable_reason(facts, train_coco=load_coco(train))
            ),
        ),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
