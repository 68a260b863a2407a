"""The train_student stage's bookkeeping: params used, the teachers' labels, fingerprint, launch.

Like :func:`teacher.train.stage.run_training_stage` for the teachers, plus the pool: the
teachers' labels (``data/teacher_labels.json``) and their images (``data.unlabeled``) are a
second training source; without them the student trains on the human labels alone and the
stage says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from teacher.coco.io import categories_by_id, load_coco, read_json, save_json
from teacher.core.artifacts import PARAMS_FILE
from teacher.core.digest import fingerprint, images_digest
from teacher.core.errors import TeacherError
from teacher.core.params import load_params, to_dict
from teacher.dataset.augment import resolve_policy
from teacher.student.data import (
    drop_known_images,
    has_masks,
    has_targets,
    load_teacher_labels,
    teacher_source,
)
from teacher.student.task import train_student
from teacher.train.distributed import is_main_process, launch
from teacher.train.stage import training_parser


def student_parser(description: str | None) -> argparse.ArgumentParser:
    """``python -m stages.train_student`` arguments; defaults are the paths in dvc.yaml."""
    p = training_parser("train_student", description, teacher="student")
    p.add_argument(
        "--teacher-labels",
        type=Path,
        default=Path("data/teacher_labels.json"),
        help="the label stage's COCO file (teachers' detections on the pool)",
    )
    p.add_argument(
        "--pool", type=Path, required=True, help="folder of the pool images (data.unlabeled)"
    )
    p.add_argument(
        "--test",
        type=Path,
        default=Path("data/split/test.json"),
        help="the test split: pool images equal to one of its images are left out",
    )
    return p


def pool_note(
    teacher_images: int,
    labels: int,
    *,
    weight: float,
    min_score: float,
    path: Path,
    ignored: int = 0,
    overlap: int = 0,
    nothing_found: int = 0,
) -> str:
    """The line saying what the student trains on besides the human labels."""
    if weight == 0:
        return "human labels alone (student.teacher_weight is 0)"
    if nothing_found:
        return (
            f"human labels alone: the teachers kept no detection scoring >= {min_score:g} on the "
            f"{nothing_found} pool images of {path} (check the teachers' val mAP, or lower "
            "student.min_score)"
        )
    if teacher_images == 0:
        if overlap:
            return (
                f"human labels alone: every pool image of {path} ({overlap}) is also an image "
                "of the human splits"
            )
        return f"human labels alone: no unlabeled pool ({path} lists no image; set data.unlabeled)"
    return (
        f"human labels + {labels} teacher labels (score >= {min_score:g}) on {teacher_images} "
        f"pool images, weight {weight:g}"
        + (f", {ignored} uncertain detections as ignore regions" if ignored else "")
        + (f"; {overlap} pool images left out (equal to human-split images)" if overlap else "")
    )


def run_student_stage(args: argparse.Namespace) -> str:
    """Train the student as a stage; returns the line the stage prints."""
    params = load_params(args.params)
    student = params["student"]
    used = {
        "seed": params["seed"],
        **{k: to_dict(params[k]) for k in ("train", "augment", "student")},
    }
    policy = resolve_policy(params["augment"], read_json(args.inspect))
    train_coco, val_coco = load_coco(args.train), load_coco(args.val)
    if not Path(args.teacher_labels).is_file():
        raise TeacherError(
            f"{args.teacher_labels}: not found; the label stage writes it (`dvc repro label`)"
        )
    teacher = teacher_source(
        load_teacher_labels(args.teacher_labels),
        path=args.teacher_labels,
        pool=args.pool,
        categories=categories_by_id(train_coco),
        min_score=student.min_score,
        weight=student.teacher_weight,
        ignore_score=student.ignore_score,
        score_weight=student.score_weight,
    )
    splits = [("train", train_coco), ("val", val_coco), ("test", load_coco(args.test))]
    teacher, overlap = drop_known_images(
        teacher, [(name, coco, Path(args.images)) for name, coco in splits]
    )
    if overlap and is_main_process():
        shown = overlap[:10] + ([f"... ({len(overlap)} in all)"] if len(overlap) > 10 else [])
        print("train_student: " + "\ntrain_student: ".join(shown))
    if teacher.coco["images"] and not has_targets(teacher):
        empty = len(teacher.coco["images"])
        teacher = dataclasses.replace(
            teacher, coco={**teacher.coco, "images": [], "annotations": []}
        )
    else:
        empty = 0
    note = pool_note(
        len(teacher.coco["images"]),
        sum(a["score"] >= student.min_score for a in teacher.coco["annotations"]),
        weight=student.teacher_weight,
        min_score=student.min_score,
        path=args.teacher_labels,
        ignored=sum(a["score"] < student.min_score for a in teacher.coco["annotations"]),
        overlap=len(overlap),
        nothing_found=empty,
    )
    if is_main_process():
        print(f"train_student: training on {note}")
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.rmtree(args.metrics, ignore_errors=True)  # dvclive starts fresh; resume replays
    run_id = fingerprint(
        used,
        args.train,
        args.val,
        args.teacher_labels,
        images_digest(args.images, train_coco, val_coco),
        images_digest(args.pool, teacher.coco),
    )
    metrics = launch(
        train_student,
        processes=params["train"].processes,
        kwargs=dict(
            train_coco=train_coco,
            val_coco=val_coco,
            image_root=args.images,
            teacher=teacher,
            masks=has_masks(train_coco),
            student=student,
            train=params["train"],
            augment_policy=policy,
            seed=params["seed"],
            out_dir=args.out,
            checkpoint_dir=args.checkpoints,
            live_dir=args.metrics,
            fingerprint=run_id,
        ),
    )
    if is_main_process():
        save_json({**used, "augment_policy": policy, "trained_on": note}, args.out / PARAMS_FILE)
    done = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"{done} -> {args.out}"
