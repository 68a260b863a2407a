"""``teacher predict --student``: a trained student (PyTorch or ONNX) labels a folder of images.

The same labeling job as the teachers' (:mod:`teacher.inference.job`), so the COCO document is
the one ``teacher predict`` writes: images with sizes, categories, per detection ``bbox`` (xywh
px), ``score``, ``area`` and, for a segmenting student, ``segmentation`` (compressed RLE);
``info.unreadable`` lists the images skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from teacher.coco.detections import Detections
from teacher.inference.predict import Detector, Filter, select


def student_detector(device: Any, *, path: str | Path, keep: Filter) -> Detector:
    """The student at ``path`` (PyTorch folder or ONNX export) as a labeling job's detector."""
    from teacher.student.model import predict
    from teacher.student.onnx import load_any_student

    student = load_any_student(path, device=device)
    info = student.info

    def detect(images: list[np.ndarray]) -> list[Detections]:
        dets = predict(
            student,
            images,
            max_detections=4 * keep.max_detections,
            score_threshold=keep.score_threshold,
        )  # spares for the per-class NMS
        return [select(det, keep) for det in dets]

    return Detector(
        detect,
        categories=list(zip(info.category_ids, info.names, strict=True)),
        description=f"student predictions ({info.source})",
    )
