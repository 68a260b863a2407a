"""`make demo`: the whole pipeline on the bundled sample with the `tiny-pretrained` teachers, offline:
teachers -> labels of the unlabeled pool -> student -> evaluation.

Copies the repository's files into a fresh git + DVC repository (default `demo/`, which git
ignores), applies `scripts/tiny-params.yaml` then `scripts/demo-params.yaml` over params.yaml,
runs `dvc repro` and `dvc plots show`, trains the student once more on the human labels alone
(what the teachers' labels add), and prints what fine-tuning gained and where the metrics and
plots are. Your workspace is not touched.

    python scripts/demo.py [--out demo] [--seeds 0 1 2]

``--seeds``: one run per seed (params.yaml's ``seed``: the split, LoRA init, sampling), in
``OUT/seed-N``, and a table of each run's gains with their min / median / max. The sample's test
split is 10 images (28 objects), so one run's gain moves by about 0.1 with the seed: compare
presets or recipes over several.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from teacher.proving.demo import GAIN_KEYS, gain_table, make_copy

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "scripts" / "tiny-params.yaml"
DEMO = ROOT / "scripts" / "demo-params.yaml"  # tiny-pretrained teachers, over TINY


def run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(cwd / "src")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


HUMAN_ONLY = "student-human-only"  # models/<this>: the student trained without the pool


def train_human_only(repo: Path) -> dict[str, float]:
    """The student again, on the human labels alone (``student.teacher_weight: 0``), scored on
    the same test split as evaluate scores the pipeline's: what the teachers' labels added."""
    import yaml

    from teacher.coco.io import load_coco
    from teacher.core.params import load_params
    from teacher.student.evaluate import evaluate_student

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["student"]["teacher_weight"] = 0.0
    (repo / f"params-{HUMAN_ONLY}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = params["data"]
    run(
        [
            "python", "-m", "stages.train_student", "--params", f"params-{HUMAN_ONLY}.yaml",
            "--images", data["images"], "--pool", data["unlabeled"],
            "--out", f"models/{HUMAN_ONLY}", "--metrics", f"metrics/train_{HUMAN_ONLY}",
            "--checkpoints", f"checkpoints/train_{HUMAN_ONLY}",
        ],
        repo,
    )  # fmt: skip
    evaluate = load_params(repo / "params.yaml")["evaluate"]
    return evaluate_student(
        load_coco(repo / "data/split/test.json"),
        repo / data["images"],
        student_dir=repo / "models" / HUMAN_ONLY,
        score_threshold=evaluate.score_threshold,
        max_detections=evaluate.max_detections,
        log=lambda _: None,
    )


def print_student_summary(metrics_path: Path, human_only: dict[str, float] | None = None) -> None:
    """Teachers vs the student (and the student on human labels alone) on the test split: box
    mAP@50, box mAP, mask mAP, milliseconds per image."""
    if not metrics_path.is_file():
        return
    m = json.loads(metrics_path.read_text())
    print("\n  test split                box mAP@50   box mAP   mask mAP   ms/image")
    rows = [
        ("teachers", m, ("box/map_50", "box/map", "segm/map", "teacher/ms_per_image")),
        ("student", m, ("student/box/map_50", "student/box/map", "student/segm/map",
                        "student/ms_per_image")),
    ]  # fmt: skip
    if human_only:
        rows.append(("student, human labels", human_only, rows[1][2]))
    for who, values, keys in rows:
        cells = [f"{values[k]:9.3f}" if k in values else "        -" for k in keys[:3]]
        ms = values.get(keys[3], float("nan"))
        print(f"  {who:<24}{cells[0]:>12}  {cells[1]}  {cells[2]}  {ms:9.1f}")


def print_gains(metrics_path: Path) -> None:
    """What fine-tuning bought: evaluate's ``gain/...`` (adapted minus base) for boxes and masks."""
    if not metrics_path.is_file():
        return
    m = json.loads(metrics_path.read_text())
    for key in GAIN_KEYS:
        if f"gain/{key}" in m:
            print(
                f"  {key}: base {m.get(f'base/{key}', float('nan')):.3f} -> fine-tuned "
                f"{m.get(key, float('nan')):.3f} (gain {m[f'gain/{key}']:+.3f})"
            )


def print_tradeoff(metrics_path: Path) -> None:
    """The forgetting guard: per adapter scale, the box gain over the base and the retention of
    the pretraining classes (metrics/evaluate/plots/tradeoff.json, drawn by `dvc plots show`)."""
    rows_path = metrics_path.parent / "plots" / "tradeoff.json"
    if not rows_path.is_file():
        return
    rows = json.loads(rows_path.read_text())
    if rows:
        print(
            "\n  adapter scale   box mAP gain   retention (1 = nothing forgotten, -1 = not measured)"
        )
    for row in rows:
        print(f"  {row['scale']:13g}   {row['gain']:+12.3f}   {row['retention']:9.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "demo")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="one run per seed, in OUT/seed-N, and the gains' min / median / max",
    )
    args = parser.parse_args()
    if args.seeds is None:
        return demo(args.out.resolve())
    runs = {}
    for seed in args.seeds:
        repo = args.out.resolve() / f"seed-{seed}"
        if demo(repo, overlays=(TINY, DEMO, {"seed": seed})):
            return 1
        runs[seed] = json.loads((repo / "metrics/evaluate/metrics.json").read_text())
    print(f"\nwhat fine-tuning bought on the sample's test split, per seed ({args.out}/seed-N):")
    print("\n".join(gain_table(runs)))
    return 0


def demo(out: Path, *, overlays: tuple[Path | dict, ...] = (TINY, DEMO)) -> int:
    """One demo run in ``out``; prints where its outputs are and what it measured."""
    start = time.time()
    repo = make_copy(out, root=ROOT, overlays=overlays)
    try:
        run(["dvc", "repro"], repo)
        run(["dvc", "plots", "show", "-o", "dvc_plots"], repo)
        human_only = train_human_only(repo)
    except subprocess.CalledProcessError as e:
        print(
            f"demo: `{' '.join(e.cmd)}` failed (exit {e.returncode}); see its output above",
            file=sys.stderr,
        )
        return 1
    print(f"\ndemo finished in {time.time() - start:.0f} s, in {repo}")
    print(f"  metrics: {repo / 'metrics/evaluate/metrics.json'}  (cd {repo} && dvc metrics show)")
    print(f"  plots:   {repo / 'dvc_plots/index.html'}  (open in a browser; works offline)")
    print(f"  gallery: {repo / 'metrics/evaluate/plots/gallery'}")
    print(f"  adapters: {repo / 'models/dino'}, {repo / 'models/sam'}")
    print(
        f"  teacher labels: {repo / 'data/teacher_labels.json'}; student: {repo / 'models/student'}"
        f" (and on human labels alone: {repo / 'models' / HUMAN_ONLY})"
    )
    print_gains(repo / "metrics/evaluate/metrics.json")
    print_tradeoff(repo / "metrics/evaluate/metrics.json")
    print_student_summary(repo / "metrics/evaluate/metrics.json", human_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
