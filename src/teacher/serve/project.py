"""``teacher label-studio-setup``: a Label Studio project in which a labeler sees the images and
the teachers' predictions, made through Label Studio's REST API (registered in ``teacher.cli``).

The steps, each one API call (``LabelStudio`` sends them; ``SetupError`` says what failed and
what to do):

1. the labeling config (``--label-config``, or one made from the classes: ``--classes``, else
   those the running ``teacher serve`` at ``--model-url`` reports on ``/health``);
2. ``POST /api/projects``: the project, predictions shown to the labeler;
3. ``POST /api/storages/localfiles`` + ``/sync``: a Local Storage over the image folder. Label
   Studio serves ``/data/local-files/?d=...`` only under such a storage (else 404) and only when
   it was started with ``LOCAL_FILES_SERVING_ENABLED=true`` and a ``LOCAL_FILES_DOCUMENT_ROOT``
   above the folder; the sync makes a task per image (a later Sync adds new images);
4. ``POST /api/ml``: the connection to ``teacher serve`` (basic auth with
   ``TEACHER_SERVE_TOKEN``), interactive, predictions retrieved when a task opens;
5. a check: the first task's image answers 200 through Label Studio, as the browser asks for it.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from teacher.core.errors import TeacherError
from teacher.serve.sources import ImageSourceError, ImageSources, label_studio_headers
from teacher.serve.tasks import default_label_config

IMAGE_FILES = r"(?i).*\.(jpe?g|png|bmp|tiff?|webp)$"  # the storage's filter: teacher's image kinds
SYNC_TIMEOUT_S = 600.0  # a sync with a background worker: how long to wait for its tasks
SERVING_HINT = (
    "start Label Studio with LOCAL_FILES_SERVING_ENABLED=true and LOCAL_FILES_DOCUMENT_ROOT set "
    "to a folder above the images (e.g. the repository root)"
)


class SetupError(TeacherError):
    """A step of the setup failed: the message names the step, Label Studio's answer, a fix."""


@dataclass(frozen=True)
class LabelStudio:
    """Label Studio's REST API at ``url`` (no trailing slash), ``headers`` carrying the key."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0

    def call(
        self, method: str, path: str, *, step: str, ok: tuple[int, ...] = (200, 201), **kw: Any
    ) -> httpx.Response:
        """One API call; ``SetupError`` naming ``step`` when the answer's status is not in
        ``ok`` (an empty ``ok`` takes any answer)."""
        try:
            headers = {**self.headers, **kw.pop("headers", {})}
            r = httpx.request(
                method, self.url + path, headers=headers, timeout=self.timeout_s, **kw
            )
        except httpx.HTTPError as e:
            raise SetupError(
                f"{step}: {method} {self.url}{path} failed ({type(e).__name__}: {e})"
            ) from None
        if ok and r.status_code not in ok:
            raise SetupError(f"{step}: Label Studio answered HTTP {r.status_code}: {answer(r)}")
        return r


def connect_label_studio(url: str, api_key: str, *, timeout_s: float = 60.0) -> LabelStudio:
    """Label Studio at ``url``, its answer and the key checked: a legacy token or a personal
    access token (exchanged for an access token, as ``teacher serve`` does)."""
    url = url.rstrip("/")
    try:
        ok = httpx.get(url + "/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError as e:
        raise SetupError(
            f"Label Studio is not reachable at {url} ({type(e).__name__}: {e}): start it, or "
            "pass its address in --label-studio-url / LABEL_STUDIO_URL"
        ) from None
    if not ok:
        raise SetupError(f"{url}/health does not answer 200: is it Label Studio?")
    try:
        headers = label_studio_headers(
            ImageSources(ls_url=url, api_key=api_key, timeout_s=timeout_s)
        )
    except ImageSourceError as e:
        raise SetupError(str(e)) from None
    ls = LabelStudio(url, headers, timeout_s)
    who = ls.call("GET", "/api/current-user/whoami", step="checking the API key", ok=())
    if who.status_code in (401, 403):
        raise SetupError(
            f"Label Studio at {url} refused the API key in LABEL_STUDIO_API_KEY (HTTP "
            f"{who.status_code}): copy it from Account & Settings (a personal access token, or "
            "a legacy token where the organization allows them)"
        )
    return ls


def answer(r: httpx.Response) -> str:
    """What Label Studio said, short: its validation errors or detail, else the body's start."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict):
        details = body.get("validation_errors") or body.get("detail") or body
        return str(details)[:1000]
    return str(body)[:1000]


def model_health(model_url: str) -> dict[str, Any]:
    """``GET /health`` of a running ``teacher serve`` (open, no token needed)."""
    try:
        r = httpx.get(model_url.rstrip("/") + "/health", timeout=30)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise SetupError(
            f"--model-url {model_url}: no `teacher serve` answers there ({type(e).__name__}: "
            f"{e}); start it first (`teacher serve --adapters models/ ...`)"
        ) from None


def project_label_config(
    *,
    label_config: str | None,
    classes: list[str] | None,
    health: dict[str, Any] | None,
    boxes_only: bool,
) -> str:
    """The labeling config: the file's, or boxes (and masks, and click-to-segment when the
    model has SAM) of the classes given, else of the classes the model reports."""
    if label_config:
        path = Path(label_config)
        if not path.is_file():
            raise SetupError(f"--label-config {label_config}: no such file")
        return path.read_text()
    if not classes and health is not None and isinstance(health.get("classes"), list):
        classes = health["classes"]  # a string: the server takes each project's labels
    if not classes:
        raise SetupError(
            "no classes: pass --classes 'cat,dog' (or --label-config), or --model-url of a "
            "`teacher serve` started with adapters or --classes"
        )
    sam = health.get("sam", True) if health is not None else True
    masks = sam and not boxes_only
    return default_label_config(classes, masks=masks, smart=masks and health is not None)


def create_project(ls: LabelStudio, *, title: str, label_config: str) -> dict[str, Any]:
    """The project; the labeler's view starts from the predictions."""
    body = {"title": title, "label_config": label_config, "show_collab_predictions": True}
    return ls.call("POST", "/api/projects", step="creating the project", json=body).json()


def add_image_storage(ls: LabelStudio, *, project: int, folder: Path, sync: bool) -> dict:
    """A Local Storage over ``folder``, through which Label Studio serves its images; with
    ``sync``, synced: a task per image. Returns the storage as Label Studio reports it."""
    body = {
        "project": project,
        "title": f"teacher: {folder.name}",
        "path": str(folder),
        "regex_filter": IMAGE_FILES,
        "use_blob_urls": True,  # a task per image file, not a JSON file of tasks
        "recursive_scan": True,
    }
    r = ls.call(
        "POST", "/api/storages/localfiles", step="adding the Local Storage", ok=(), json=body
    )
    if r.status_code != 201:
        raise SetupError(
            f"adding a Local Storage over {folder}: Label Studio answered HTTP {r.status_code}: "
            f"{answer(r)}. {SERVING_HINT}"
        )
    storage = r.json()
    if not sync:
        return storage
    path = f"/api/storages/localfiles/{storage['id']}"
    ls.call("POST", path + "/sync", step="syncing the Local Storage (importing the images)")
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while (storage := ls.call("GET", path, step="reading the storage").json())["status"] in (
        "queued",
        "in_progress",
    ) and time.monotonic() < deadline:
        time.sleep(1)
    if storage["status"] not in ("completed", "completed_with_errors"):
        raise SetupError(
            f"syncing the Local Storage over {folder}: status {storage['status']!r} "
            f"({str(storage.get('traceback') or '')[-500:]})"
        )
    return storage


def import_tasks(ls: LabelStudio, *, project: int, tasks: Path) -> int:
    """The tasks of a file (``teacher predict --format label-studio``: with their predictions)
    imported into the project; returns how many."""
    if not tasks.is_file():
        raise SetupError(f"--tasks {tasks}: no such file (teacher predict --format label-studio)")
    r = ls.call(
        "POST",
        f"/api/projects/{project}/import",
        step=f"importing {tasks}",
        content=tasks.read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    return int(r.json().get("task_count", 0))


def connect_model(ls: LabelStudio, *, project: int, model_url: str, token: str | None) -> dict:
    """The model connection: interactive (smart tools), basic auth with the server's token."""
    auth = (
        {"auth_method": "BASIC_AUTH", "basic_auth_user": "label-studio", "basic_auth_pass": token}
        if token
        else {"auth_method": "NONE"}
    )
    body = {"url": model_url, "project": project, "title": "teacher", "is_interactive": True}
    r = ls.call("POST", "/api/ml", step="connecting the model", ok=(), json={**body, **auth})
    if r.status_code != 201:
        raise SetupError(
            f"connecting the model at {model_url}: Label Studio answered HTTP {r.status_code}: "
            f"{answer(r)}. Label Studio must reach that URL (on this machine start it with "
            "ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false), and TEACHER_SERVE_TOKEN "
            "must be the server's"
        )
    ls.call(
        "PATCH",
        f"/api/projects/{project}",
        step="asking for predictions when a task opens",
        json={"evaluate_predictions_automatically": True},
    )
    return r.json()


def check_first_image(ls: LabelStudio, *, project: int) -> tuple[int, str]:
    """The project's task count and its first task's image URL, which must answer 200 through
    Label Studio, as the labeler's browser asks for it."""
    tasks = ls.call("GET", "/api/tasks", step="listing the tasks", params={"project": project})
    found = tasks.json()
    if not found.get("total", len(found.get("tasks", []))) or not found.get("tasks"):
        raise SetupError(
            "the Local Storage imported no task: the folder holds no image (.jpg, .png, .bmp, "
            ".tif, .webp)"
        )
    url = next(iter(found["tasks"][0]["data"].values()))
    path = url if url.startswith("/") else "/" + url.split("/", 3)[-1]
    r = ls.call("GET", path, step=f"reading the first image {url}", ok=())
    if r.status_code != 200:
        raise SetupError(
            f"Label Studio answers HTTP {r.status_code} for the first image ({url}): the "
            f"labeler would see no image; {SERVING_HINT}"
        )
    return int(found.get("total", len(found["tasks"]))), url


def given_classes(text: str) -> list[str]:
    """``--classes`` read as ``teacher predict`` reads it (imported here only: it loads torch)."""
    from teacher.inference.predict import parse_classes

    return parse_classes(text)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images",
        help="folder of images, under Label Studio's LOCAL_FILES_DOCUMENT_ROOT (not the root "
        "itself); a task per image, subfolders included",
    )
    p.add_argument(
        "--tasks",
        help="import these tasks (`teacher predict --format label-studio`'s file, predictions "
        "included) instead of a task per image; their URLs must point into the folder",
    )
    p.add_argument("--title", help="project title (default: teacher: <folder name>)")
    p.add_argument("--classes", help="comma-separated labels (default: the model's classes)")
    p.add_argument(
        "--label-config",
        help="a labeling config XML file to use as it is (with --tasks, default: the "
        "<tasks>.label_config.xml `teacher predict` wrote beside them)",
    )
    p.add_argument("--boxes-only", action="store_true", help="RectangleLabels only, no masks")
    p.add_argument(
        "--model-url",
        help="a running `teacher serve` (e.g. http://127.0.0.1:9090) to connect; its token "
        "comes from TEACHER_SERVE_TOKEN",
    )
    p.add_argument(
        "--label-studio-url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio's address (default: LABEL_STUDIO_URL; the API key comes from "
        "LABEL_STUDIO_API_KEY)",
    )


def run(args: argparse.Namespace) -> int:
    folder = Path(args.images).resolve()
    if not folder.is_dir():
        raise SetupError(f"{args.images}: not a folder; pass the folder of images to label")
    key = os.environ.get("LABEL_STUDIO_API_KEY")
    if not args.label_studio_url or not key:
        raise SetupError(
            "set LABEL_STUDIO_URL (or --label-studio-url) and LABEL_STUDIO_API_KEY (Label "
            "Studio: Account & Settings > Access Token)"
        )
    health = model_health(args.model_url) if args.model_url else None
    tasks = Path(args.tasks) if args.tasks else None
    beside = tasks.with_name(tasks.stem + ".label_config.xml") if tasks else None
    xml = project_label_config(
        label_config=args.label_config or (str(beside) if beside and beside.is_file() else None),
        classes=given_classes(args.classes) if args.classes else None,
        health=health,
        boxes_only=args.boxes_only,
    )
    ls = connect_label_studio(args.label_studio_url, key)
    project = create_project(ls, title=args.title or f"teacher: {folder.name}", label_config=xml)
    add_image_storage(ls, project=project["id"], folder=folder, sync=tasks is None)
    if tasks is not None:
        print(f"imported {import_tasks(ls, project=project['id'], tasks=tasks)} tasks from {tasks}")
    if args.model_url:
        token = os.environ.get("TEACHER_SERVE_TOKEN") or None
        ml = connect_model(ls, project=project["id"], model_url=args.model_url, token=token)
        print(f"model {ml.get('model_version')} connected ({ml.get('readable_state')})")
    count, url = check_first_image(ls, project=project["id"])
    print(f"{count} tasks, images served by Label Studio (first: {url})")
    print(f"label at {ls.url}/projects/{project['id']}/data")
    return 0
