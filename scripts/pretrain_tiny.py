"""Pretrain the ``tiny-pretrained`` presets from random init on the synthetic pretraining domain.

    python scripts/pretrain_tiny.py sam  [--steps N] [--seed S] [--threads T] [--device D]
                                         [--batch-size B] [--init W --world finetune] [--out DIR]
    python scripts/pretrain_tiny.py dino [--steps N] [--seed S] [--threads T] [--device D]
                                         [--batch-size B] [--varifocal] [--dense-levels 3]
                                         [--init-scheme reference] [--out DIR]
    python scripts/pretrain_tiny.py dino --probe WEIGHTS [--arch JSON] [--seed S]
    python scripts/pretrain_tiny.py sam  --probe WEIGHTS [--seed S]
    python scripts/pretrain_tiny.py student [--steps N] [--seed S] [--threads T] [--batch-size B]

Full training of every weight (not LoRA) of the tiny architectures (``teacher.sam`` /
``teacher.dino``) on images of ``teacher.dataset.synth.PRETRAIN``, generated in memory from the seed;
a held-out test set (another seed) is scored at the end: SAM mean mask IoU from true boxes,
Grounding DINO COCO box mAP@50 prompted with the pretraining classes, the student (RF-DETR,
``teacher.proving.student``) COCO box mAP@50 and mask mAP. Deterministic per seed
on one machine (fixed thread count, seeded generator, data and initialisation; on a GPU,
``--device cuda``, close but not bit for bit: its kernels are not deterministic, and float32
matrix products there run in TF32). Writes
``<out>/{sam,dino,student}-tiny-pretrained.safetensors`` (default ``src/teacher/weights``) and prints
the scores and the time it took. ``--probe`` trains nothing: it scores a weights file on the held-out
set and prints where DINO's box AP is lost, or SAM's mask IoU beside the best its low-res
masks allow, on both domains. The code lives in ``teacher.proving.pretrain``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from teacher.dataset import synth
from teacher.proving.pretrain import (
    pretrain_dino,
    pretrain_sam,
    probe_file,
    probe_sam_file,
)

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("model", choices=("sam", "dino", "student"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--device",
        default="auto",
        help="where to train: cpu, cuda, cuda:N; auto = cuda when there is one, else cpu",
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="images per step (dino phase 0: twice this)"
    )
    parser.add_argument("--images", type=int, default=3000, help="pretraining images (in memory)")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--arch", type=json.loads, default=None, help="dino: tiny_config keywords")
    parser.add_argument("--word-std", type=float, default=1.0, help="dino: word embedding init std")
    parser.add_argument(
        "--backbone-steps", type=int, default=12000, help="dino: phase 0 steps (dense shapes)"
    )
    parser.add_argument(
        "--train-text",
        action="store_true",
        help="dino: train the text path too (locked by default)",
    )
    parser.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=0.1,
        help="dino: the backbone's lr in the detector phases, as a fraction of --lr",
    )
    parser.add_argument(
        "--background-weight",
        type=float,
        default=1.0,
        help="dino: phase 0's loss weight of background positions (shapes: 1)",
    )
    parser.add_argument(
        "--dense-levels",
        type=int,
        default=2,
        choices=(2, 3),
        help="dino: phase 0 classifies the Swin's 2 finest levels (strides 8, 16) or 3 (and 32)",
    )
    parser.add_argument("--clip", type=float, default=1.0, help="dino: gradient norm clip")
    parser.add_argument(
        "--varifocal",
        action="store_true",
        help="dino: class terms trained towards each matched box's IoU (varifocal loss)",
    )
    parser.add_argument(
        "--denoise",
        type=int,
        default=0,
        help="dino: contrastive denoising queries per image in the detector phase (0: none; "
        "MM-Grounding-DINO: 100)",
    )
    parser.add_argument(
        "--init-scheme",
        choices=("transformers", "reference"),
        default="transformers",
        help="dino, a detector from scratch: transformers' draw (std 0.02; the committed preset's) "
        "or Grounding DINO's (reference_init: Xavier, default-drawn box MLPs)",
    )
    parser.add_argument("--init", type=Path, default=None, help="continue from these weights")
    parser.add_argument(
        "--world",
        choices=sorted(synth.WORLDS),
        default="pretrain",
        help="sam: the domain trained and scored on (finetune: what fine-tuning could gain)",
    )
    parser.add_argument(
        "--init-backbone",
        type=Path,
        default=None,
        help="dino: start from this file's Swin (phase 0 skipped), the rest from random init",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "teacher" / "weights")
    parser.add_argument(
        "--probe",
        type=Path,
        default=None,
        help="train nothing; score these weights (dino: of --arch) on the held-out set of --seed "
        "and print where DINO's box AP is lost, or SAM's mIoU beside its masks' ceiling",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):  # TF32 matrix products: the GPU's fast float32 path
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.model == "sam" and (
        args.varifocal
        or args.dense_levels != 2
        or args.denoise
        or args.init_scheme != "transformers"
    ):
        parser.error("--varifocal, --dense-levels, --denoise and --init-scheme are for dino")
    if args.model == "dino" and args.world != "pretrain":
        parser.error("--world is for sam (dino pretrains on the pretraining domain)")
    if args.probe is not None:
        if args.model == "sam":
            print(json.dumps(probe_sam_file(args.probe, seed=args.seed, n=args.test_images)))
        else:
            probe = probe_file(args.probe, arch=args.arch, seed=args.seed, n=args.test_images)
            print(json.dumps(probe))
        return
    start = time.time()
    if args.model == "student":
        from teacher.proving.student import pretrain_student

        state, scores = pretrain_student(
            steps=3000 if args.steps is None else args.steps,
            seed=args.seed,
            n_images=args.images,
            n_test=args.test_images,
            batch_size=args.batch_size,
            lr=args.lr or 1e-3,
            device=device,
        )
    elif args.model == "sam":
        state, scores = pretrain_sam(
            steps=3000 if args.steps is None else args.steps,
            seed=args.seed,
            n_images=args.images,
            n_test=args.test_images,
            batch_size=args.batch_size,
            lr=args.lr or 1e-3,
            device=device,
            init=args.init,
            world=synth.WORLDS[args.world],
        )
    else:
        state, scores = pretrain_dino(
            steps=8000 if args.steps is None else args.steps,
            seed=args.seed,
            n_images=args.images,
            n_test=args.test_images,
            batch_size=args.batch_size,
            lr=args.lr or 1e-3,
            init=args.init,
            init_backbone=args.init_backbone,
            clip=args.clip,
            arch=args.arch,
            word_std=args.word_std,
            lock_text=not args.train_text,
            backbone_steps=0 if args.init else args.backbone_steps,
            backbone_lr_scale=args.backbone_lr_scale,
            background_weight=args.background_weight,
            varifocal=args.varifocal,
            phase0_levels=args.dense_levels,
            device=device,
            denoise=args.denoise,
            init_scheme=args.init_scheme,
        )
    elapsed = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.model}-tiny-pretrained.safetensors"
    save_file(
        state,
        str(path),
        metadata={"seed": str(args.seed), "scores": str(scores), "args": str(vars(args))},
    )
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB; held-out test: {scores}")
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(
        f"pretraining took {elapsed:.0f} s on {where} ({platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s)), torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
