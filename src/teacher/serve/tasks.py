"""``teacher predict --format label-studio``: the COCO predictions of ``label_folder`` as
Label Studio tasks with predictions, ready to import (Project > Import, or the API).

Each image becomes ``{"data": {"image": <url>}, "predictions": [{model_version, score,
result}]}``; ``<url>`` is ``url_prefix`` + the file's path under the labeled folder (default
prefix: Label Studio's local-files storage, ``/data/local-files/?d=<folder>/``).
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from teacher.coco.io import annotation_mask, categories_by_id, images_by_id, index_by_image
from teacher.serve.label_config import LabelConfig
from teacher.serve.protocol import Found, task_prediction


def default_label_config(names: list[str], *, masks: bool) -> str:
    """A labeling config for the classes: boxes (``label``), and brush masks (``mask``)."""
    labels = "".join(f"\n    <Label value={quoteattr(n)}/>" for n in names)
    xml = (
        f'<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
        f'  <RectangleLabels name="label" toName="image">{labels}\n  </RectangleLabels>\n'
    )
    if masks:
        xml += f'  <BrushLabels name="mask" toName="image">{labels}\n  </BrushLabels>\n'
    return xml + "</View>\n"


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
        masks=np.stack([annotation_mask(a, h, w) for a in anns]) if with_masks else None,
    )


def label_studio_tasks(
    coco: dict[str, Any], config: LabelConfig, *, url_prefix: str, model_version: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Tasks with predictions for every image of ``coco``; and the class names the config has
    no label for (their detections are left out: report them)."""
    names = {cid: c["name"] for cid, c in categories_by_id(coco).items()}
    keys = sorted({c.value for c in config.controls}) or ["image"]
    tasks, unknown = [], set()
    images = images_by_id(coco)
    for image_id, anns in index_by_image(coco).items():
        image = images[image_id]
        found = coco_found(image, anns, names)
        pred, missing = task_prediction({keys[0]: found}, config, model_version=model_version)
        unknown |= set(missing)
        tasks.append({"data": {keys[0]: url_prefix + image["file_name"]}, "predictions": [pred]})
    return tasks, sorted(unknown)
