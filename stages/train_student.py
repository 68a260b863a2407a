"""Stage ``train_student``: RF-DETR on human + teacher labels -> models/student, metrics/train_student.

    python -m stages.train_student --params params.yaml --inspect data/inspect.json \
        --train data/split/train.json --val data/split/val.json --images data/sample/images \
        --teacher-labels data/teacher_labels.json --pool data/sample/unlabeled \
        --out models/student --metrics metrics/train_student --checkpoints checkpoints/train_student

Writes ``models/student/`` (config.json, model.safetensors, student.json: classes, input size,
masks; params.json: the params used and what it trained on) and dvclive's
``metrics/train_student/``. Re-running after an interruption resumes from the last epoch checkpoint.
"""

from __future__ import annotations

import sys

from teacher.student.stage import run_student_stage, student_parser
from teacher.train.stage import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_student", student_parser(__doc__), run_student_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
