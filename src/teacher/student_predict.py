"""``teacher predict --student``: a trained student (PyTorch or ONNX) labels a folder of images.

The COCO document is the one ``teacher predict`` writes for the teachers: images with sizes,
categories, per detection ``bbox`` (xywh px), ``score``, ``area`` and, for a segmenting student,
``segmentation`` (compressed RLE); ``info.unreadable`` lists the images skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teacher.predict import Filter, Unreadable, list_images, read_batches, select, to_annotations
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
    from tqdm import tqdm

    folder = Path(folder)
    paths = list_images(folder)
    unreadable = Unreadable()
    info = student.info
    doc: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": c, "name": n} for c, n in zip(info.category_ids, info.names, strict=True)
        ],
    }
    bar = tqdm(total=len(paths), desc="predict (student)", unit="img", disable=not progress)
    for batch in read_batches(paths, batch_size=batch_size, unreadable=unreadable):
        dets = predict(
            student,
            [img for _, img, _ in batch],
            max_detections=4 * keep.max_detections,
            score_threshold=keep.score_threshold,
        )
        for (path, image, full), det in zip(batch, dets, strict=True):
            image_id = (
                len(doc["images"]) + 1
            )  # full: the file's size (large images are read downscaled)
            doc["images"].append(
                {
                    "id": image_id,
                    "file_name": path.relative_to(folder).as_posix(),
                    "height": int(full[1]),
                    "width": int(full[0]),
                }
            )
            doc["annotations"] += to_annotations(
                select(det, keep),
                image_id=image_id,
                first_id=len(doc["annotations"]) + 1,
                size=full,
                detected_size=(image.shape[1], image.shape[0]),
            )
        bar.update(len(batch))
    bar.update(len(paths) - bar.n)
    bar.close()
    doc["info"] = {
        "description": f"student predictions ({info.source})",
        "unreadable": [{"file": f, "reason": r} for f, r in unreadable.items],
    }
    return doc
