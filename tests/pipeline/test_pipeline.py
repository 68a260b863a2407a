"""The whole pipeline as users drive it: `dvc repro`, `dvc exp run -S`, diffs, plots, faults.

One full `dvc repro` of the sample data with the `tiny-random` models (scripts/tiny-params.yaml,
shortened further here) is shared by the module; a second copy is killed with SIGKILL during
train_dino, re-run, and must end byte-identical to the first: that checks resume and determinism
in one run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, make_repo_copy, repo_env, run_in_repo, set_params

from teacher.proving.demo import overlay_params

pytestmark = pytest.mark.slow

STAGES = {
    "inspect",
    "validate",
    "split",
    "train_dino",
    "train_sam",
    "label",
    "train_student",
    "evaluate",
}
TINY = yaml.safe_load((REPO_ROOT / "scripts" / "tiny-params.yaml").read_text())
SHORT = {"train.epochs": 2, "train.max_steps_per_epoch": 3, "evaluate.gallery_images": 2}


def tiny_params(repo: Path) -> None:
    overlay_params(repo / "params.yaml", TINY)
    set_params(repo, SHORT)


def commit(repo: Path, message: str) -> None:
    run_in_repo(repo, "git", "add", "-A")
    run_in_repo(repo, "git", "commit", "-qm", message)


def ran(output: str) -> set[str]:
    """Stages that `dvc repro` / `dvc exp run` executed, from their output."""
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def outputs(repo: Path) -> dict[str, bytes]:
    """Everything the pipeline wrote that must be reproducible, by relative path."""
    names = [
        "data/inspect.json",
        "data/validated.json",
        "metrics/validate.json",
        *(f"data/split/{s}.json" for s in ("train", "val", "test")),
        "models/dino/adapter_model.safetensors",
        "models/dino/labels.json",
        "models/sam/adapter_model.safetensors",
        "metrics/train_dino/metrics.json",
        "metrics/train_sam/metrics.json",
        "metrics/evaluate/metrics.json",
    ]
    out = {n: (repo / n).read_bytes() for n in names}
    timed = json.loads(out["metrics/evaluate/metrics.json"])  # latencies differ run to run
    out["metrics/evaluate/metrics.json"] = json.dumps(
        {k: v for k, v in timed.items() if not k.endswith("ms_per_image")}, sort_keys=True
    ).encode()
    out["models/student/model.safetensors"] = (
        repo / "models/student/model.safetensors"
    ).read_bytes()
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    repo = make_repo_copy(tmp_path_factory.mktemp("pipeline") / "repo")
    tiny_params(repo)
    commit(repo, "sample data, tiny-random models")
    first = run_in_repo(repo, "dvc", "repro", timeout=900)
    status = run_in_repo(repo, "git", "status", "--porcelain").stdout
    commit(repo, "dvc repro")
    return {"repo": repo, "ran": ran(first.stdout), "git_status": status}


def test_repro_runs_every_stage_and_dvclive_leaves_dvc_yaml_alone(pipeline):
    assert pipeline["ran"] == STAGES
    changed = {line[3:] for line in pipeline["git_status"].splitlines()}
    # dvc.lock and the git-tracked metrics change; dvc.yaml / params.yaml are never rewritten,
    # and nothing lands outside the declared outputs (no stray dvclive/ folder)
    assert "dvc.yaml" not in changed and "params.yaml" not in changed
    allowed = ("dvc.lock", "metrics/", "data/.gitignore", "models/.gitignore", ".gitignore")
    assert all(name.startswith(allowed) for name in changed), changed


def test_second_repro_runs_nothing(pipeline):
    start = time.monotonic()
    out = run_in_repo(pipeline["repo"], "dvc", "repro").stdout
    print(f"second dvc repro: {time.monotonic() - start:.1f} s")
    assert ran(out) == set() and "up to date" in out


def test_committed_lock_matches_the_sample_data(pipeline):
    """The data stages' entries of the repository's own dvc.lock equal a fresh run's."""
    ours = yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())["stages"]
    fresh = yaml.safe_load((pipeline["repo"] / "dvc.lock").read_text())["stages"]
    for stage in ("inspect", "validate", "split"):
        assert ours[stage] == fresh[stage], stage


@pytest.mark.parametrize(
    ("change", "direct"),
    [
        ({"sam.box_jitter": 0.2}, {"train_sam"}),
        ({"sam.multimask": True}, {"train_sam", "label", "evaluate"}),  # tiny-params sets false
        ({"dino.shortest_edge": 96}, {"train_dino", "label", "evaluate"}),
        ({"dino.train_heads": False}, {"train_dino"}),
        ({"split.train": 0.6, "split.val": 0.2, "split.test": 0.2}, {"split"}),
        ({"validate.min_box_size": 3.0}, {"validate"}),
        ({"lora.rank": 16}, {"train_dino", "train_sam"}),
        ({"evaluate.nms_iou": 0.5}, {"evaluate"}),
        ({"evaluate.adapter_scales": [0.25, 1.0]}, {"evaluate"}),
        ({"evaluate.retention_threshold": 0.5}, {"evaluate"}),
        ({"label.score_threshold": 0.3}, {"label"}),
        ({"student.teacher_weight": 0.25}, {"train_student"}),
        ({"student.min_score": 0.5}, {"train_student"}),
    ],
)
def test_a_param_change_touches_exactly_its_stages(pipeline, change, direct):
    """`dvc status` lists the stages a change reaches directly; their downstream stages re-run
    because their outputs change (checked for real by the `dvc exp run` test)."""
    repo = pipeline["repo"]
    try:
        set_params(repo, change)
        status = json.loads(run_in_repo(repo, "dvc", "status", "--json").stdout or "{}")
        assert set(status) == direct
    finally:
        run_in_repo(repo, "git", "checkout", "params.yaml")


@pytest.mark.parametrize(
    ("module", "direct"),
    [
        ("src/teacher/sam/model.py", {"train_sam", "label", "evaluate"}),
        ("src/teacher/dino/model.py", {"train_dino", "label", "evaluate"}),
        ("src/teacher/dataset/splitting.py", {"split"}),
        ("src/teacher/train/loop.py", {"train_dino", "train_sam", "train_student"}),
        ("src/teacher/student/model.py", {"train_student", "evaluate"}),
        ("src/teacher/inference/labeling.py", {"label"}),
    ],
)
def test_editing_a_library_module_touches_the_stages_that_use_it(pipeline, module, direct):
    repo = pipeline["repo"]
    try:
        with open(repo / module, "a") as f:
            f.write("\n# edited\n")
        status = json.loads(run_in_repo(repo, "dvc", "status", "--json").stdout or "{}")
        assert set(status) == direct
    finally:
        run_in_repo(repo, "git", "checkout", module)


def test_exp_run_reruns_training_and_evaluation_and_diffs_show_it(pipeline):
    repo = pipeline["repo"]
    try:
        out = run_in_repo(
            repo, "dvc", "exp", "run", "-n", "rank4", "-S", "lora.rank=4", timeout=900
        ).stdout
        assert ran(out) == {"train_dino", "train_sam", "label", "train_student", "evaluate"}
        params = json.loads(run_in_repo(repo, "dvc", "params", "diff", "--json").stdout)
        rank = params["params.yaml"]["lora.rank"]
        assert (rank["old"], rank["new"]) == (8, 4)
        metrics = json.loads(run_in_repo(repo, "dvc", "metrics", "diff", "--json").stdout)
        changed = {k for f in metrics.values() for k, v in f.items() if v.get("diff")}
        assert changed, "a different LoRA rank changed no metric"
        shown = json.loads(run_in_repo(repo, "dvc", "exp", "show", "--json").stdout)
        assert "rank4" in json.dumps(shown)
        html = repo / "plots-diff"
        run_in_repo(repo, "dvc", "plots", "diff", "HEAD", "-o", str(html))
        assert (html / "index.html").is_file()
    finally:
        run_in_repo(repo, "git", "checkout", "--", ".")
        run_in_repo(repo, "dvc", "checkout", "--force", check=False)


def test_exp_run_on_a_student_param_reruns_only_the_student_and_evaluate(pipeline):
    repo = pipeline["repo"]
    try:
        out = run_in_repo(
            repo, "dvc", "exp", "run", "-n", "tw", "-S", "student.teacher_weight=0.25", timeout=900
        ).stdout
        assert ran(out) == {"train_student", "evaluate"}
    finally:
        run_in_repo(repo, "git", "checkout", "--", ".")
        run_in_repo(repo, "dvc", "checkout", "--force", check=False)


def test_the_student_learned_from_the_pool_and_is_scored_beside_the_teachers(pipeline):
    repo = pipeline["repo"]
    labels = json.loads((repo / "data/teacher_labels.json").read_text())
    assert len(labels["images"]) == 24 and labels["info"]["unreadable"] == []
    trained_on = json.loads((repo / "models/student/params.json").read_text())["trained_on"]
    assert "pool images" in trained_on or "human labels alone" in trained_on
    m = json.loads((repo / "metrics/evaluate/metrics.json").read_text())
    for key in (
        "student/box/map",
        "student/segm/map",
        "student/ms_per_image",
        "teacher/ms_per_image",
    ):
        assert key in m, key


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_dvc_plots_show_renders_offline(pipeline, tmp_path):
    """The page `dvc plots show` writes carries vega inline and draws every plot without
    network, in headless Chromium."""
    browser = chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian package `chromium`); .ci/run installs it")
    out = tmp_path / "plots"
    run_in_repo(pipeline["repo"], "dvc", "plots", "show", "-o", str(out))
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in page
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (out / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    charts = dom.count('class="marks"')
    specs = page.count("vegaEmbed(")
    assert specs >= 3 and charts == specs, f"{charts} charts drawn of {specs} declared"


def test_kill_during_training_then_repro_resumes_and_matches(pipeline, tmp_path):
    """SIGKILL train_dino after its first epoch checkpoint; `dvc repro` resumes and every output
    is byte-identical to the uninterrupted run (which also shows same seed → same bytes)."""
    repo = make_repo_copy(tmp_path / "repo")
    tiny_params(repo)
    commit(repo, "copy")
    run_in_repo(repo, "dvc", "repro", "split")
    proc = subprocess.Popen(
        ["dvc", "repro", "train_dino"],
        cwd=repo,
        env=repo_env(repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = repo / "checkpoints" / "train_dino"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(ckpt.glob("epoch-*/meta.json")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "train_dino ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (repo / "models/dino/adapter_model.safetensors").exists()
    out = run_in_repo(repo, "dvc", "repro", timeout=900).stdout
    assert "train_dino" in ran(out)
    theirs, ours = outputs(pipeline["repo"]), outputs(repo)
    differ = [name for name in theirs if theirs[name] != ours[name]]
    assert not differ, f"differ after resume: {differ}"


def test_another_seed_gives_another_split(pipeline, tmp_path):
    repo = make_repo_copy(tmp_path / "repo")
    tiny_params(repo)
    set_params(repo, {"seed": 1})
    run_in_repo(repo, "dvc", "repro", "split")
    a = (pipeline["repo"] / "data/split/train.json").read_bytes()
    assert (repo / "data/split/train.json").read_bytes() != a


def test_evaluate_writes_dvc_metrics_and_plots(pipeline):
    repo = pipeline["repo"]
    m = json.loads((repo / "metrics/evaluate/metrics.json").read_text())
    for key in (
        "box/map",
        "box/map_50",
        "segm/map",
        "mask/miou",
        "base/box/map",
        "base/mask/miou",
        "gain/mask/miou",
        "retention/box/map",  # the forgetting guard (issue 13)
        "scale/0.5/box/map",
        "scale/0.5/segm/map",
        "scale/0.5/retention/box/map",
    ):
        assert key in m, key
    shown = json.dumps(json.loads(run_in_repo(repo, "dvc", "metrics", "show", "--json").stdout))
    assert '"box/map"' in shown and '"mask/miou"' in shown and '"val_map"' in shown
    plots = " ".join(json.loads(run_in_repo(repo, "dvc", "plots", "show", "--json").stdout)["data"])
    for declared in (
        "metrics/evaluate/plots/pr/",
        "metrics/evaluate/plots/gallery/",
        "metrics/evaluate/plots/tradeoff.json",
        "metrics/train_dino/plots/",
        "metrics/train_sam/plots/",
    ):
        assert declared in plots, declared
