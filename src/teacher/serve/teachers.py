"""The teachers as the server uses them: the ONE module of ``teacher.serve`` that calls into
``teacher.inference.predict`` and ``teacher.sam`` (adapt it here when their APIs change).

``ServeTeachers.detect`` runs Grounded-SAM on a batch of images (as ``teacher predict``), with
the server's classes or, when it was started without any, the classes of the call (the labels
of the project's labeling config);
``ServeTeachers.segment`` answers the smart tools' clicks with SAM, reusing the image
embedding of the last few images (an LRU keyed by the image URL), so every click after the
first on an image costs one prompt-encoder + decoder call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from teacher.coco.images import resize_mask
from teacher.core.artifacts import LABELS_FILE, TRAINED_ALIASES_FILE, TRAINED_MODULES_FILE
from teacher.core.digest import fingerprint
from teacher.dino.labels import LabelMap, build_label_map
from teacher.inference.predict import (
    Filter,
    Teachers,
    load_predict_teachers,
    predict_images,
    working_edge,
)
from teacher.sam.predictor import PreparedImage, prepare_image
from teacher.serve.protocol import Found, Prompts
from teacher.serve.sources import TaskImage
from teacher.train.lora import PEFT_WEIGHTS_FILE

ADAPTER_FILES = (
    PEFT_WEIGHTS_FILE,
    "adapter_config.json",
    TRAINED_ALIASES_FILE,
    TRAINED_MODULES_FILE,  # folders written before trained modules were stored once
    LABELS_FILE,
)
LABEL_MAPS = 16  # prompt label maps of labeling configs kept (one per project's class list)


def adapters_version(
    adapters: str | Path | None,
    *,
    dino_model: str,
    sam_model: str,
    extra: Any = None,
    adapter_scale: float = 1.0,
) -> str:
    """``model_version``: a hash of the base model names, every adapter file's content and the
    adapter scale (when not 1: the versions of unscaled adapters stay as they were)."""
    files = []
    if adapters is not None:
        files = sorted(
            p
            for name in ("dino", "sam")
            for p in (Path(adapters) / name).glob("*")
            if p.name in ADAPTER_FILES
        )
    scaled = () if adapter_scale == 1.0 or not files else ({"adapter_scale": adapter_scale},)
    digest = fingerprint(
        dino_model, sam_model, [p.parent.name + "/" + p.name for p in files], files, extra, *scaled
    )
    return f"teacher-{'adapters' if files else 'base'}-{digest[:12]}"


class ServeTeachers:
    """Grounded-SAM for pre-labeling and SAM for clicks, behind one lock (one model call at a
    time; requests queue)."""

    def __init__(
        self,
        teachers: Teachers,
        *,
        keep: Filter,
        text_threshold: float,
        multimask: bool,
        model_version: str,
        batch_size: int = 4,
        cache_size: int = 8,
    ) -> None:
        self.teachers = teachers
        self.keep = keep
        self.text_threshold = text_threshold
        self.multimask = multimask
        self.model_version = model_version
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.prepared: OrderedDict[str, tuple[PreparedImage, tuple[int, int]]] = OrderedDict()
        self.embeddings_computed = 0  # how many images SAM embedded for clicks (tests, /health)
        self.label_maps: OrderedDict[tuple[str, ...], LabelMap] = OrderedDict()
        self.label_maps_lock = threading.Lock()  # the cache only; builds take ``lock``
        self.lock = threading.Lock()

    @property
    def class_names(self) -> list[str]:
        """The server's own classes (--classes or the adapter's); [] when each call brings its
        own (:attr:`classes_per_call`)."""
        return list(self.teachers.label_map.names)

    @property
    def classes_per_call(self) -> bool:
        """True when started without classes: each call prompts with the classes it passes to
        :meth:`detect` (the labels of its labeling config)."""
        return not self.teachers.label_map.names

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        """The prompt label map of ``classes`` (category ids 1..N in order), kept for the next
        call with the same classes; ``TeacherError`` when a name cannot be a prompt."""
        names = tuple(classes)
        with self.label_maps_lock:
            if names in self.label_maps:
                self.label_maps.move_to_end(names)
                return self.label_maps[names]
        assert self.teachers.dino is not None  # serve always loads DINO
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
        with self.lock:  # the tokenizer: a model call changes its padding settings
            built = build_label_map(cats, tokenizer=self.teachers.dino.processor.tokenizer)
        with self.label_maps_lock:
            self.label_maps[names] = built
            while len(self.label_maps) > LABEL_MAPS:
                self.label_maps.popitem(last=False)
        return built

    @property
    def has_sam(self) -> bool:
        return self.teachers.sam is not None

    @property
    def working_edge(self) -> int | None:
        """The longest image side the teachers look at (:func:`predict.working_edge`): task
        images are decoded to it (``ImageSources.max_edge``)."""
        return working_edge(self.teachers)

    def detect(
        self, images: Sequence[TaskImage], *, classes: Sequence[str] | None = None
    ) -> list[Found]:
        """Grounded-SAM on many images, ``batch_size`` per DINO forward, prompted with the
        server's classes or, given, ``classes`` (whose names the detections then carry)."""
        teachers = self.teachers
        if classes:
            teachers = replace(teachers, label_map=self.label_map(classes))
        elif self.classes_per_call:
            raise ValueError("started without classes: pass the classes of the call")
        names = dict(
            zip(teachers.label_map.category_ids, classes or teachers.label_map.names, strict=True)
        )
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = list(images[i : i + self.batch_size])
            with self.lock:
                dets = predict_images(
                    teachers,
                    [image.pixels for image in batch],
                    keep=self.keep,
                    text_threshold=self.text_threshold,
                    multimask=self.multimask,
                )
            out += [found_of(det, image, names) for det, image in zip(dets, batch, strict=True)]
        return out

    def segment(
        self, key: str, load: Callable[[], TaskImage], prompts: Prompts
    ) -> tuple[np.ndarray, float]:
        """SAM's mask (H, W) bool at the file's size and predicted IoU for the clicks on the
        image ``key``.

        ``load`` gives the image when ``key`` is not among the prepared images.
        """
        if not self.has_sam:
            raise RuntimeError("SAM is not loaded (started with --boxes-only)")
        with self.lock:
            prepared, size = self._prepared(key, load)
            assert self.teachers.sam is not None  # has_sam
            mask, score = sam_mask(self.teachers.sam, prepared, prompts)
        return resize_mask(mask, size), score

    def _prepared(
        self, key: str, load: Callable[[], TaskImage]
    ) -> tuple[PreparedImage, tuple[int, int]]:
        """The prepared image of ``key`` and its file's (width, height)."""
        if key in self.prepared:
            self.prepared.move_to_end(key)
            return self.prepared[key]
        assert self.teachers.sam is not None  # only called when has_sam
        image = load()
        self.prepared[key] = prepare_image(self.teachers.sam, image.pixels), image.size
        self.embeddings_computed += 1
        while len(self.prepared) > self.cache_size:
            self.prepared.popitem(last=False)
        return self.prepared[key]


def found_of(det: Any, image: TaskImage, names: dict[int, str]) -> Found:
    """``predict_images``' detections of one image (a dict today) as ``Found``: boxes in the
    file's pixels, masks as the teachers made them (smaller when the image was downscaled)."""
    get = det.get if isinstance(det, dict) else lambda k, d=None: getattr(det, k, d)
    masks = get("masks")
    (width, height), seen = image.size, image.pixels.shape
    scale = np.array([width / seen[1], height / seen[0]] * 2)
    return Found(
        width=int(width),
        height=int(height),
        boxes_xywh=np.asarray(get("boxes"), np.float64).reshape(-1, 4) * scale,
        scores=np.asarray(get("scores"), np.float64).reshape(-1),
        names=[names[int(c)] for c in np.asarray(get("category_ids")).reshape(-1)],
        masks=None if masks is None else np.asarray(masks, bool),
    )


@torch.no_grad()
def sam_mask(
    model: torch.nn.Module, prepared: PreparedImage, prompts: Prompts
) -> tuple[np.ndarray, float]:
    """SAM's mask (either family) for points and/or a box, at the original size: for one
    prompt (one click or a box alone) the best of its three candidates, for several its single
    mask, as segment-anything advises (``SamPredictor.predict``: multimask output for ambiguous
    single prompts) and as train_sam trains it (teacher.sam.prompts: three candidates only for
    a lone click, one mask once there is more than one prompt)."""
    from teacher.sam.model import select_best, unwrap

    sam = unwrap(model)  # either family: its geometry, decoder and post-processing
    scale = np.array(
        [prepared.original_size[1] / prompts.width, prepared.original_size[0] / prompts.height]
    )
    points = labels = boxes = None  # clicks in the context's frame -> this image's pixels
    if len(prompts.points):
        points = prepared.points_to_input(prompts.points * scale)[None]
        labels = torch.as_tensor(prompts.point_labels, dtype=torch.int64, device=sam.device)[None]
    if prompts.box_xyxy is not None:
        xyxy = prompts.box_xyxy[None] * np.tile(scale, 2)
        boxes = torch.as_tensor(
            sam.geometry.boxes_to_input(xyxy, prepared.original_size),
            dtype=torch.float32,
            device=sam.device,
        )
    single = len(prompts.points) + (prompts.box_xyxy is not None) == 1
    low_res, iou = sam.decode(
        prepared.embedding.to(sam.device),
        boxes=boxes,
        points=points,
        labels=labels,
        multimask=single,
    )
    best, best_iou = select_best(low_res, iou)
    logits = sam.postprocess(best[:, None], prepared.input_size, prepared.original_size)[0, 0]
    return (logits > sam.mask_threshold).cpu().numpy(), float(best_iou[0])


def load_serve_teachers(
    *,
    adapters: str | Path | None,
    classes: Sequence[str] | None,
    dino_params: Any,
    sam_params: Any,
    keep: Filter,
    text_threshold: float,
    segment_masks: bool = True,
    batch_size: int = 4,
    cache_size: int = 8,
    adapter_scale: float = 1.0,
    log=print,
) -> ServeTeachers:
    """The models as ``teacher predict`` loads them (adapters at ``adapter_scale``), and their
    ``model_version``. Without ``classes`` and an adapter's, each call brings its classes
    (:attr:`ServeTeachers.classes_per_call`)."""
    teachers = load_predict_teachers(
        classes=classes,
        adapters=adapters,
        dino_params=dino_params,
        sam_params=sam_params,
        segment_masks=segment_masks,
        adapter_scale=adapter_scale,
        classes_per_call=True,
        log=log,
    )
    version = adapters_version(
        adapters,
        dino_model=dino_params.model,
        sam_model=sam_params.model,
        extra=list(classes or []),
        adapter_scale=adapter_scale,
    )
    return ServeTeachers(
        teachers,
        keep=keep,
        text_threshold=text_threshold,
        multimask=sam_params.multimask,
        model_version=version,
        batch_size=batch_size,
        cache_size=cache_size,
    )
