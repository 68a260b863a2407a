"""The open vocabulary a fine-tuned detector should keep: class names outside the dataset.

:data:`COCO_CLASSES` (the default) and :func:`retention_classes`, which ``evaluate`` measures
forgetting on (``retention/box/*``) and ``train_dino`` keeps while training
(``dino.retain_weight``), both from ``evaluate.retention_classes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from teacher.coco.io import clean_name

# The 80 COCO detection class names (instances_val2017.json, in id order).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def _key(name: str) -> str:
    return clean_name(str(name)).lower()


def retention_classes(
    configured: Sequence[str] | None, dataset_names: Iterable[str]
) -> tuple[list[str], list[str]]:
    """(classes retention is measured on, configured names left out as dataset classes).

    ``configured`` (``evaluate.retention_classes``) or, when None, :data:`COCO_CLASSES`; names of
    the dataset (compared cleaned and case-insensitively) are left out, as are repeats.
    """
    own = {_key(n) for n in dataset_names}
    names, dropped, seen = [], [], set()
    for name in COCO_CLASSES if configured is None else configured:
        key = _key(name)
        if not key or key in seen:
            continue
        seen.add(key)
        if key in own:
            dropped.append(str(name))
        else:
            names.append(clean_name(str(name)))
    return names, ([] if configured is None else dropped)
