"""evaluate stage: score the teachers on the test split; write DVC metrics and plots.

    python -m stages.evaluate --test data/split/test.json --images data/sample/images \
        --dino models/dino --sam models/sam --student models/student --out metrics/evaluate
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from teacher.coco.io import load_coco, save_json
from teacher.core.errors import TeacherError
from teacher.core.params import ParamsError, load_params
from teacher.evaluation.gallery import save_panel
from teacher.evaluation.report import Report, evaluate_test_split


def safe_name(name: str) -> str:
    """A class name usable as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def save_report(report: Report, out: Path) -> None:
    """metrics.json, plots/pr/<class>.csv (recall, precision), plots/gallery/<image>.png,
    plots/tradeoff.json (per adapter scale: scale, retention, gain)."""
    plots = out / "plots"
    shutil.rmtree(plots, ignore_errors=True)
    (plots / "pr").mkdir(parents=True)
    (plots / "gallery").mkdir(parents=True)
    save_json(report.metrics, out / "metrics.json")
    save_json(report.tradeoff, plots / "tradeoff.json")
    for name, points in report.curves.items():
        rows = [f"{p['recall']},{p['precision']}" for p in points]
        (plots / "pr" / f"{safe_name(name)}.csv").write_text(
            "recall,precision\n" + "\n".join(rows) + "\n"
        )
    for stem, panel in report.panels.items():
        save_panel(panel, plots / "gallery" / f"{safe_name(stem)}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, required=True, help="test split (COCO json)")
    parser.add_argument("--images", type=Path, required=True, help="image root")
    parser.add_argument("--dino", type=Path, required=True, help="DINO adapter folder")
    parser.add_argument("--sam", type=Path, required=True, help="SAM adapter folder")
    parser.add_argument(
        "--student",
        type=Path,
        help="trained student folder (models/student): "
        "adds student/... and the teachers' and student's ms_per_image",
    )
    parser.add_argument("--out", type=Path, required=True, help="metrics/evaluate folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        report = evaluate_test_split(
            load_coco(args.test),
            args.images,
            dino_dir=args.dino,
            sam_dir=args.sam,
            dino_params=params["dino"],
            sam_params=params["sam"],
            params=params["evaluate"],
            student_dir=args.student,
        )
        save_report(report, args.out)
    except (TeacherError, ParamsError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    shown = {k: round(v, 4) for k, v in report.metrics.items() if k.count("/") == 1}
    print(f"evaluate: wrote {args.out / 'metrics.json'} ({len(report.metrics)} values): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
