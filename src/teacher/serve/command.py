"""``teacher serve``: arguments and run (registered in ``teacher.cli``). Secrets come from the
environment only (``TEACHER_SERVE_TOKEN``, ``LABEL_STUDIO_API_KEY``), never the command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teacher.core.params import LabelParams

if TYPE_CHECKING:
    from teacher.inference.job import Labeled


def model_params(path: str) -> dict:
    """params.yaml's sections (defaults when the file is absent), as ``teacher predict``."""
    from teacher.core.params import SECTIONS, load_params

    return load_params(path) if Path(path).is_file() else {n: c() for n, c in SECTIONS.items()}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapters",
        help="folder holding the trained dino/ and sam/ adapters "
        "(models/); without it, the base models",
    )
    p.add_argument(
        "--classes",
        help="comma-separated class names; default: the DINO adapter's, else the labels of "
        "each project's labeling config (its RectangleLabels, BrushLabels, PolygonLabels)",
    )
    p.add_argument(
        "--params",
        default="params.yaml",
        help="its dino and sam sections name the models and default thresholds",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=9090, help="port (9090, Label Studio's default)")
    p.add_argument(
        "--local-files-root",
        default=os.environ.get("LOCAL_FILES_DOCUMENT_ROOT"),
        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: /data/local-files/?d= images "
        "are read from here and may not leave it (default: that variable)",
    )
    p.add_argument(
        "--label-studio-url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio's address, for uploaded images (default: LABEL_STUDIO_URL;"
        " the API key comes from LABEL_STUDIO_API_KEY)",
    )
    p.add_argument(
        "--no-http", action="store_true", help="refuse http(s) image URLs outside Label Studio"
    )
    p.add_argument("--max-image-mb", type=float, default=50, help="per image file (50)")
    p.add_argument("--fetch-timeout", type=float, default=20, help="seconds per image (20)")
    p.add_argument(
        "--max-tasks",
        type=int,
        default=1000,
        help="tasks per /predict call (1000; Label Studio sends a whole selection)",
    )
    p.add_argument(
        "--call-timeout",
        type=positive(float),
        default=60,
        help="seconds per /predict call: tasks not done by then get an error, Label Studio "
        "asks again later (60; below Label Studio's own timeout, 100)",
    )
    p.add_argument(
        "--max-concurrent",
        type=positive(int),
        default=4,
        help="/predict calls at once; more get HTTP 429 with Retry-After (4)",
    )
    p.add_argument("--score-threshold", type=float, help="default dino.box_threshold")
    p.add_argument("--text-threshold", type=float, help="default dino.text_threshold")
    p.add_argument(
        "--nms-iou",
        type=float,
        default=LabelParams().nms_iou,
        help=f"per-class NMS IoU ({LabelParams().nms_iou:g}, as label.nms_iou)",
    )
    # off by default here, unlike label.agnostic_nms_iou: a project's labeling config may hold
    # only some of the teachers' classes, and the names it lacks are dropped after NMS, so a
    # detection under such a name would suppress the same object under a name the project has
    p.add_argument(
        "--agnostic-nms-iou",
        type=float,
        default=1.0,
        help="NMS IoU across class names; 1 disables (1: the labeling config may lack some of "
        f"the teachers' classes; label.agnostic_nms_iou is {LabelParams().agnostic_nms_iou:g})",
    )
    p.add_argument("--max-detections", type=int, default=100, help="per image (100)")
    p.add_argument("--batch-size", type=int, default=4, help="images per DINO forward (4)")
    p.add_argument(
        "--cache-images",
        type=int,
        default=8,
        help="images whose SAM embedding is kept for further clicks (8)",
    )
    p.add_argument("--boxes-only", action="store_true", help="no SAM: boxes only, no smart tools")
    p.add_argument(
        "--adapter-scale",
        type=float,
        default=1.0,
        help="scale of both adapters, >= 0: 0 = the base models, 1 = as trained (1), between = "
        "a blend that keeps more of the base models' open vocabulary (docs/METRICS.md: the forgetting guard)",
    )


def run(args: argparse.Namespace) -> int:
    from teacher.inference.predict import filter_from_args, parse_classes
    from teacher.serve.app import run_server
    from teacher.serve.backend import CLASSES_FROM_CONFIG, Backend
    from teacher.serve.sources import ImageSources
    from teacher.serve.teachers import load_serve_teachers

    params = model_params(args.params)
    dino = params["dino"]
    keep = filter_from_args(args, default_score=dino.box_threshold)
    teachers = load_serve_teachers(
        adapters=args.adapters,
        classes=parse_classes(args.classes) if args.classes else None,
        dino_params=dino,
        sam_params=params["sam"],
        keep=keep,
        text_threshold=dino.text_threshold if args.text_threshold is None else args.text_threshold,
        segment_masks=not args.boxes_only,
        batch_size=args.batch_size,
        cache_size=args.cache_images,
        adapter_scale=args.adapter_scale,
    )
    sources = ImageSources(
        local_root=Path(args.local_files_root) if args.local_files_root else None,
        ls_url=args.label_studio_url,
        api_key=os.environ.get("LABEL_STUDIO_API_KEY"),
        max_bytes=int(args.max_image_mb * 2**20),
        timeout_s=args.fetch_timeout,
        allow_http=not args.no_http,
        max_edge=teachers.working_edge,  # larger images are decoded straight to it
    )
    backend = Backend(
        teachers=teachers,
        sources=sources,
        max_tasks=args.max_tasks,
        call_timeout_s=args.call_timeout,
    )
    print(
        f"teacher serve: {teachers.model_version}, "
        f"classes {teachers.class_names or CLASSES_FROM_CONFIG}, "
        f"http://{args.host}:{args.port}",
        flush=True,
    )
    run_server(
        backend,
        host=args.host,
        port=args.port,
        token=os.environ.get("TEACHER_SERVE_TOKEN") or None,
        max_concurrent=args.max_concurrent,
    )
    return 0


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """argparse type: a number of ``kind`` above 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value

    return parse


def local_files_prefix(folder: str | Path) -> str:
    """``/data/local-files/?d=<folder>/``, the folder relative to the working directory when it
    is under it (start Label Studio with ``LOCAL_FILES_DOCUMENT_ROOT`` = that directory)."""
    path = Path(folder).resolve()
    try:
        rel = path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        rel = path.as_posix().lstrip("/")
    return "/data/local-files/?d=" + ("" if rel == "." else rel.rstrip("/") + "/")


def save_label_studio_tasks(
    done: Labeled,
    *,
    out: str | Path,
    images: str | Path,
    label_config: str | None,
    image_url_prefix: str | None,
    masks: bool,
    adapters: str | None,
    classes: str | None,
    dino_model: str,
    sam_model: str,
    adapter_scale: float = 1.0,
) -> dict[str, Any]:
    """``teacher predict --format label-studio``: tasks with predictions at ``out``; the
    labeling config (``label_config``, or a default one written beside ``out``) decides the
    regions; image URLs are ``image_url_prefix`` (default: local files of ``images``) + path.
    Streamed from the job's shards; returns what ``write_label_studio_tasks`` returns."""
    import sys

    from teacher.core.errors import TeacherError
    from teacher.inference.predict import parse_classes
    from teacher.inference.shards import ordered_records
    from teacher.serve.label_config import LabelConfigError, parse_label_config
    from teacher.serve.tasks import default_label_config, write_label_studio_tasks
    from teacher.serve.teachers import adapters_version

    out = Path(out)
    if label_config:
        if not Path(label_config).is_file():
            raise TeacherError(
                f"--label-config {label_config}: no such file; export the "
                "project's labeling config (Settings > Labeling Interface > Code)"
            )
        xml = Path(label_config).read_text()
    else:
        xml = default_label_config([name for _, name in done.categories], masks=masks)
        config_path = out.with_name(out.stem + ".label_config.xml")
        config_path.write_text(xml)
        print(f"wrote {config_path}: the labeling config to paste into the Label Studio project")
    try:
        config = parse_label_config(xml)
    except LabelConfigError as e:
        raise TeacherError(f"--label-config {label_config}: {e}") from e
    version = adapters_version(
        adapters,
        dino_model=dino_model,
        sam_model=sam_model,
        extra=parse_classes(classes) if classes else [],
        adapter_scale=adapter_scale,
    )
    summary = write_label_studio_tasks(
        ordered_records(done.shards, done.images),
        out,
        config,
        categories=[{"id": c, "name": n} for c, n in done.categories],
        url_prefix=image_url_prefix or local_files_prefix(images),
        model_version=version,
    )
    if summary["unknown"]:
        print(
            f"classes with no label in the labeling config (their detections are left out): "
            f"{', '.join(summary['unknown'])}",
            file=sys.stderr,
        )
    if summary["images"] == 0:
        out.unlink()
    return summary
