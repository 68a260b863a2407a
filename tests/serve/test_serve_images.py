"""Images that attack the reader (issue #34), through `teacher serve` and `teacher predict` as
real processes on localhost with the tiny-random teachers: a 10 KB PNG of 79 megapixels (1-bit,
under the server's 80 MP limit), a FIFO under the local-files root or in the folder to label, a
file name that is not UTF-8, and what the errors say. Every wait is bounded in time, so a
regression fails instead of hanging."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO_ROOT
from PIL import Image
from serve_world import (
    TOKEN,
    make_world,
    model_args,
    peak_rss_mb,
    predict_args,
    start_server,
    static_files,
)

from teacher.serve.sources import ImageSourceError, ImageSources, load_task_image

AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOMB = (8900, 8900)  # 79.2 MP, under `teacher serve`'s 80 MP limit
# A process's peak RSS bound. The server idles at ~0.8 GB with the tiny teachers; before images
# were decoded to the teachers' working size, four tasks of the bomb took it to 4.4 GB (the real
# teachers: 15 GB for one task), `teacher predict` to 2.1 GB.
PEAK_MB = 2048
CONFIG = """<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="box"/><Label value="round thing"/></RectangleLabels>
  <BrushLabels name="mask" toName="img"><Label value="box"/><Label value="round thing"/></BrushLabels>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="box" smart="true"/></KeyPointLabels>
</View>"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """serve_world's world, and under the local-files root: the bomb, a FIFO, a file that is no
    image."""
    world = make_world(tmp_path_factory.mktemp("serve_images"))
    images = world["root"] / "files" / "images"
    Image.new("1", BOMB).save(images / "bomb.png")
    os.mkfifo(images / "pipe.png")
    (images / "not-an-image.png").write_bytes(b"nope")
    return world


@pytest.fixture(scope="module")
def served(world):
    proc, url = start_server(world)
    yield proc, url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def task(i, image):
    return {"id": i, "data": {"image": image}}


def local(name):
    return f"/data/local-files/?d=images/{name}"


def predict(url, tasks, **extra):
    body = {"tasks": tasks, "label_config": CONFIG, **extra}
    return httpx.post(url + "/predict", json=body, headers=AUTH, timeout=120)


def brush_size(rle: list[int]) -> int:
    """The byte count a Label Studio brush RLE declares (its first 32 bits): width x height x 4."""
    return int.from_bytes(bytes(rle[:4]), "big")


def test_a_png_bomb_under_the_pixel_limit_leaves_the_server_small(world, served):
    proc, url = served
    bomb = world["root"] / "files" / "images" / "bomb.png"
    assert 5_000 < bomb.stat().st_size < 20_000  # ~10 KB for 79 megapixels
    with static_files(world["root"] / "files") as http:
        urls = [local("bomb.png"), f"{http}/images/bomb.png"] * 2
        r = predict(url, [task(i, u) for i, u in enumerate(urls)])  # 4 tasks in one call
    assert r.status_code == 200, r.text[-2000:]
    body = r.json()
    assert body["errors"] == [] and len(body["results"]) == 4
    for prediction in body["results"]:
        regions = prediction["result"]
        assert {g["type"] for g in regions} == {"rectanglelabels", "brushlabels"}
        assert all((g["original_width"], g["original_height"]) == BOMB for g in regions)
        for g in regions:  # the brush is at the file's size, as Label Studio decodes it
            if g["type"] == "brushlabels":
                assert brush_size(g["value"]["rle"]) == BOMB[0] * BOMB[1] * 4
            else:
                assert g["value"]["x"] + g["value"]["width"] <= 100.0001
    assert peak_rss_mb(proc.pid) < PEAK_MB
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_click_on_the_bomb_gives_a_brush_of_the_files_size(served):
    proc, url = served
    click = {
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "img",
        "original_width": BOMB[0],
        "original_height": BOMB[1],
        "is_positive": True,
        "value": {"x": 40.0, "y": 60.0, "keypointlabels": ["box"]},
    }
    r = predict(url, [task(1, local("bomb.png"))], params={"context": {"result": [click]}})
    assert r.status_code == 200, r.text[-2000:]
    (region,) = r.json()["results"][0]["result"]
    assert (region["original_width"], region["original_height"]) == BOMB
    assert brush_size(region["value"]["rle"]) == BOMB[0] * BOMB[1] * 4
    assert peak_rss_mb(proc.pid) < PEAK_MB


def test_special_and_bad_files_get_an_error_without_server_paths(world, served):
    _, url = served
    root = str(world["root"])
    names = ["pipe.png", "missing.png", "not-an-image.png", "../../outside.png"]
    started = time.monotonic()
    r = predict(
        url, [task(0, local("img_0.png")), *(task(i + 1, local(n)) for i, n in enumerate(names))]
    )
    assert time.monotonic() - started < 60  # the FIFO did not hang the call
    assert r.status_code == 200, r.text[-2000:]
    body = r.json()
    errors = {e["index"]: e["error"] for e in body["errors"]}
    assert body["results"][0]["result"] and sorted(errors) == [1, 2, 3, 4]
    assert (
        "images/pipe.png (under the local-files root): a FIFO (named pipe), not a regular file"
        in errors[1]
    )
    assert "images/missing.png (under the local-files root): cannot read" in errors[2]
    assert "not a readable image (no image format PIL knows)" in errors[3]
    assert "leaves the local-files root" in errors[4]
    for error in errors.values():  # said relative to the root, no Python object reprs
        assert root not in error and "object at 0x" not in error and "PosixPath" not in error
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_fifo_under_the_root_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    sources = ImageSources(local_root=tmp_path)
    outcome: list = []

    def load():
        try:
            load_task_image("/data/local-files/?d=pipe.png", sources)
        except ImageSourceError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert outcome == [
        "pipe.png (under the local-files root): a FIFO (named pipe), not a regular file; "
        "point the task at an image file"
    ]


# --- `teacher predict`: the same reader ---------------------------------------------------


def run_predict(args: list[str], log: Path, *, timeout_s: float = 300) -> tuple[int, float]:
    """`teacher ARGS` as a child process; its exit code and peak RSS in MiB (its own rusage, from
    wait4). Killed past ``timeout_s``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "teacher.cli", *args], env=env, stdout=out, stderr=out
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024  # Linux: KiB
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise AssertionError(
        f"teacher {' '.join(args)} ran over {timeout_s} s: {log.read_text()[-2000:]}"
    )


def test_teacher_predict_on_the_png_bomb_stays_small(world, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    shutil.copy(world["root"] / "files" / "images" / "bomb.png", pool / "bomb.png")
    out = tmp_path / "tasks.json"
    code, peak = run_predict(predict_args(world, pool, out, max_detections=3), tmp_path / "log")
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    assert peak < PEAK_MB
    (labeled,) = json.loads(out.read_text())
    regions = labeled["predictions"][0]["result"]
    assert regions and all((g["original_width"], g["original_height"]) == BOMB for g in regions)
    brushes = [g["value"]["rle"] for g in regions if g["type"] == "brushlabels"]
    assert brushes and all(brush_size(rle) == BOMB[0] * BOMB[1] * 4 for rle in brushes)


def test_predict_reports_a_fifo_and_a_name_that_is_not_utf8_as_unreadable(world, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    png = (world["root"] / "files" / "images" / "img_0.png").read_bytes()
    (pool / "ok.png").write_bytes(png)
    os.mkfifo(pool / "pipe.png")
    with open(os.fsencode(pool) + b"/bad\xff.png", "wb") as f:  # a Latin-1 name
        f.write(png)
    out, log = tmp_path / "pred.json", tmp_path / "log"
    code, _ = run_predict(
        ["predict", str(pool), *model_args(world), "--out", str(out), "--max-detections", "3"],
        log,
    )
    assert code == 0, log.read_text()[-3000:]
    doc = json.loads(out.read_bytes().decode("utf-8"))  # strict UTF-8
    json.dumps(doc, ensure_ascii=False).encode("utf-8")  # and no lone surrogate in any string
    assert [im["file_name"] for im in doc["images"]] == ["ok.png"]
    reasons = {Path(u["file"]).name: u["reason"] for u in doc["info"]["unreadable"]}
    assert reasons.keys() == {"pipe.png", "bad\\xff.png"}
    assert reasons["pipe.png"].startswith("a FIFO (named pipe), not a regular file")
    assert reasons["bad\\xff.png"].startswith("file name is not UTF-8; rename it")
    assert "skipped unreadable image" in log.read_text()
