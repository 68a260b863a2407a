"""``teacher predict --format label-studio``: a labeling job's predictions as Label Studio
tasks with predictions, ready to import (Project > Import, or the API), streamed to the file.

Each image becomes ``{"data": {"image": <url>}, "predictions": [{model_version, score,
result}]}``; ``<url>`` is ``url_prefix`` + the file's path under the labeled folder (default
prefix: Label Studio's local-files storage, ``/data/local-files/?d=<folder>/``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload
from xml.sax.saxutils import quoteattr

import numpy as np

from teacher.coco.io import annotation_mask, atomic_text_file
from teacher.serve.label_config import LabelConfig
from teacher.serve.protocol import Found, task_prediction


def default_label_config(names: list[str], *, masks: bool, smart: bool = False) -> str:
    """A labeling config for the classes: boxes (``label``), brush masks (``mask``) with
    ``masks``, and with ``smart`` the smart keypoint tool (``click``: SAM's mask for a click)."""
    labels = "".join(f"\n    <Label value={quoteattr(n)}/>" for n in names)
    xml = (
        f'<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
        f'  <RectangleLabels name="label" toName="image">{labels}\n  </RectangleLabels>\n'
    )
    if masks:
        xml += f'  <BrushLabels name="mask" toName="image">{labels}\n  </BrushLabels>\n'
    if smart:
        smart_labels = labels.replace("/>", ' smart="true"/>')
        xml += (
            f'  <KeyPointLabels name="click" toName="image" smart="true">{smart_labels}\n'
            "  </KeyPointLabels>\n"
        )
    return xml + "</View>\n"


class AnnotationMasks(Sequence[np.ndarray]):
    """The masks of an image's annotations, each decoded from its RLE when read: one full-size
    mask in memory at a time, not all of them (a byte a pixel each)."""

    def __init__(self, anns: list[dict], *, height: int, width: int) -> None:
        self.anns, self.height, self.width = anns, height, width

    def __len__(self) -> int:
        return len(self.anns)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        return annotation_mask(self.anns[i], self.height, self.width)


def coco_found(image: dict, anns: list[dict], names: dict[int, str]) -> Found:
    """One image's COCO results (bbox, score, optional RLE segmentation) as ``Found``."""
    h, w = int(image["height"]), int(image["width"])
    with_masks = bool(anns) and all(a.get("segmentation") for a in anns)
    return Found(
        width=w,
        height=h,
        boxes_xywh=np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4),
        scores=np.array([a.get("score", 1.0) for a in anns], np.float64),
        names=[names[a["category_id"]] for a in anns],
        masks=AnnotationMasks(anns, height=h, width=w) if with_masks else None,
    )


def label_studio_task(
    record: dict[str, Any],
    config: LabelConfig,
    names: dict[int, str],
    *,
    url_prefix: str,
    model_version: str,
) -> tuple[dict[str, Any], list[str]]:
    """One image's task with its prediction (``record``: ``file_name``, ``width``, ``height``
    and its ``annotations``); and the class names the config has no label for (their
    detections are left out: report them)."""
    key = sorted({c.value for c in config.controls} or {"image"})[0]
    found = coco_found(record, record["annotations"], names)
    pred, missing = task_prediction({key: found}, config, model_version=model_version)
    return {"data": {key: url_prefix + record["file_name"]}, "predictions": [pred]}, missing


def write_label_studio_tasks(
    records: Iterator[dict[str, Any]],
    out: Path,
    config: LabelConfig,
    *,
    categories: list[dict[str, Any]],
    url_prefix: str,
    model_version: str,
) -> dict[str, Any]:
    """Stream the tasks of ``records`` (a labeling job's, in order) to ``out`` as a JSON list,
    one task per line, atomically. Returns the counts, the unreadable images (``{"file",
    "reason"}``) and the class names the config has no label for."""
    names = {int(c["id"]): str(c["name"]) for c in categories}
    unknown: set[str] = set()
    unreadable: list[dict[str, str]] = []
    n_images = n_regions = 0
    with atomic_text_file(out) as f:
        f.write("[")
        for record in records:
            if "unreadable" in record:
                unreadable.append({"file": record["path"], "reason": record["unreadable"]})
                continue
            task, missing = label_studio_task(
                record, config, names, url_prefix=url_prefix, model_version=model_version
            )
            unknown |= set(missing)
            f.write(("\n" if n_images == 0 else ",\n") + json.dumps(task, sort_keys=True))
            n_images += 1
            n_regions += len(record["annotations"])
        f.write("\n]\n")
    return {
        "images": n_images,
        "annotations": n_regions,
        "unreadable": unreadable,
        "unknown": sorted(unknown),
    }
