"""The data stages end to end: dvc repro in a copy of the repo, the stage scripts' failure
modes, the `teacher validate` command and the bundled sample."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_in_repo, set_params

from teacher import cli
from teacher.coco.io import load_coco, save_coco

SAMPLE = REPO_ROOT / "data" / "sample"
SPLITS = ("train", "val", "test")


def digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def ran(proc) -> set[str]:
    return {s for s in ("inspect", "validate", "split") if f"Running stage '{s}'" in proc.stdout}


@pytest.mark.slow
def test_dvc_repro_data_stages(repo_copy):
    user_file = repo_copy / "data/sample/annotations.json"
    before = digest(user_file)
    assert ran(run_in_repo(repo_copy, "dvc", "repro", "split")) == {"inspect", "validate", "split"}
    facts = json.loads((repo_copy / "data/inspect.json").read_text())
    assert facts["teachers"]["dino"] and facts["teachers"]["sam"] and facts["grayscale"] is False
    report = json.loads((repo_copy / "metrics/validate.json").read_text())
    assert report["ok"] and report["errors"] == 0 and report["image_without_annotations"] == 4
    assert digest(user_file) == before  # the user's file is never modified
    names = {c["name"] for c in load_coco(repo_copy / "data/validated.json")["categories"]}
    split_bytes = {}
    for s in SPLITS:
        part = load_coco(repo_copy / f"data/split/{s}.json")
        assert {c["name"] for c in part["categories"]} == names
        assert {a["category_id"] for a in part["annotations"]} == {1, 2, 3, 4}
        split_bytes[s] = (repo_copy / f"data/split/{s}.json").read_bytes()

    assert ran(run_in_repo(repo_copy, "dvc", "repro", "split")) == set()  # nothing changed
    set_params(repo_copy, {"split.train": 0.6, "split.val": 0.25})
    assert ran(run_in_repo(repo_copy, "dvc", "repro", "split")) == {"split"}
    set_params(repo_copy, {"split.train": 0.7, "split.val": 0.15})
    run_in_repo(repo_copy, "dvc", "repro", "--force", "--single-item", "split")
    for s in SPLITS:  # same data and params -> byte-identical files
        assert (repo_copy / f"data/split/{s}.json").read_bytes() == split_bytes[s]

    bad = load_coco(user_file)
    bad["annotations"].append(dict(bad["annotations"][0]))  # duplicate annotation id
    save_coco(bad, repo_copy / "data/bad.json")
    set_params(repo_copy, {"data.annotations": "data/bad.json"})
    proc = run_in_repo(repo_copy, "dvc", "repro", "validate", check=False)
    assert proc.returncode != 0 and "duplicate_annotation_id" in proc.stdout + proc.stderr


def bad_export(tmp_path: Path) -> Path:
    data = load_coco(SAMPLE / "annotations.json")
    data["images"].append(dict(data["images"][0]))  # duplicate image id
    data["images"].append({"id": 999, "file_name": "../../etc/passwd", "width": 5, "height": 5})
    data["annotations"][3]["category_id"] = 77
    save_coco(data, tmp_path / "bad.json")
    return tmp_path / "bad.json"


def stage_params(tmp_path: Path, annotations: Path, on_error: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        f"data:\n  annotations: {annotations}\n  images: {SAMPLE / 'images'}\n"
        f"validate:\n  on_error: {on_error}\n"
    )
    return path


def test_validate_stage_fail_then_drop(tmp_path, capsys):
    from stages import inspect as inspect_stage
    from stages import validate as validate_stage

    bad = bad_export(tmp_path)
    before = digest(bad)
    params = stage_params(tmp_path, bad, "fail")
    facts = tmp_path / "inspect.json"
    assert inspect_stage.main(["--params", str(params), "--out", str(facts)]) == 0
    out, report = tmp_path / "validated.json", tmp_path / "validate.json"
    args = [
        "--params",
        str(params),
        "--inspect",
        str(facts),
        "--out",
        str(out),
        "--report",
        str(report),
    ]
    assert validate_stage.main(args) == 1
    text = capsys.readouterr().out
    for rule in ("duplicate_image_id", "unsafe_file_name", "unknown_category", "on_error: drop"):
        assert rule in text
    assert not out.exists() and json.loads(report.read_text())["errors"] == 3
    args[1] = str(stage_params(tmp_path, bad, "drop"))
    assert validate_stage.main(args) == 0
    fixed = load_coco(out)
    assert len(fixed["images"]) == 72 and 4 not in {a["id"] for a in fixed["annotations"]}
    assert json.loads(report.read_text())["findings"][0]["fix"].startswith(
        "later duplicates dropped"
    )
    assert digest(bad) == before


def test_inspect_stage_reports_non_json_without_failing(tmp_path):
    from stages import inspect as inspect_stage

    (tmp_path / "x.json").write_text("<html>")
    out = tmp_path / "inspect.json"
    assert (
        inspect_stage.main(
            [
                "--params",
                str(stage_params(tmp_path, tmp_path / "x.json", "fail")),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    facts = json.loads(out.read_text())
    assert "not valid JSON" in facts["format_error"] and facts["counts"]["images"] == 0


def test_cli_validate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: defaults
    bad = bad_export(tmp_path)
    assert (
        cli.main(
            [
                "validate",
                str(bad),
                "--images",
                str(SAMPLE / "images"),
                "--out",
                "fixed.json",
                "--report",
                "r.json",
            ]
        )
        == 1
    )
    assert "duplicate_image_id" in capsys.readouterr().out
    assert not (tmp_path / "fixed.json").exists() and (tmp_path / "r.json").exists()
    assert (
        cli.main(
            [
                "validate",
                str(SAMPLE / "annotations.json"),
                "--images",
                str(SAMPLE / "images"),
                "--out",
                "fixed.json",
            ]
        )
        == 0
    )
    assert len(load_coco(tmp_path / "fixed.json")["images"]) == 72
    (tmp_path / "p.yaml").write_text("validate:\n  on_error: drop\n")
    assert cli.main(["validate", str(bad), "--params", "p.yaml", "--out", "fixed.json"]) == 0


def test_teacher_console_script_help():
    exe = Path(sys.executable).parent / "teacher"
    if not exe.exists():
        pytest.skip("teacher console script not installed (pip install -e .)")
    out = subprocess.run([str(exe), "validate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--images" in out.stdout


def test_sample_is_deterministic_and_complete(tmp_path):
    from teacher.dataset.inspection import inspect_dataset
    from teacher.dataset.sample import make_sample, make_unlabeled

    make_sample(tmp_path)
    make_unlabeled(tmp_path)
    committed = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all(digest(SAMPLE / p) == digest(tmp_path / p) for p in committed)
    assert sum((SAMPLE / p).stat().st_size for p in committed) < 3_000_000
    facts = inspect_dataset(load_coco(SAMPLE / "annotations.json"), image_root=SAMPLE / "images")
    kinds = facts["annotation_kinds"]
    assert facts["counts"]["images"] >= 60 and facts["counts"]["images_without_annotations"] >= 3
    assert min(kinds["polygon"], kinds["rle_compressed"], kinds["rle_uncompressed"]) >= 10
    assert kinds["crowd"] >= 2 and facts["color"]["grayscale"] >= 1
    assert [c["name"] for c in facts["categories"]] == ["circle", "square", "triangle", "star"]


def test_sample_exif_rotated_images_read_upright():
    from teacher.coco.images import load_image, read_image_size

    data = load_coco(SAMPLE / "annotations.json")
    for im in data["images"]:
        path = SAMPLE / "images" / im["file_name"]
        assert read_image_size(path) == (im["width"], im["height"])
    rotated = next(im for im in data["images"] if im["id"] == 17)
    assert rotated["width"] != rotated["height"]
    assert load_image(SAMPLE / "images" / rotated["file_name"]).shape == (
        rotated["height"],
        rotated["width"],
        3,
    )


def test_split_stage_refuses_too_few_annotated_images(tmp_path, capsys):
    from stages import split as split_stage

    data = load_coco(SAMPLE / "annotations.json")
    keep = {a["image_id"] for a in data["annotations"][:1]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    save_coco(data, tmp_path / "validated.json")
    args = [
        "--params",
        str(stage_params(tmp_path, SAMPLE / "annotations.json", "fail")),
        "--validated",
        str(tmp_path / "validated.json"),
        "--out",
        str(tmp_path / "split"),
    ]
    assert split_stage.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("split: ") and "Traceback" not in err
    assert "1 image(s) with annotations (1 images in all)" in err and "at least 3" in err
    assert not (tmp_path / "split").exists()


def test_validate_stage_with_a_wrong_image_folder_names_it_whatever_on_error(tmp_path, capsys):
    """Issue 16: on_error: drop that drops everything exited 0 with "0 images"; the split stage
    then asked for more annotated images when the image folder was the problem."""
    from stages import inspect as inspect_stage
    from stages import validate as validate_stage

    empty = tmp_path / "no_images_here"
    empty.mkdir()
    for on_error in ("fail", "drop"):
        params = tmp_path / "params.yaml"
        params.write_text(
            f"data:\n  annotations: {SAMPLE / 'annotations.json'}\n  images: {empty}\n"
            f"validate:\n  on_error: {on_error}\n"
        )
        facts = tmp_path / "inspect.json"
        assert inspect_stage.main(["--params", str(params), "--out", str(facts)]) == 0
        out = tmp_path / "validated.json"
        rc = validate_stage.main(
            [
                "--params",
                str(params),
                "--inspect",
                str(facts),
                "--out",
                str(out),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        text = capsys.readouterr().out
        assert rc == 1 and not out.exists()
        assert "too_much_dropped" in text and "most by image_missing" in text
        assert "data.images" in text and "on_error: drop" not in text
