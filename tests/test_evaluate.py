"""The evaluate stage: metrics, PR curves and gallery from tiny-random teachers; SKIPPED handling;
through `dvc repro` (after the real train stages) its outputs are DVC metrics and plots."""

import json
from pathlib import Path

import pytest
from conftest import run_in_repo, set_params
from fake_adapters import (
    TINY_DINO,
    TINY_SAM,
    write_dino_adapter,
    write_sam_adapter,
    write_skipped,
    write_tiny_coco,
)

from stages.evaluate import main as evaluate_main
from teacher.evaluation import gains

STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
         "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]
TINY_PARAMS = {
    "dino.model": "tiny-random", "dino.shortest_edge": TINY_DINO.shortest_edge,
    "dino.longest_edge": TINY_DINO.longest_edge, "sam.model": TINY_SAM.model,
    "evaluate.score_threshold": 0.0, "evaluate.gallery_images": 2,
    # every key the stage declares must exist in params.yaml for DVC
    "dino.revision": "main", "dino.box_threshold": 0.25, "sam.multimask": True,
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Tiny data and both adapters, written once for the module."""
    root = tmp_path_factory.mktemp("eval")
    gt = write_tiny_coco(root / "images", n_images=3)
    (root / "test.json").write_text(json.dumps(gt))
    write_dino_adapter(root / "models" / "dino", gt["categories"])
    write_sam_adapter(root / "models" / "sam")
    return root


def _run(root: Path, tmp_path: Path, *, dino: Path, sam: Path, **extra) -> tuple[int, dict, Path]:
    params = tmp_path / "params.yaml"
    params.write_text("")
    set_params(tmp_path, {**TINY_PARAMS, **extra})
    out = tmp_path / "metrics" / "evaluate"
    rc = evaluate_main(["--test", str(root / "test.json"), "--images", str(root / "images"),
                        "--dino", str(dino), "--sam", str(sam), "--out", str(out),
                        "--params", str(params)])
    metrics = json.loads((out / "metrics.json").read_text()) if rc == 0 else {}
    return rc, metrics, out


def test_stage_writes_every_metric_family_and_plots(adapters, tmp_path):
    rc, m, out = _run(adapters, tmp_path, dino=adapters / "models/dino", sam=adapters / "models/sam")
    assert rc == 0
    for family in ("box", "segm", "base/box", "base/segm"):
        assert all(f"{family}/{k}" in m for k in STATS), family
        assert {f"{family}/map/box", f"{family}/map/round thing"} <= set(m)
    for prefix in ("", "base/"):
        assert {f"{prefix}mask/miou", f"{prefix}mask/miou/box", f"{prefix}mask/miou/round thing"} <= set(m)
    assert 0.0 <= m["mask/miou"] <= 1.0 and all(isinstance(v, float) for v in m.values())
    # the perturbed adapters change SAM's masks, so a gain is measured and is the difference
    assert m["gain/mask/miou"] == pytest.approx(m["mask/miou"] - m["base/mask/miou"])
    assert m["gain/mask/miou"] != 0.0
    assert "gain/box/map_large" not in m  # -1 (no large objects) is not a number to subtract
    curves = sorted(p.name for p in (out / "plots" / "pr").iterdir())
    assert curves == ["box.csv", "round_thing.csv"]
    lines = (out / "plots/pr/box.csv").read_text().splitlines()
    assert lines[0] == "recall,precision" and len(lines) == 102
    gallery = sorted(p.name for p in (out / "plots" / "gallery").iterdir())
    assert gallery == ["1_img_0.png", "2_img_1.png"]


def test_skipped_sam_gives_no_mask_metrics_and_says_why(adapters, tmp_path, capsys):
    skipped = write_skipped(tmp_path / "sam_skipped", "no masks in the training data")
    rc, m, out = _run(adapters, tmp_path, dino=adapters / "models/dino", sam=skipped, **{"evaluate.base": False})
    assert rc == 0
    assert "box/map" in m and not any(k.startswith(("mask/", "segm/", "base/", "gain/")) for k in m)
    assert "no masks in the training data" in capsys.readouterr().out
    assert len(list((out / "plots" / "gallery").iterdir())) == 2


def test_skipped_dino_gives_no_box_metrics(adapters, tmp_path, capsys):
    skipped = write_skipped(tmp_path / "dino_skipped", "no boxes")
    rc, m, out = _run(adapters, tmp_path, dino=skipped, sam=adapters / "models/sam",
                      **{"evaluate.base": False})
    assert rc == 0 and set(m) == {"mask/miou", "mask/miou/box", "mask/miou/round thing"}
    assert "no dino metrics" in capsys.readouterr().out
    assert list((out / "plots" / "pr").iterdir()) == []


def test_gains_skip_unmeasured_values():
    assert gains({"a": 0.5, "b": -1.0, "c": 0.2}, {"a": 0.25, "b": 0.1}) == {"gain/a": 0.25}


def test_missing_adapter_is_a_clear_error(adapters, tmp_path, capsys):
    rc, _, _ = _run(adapters, tmp_path, dino=tmp_path / "nowhere", sam=adapters / "models/sam")
    assert rc == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


@pytest.mark.slow
def test_pipeline_reaches_evaluate_and_experiments_compare(repo_copy):
    """`dvc repro evaluate` from the sample data: both teachers trained (1 step), then scored;
    then `dvc exp run -S lora.rank=4` against the committed rank-8 run: `dvc metrics diff`
    shows the evaluate metrics that changed, and the data stages were not re-run."""
    sample = json.loads((repo_copy / "data/sample/annotations.json").read_text())
    keep = {im["id"] for im in sample["images"][:16]}  # a subset: the tests' time budget is small
    subset = {**sample, "images": [im for im in sample["images"] if im["id"] in keep],
              "annotations": [a for a in sample["annotations"] if a["image_id"] in keep]}
    (repo_copy / "data/subset.json").write_text(json.dumps(subset))
    set_params(repo_copy, {
        "data.annotations": "data/subset.json",
        **TINY_PARAMS, "dino.shortest_edge": 128, "dino.longest_edge": 160,  # training needs >1 px maps
        "train.epochs": 1, "train.max_steps_per_epoch": 1,
        "train.batch_size": 2, "train.warmup_steps": 0, "train.lr": 0.01, "lora.rank": 8,
        "evaluate.gallery_images": 1, "evaluate.base": False})  # base/gain: the stage test above
    run_in_repo(repo_copy, "git", "add", "-A")
    run_in_repo(repo_copy, "git", "commit", "-qm", "copy")  # dvclive needs a commit to exist
    run_in_repo(repo_copy, "dvc", "repro", "evaluate", timeout=900)
    m = json.loads((repo_copy / "metrics/evaluate/metrics.json").read_text())
    for key in ("box/map", "box/map_50", "segm/map", "mask/miou"):
        assert key in m, key
    assert len(list((repo_copy / "metrics/evaluate/plots/gallery").iterdir())) == 1
    shown = json.dumps(json.loads(run_in_repo(repo_copy, "dvc", "metrics", "show", "--json").stdout))
    assert '"box/map"' in shown and '"mask/miou"' in shown  # declared as DVC metrics
    plots = " ".join(json.loads(run_in_repo(repo_copy, "dvc", "plots", "show", "--json").stdout)["data"])
    assert "metrics/evaluate/plots/pr/" in plots and "metrics/evaluate/plots/gallery/" in plots
    status = json.loads(run_in_repo(repo_copy, "dvc", "status", "--json").stdout)
    assert "evaluate" not in status  # every output declared, nothing left to re-run

    run_in_repo(repo_copy, "git", "add", "-A")
    run_in_repo(repo_copy, "git", "commit", "-qm", "rank 8")
    exp = run_in_repo(repo_copy, "dvc", "exp", "run", "-S", "lora.rank=4", timeout=900).stdout
    assert "Stage 'split' didn't change" in exp and "Running stage 'evaluate'" in exp
    diff = json.loads(run_in_repo(repo_copy, "dvc", "metrics", "diff", "--json").stdout)
    changed = diff["metrics/evaluate/metrics.json"]
    assert "mask/miou" in changed and changed["mask/miou"]["diff"] != 0
