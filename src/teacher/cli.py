"""The ``teacher`` command: the library from the shell, outside the pipeline.

Subcommands live in :data:`COMMANDS`. Adding one is a few lines: write
``configure(parser)`` (its arguments) and ``run(args) -> exit code``, then add
``"name": Command(help, configure, run)`` to the registry. ``TeacherError`` raised by ``run``
is printed without a traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teacher.core.errors import TeacherError
from teacher.core.params import LabelParams, ParamsError, ValidateParams, load_params
from teacher.serve.command import configure as _serve_configure
from teacher.serve.command import run as _serve_run
from teacher.serve.project import configure as _ls_setup_configure
from teacher.serve.project import run as _ls_setup_run

if TYPE_CHECKING:
    from teacher.inference.job import Labeled


@dataclass(frozen=True)
class Command:
    help: str  # one line, shown by `teacher --help`
    configure: Callable[[argparse.ArgumentParser], None]  # adds the subcommand's arguments
    run: Callable[[argparse.Namespace], int]  # does the work, returns the exit code


# --- validate ------------------------------------------------------------------------------


def _validate_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("annotations", help="COCO JSON to check (never modified)")
    p.add_argument(
        "--images",
        help="image root that file_name is relative to; without it, image files are not checked",
    )
    p.add_argument("--out", help="write the validated (fixed) copy here")
    p.add_argument("--report", help="write the full report (every finding with all ids) here")
    p.add_argument(
        "--params",
        default="params.yaml",
        help="its validate section sets on_error, min_box_size, min_instances "
        "(defaults when the file is absent)",
    )


def refuse_overwrite(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """``TeacherError`` when an output path is one of the inputs (the user's file would be
    overwritten) or two outputs are the same file."""
    seen: dict[Path, str] = {}
    for flag, path in inputs.items():
        if path:
            seen[Path(path).resolve()] = flag
    for flag, path in outputs.items():
        if not path:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise TeacherError(
                f"{flag} {path} is the same file as {seen[resolved]}: it would be "
                "overwritten; write to another path"
            )
        seen[resolved] = flag


def _validate_run(args: argparse.Namespace) -> int:
    from teacher.coco.io import save_coco, save_json
    from teacher.core.params import SplitParams
    from teacher.dataset.splitting import split_size_warning
    from teacher.dataset.validation.report import summary_text, validation_report
    from teacher.dataset.validation.validator import validate_file, validate_options

    refuse_overwrite(
        {"the annotations": args.annotations}, {"--out": args.out, "--report": args.report}
    )
    params = load_params(args.params) if Path(args.params).is_file() else None
    checks = params["validate"] if params else ValidateParams()
    split = params["split"] if params else SplitParams()
    result = validate_file(args.annotations, images=args.images, **validate_options(checks))
    if args.report:
        source = {"annotations": args.annotations, "images": args.images}
        save_json(validation_report(result, on_error=checks.on_error, source=source), args.report)
    print(summary_text(result, source=args.annotations, report_path=args.report))
    failed = bool(result.fatal or (result.errors and checks.on_error == "fail"))
    annotated = len({a["image_id"] for a in result.coco["annotations"]})
    warning = (
        None
        if result.fatal
        else split_size_warning(
            annotated, fractions={"train": split.train, "val": split.val, "test": split.test}
        )
    )
    if warning:
        print(f"warning: {warning}")
    if args.out and not failed:
        save_coco(result.coco, args.out)
        print(
            f"wrote {args.out}: {len(result.coco['images'])} images, "
            f"{len(result.coco['annotations'])} annotations"
        )
    return 1 if failed else 0


# --- predict -------------------------------------------------------------------------------


def _model_params(path: str) -> dict:
    """params.yaml's sections (defaults when the file is absent)."""
    from teacher.core.params import SECTIONS

    if Path(path).is_file():
        return load_params(path)
    return {name: cls() for name, cls in SECTIONS.items()}


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _adapter_scale_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter-scale",
        type=float,
        default=None,
        help="scale of both adapters, >= 0: 0 = the base models, 1 = as trained (1), between = "
        "a blend that keeps more of the base models' open vocabulary (docs/METRICS.md: the forgetting guard)",
    )


def _teacher_scale(args: argparse.Namespace) -> float:
    """``--adapter-scale`` (default 1); refused beside ``--student``, which has no adapters."""
    if args.student:
        if args.adapter_scale is not None:
            raise TeacherError(
                "--adapter-scale scales the teachers' adapters; the student (--student) has "
                "none: drop one of the two"
            )
        return 1.0
    return 1.0 if args.adapter_scale is None else args.adapter_scale


def _predict_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", help="folder of unlabeled images (searched recursively)")
    p.add_argument(
        "--classes",
        help='comma-separated class names, e.g. "cat,dog"; default: '
        "the classes the DINO adapter was trained on",
    )
    p.add_argument(
        "--adapters",
        help="folder holding the trained dino/ and sam/ adapters "
        "(models/); without it, the base models",
    )
    p.add_argument("--out", required=True, help="COCO json to write (boxes, RLE masks, scores)")
    p.add_argument(
        "--params",
        default="params.yaml",
        help="its dino and sam sections name the models and default thresholds",
    )
    p.add_argument(
        "--score-threshold",
        type=_fraction,
        help="min detection score, 0..1 (default dino.box_threshold)",
    )
    p.add_argument(
        "--text-threshold",
        type=_fraction,
        help="min class score, 0..1 (default dino.text_threshold)",
    )
    p.add_argument(
        "--nms-iou",
        type=_fraction,
        default=LabelParams().nms_iou,
        help=f"per-class NMS IoU, 0..1; 1 disables ({LabelParams().nms_iou:g}, as label.nms_iou)",
    )
    p.add_argument(
        "--agnostic-nms-iou",
        type=_fraction,
        default=LabelParams().agnostic_nms_iou,
        help="NMS IoU across class names (the same object under two names), 0..1; 1 disables "
        f"({LabelParams().agnostic_nms_iou:g}, as label.agnostic_nms_iou)",
    )
    p.add_argument("--max-detections", type=_positive, default=100, help="per image, >= 1 (100)")
    p.add_argument(
        "--batch-size", type=_positive, default=4, help="images per DINO forward, >= 1 (4)"
    )
    p.add_argument("--boxes-only", action="store_true", help="skip SAM: boxes without masks")
    _adapter_scale_argument(p)
    p.add_argument(
        "--format",
        choices=("coco", "label-studio"),
        default="coco",
        help="coco: one COCO json; label-studio: tasks with predictions to import",
    )
    p.add_argument(
        "--label-config",
        help="label-studio: the project's labeling config XML "
        "(default: written beside --out, RectangleLabels + BrushLabels of the classes)",
    )
    p.add_argument(
        "--image-url-prefix",
        help="label-studio: prepended to each file's path under "
        "the folder (default /data/local-files/?d=<folder>/)",
    )
    p.add_argument(
        "--processes",
        type=_positive,
        default=1,
        help="data-parallel processes on this machine, >= 1 (one per GPU; on CPU each takes its "
        "share of the cores); inside accelerate launch / torchrun every rank takes part",
    )
    p.add_argument(
        "--shard-size", type=_positive, default=1000, help="images per shard, >= 1 (1000)"
    )
    p.add_argument(
        "--shards",
        help="folder of finished shards (default: OUT.shards beside --out); removed when done",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the shards an interrupted run left (made with the same settings); "
        "without it, a run starts over",
    )
    p.add_argument(
        "--student",
        help="label with a trained student instead of the teachers: "
        "models/student (PyTorch) or a `teacher export --student` folder (ONNX); "
        "--score-threshold defaults to student.score_threshold",
    )


def _predict_run(args: argparse.Namespace) -> int:
    from functools import partial

    from teacher.core.digest import folder_digest
    from teacher.inference.predict import filter_from_args, parse_classes, predict_detector

    params = _model_params(args.params)
    scale = _teacher_scale(args)
    if args.student:
        return _predict_student(args, params)
    dino, sam = params["dino"], params["sam"]
    classes = parse_classes(args.classes) if args.classes else None
    keep = filter_from_args(args, default_score=dino.box_threshold)
    text = dino.text_threshold if args.text_threshold is None else args.text_threshold
    loader = partial(
        predict_detector,
        classes=classes,
        adapters=args.adapters,
        dino=dino,
        sam=sam,
        segment_masks=not args.boxes_only,
        adapter_scale=scale,
        keep=keep,
        text_threshold=text,
    )
    settings = {
        "classes": classes,
        "adapters": folder_digest(args.adapters) if args.adapters else None,
        "models": [dino.model, dino.revision, dino.shortest_edge, dino.longest_edge, sam.model],
        "filter": [
            keep.score_threshold,
            keep.nms_iou,
            keep.agnostic_iou,
            keep.max_detections,
            text,
        ],
        "masks": [not args.boxes_only, sam.multimask],
        "adapter_scale": scale,
    }
    done = _run_predict_job(args, loader, settings)
    if done is None:  # another rank of a distributed launch: the main process writes
        return 0
    if args.format == "label-studio":
        from teacher.serve.command import save_label_studio_tasks

        summary = save_label_studio_tasks(
            done,
            out=args.out,
            images=args.images,
            label_config=args.label_config,
            image_url_prefix=args.image_url_prefix,
            masks=not args.boxes_only,
            adapters=args.adapters,
            classes=args.classes,
            dino_model=dino.model,
            sam_model=sam.model,
            adapter_scale=scale,
        )
    else:
        summary = _write_predictions(args, done)
    _predict_summary(args, done, summary)
    return 0


def _predict_student(args: argparse.Namespace, params: dict) -> int:
    """``teacher predict --student``: the student (PyTorch or ONNX) labels the folder."""
    from functools import partial

    from teacher.core.digest import file_sha256, folder_digest
    from teacher.inference.predict import filter_from_args
    from teacher.inference.student import student_detector
    from teacher.student.onnx import load_any_student

    load_any_student(args.student)  # a wrong path is said now, not in every process
    keep = filter_from_args(args, default_score=params["student"].score_threshold)
    path = Path(args.student)
    settings = {
        "student": file_sha256(path) if path.is_file() else folder_digest(path),
        "filter": [keep.score_threshold, keep.nms_iou, keep.max_detections],
    }
    done = _run_predict_job(args, partial(student_detector, path=path, keep=keep), settings)
    if done is None:
        return 0
    _predict_summary(args, done, _write_predictions(args, done))
    return 0


def _run_predict_job(args: argparse.Namespace, loader: Any, settings: dict) -> Labeled | None:
    """The labeling job of `teacher predict`: shards in ``--shards`` (kept after a crash, reused
    with ``--resume``), ``--processes`` processes; the job's result once every shard is done."""
    from teacher.core.digest import code_digest
    from teacher.inference.job import Job, clear_shards, run_job
    from teacher.inference.predict import list_images

    list_images(args.images)  # not a folder: said before anything loads
    shard_dir = (
        Path(args.shards)
        if args.shards
        else Path(args.out).with_name(Path(args.out).name + ".shards")
    )
    if not args.resume:
        clear_shards(shard_dir)
    job = Job(
        folder=Path(args.images),
        shard_dir=shard_dir,
        loader=loader,
        settings={**settings, "batch_size": args.batch_size, "code": code_digest()},
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        processes=args.processes,
    )
    return run_job(job)


def _write_predictions(args: argparse.Namespace, done: Labeled) -> dict:
    """The merged COCO document at ``--out``; nothing is left there when no image was read."""
    from teacher.inference.shards import ordered_records, write_merged

    out = Path(args.out)
    summary = write_merged(
        out,
        lambda: ordered_records(done.shards, done.images),
        categories=[{"id": c, "name": n} for c, n in done.categories],
        info={"description": done.description},
    )
    if summary["images"] == 0:
        out.unlink()
    return summary


def _predict_summary(args: argparse.Namespace, done: Labeled, summary: dict) -> None:
    """Unreadable images on stderr; exit non-zero (TeacherError) when no image was read."""
    from teacher.inference.job import clear_shards, no_image_error

    for item in summary["unreadable"]:
        print(f"skipped unreadable image {item['file']}: {item['reason']}", file=sys.stderr)
    if summary["images"] == 0:
        raise no_image_error(Path(args.images), len(summary["unreadable"]))
    clear_shards(done.shard_dir)
    print(
        f"wrote {args.out}: {summary['images']} images, {summary['annotations']} detections"
        f" ({len(summary['unreadable'])} unreadable images skipped)"
    )


# --- export --------------------------------------------------------------------------------


def _export_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", default="models", help="folder holding dino/ and sam/ (models)")
    p.add_argument(
        "--out",
        required=True,
        help="new or empty folder for dino/ (save_pretrained) and sam.pth (SAM) or sam/ (SAM 2, save_pretrained) (see --force)",
    )
    p.add_argument(
        "--params", default="params.yaml", help="its dino and sam sections name the base models"
    )
    p.add_argument(
        "--student",
        nargs="?",
        const="models/student",
        default=None,
        metavar="DIR",
        help="export the trained student (default models/student) instead of the "
        "teachers: OUT/student.onnx + student.json",
    )
    p.add_argument(
        "--format", choices=["onnx"], default="onnx", help="student export format (onnx)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty --out folder whole, once the new export is complete "
        "(without it, a non-empty --out is refused)",
    )
    _adapter_scale_argument(p)


def _export_run(args: argparse.Namespace) -> int:
    from teacher.inference.export import export_all, replaced_folder

    scale = _teacher_scale(args)
    if args.student:
        from teacher.student.onnx import export_onnx

        with replaced_folder(args.out, force=args.force, keep=[Path(args.student)]) as new:
            written = export_onnx(args.student, new)
        print(f"export: student -> {Path(args.out) / written.name}")
        return 0
    params = _model_params(args.params)
    export_all(
        args.adapters,
        args.out,
        dino=params["dino"],
        sam=params["sam"],
        adapter_scale=scale,
        force=args.force,
    )
    return 0


# --- prune-cache ---------------------------------------------------------------------------


def _prune_cache_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "cache",
        nargs="?",
        default="checkpoints/sam_embeddings",
        help="the SAM embedding cache of decoder-only training (checkpoints/sam_embeddings)",
    )
    p.add_argument(
        "--max-gib",
        type=float,
        help="keep at most this many GiB, least recently used "
        "removed first (default: sam.embedding_cache_gib)",
    )
    p.add_argument(
        "--annotations",
        help="COCO json of the current data (e.g. data/validated.json): "
        "with --images, entries of other images (edited, removed) and of other encoders "
        "than sam.model's are stale and removed",
    )
    p.add_argument("--images", help="image root of --annotations")
    p.add_argument(
        "--params", default="params.yaml", help="its sam section (model, embedding_cache_gib)"
    )


def _prune_cache_run(args: argparse.Namespace) -> int:
    from teacher.sam.data import prune_embedding_cache

    sam_params = _model_params(args.params)["sam"]
    if bool(args.annotations) != bool(args.images):
        raise TeacherError(
            "pass --annotations and --images together (the current data), or neither"
        )
    current = None
    if args.annotations:
        from teacher.coco.io import load_coco
        from teacher.sam.build import load_base_sam
        from teacher.sam.data import embedding_folder, embedding_paths

        folder = embedding_folder(load_base_sam(sam_params.model), args.cache)
        current = embedding_paths(folder, load_coco(args.annotations), args.images).values()
    max_gib = sam_params.embedding_cache_gib if args.max_gib is None else args.max_gib
    done = prune_embedding_cache(args.cache, max_bytes=int(max_gib * 2**30), current=current)
    print(
        f"{args.cache}: removed {done.removed} files ({done.freed / 2**20:.1f} MiB); "
        f"{done.kept} left ({done.size / 2**20:.1f} MiB, bound {max_gib:g} GiB)"
    )
    return 0


# --- registry ------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "validate": Command(
        "check a COCO export (and write a fixed copy)", _validate_configure, _validate_run
    ),
    "predict": Command(
        "auto-label a folder of images with Grounded-SAM (COCO boxes + masks)",
        _predict_configure,
        _predict_run,
    ),
    "serve": Command(
        "serve the teachers to Label Studio (ML backend: pre-labels, smart tools)",
        _serve_configure,
        _serve_run,
    ),
    "label-studio-setup": Command(
        "a Label Studio project over a folder of images: labeling config, local storage, "
        "tasks, the model connected",
        _ls_setup_configure,
        _ls_setup_run,
    ),
    "export": Command(
        "merge the adapters into full DINO (save_pretrained) and SAM (.pth) models",
        _export_configure,
        _export_run,
    ),
    "prune-cache": Command(
        "bound the SAM embedding cache: drop stale entries, then least recently used",
        _prune_cache_configure,
        _prune_cache_run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teacher", description="Fine-tuned teachers from the shell, outside the DVC pipeline."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (TeacherError, ParamsError) as e:
        print(f"teacher {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
