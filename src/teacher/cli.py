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

from teacher.errors import TeacherError
from teacher.params import ParamsError, ValidateParams, load_params


@dataclass(frozen=True)
class Command:
    help: str  # one line, shown by `teacher --help`
    configure: Callable[[argparse.ArgumentParser], None]  # adds the subcommand's arguments
    run: Callable[[argparse.Namespace], int]  # does the work, returns the exit code


# --- validate ------------------------------------------------------------------------------


def _validate_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("annotations", help="COCO JSON to check (never modified)")
    p.add_argument("--images", help="image root that file_name is relative to; "
                   "without it, image files are not checked")
    p.add_argument("--out", help="write the validated (fixed) copy here")
    p.add_argument("--report", help="write the full report (every finding with all ids) here")
    p.add_argument("--params", default="params.yaml",
                   help="its validate section sets on_error, min_box_size, min_instances "
                   "(defaults when the file is absent)")


def _validate_run(args: argparse.Namespace) -> int:
    from teacher.checks import summary_text, validate_file, validation_report
    from teacher.coco import save_coco, save_json

    checks = load_params(args.params)["validate"] if Path(args.params).is_file() else ValidateParams()
    result = validate_file(args.annotations, images=args.images, on_error=checks.on_error,
                           min_box_size=checks.min_box_size, min_instances=checks.min_instances)
    if args.report:
        source = {"annotations": args.annotations, "images": args.images}
        save_json(validation_report(result, on_error=checks.on_error, source=source), args.report)
    print(summary_text(result, source=args.annotations, report_path=args.report))
    fatal = result.counts["not_json"] or result.counts["not_coco"]
    failed = bool(fatal or (result.errors and checks.on_error == "fail"))
    if args.out and not failed:
        save_coco(result.coco, args.out)
        print(f"wrote {args.out}: {len(result.coco['images'])} images, "
              f"{len(result.coco['annotations'])} annotations")
    return 1 if failed else 0


# --- predict -------------------------------------------------------------------------------


def _model_params(path: str) -> dict:
    """params.yaml's sections (defaults when the file is absent)."""
    from teacher.params import SECTIONS

    if Path(path).is_file():
        return load_params(path)
    return {name: cls() for name, cls in SECTIONS.items()}


def _predict_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", help="folder of unlabeled images (searched recursively)")
    p.add_argument("--classes", help='comma-separated class names, e.g. "cat,dog"; default: '
                   "the classes the DINO adapter was trained on")
    p.add_argument("--adapters", help="folder holding the trained dino/ and sam/ adapters "
                   "(models/); without it, the base models")
    p.add_argument("--out", required=True, help="COCO json to write (boxes, RLE masks, scores)")
    p.add_argument("--params", default="params.yaml",
                   help="its dino and sam sections name the models and default thresholds")
    p.add_argument("--score-threshold", type=float, help="min detection score (default dino.box_threshold)")
    p.add_argument("--text-threshold", type=float, help="min class score (default dino.text_threshold)")
    p.add_argument("--nms-iou", type=float, default=0.7, help="per-class NMS IoU; 1 disables (0.7)")
    p.add_argument("--max-detections", type=int, default=100, help="per image (100)")
    p.add_argument("--batch-size", type=int, default=4, help="images per DINO forward (4)")
    p.add_argument("--boxes-only", action="store_true", help="skip SAM: boxes without masks")
    p.add_argument("--student", help="label with a trained student instead of the teachers: "
                   "models/student (PyTorch) or a `teacher export --student` folder (ONNX); "
                   "--score-threshold defaults to student.score_threshold")


def _predict_run(args: argparse.Namespace) -> int:
    from teacher.coco import save_coco
    from teacher.predict import Filter, label_folder, load_predict_teachers, parse_classes

    params = _model_params(args.params)
    if args.student:
        return _predict_student(args, params)
    dino = params["dino"]
    teachers = load_predict_teachers(
        classes=parse_classes(args.classes) if args.classes else None, adapters=args.adapters,
        dino_params=dino, sam_params=params["sam"], segment_masks=not args.boxes_only)
    keep = Filter(
        score_threshold=dino.box_threshold if args.score_threshold is None else args.score_threshold,
        nms_iou=args.nms_iou, max_detections=args.max_detections)
    text = dino.text_threshold if args.text_threshold is None else args.text_threshold
    doc = label_folder(teachers, args.images, keep=keep, text_threshold=text,
                       batch_size=args.batch_size, multimask=params["sam"].multimask)
    save_coco(doc, args.out)
    for item in doc["info"]["unreadable"]:
        print(f"skipped unreadable image {item['file']}: {item['reason']}", file=sys.stderr)
    print(f"wrote {args.out}: {len(doc['images'])} images, {len(doc['annotations'])} detections"
          f" ({len(doc['info']['unreadable'])} unreadable images skipped)")
    return 0


def _predict_student(args: argparse.Namespace, params: dict) -> int:
    """``teacher predict --student``: the student (PyTorch or ONNX) labels the folder."""
    from teacher.coco import save_coco
    from teacher.predict import Filter
    from teacher.student.onnx import load_any_student
    from teacher.student_predict import label_with_student

    student = load_any_student(args.student)
    keep = Filter(score_threshold=params["student"].score_threshold if args.score_threshold is None
                  else args.score_threshold, nms_iou=args.nms_iou, max_detections=args.max_detections)
    doc = label_with_student(student, args.images, keep=keep, batch_size=args.batch_size)
    save_coco(doc, args.out)
    for item in doc["info"]["unreadable"]:
        print(f"skipped unreadable image {item['file']}: {item['reason']}", file=sys.stderr)
    print(f"wrote {args.out}: {len(doc['images'])} images, {len(doc['annotations'])} detections"
          f" ({len(doc['info']['unreadable'])} unreadable images skipped)")
    return 0


# --- export --------------------------------------------------------------------------------


def _export_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", default="models", help="folder holding dino/ and sam/ (models)")
    p.add_argument("--out", required=True, help="folder for dino/ (save_pretrained) and sam.pth")
    p.add_argument("--params", default="params.yaml", help="its dino and sam sections name the base models")
    p.add_argument("--student", nargs="?", const="models/student", default=None, metavar="DIR",
                   help="export the trained student (default models/student) instead of the "
                   "teachers: OUT/student.onnx + student.json")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="student export format (onnx)")


def _export_run(args: argparse.Namespace) -> int:
    from teacher.export import export_all

    if args.student:
        from teacher.student.onnx import export_onnx

        print(f"export: student -> {export_onnx(args.student, args.out)}")
        return 0
    params = _model_params(args.params)
    export_all(args.adapters, args.out, dino=params["dino"], sam=params["sam"])
    return 0


# --- prune-cache ---------------------------------------------------------------------------


def _prune_cache_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", nargs="?", default="checkpoints/sam_embeddings",
                   help="the SAM embedding cache of decoder-only training (checkpoints/sam_embeddings)")
    p.add_argument("--max-gib", type=float, help="keep at most this many GiB, least recently used "
                   "removed first (default: sam.embedding_cache_gib)")
    p.add_argument("--annotations", help="COCO json of the current data (e.g. data/validated.json): "
                   "with --images, entries of other images (edited, removed) and of other encoders "
                   "than sam.model's are stale and removed")
    p.add_argument("--images", help="image root of --annotations")
    p.add_argument("--params", default="params.yaml", help="its sam section (model, embedding_cache_gib)")


def _prune_cache_run(args: argparse.Namespace) -> int:
    from teacher.sam.data import prune_embedding_cache

    sam_params = _model_params(args.params)["sam"]
    if bool(args.annotations) != bool(args.images):
        raise TeacherError("pass --annotations and --images together (the current data), or neither")
    current = None
    if args.annotations:
        from teacher.coco import load_coco
        from teacher.sam.data import embedding_folder, embedding_paths
        from teacher.sam.model import load_base_sam

        folder = embedding_folder(load_base_sam(sam_params.model), args.cache)
        current = embedding_paths(folder, load_coco(args.annotations), args.images).values()
    max_gib = sam_params.embedding_cache_gib if args.max_gib is None else args.max_gib
    done = prune_embedding_cache(args.cache, max_bytes=int(max_gib * 2**30), current=current)
    print(f"{args.cache}: removed {done.removed} files ({done.freed / 2**20:.1f} MiB); "
          f"{done.kept} left ({done.size / 2**20:.1f} MiB, bound {max_gib:g} GiB)")
    return 0


# --- registry ------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "validate": Command("check a COCO export (and write a fixed copy)", _validate_configure,
                        _validate_run),
    "predict": Command("auto-label a folder of images with Grounded-SAM (COCO boxes + masks)",
                       _predict_configure, _predict_run),
    "export": Command("merge the adapters into full DINO (save_pretrained) and SAM (.pth) models",
                      _export_configure, _export_run),
    "prune-cache": Command("bound the SAM embedding cache: drop stale entries, then least recently used",
                           _prune_cache_configure, _prune_cache_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teacher", description="Fine-tuned teachers from the shell, outside the DVC pipeline.")
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
