"""The ML backend's work, apart from HTTP: labeling configs per project, predictions for a
batch of tasks (one bad task gives that task an error, not the call), smart-tool clicks.

Label Studio's calls (label_studio_ml/api.py of label-studio-ml-backend is the reference):
``POST /setup {project, schema, extra_params}`` -> ``{model_version}``;
``POST /predict {tasks, label_config, project, params: {context}}`` -> ``{results: [prediction
per task, in order]}``; ``POST /webhook {action, ...}`` (annotation events; the teachers train
through the DVC pipeline, so they are acknowledged only); ``GET /health``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from teacher.serve.label_config import (
    PREDICTED,
    LabelConfig,
    LabelConfigError,
    match_labels,
    parse_label_config,
)
from teacher.serve.protocol import (
    ContextError,
    Found,
    context_prompts,
    interactive_prediction,
    task_prediction,
)
from teacher.serve.sources import ImageSourceError, ImageSources, load_task_image
from teacher.serve.teachers import ServeTeachers

log = logging.getLogger("teacher.serve")
FETCH_WORKERS = 4  # images downloaded in parallel within one call
MAX_PROJECTS = 256  # labeling configs remembered from /setup
CHUNK_TASKS = 16  # tasks whose images are in memory at once (DINO batches within a chunk)


class RequestError(ValueError):
    """A request the server cannot answer as sent (HTTP 400 / 422 with this message)."""


@dataclass
class Backend:
    teachers: ServeTeachers
    sources: ImageSources
    max_tasks: int = 1000  # tasks per /predict call (Label Studio sends a whole selection)
    configs: dict[str, str] = field(default_factory=dict)  # project id -> label config (setup)

    def health(self) -> dict[str, Any]:
        return {
            "status": "UP",
            "model_class": "teacher",
            "model_version": self.version,
            "classes": self.teachers.class_names,
            "sam": self.teachers.has_sam,
            "images_embedded": self.teachers.embeddings_computed,
        }

    @property
    def version(self) -> str:
        return self.teachers.model_version

    def setup(self, *, project: str | None, schema: str | None) -> dict[str, Any]:
        config = self._config(schema, project=None)
        assert schema is not None  # _config refused a missing one
        if project:
            self.configs.pop(project_id(project), None)
            self.configs[project_id(project)] = schema
            while len(self.configs) > MAX_PROJECTS:  # the oldest set-up project goes first
                self.configs.pop(next(iter(self.configs)))
        return {"model_version": self.version, **self.label_report(config)}

    def label_report(self, config: LabelConfig) -> dict[str, Any]:
        """Classes the config has no label for, and labels no class fills, per control."""
        unknown, unfilled = {}, {}
        for control in config.of_type(*PREDICTED):
            mapping, missing = match_labels(self.teachers.class_names, control)
            if missing:
                unknown[control.name] = missing
            left = sorted(set(control.labels) - set(mapping.values()))
            if left:
                unfilled[control.name] = left
        return {"unknown_classes": unknown, "labels_without_class": unfilled}

    def _config(self, xml: str | None, *, project: str | None) -> LabelConfig:
        if not xml and project:
            xml = self.configs.get(project_id(project))
        if not xml:
            raise RequestError("no label_config: send it with the request or POST /setup first")
        try:
            return parse_label_config(xml)
        except LabelConfigError as e:
            raise RequestError(str(e)) from e

    def predict(
        self,
        *,
        tasks: Sequence[Mapping[str, Any]],
        label_config: str | None,
        project: str | None,
        context: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        if len(tasks) > self.max_tasks:
            raise RequestError(
                f"{len(tasks)} tasks in one call; at most {self.max_tasks} (--max-tasks)"
            )
        config = self._config(label_config, project=project)
        try:
            clicks = context_prompts(context or {})
        except ContextError as e:
            raise RequestError(f"params.context: {e}") from e
        if clicks is not None:
            return self.interactive(tasks, config, *clicks)
        return self.prelabel(tasks, config)

    def prelabel(self, tasks: Sequence[Mapping[str, Any]], config: LabelConfig) -> dict[str, Any]:
        """Predictions for every task (in order); a task whose image fails gets none (``[]``,
        so that Label Studio asks again later) and an entry in ``errors``. Tasks go through
        ``CHUNK_TASKS`` at a time, so memory holds one chunk's images, whatever the call's size."""
        keys = sorted({c.value for c in config.of_type(*PREDICTED)})
        if not keys:
            raise RequestError(
                "the labeling config has no RectangleLabels, BrushLabels or "
                "PolygonLabels on an <Image>: nothing to predict"
            )
        results: list = []
        errors: dict[int, str] = {}
        unknown: set[str] = set()
        for start in range(0, len(tasks), CHUNK_TASKS):
            founds = self._detect_chunk(
                tasks, range(start, min(start + CHUNK_TASKS, len(tasks))), keys, errors
            )
            for t in sorted(founds):
                if t in errors:  # no prediction: Label Studio asks again next time
                    results.append([])
                    continue
                pred, missing = task_prediction(founds[t], config, model_version=self.version)
                results.append(pred)
                unknown |= set(missing)
        if unknown:
            log.warning("classes without a label in the labeling config: %s", sorted(unknown))
        return {
            "results": results,
            "model_version": self.version,
            "unknown_classes": sorted(unknown),
            "errors": [
                {"index": t, "task": tasks[t].get("id"), "error": errors[t]} for t in sorted(errors)
            ],
        }

    def _detect_chunk(
        self,
        tasks: Sequence[Mapping[str, Any]],
        indexes: range,
        keys: list[str],
        errors: dict[int, str],
    ) -> dict[int, dict[str, Found]]:
        """``{task index: {data key: Found}}`` for the tasks at ``indexes`` (every index, empty
        where it failed); failures go to ``errors``. Images are fetched in parallel."""
        wanted = [(t, k) for t in indexes for k in keys]
        with ThreadPoolExecutor(FETCH_WORKERS) as pool:
            loaded = list(pool.map(lambda tk: self._task_image(tasks[tk[0]], tk[1]), wanted))
        errors.update({t: err for (t, _), (_, err) in zip(wanted, loaded, strict=True) if err})
        good = [
            (t, k, img) for (t, k), (img, _) in zip(wanted, loaded, strict=True) if t not in errors
        ]
        founds: dict[int, dict[str, Found]] = {t: {} for t in indexes}
        for (t, k, _), found in zip(good, self._detect(good, errors), strict=True):
            if found is not None:
                founds[t][k] = found
        return founds

    def _detect(
        self, good: list[tuple[int, str, np.ndarray]], errors: dict[int, str]
    ) -> Sequence[Found | None]:
        """Detections of the images in ``good`` (task index, key, image), batched; if a batch
        fails, image by image, so that only the task whose image breaks the model gets an
        error (None in its place)."""
        try:
            return self.teachers.detect([image for _, _, image in good])
        except Exception:  # noqa: BLE001 - isolated below, per image
            out: list[Found | None] = []
            for t, _, image in good:
                try:
                    out += self.teachers.detect([image])
                except Exception as e:  # noqa: BLE001 - reported for this task only
                    log.exception("task %s: prediction failed", t)
                    errors[t] = f"prediction failed: {type(e).__name__}: {e}"
                    out.append(None)
            return out

    def _task_image(self, task: Mapping[str, Any], data_key: str):
        """(image, None) or (None, error message) for one task's image."""
        data = task.get("data") if isinstance(task, Mapping) else None
        if not isinstance(data, Mapping) or data_key not in data:
            return None, f"task has no data.{data_key} (the image the labeling config names)"
        try:
            return load_task_image(data[data_key], self.sources), None
        except ImageSourceError as e:
            return None, str(e)

    def interactive(
        self, tasks: Sequence[Mapping[str, Any]], config: LabelConfig, to_name: str, prompts
    ) -> dict[str, Any]:
        """SAM's mask for the smart tools' clicks on the first task's image."""
        if len(tasks) != 1:
            raise RequestError(
                f"a context (smart tool clicks) comes with one task, got {len(tasks)}"
            )
        if not self.teachers.has_sam:
            raise RequestError(
                "interactive segmentation needs SAM; the server was started with --boxes-only"
            )
        controls = [c for c in config.of_type("brushlabels") if c.to_name == to_name] or [
            c for c in config.of_type("polygonlabels") if c.to_name == to_name
        ]
        if not controls:
            raise RequestError(
                f"the labeling config has no BrushLabels or PolygonLabels on "
                f"image {to_name!r} to put SAM's mask in"
            )
        data_key = controls[0].value
        url = (tasks[0].get("data") or {}).get(data_key)

        def load() -> np.ndarray:
            image, error = self._task_image(tasks[0], data_key)
            if error:
                raise ImageSourceError(error)
            return image

        try:
            mask, score = self.teachers.segment(str(url), load, prompts)
        except ImageSourceError as e:
            raise RequestError(f"task {tasks[0].get('id')}: {e}") from e
        pred = interactive_prediction(
            mask, score, controls=controls, label=prompts.label, model_version=self.version
        )
        return {"results": [pred], "model_version": self.version, "errors": []}


def project_id(project: str | int) -> str:
    """Label Studio sends ``"<id>.<created timestamp>"``; configs are kept by ``<id>``."""
    return str(project).split(".", 1)[0]
