"""The label stage's library as a batch job: shards, resume after kill -9, processes, changes.

The teachers are the real tiny-random Grounding DINO and SAM with adapters written by
fake_adapters (perturbed weights, saved as the training stages save them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT
from fake_adapters import (
    TINY_DINO,
    TINY_SAM,
    write_dino_adapter,
    write_sam_adapter,
    write_tiny_coco,
    write_tiny_params,
)
from PIL import Image

from teacher.coco.io import dumps_coco, load_coco
from teacher.core.errors import TeacherError
from teacher.core.params import LabelParams
from teacher.inference.labeling import label_pool
from teacher.inference.shards import (
    PoolImage,
    Shard,
    plan_shards,
    read_header,
    shard_text,
    share_of,
    write_merged,
)
from teacher.student.data import teacher_source

TESTS = Path(__file__).resolve().parents[1]


def models(root: Path) -> dict:
    """Trained-looking adapters of the tiny-random teachers under ``root/models`` (made once)."""
    dirs = {"dino_dir": root / "models/dino", "sam_dir": root / "models/sam"}
    if not dirs["dino_dir"].is_dir():
        coco = write_tiny_coco(root / "scratch", n_images=1)
        write_dino_adapter(dirs["dino_dir"], coco["categories"])
        write_sam_adapter(dirs["sam_dir"])
    return dirs


def pool(root: Path, n: int) -> Path:
    write_tiny_coco(root / "pool", n_images=n)
    return root / "pool"


def label(root: Path, pool_dir: Path, out: Path, shards: Path, logs: list | None = None, **kw):
    """The label stage's library call, shards of 2 images, every detection kept."""
    params = {"score_threshold": 0.0, "shard_size": 2, "batch_size": 2, **kw}
    return label_pool(
        pool_dir,
        **models(root),
        label=LabelParams(**params),
        dino=TINY_DINO,
        sam=TINY_SAM,
        out=out,
        shard_dir=shards,
        progress=False,
        log=(logs.append if logs is not None else lambda s: None),
    )


# --- pure parts ------------------------------------------------------------------------------


def test_the_merge_writes_what_save_coco_writes():
    records = [
        {
            "file_name": "a.png",
            "sha256": "1",
            "width": 4,
            "height": 3,
            "annotations": [{"bbox": [0, 0, 1, 1], "category_id": 1, "score": 0.5}] * 2,
        },
        {"file_name": "b.png", "sha256": "2", "path": "/p/b.png", "unreadable": "not an image"},
        {"file_name": "c.png", "sha256": "3", "width": 2, "height": 2, "annotations": []},
    ]
    cats = [{"id": 1, "name": "cat"}]

    def write(path, recs):
        return write_merged(path, lambda: iter(recs), categories=cats, info={"description": "d"})

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        summary = write(Path(tmp) / "o.json", records)
        text = (Path(tmp) / "o.json").read_text()
        empty = write(Path(tmp) / "e.json", [])
        empty_text = (Path(tmp) / "e.json").read_text()
    doc = {
        "annotations": [
            {"bbox": [0, 0, 1, 1], "category_id": 1, "score": 0.5, "id": 1, "image_id": 1},
            {"bbox": [0, 0, 1, 1], "category_id": 1, "score": 0.5, "id": 2, "image_id": 1},
        ],
        "categories": cats,
        "images": [
            {"id": 1, "file_name": "a.png", "width": 4, "height": 3},
            {"id": 2, "file_name": "c.png", "width": 2, "height": 2},
        ],
        "info": {
            "description": "d",
            "unreadable": [{"file": "/p/b.png", "reason": "not an image"}],
        },
    }
    assert text == dumps_coco(doc)
    assert summary == {"images": 2, "annotations": 2, "unreadable": doc["info"]["unreadable"]}
    assert empty["images"] == 0
    assert empty_text == dumps_coco(
        {
            "annotations": [],
            "categories": cats,
            "images": [],
            "info": {"description": "d", "unreadable": []},
        }
    )


def test_shards_are_cut_in_pool_order_and_shared_contiguously():
    images = [PoolImage(f"{i:02d}.png", str(i)) for i in range(7)]
    shards = plan_shards(images, done={("02.png", "2")}, shard_size=3)
    assert [[im.file_name for im in s.images] for s in shards] == [
        ["00.png", "01.png", "03.png"],
        ["04.png", "05.png", "06.png"],
    ]
    # the same images give the same shard name in every run; other images another
    assert Shard(shards[0].images).name == shards[0].name != shards[1].name
    five = [Shard((im,)) for im in images[:5]]
    shares = [share_of(five, rank=r, processes=2) for r in range(2)]
    assert [len(s) for s in shares] == [3, 2] and shares[0] + shares[1] == five


def test_shares_are_accelerates_split_between_processes():
    """share_of splits as accelerate's documented pattern does (called unbound, on a stand-in
    state: spawned processes share without a process group)."""
    from types import SimpleNamespace

    from accelerate import PartialState

    for n in (0, 1, 5, 7, 16):
        items = [Shard((PoolImage(str(i), ""),)) for i in range(n)]
        for processes in (1, 2, 3, 8):
            for rank in range(processes):
                mine = share_of(items, rank=rank, processes=processes)
                if rank >= n > 0:  # a process with no shard of its own labels nothing (accelerate
                    assert mine == []  # before 1.x hands it the last input again)
                    continue
                state = SimpleNamespace(num_processes=processes, process_index=rank)
                with PartialState.split_between_processes(state, items) as theirs:
                    assert mine == list(theirs)


def test_a_truncated_shard_is_not_read(tmp_path):
    path = tmp_path / "shard-x.jsonl"
    text = shard_text({"a": 1}, [{"file_name": "a", "sha256": "1", "annotations": []}] * 3)
    path.write_text(text)
    assert read_header(path)["images"] == 3
    path.write_text(text[: text.rindex("{")])  # the last line lost
    assert read_header(path) is None


# --- the job ---------------------------------------------------------------------------------


def test_an_empty_pool_gives_no_teacher_labels(tmp_path):
    (tmp_path / "pool").mkdir()
    out = tmp_path / "labels.json"
    done = label_pool(
        tmp_path / "pool",
        dino_dir=tmp_path / "dino",
        sam_dir=tmp_path / "sam",
        label=LabelParams(),
        dino=TINY_DINO,
        sam=TINY_SAM,
        out=out,
        shard_dir=tmp_path / "shards",
        log=lambda s: None,
    )
    doc = load_coco(out)
    assert done["images"] == 0 and doc["images"] == [] and doc["annotations"] == []


def test_a_missing_pool_folder_names_the_param(tmp_path):
    with pytest.raises(TeacherError, match="data.unlabeled .*not a folder"):
        label_pool(
            tmp_path / "nope",
            dino_dir=tmp_path,
            sam_dir=tmp_path,
            label=LabelParams(),
            dino=TINY_DINO,
            sam=TINY_SAM,
            out=tmp_path / "o.json",
            shard_dir=tmp_path / "shards",
        )


def test_without_a_dino_adapter_the_label_stage_says_run_train_dino(tmp_path):
    write_tiny_coco(tmp_path / "pool", n_images=1)
    with pytest.raises(TeacherError, match="dvc repro train_dino"):
        label_pool(
            tmp_path / "pool",
            dino_dir=tmp_path / "dino",
            sam_dir=tmp_path / "sam",
            label=LabelParams(),
            dino=TINY_DINO,
            sam=TINY_SAM,
            out=tmp_path / "o.json",
            shard_dir=tmp_path / "shards",
        )


def test_the_teachers_label_the_pool_with_boxes_masks_scores_and_skip_unreadable(tmp_path):
    pool_dir = pool(tmp_path, 3)
    (pool_dir / "broken.png").write_bytes(b"\x89PNG broken")
    done = label(tmp_path, pool_dir, tmp_path / "labels.json", tmp_path / "shards")
    doc = load_coco(tmp_path / "labels.json")
    assert len(doc["images"]) == 3 == done["images"]
    assert doc["info"]["unreadable"][0]["file"].endswith("broken.png") and done["unreadable"]
    assert doc["annotations"] and all(
        {"score", "bbox", "segmentation", "id", "image_id"} <= set(a) for a in doc["annotations"]
    )
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
    src = teacher_source(
        doc,
        path=tmp_path / "labels.json",
        pool=pool_dir,
        categories={1: {}, 5: {}},
        min_score=0.0,
        weight=1.0,
    )
    assert len(src.coco["annotations"]) == len(doc["annotations"])
    # a complete run leaves only the shards it used: 2 of 2 images, 2 of 1 + the broken one
    assert len(list((tmp_path / "shards").glob("shard-*.jsonl"))) == 2
    assert not list((tmp_path / "shards").glob("progress-*"))


def test_a_sam2_teacher_labels_the_pool_with_masks(tmp_path):
    """sam.model: tiny-random-sam2 with its adapter: every teacher label has a mask."""
    import dataclasses

    from pycocotools import mask as mask_utils

    pool_dir = pool(tmp_path, 2)
    dirs = models(tmp_path)
    write_sam_adapter(tmp_path / "models/sam2", model="tiny-random-sam2")
    label_pool(
        pool_dir,
        dino_dir=dirs["dino_dir"],
        sam_dir=tmp_path / "models/sam2",
        label=LabelParams(score_threshold=0.0, batch_size=2, max_detections=3),
        dino=TINY_DINO,
        sam=dataclasses.replace(TINY_SAM, model="tiny-random-sam2"),
        out=tmp_path / "labels.json",
        shard_dir=tmp_path / "shards",
        progress=False,
        log=lambda s: None,
    )
    doc = load_coco(tmp_path / "labels.json")
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    assert len(doc["annotations"]) == 6
    for ann in doc["annotations"]:
        assert mask_utils.decode(ann["segmentation"]).shape == sizes[ann["image_id"]]


def test_a_rerun_labels_nothing_and_writes_the_same_bytes(tmp_path):
    pool_dir = pool(tmp_path, 3)
    label(tmp_path, pool_dir, tmp_path / "a.json", tmp_path / "shards")
    logs: list[str] = []
    label(tmp_path, pool_dir, tmp_path / "b.json", tmp_path / "shards", logs)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert any("resuming: 3 of 3 images already labeled" in line for line in logs)


def test_shards_of_other_settings_are_discarded_saying_which(tmp_path):
    pool_dir = pool(tmp_path, 3)
    label(tmp_path, pool_dir, tmp_path / "a.json", tmp_path / "shards")
    logs: list[str] = []
    label(tmp_path, pool_dir, tmp_path / "b.json", tmp_path / "shards", logs, score_threshold=0.3)
    label(tmp_path, pool_dir, tmp_path / "fresh.json", tmp_path / "fresh", score_threshold=0.3)
    assert sum("made with other score_threshold" in line for line in logs) == 2
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "fresh.json").read_bytes()
    assert len(list((tmp_path / "shards").glob("shard-*.jsonl"))) == 2  # the old ones removed


def test_a_changed_pool_reuses_the_unchanged_images(tmp_path):
    pool_dir = pool(tmp_path, 4)
    label(tmp_path, pool_dir, tmp_path / "a.json", tmp_path / "shards")
    before = load_coco(tmp_path / "a.json")
    (pool_dir / "img_0.png").unlink()  # removed
    pixels = np.asarray(Image.open(pool_dir / "img_1.png")).copy()
    Image.fromarray(255 - pixels).save(pool_dir / "img_1.png")  # edited
    Image.fromarray(pixels).save(pool_dir / "img_9.png")  # added
    logs: list[str] = []
    label(tmp_path, pool_dir, tmp_path / "b.json", tmp_path / "shards", logs)
    label(tmp_path, pool_dir, tmp_path / "fresh.json", tmp_path / "fresh")
    assert any("resuming: 2 of 4 images already labeled" in line for line in logs)
    after, fresh = load_coco(tmp_path / "b.json"), load_coco(tmp_path / "fresh.json")
    names = sorted(im["file_name"] for im in after["images"])
    assert names == ["img_1.png", "img_2.png", "img_3.png", "img_9.png"]

    def by_name(doc):
        files = {im["id"]: im["file_name"] for im in doc["images"]}
        out: dict[str, list] = {}
        for a in doc["annotations"]:
            out.setdefault(files[a["image_id"]], []).append(
                {k: v for k, v in a.items() if k not in ("id", "image_id")}
            )
        return out

    assert by_name(after) == by_name(fresh)
    assert by_name(after)["img_2.png"] == by_name(before)["img_2.png"]


KILL_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {here!r}]
from pathlib import Path
import teacher.inference.job as job
import test_labeling as t
written = job.write_shard
def slowly(*args, **kwargs):
    path = written(*args, **kwargs)
    time.sleep(3)  # killed in one of these pauses, after a shard is written
    return path
job.write_shard = slowly
t.label(Path({root!r}), Path({pool!r}), Path({out!r}), Path({shards!r}))
"""


def test_kill_9_midway_then_rerun_equals_an_uninterrupted_run(tmp_path):
    pool_dir = pool(tmp_path, 7)
    label(tmp_path, pool_dir, tmp_path / "whole.json", tmp_path / "whole")
    shards = tmp_path / "shards"
    script = KILL_SCRIPT.format(
        tests=str(TESTS),
        here=str(Path(__file__).parent),
        root=str(tmp_path),
        pool=str(pool_dir),
        out=str(tmp_path / "killed.json"),
        shards=str(shards),
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(shards.glob("shard-*.jsonl"))) < 2 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.json").exists()
    kept = len(list(shards.glob("shard-*.jsonl")))
    assert 2 <= kept < 4  # 7 images in shards of 2: killed before the last
    logs: list[str] = []
    label(tmp_path, pool_dir, tmp_path / "resumed.json", shards, logs)
    assert any(f"resuming: {2 * kept} of 7 images" in line for line in logs)
    assert (tmp_path / "resumed.json").read_bytes() == (tmp_path / "whole.json").read_bytes()


FULL_DISK_SCRIPT = """
import resource, signal, sys
sys.path[:0] = [{tests!r}, {here!r}]
from pathlib import Path
import teacher.inference.job as job
import test_labeling as t
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
written = job.write_shard
def on_a_full_disk(*args, **kwargs):  # the disk fills up as the first shard is written
    resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))  # no file over 600 bytes
    return written(*args, **kwargs)
job.write_shard = on_a_full_disk
t.label(Path({root!r}), Path({pool!r}), Path({out!r}), Path({shards!r}))
"""


def test_a_full_disk_leaves_no_shard_a_rerun_would_trust(tmp_path):
    pool_dir = pool(tmp_path, 3)
    models(tmp_path)
    shards = tmp_path / "shards"
    script = FULL_DISK_SCRIPT.format(
        tests=str(TESTS),
        here=str(Path(__file__).parent),
        root=str(tmp_path),
        pool=str(pool_dir),
        out=str(tmp_path / "o.json"),
        shards=str(shards),
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0 and "free disk space" in proc.stderr
    assert not [p for p in shards.iterdir() if p.name.startswith(("shard-", ".shard-"))]
    label(tmp_path, pool_dir, tmp_path / "o.json", shards)  # room again: it completes
    assert len(load_coco(tmp_path / "o.json")["images"]) == 3


def same_labels(a: Path, b: Path) -> None:
    """Two runs' documents: the same images, and detections equal to float tolerance."""
    one, two = json.loads(a.read_text()), json.loads(b.read_text())
    assert [im["file_name"] for im in one["images"]] == [im["file_name"] for im in two["images"]]
    assert len(one["annotations"]) == len(two["annotations"]) > 0
    for x, y in zip(one["annotations"], two["annotations"], strict=True):
        assert x["category_id"] == y["category_id"] and x["image_id"] == y["image_id"]
        np.testing.assert_allclose(x["bbox"], y["bbox"], atol=0.02)
        assert x["score"] == pytest.approx(y["score"], abs=1e-4)
        assert x["area"] == pytest.approx(y["area"], rel=0.02)


def test_two_processes_label_what_one_does(tmp_path):
    pool_dir = pool(tmp_path, 5)
    label(tmp_path, pool_dir, tmp_path / "one.json", tmp_path / "one")
    label(tmp_path, pool_dir, tmp_path / "two.json", tmp_path / "two", processes=2)
    same_labels(tmp_path / "one.json", tmp_path / "two.json")


@pytest.mark.slow
def test_every_rank_of_a_torchrun_launch_takes_part(tmp_path):
    """The multi-node entry: `torchrun ... -m stages.label`; the main rank plans, broadcasts
    the plan (gloo), waits for the other rank's shards and merges."""
    pool_dir = pool(tmp_path, 5)
    label(tmp_path, pool_dir, tmp_path / "one.json", tmp_path / "one")
    params = yaml.safe_load(write_tiny_params(tmp_path / "params.yaml").read_text())
    params["label"] = {"score_threshold": 0.0, "shard_size": 2, "batch_size": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    dirs = models(tmp_path)
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "stages.label",
        *("--params", str(tmp_path / "params.yaml"), "--pool", str(pool_dir)),
        *("--dino", str(dirs["dino_dir"]), "--sam", str(dirs["sam_dir"])),
        *("--shards", str(tmp_path / "two"), "--out", str(tmp_path / "two.json")),
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'src'}"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("label: ") == 1  # the main rank reports, once
    same_labels(tmp_path / "one.json", tmp_path / "two.json")


def test_the_student_reads_teacher_labels_with_masks_left_on_disk(tmp_path):
    """train_student's processes hold boxes and scores; each mask is read back with its image."""
    from teacher.student.data import MASK_AT, StudentDataset, load_teacher_labels, with_mask

    pool_dir = pool(tmp_path, 3)
    label(tmp_path, pool_dir, tmp_path / "labels.json", tmp_path / "shards")
    whole = load_coco(tmp_path / "labels.json")
    lazy = load_teacher_labels(tmp_path / "labels.json")
    assert {k: v for k, v in lazy.items() if k != "annotations"} == {
        k: v for k, v in whole.items() if k != "annotations"
    }
    assert all("segmentation" not in a and MASK_AT in a for a in lazy["annotations"])
    assert [with_mask(a, tmp_path / "labels.json") for a in lazy["annotations"]] == whole[
        "annotations"
    ]
    sources = [
        teacher_source(
            doc,
            path=tmp_path / "labels.json",
            pool=pool_dir,
            categories={1: {}, 5: {}},
            min_score=0.0,
            weight=1.0,
        )
        for doc in (lazy, whole)
    ]
    a, b = (StudentDataset([s], label_of={1: 0, 5: 1}, masks=True, seed=0)[1] for s in sources)
    a_masks, b_masks = a["instances"].masks, b["instances"].masks
    assert a_masks.any() and np.array_equal(a_masks, b_masks)
    # any other layout of the same document is read whole
    (tmp_path / "indented.json").write_text(json.dumps(whole, indent=2))
    assert load_teacher_labels(tmp_path / "indented.json") == whole


def test_the_agnostic_nms_is_a_setting_of_the_shards(tmp_path):
    from dataclasses import replace

    from teacher.core.params import DinoParams, SamParams
    from teacher.inference.labeling import label_settings

    def settings(label):
        return label_settings(
            dino_dir=tmp_path, sam_dir=tmp_path, label=label, dino=DinoParams(), sam=SamParams()
        )

    label = LabelParams()
    assert settings(label) != settings(replace(label, agnostic_nms_iou=1.0))
