"""``teacher predict --student``: a trained student (PyTorch or ONNX) labels a folder of images.

The COCO document is the one ``teacher predict`` writes for the teachers
(:func:`teacher.inference.predict.label_images`): images with sizes, categories, per detection ``bbox``
(xywh px), ``score``, ``area`` and, for a segmenting student, ``segmentation`` (compressed RLE);
``info.unreadable`` lists the images skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from teacher.coco.detections import Detections
from teacher.inference.predict import Filter, label_images, select
from teacher.student.model import Student, predict


def label_with_student(
    student: Student,
    folder: str | Path,
    *,
    keep: Filter,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Auto-label every image under ``folder`` with a student (PyTorch or ONNX): a COCO dict."""
    info = student.info

    def detect(images: list[np.ndarray]) -> list[Detections]:
        dets = predict(
            student,
            images,
            max_detections=4 * keep.max_detections,
            score_threshold=keep.score_threshold,
        )  # spares for the per-class NMS
        return [select(det, keep) for det in dets]

    return label_images(
        folder,
        detect,
        categories=list(zip(info.category_ids, info.names, strict=True)),
        description=f"student predictions ({info.source})",
        batch_size=batch_size,
        progress=progress,
    )
