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
import math
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

from teacher.core.errors import TeacherError
from teacher.serve.label_config import (
    PREDICTED,
    LabelConfig,
    LabelConfigError,
    config_classes,
    match_labels,
    parse_label_config,
)
from teacher.serve.protocol import (
    ContextError,
    Found,
    Prompts,
    context_prompts,
    interactive_prediction,
    task_prediction,
)
from teacher.serve.sources import ImageSourceError, ImageSources, TaskImage, load_task_image
from teacher.serve.teachers import ServeTeachers

log = logging.getLogger("teacher.serve")
FETCH_WORKERS = 4  # images downloaded in parallel within one call
MAX_PROJECTS = 256  # labeling configs remembered from /setup
CHUNK_TASKS = 16  # tasks whose images are in memory at once (DINO batches within a chunk)
POLL_S = 0.5  # how often a call waiting on image downloads looks at its Budget
CLASSES_FROM_CONFIG = "from each project's labeling config"  # /health's classes without --classes


class RequestError(ValueError):
    """A request the server cannot answer as sent (HTTP 400 / 422 with this message)."""


@dataclass(frozen=True)
class Budget:
    """When a /predict call's work stops: at its deadline (``time.monotonic()`` seconds) or when
    its client hangs up (``hung_up``, set by the HTTP layer). Looked at between tasks: a task not
    started by then gets an error instead of a prediction."""

    deadline: float = math.inf
    timeout_s: float = math.inf  # the call's limit, for the message (--call-timeout)
    hung_up: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, timeout_s: float, hung_up: threading.Event | None = None) -> Budget:
        return cls(time.monotonic() + timeout_s, timeout_s, hung_up or threading.Event())

    def left(self) -> float:
        """Seconds until the deadline (negative past it)."""
        return self.deadline - time.monotonic()

    def stopped(self) -> str | None:
        """Why the call's remaining tasks are not done; None while they may go on."""
        if self.hung_up.is_set():
            return "not done: the client disconnected"
        if self.left() <= 0:
            return (
                f"not done within the call's {self.timeout_s:g} s (--call-timeout): send fewer "
                "tasks per call, or Label Studio asks again for this one later"
            )
        return None


@dataclass
class Backend:
    teachers: ServeTeachers
    sources: ImageSources
    max_tasks: int = 1000  # tasks per /predict call (Label Studio sends a whole selection)
    call_timeout_s: float = 60.0  # per /predict call; tasks not done by then get an error
    configs: dict[str, str] = field(default_factory=dict)  # project id -> label config (setup)

    def health(self) -> dict[str, Any]:
        """``GET /health``. Runs on the server's event loop: no lock, no I/O, or every request
        waits for it."""
        return {
            "status": "UP",
            "model_class": "teacher",
            "model_version": self.version,
            "classes": self.teachers.class_names or CLASSES_FROM_CONFIG,
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
        """The classes prompted for ``config``; classes it has no label for, and labels no class
        fills, per control."""
        classes = self.prompt_classes(config) or self.teachers.class_names
        unknown, unfilled = {}, {}
        for control in config.of_type(*PREDICTED):
            mapping, missing = match_labels(classes, control)
            if missing:
                unknown[control.name] = missing
            left = sorted(set(control.labels) - set(mapping.values()))
            if left:
                unfilled[control.name] = left
        return {"classes": classes, "unknown_classes": unknown, "labels_without_class": unfilled}

    def prompt_classes(self, config: LabelConfig) -> list[str] | None:
        """The classes DINO is prompted with for ``config``: None for the server's own
        (--classes or the adapter's); the labels the config's region controls offer when it was
        started without. Their prompt is built here, so that a label that cannot be one fails
        the call (``RequestError``), not each task."""
        if not self.teachers.classes_per_call:
            return None
        try:
            classes = config_classes(config)
            self.teachers.label_map(classes)
        except TeacherError as e:  # LabelConfigError is one
            raise RequestError(f"label_config: {e}") from e
        return classes

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
        hung_up: threading.Event | None = None,
    ) -> dict[str, Any]:
        """The reply to ``POST /predict``; pre-labeling stops at ``call_timeout_s`` or when
        ``hung_up`` is set (the client disconnected), the tasks left get an error."""
        if len(tasks) > self.max_tasks:
            raise RequestError(
                f"{len(tasks)} tasks in one call; at most {self.max_tasks} (--max-tasks)"
            )
        config = self._config(label_config, project=project)
        try:
            clicks = context_prompts(context or {}, config)
        except ContextError as e:
            raise RequestError(f"params.context: {e}") from e
        if clicks is not None:
            return self.interactive(tasks, config, *clicks)
        return self.prelabel(tasks, config, Budget.start(self.call_timeout_s, hung_up))

    def prelabel(
        self, tasks: Sequence[Mapping[str, Any]], config: LabelConfig, budget: Budget | None = None
    ) -> dict[str, Any]:
        """Predictions for every task (in order); a task whose image or prediction fails, or
        that ``budget`` leaves no time for, gets none (``[]``, so that Label Studio asks again
        later) and an entry in ``errors``. Tasks go through ``CHUNK_TASKS`` at a time, so memory
        holds one chunk's images, whatever the call's size."""
        budget = budget or Budget()
        keys = sorted({c.value for c in config.of_type(*PREDICTED)})
        if not keys:
            raise RequestError(
                "the labeling config has no RectangleLabels, BrushLabels or "
                "PolygonLabels on an <Image>: nothing to predict"
            )
        classes = self.prompt_classes(config)
        results: list = []
        errors: dict[int, str] = {}
        unknown: set[str] = set()
        for start in range(0, len(tasks), CHUNK_TASKS):
            indexes = range(start, min(start + CHUNK_TASKS, len(tasks)))
            founds = self._detect_chunk(tasks, indexes, keys, errors, budget, classes=classes)
            for t in sorted(founds):
                pred, missing = self._task_prediction(t, founds[t], config, errors)
                results.append(pred)
                unknown |= set(missing)
        if unknown:
            log.warning("classes without a label in the labeling config: %s", sorted(unknown))
        if budget.stopped():
            log.warning(
                "predict stopped (%s); %d of %d tasks without a prediction",
                budget.stopped(),
                len(errors),
                len(tasks),
            )
        return {
            "results": results,
            "model_version": self.version,
            "unknown_classes": sorted(unknown),
            "errors": [
                {"index": t, "task": task_id(tasks[t]), "error": errors[t]} for t in sorted(errors)
            ],
        }

    def _task_prediction(
        self, t: int, founds: dict[str, Found], config: LabelConfig, errors: dict[int, str]
    ) -> tuple[Any, list[str]]:
        """Task ``t``'s prediction and unknown classes; ``[]`` when it failed (Label Studio asks
        again next time), and an entry in ``errors`` when that failure is new."""
        if t in errors:
            return [], []
        try:
            return task_prediction(founds, config, model_version=self.version)
        except Exception as e:  # noqa: BLE001 - reported for this task only
            log.exception("task %s: prediction failed", t)
            errors[t] = f"prediction failed: {type(e).__name__}: {e}"
            return [], []

    def _detect_chunk(
        self,
        tasks: Sequence[Mapping[str, Any]],
        indexes: range,
        keys: list[str],
        errors: dict[int, str],
        budget: Budget,
        *,
        classes: Sequence[str] | None = None,
    ) -> dict[int, dict[str, Found]]:
        """``{task index: {data key: Found}}`` for the tasks at ``indexes`` (every index, empty
        where it failed), prompted with ``classes`` (None: the server's); failures go to
        ``errors``. Images are fetched in parallel, until ``budget`` stops the call (downloads
        still running then are left to their timeout)."""
        wanted = [(t, k) for t in indexes for k in keys]
        loaded = self._fetch(tasks, wanted, budget)
        errors.update({t: err for (t, _), (_, err) in zip(wanted, loaded, strict=True) if err})
        good = [
            (t, k, img) for (t, k), (img, _) in zip(wanted, loaded, strict=True) if t not in errors
        ]
        founds: dict[int, dict[str, Found]] = {t: {} for t in indexes}
        if good and budget.stopped():
            errors.update({t: str(budget.stopped()) for t, _, _ in good})
            return founds
        for (t, k, _), found in zip(good, self._detect(good, errors, classes), strict=True):
            if found is not None:
                founds[t][k] = found
        return founds

    def _fetch(
        self, tasks: Sequence[Mapping[str, Any]], wanted: list[tuple[int, str]], budget: Budget
    ) -> list[tuple[Any, str | None]]:
        """``_task_image`` of each (task index, data key) in ``wanted``, ``FETCH_WORKERS`` at a
        time; (None, why) for those ``budget`` stopped."""
        pool = ThreadPoolExecutor(FETCH_WORKERS)
        futures = [pool.submit(self._task_image, tasks[t], k, budget) for t, k in wanted]
        pending: set[Future] = set(futures)
        while pending and not budget.stopped():
            _, pending = wait(
                pending, timeout=min(POLL_S, budget.left()), return_when=FIRST_COMPLETED
            )
        pool.shutdown(wait=False, cancel_futures=True)
        return [(None, str(budget.stopped())) if f in pending else f.result() for f in futures]

    def _detect(
        self,
        good: list[tuple[int, str, TaskImage]],
        errors: dict[int, str],
        classes: Sequence[str] | None = None,
    ) -> Sequence[Found | None]:
        """Detections of the images in ``good`` (task index, key, image) of ``classes`` (None:
        the server's), batched; if a batch fails, image by image, so that only the task whose
        image breaks the model gets an error (None in its place)."""
        try:
            return self.teachers.detect([image for _, _, image in good], classes=classes)
        except Exception:  # noqa: BLE001 - isolated below, per image
            out: list[Found | None] = []
            for t, _, image in good:
                try:
                    out += self.teachers.detect([image], classes=classes)
                except Exception as e:  # noqa: BLE001 - reported for this task only
                    log.exception("task %s: prediction failed", t)
                    errors[t] = f"prediction failed: {type(e).__name__}: {e}"
                    out.append(None)
            return out

    def _task_image(
        self, task: Mapping[str, Any], data_key: str, budget: Budget | None = None
    ) -> tuple[Any, str | None]:
        """(image, None) or (None, error message) for one task's image; a download gets the
        time ``budget`` has left, at most ``--fetch-timeout``."""
        budget = budget or Budget()
        if budget.stopped():
            return None, budget.stopped()
        data = task.get("data") if isinstance(task, Mapping) else None
        if not isinstance(data, Mapping) or data_key not in data:
            return None, f"task has no data.{data_key} (the image the labeling config names)"
        sources = replace(self.sources, timeout_s=min(self.sources.timeout_s, budget.left()))
        try:
            return load_task_image(data[data_key], sources), None
        except ImageSourceError as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 - a URL nobody foresaw fails its task only
            # the message names no server path (the log has them)
            log.exception("data.%s %r: cannot read the image", data_key, data[data_key])
            return None, f"{data[data_key]!r}: cannot read the image ({type(e).__name__})"

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

        def load() -> TaskImage:
            image, error = self._task_image(tasks[0], data_key)
            if error:
                raise ImageSourceError(error)
            return image

        try:
            mask, score = self.teachers.segment(str(url), load, prompts)
        except ImageSourceError as e:
            raise RequestError(f"task {tasks[0].get('id')}: {e}") from e
        pred = interactive_prediction(
            mask,
            score,
            controls=controls,
            label=prompts.label,
            model_version=self.version,
            id_prefix=f"smart{secrets.token_hex(4)}-",  # one per answer (see the function)
        )
        errors = []
        if not pred["result"]:
            why = no_mask_reason(prompts)
            log.warning("task %s: smart tool: %s", task_id(tasks[0]), why)
            errors.append({"index": 0, "task": task_id(tasks[0]), "error": why})
        return {"results": [pred], "model_version": self.version, "errors": errors}


def no_mask_reason(prompts: Prompts) -> str:
    """Why SAM's answer to ``prompts`` holds no region, and what to click instead."""
    positive = int(prompts.point_labels.sum())
    clicks = f"{positive} positive and {len(prompts.point_labels) - positive} negative clicks"
    if prompts.box_xyxy is not None:
        clicks += " and a box"
    return (
        f"no mask: SAM found no object at the {clicks}; click inside the object (a positive "
        "click), or draw a box around it"
    )


def task_id(task: Any) -> str | int | None:
    """A task's ``id`` as the reply's ``errors`` echo it: a string or integer, else None."""
    value = task.get("id") if isinstance(task, Mapping) else None
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def project_id(project: str | int) -> str:
    """Label Studio sends ``"<id>.<created timestamp>"``; configs are kept by ``<id>``."""
    return str(project).split(".", 1)[0]
