"""End to end with a real Label Studio (PyPI `label-studio`, locked in
requirements/label-studio.txt, in its own virtual environment `.venv-ls/` because its pins clash
with ours), as a labeler meets it:

- `teacher label-studio-setup` makes the project (labeling config from the server's classes,
  a Local Storage over the images, a task per image, `teacher serve` connected), and every
  task's image answers 200 through Label Studio, as the browser asks for it;
- predictions retrieved through Label Studio (local files and an upload), a smart-tool click;
- the round trip of a labeler who accepts the prediction: the annotation saved with the
  prediction's result holds the predicted masks (decoded by the SDK's decoder, in `.venv-ls`);
- the labeling page in headless Chromium (Playwright, locked in `.venv-ls`): the image loaded,
  the regions drawn are the predictions, boxes and masks apart, no error; Submit saves the masks;
- importing the tasks `teacher predict --format label-studio` writes.

Label Studio and the server bind 127.0.0.1 only, Label Studio's data dir is temporary (a copy of
a migrated template kept in `.venv-ls/template-data/`, made on the first run). The screenshot of
the labeling page is kept under pytest's tmp dir and, when TEACHER_TEST_ARTIFACTS names a
folder, copied there.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_world import TOKEN, free_port, make_world, predict_args, start_server

from teacher.cli import main as teacher_main
from teacher.serve import brush

REPO = Path(__file__).resolve().parents[2]
LS_VENV = REPO / ".venv-ls"
LS_BIN = LS_VENV / "bin" / "label-studio"
TEMPLATE = LS_VENV / "template-data"
LS_PYTHON = LS_VENV / "bin" / "python"
LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"
LS_USER = ("e2e@example.com", "e2e-password")
PAGE = Path(__file__).with_name("label_studio_page.py")  # the labeling page, in Chromium
CHROMIUM = Path("/usr/bin/chromium")
H, W = 48, 64  # the world's images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The adapters, images and params of serve_world.make_world, once for this module."""
    return make_world(tmp_path_factory.mktemp("serve"))


def ls_env(data: Path, files: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(files),
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        # Nothing phones home, and a broken telemetry client cannot stop it from starting:
        # an empty DSN skips sentry_sdk.init (core/utils/sentry.py), for the server and the pages
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "FEATURE_FLAGS_OFFLINE": "true",
        "PYTHONPATH": "",
    }


def start_label_studio(data: Path, files: Path, *, timeout_s: float = 300):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(data.parent / f"label-studio-{port}.log", "w")
    proc = subprocess.Popen(
        [
            str(LS_BIN),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--host",
            url,
            "--port",
            str(port),
            "--data-dir",
            str(data),
            "--username",
            LS_USER[0],
            "--password",
            LS_USER[1],
            "--user-token",
            LS_TOKEN,
            "--enable-legacy-api-token",
        ],
        env=ls_env(data, files),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"label-studio exited {proc.returncode}: see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise AssertionError(f"label-studio not up after {timeout_s} s: see {log.name}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: label-studio and its children
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def label_studio(world, tmp_path_factory):
    if not any(LS_VENV.glob(".installed-label-studio*")):
        pytest.skip(
            f"Label Studio is not installed in {LS_VENV} (`make label-studio` installs it;"
            " it needs PyPI): the end-to-end test cannot run here"
        )
    files = world["root"] / "files"
    data = tmp_path_factory.mktemp("ls") / "data"
    if not (TEMPLATE / "label_studio.sqlite3").exists():  # first run: migrate once, keep a copy
        fresh = tmp_path_factory.mktemp("ls-template") / "data"
        fresh.mkdir()
        proc, _ = start_label_studio(fresh, files)
        stop(proc)
        shutil.copytree(fresh, TEMPLATE.with_suffix(".tmp"), dirs_exist_ok=True)
        TEMPLATE.with_suffix(".tmp").rename(TEMPLATE)
    shutil.copytree(TEMPLATE, data)
    start = time.monotonic()
    proc, url = start_label_studio(data, files)
    print(f"label-studio up in {time.monotonic() - start:.1f} s at {url}")
    yield url
    stop(proc)


def api(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=120)


@pytest.fixture(scope="module")
def server(world, label_studio):
    """`teacher serve` over the world, with Label Studio's URL and key (for uploads)."""
    env = {"LABEL_STUDIO_URL": label_studio, "LABEL_STUDIO_API_KEY": LS_TOKEN}
    proc, url = start_server(world, env=env)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def setup_command(*args: str, url: str, key: str = LS_TOKEN) -> tuple[int, str, str]:
    """`teacher label-studio-setup ARGS` as the README runs it (its variables set); returns
    the exit code, stdout and stderr."""
    env = {"LABEL_STUDIO_URL": url, "LABEL_STUDIO_API_KEY": key, "TEACHER_SERVE_TOKEN": TOKEN}
    run = subprocess.run(
        [sys.executable, "-m", "teacher.cli", "label-studio-setup", *args],
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return run.returncode, run.stdout, run.stderr


@pytest.fixture(scope="module")
def project(world, label_studio, server):
    """The project `teacher label-studio-setup` makes over the world's images, the model
    connected: ``{"id", "tasks"}`` (the tasks as Label Studio lists them, by image name)."""
    started = time.monotonic()
    code, out, err = setup_command(
        str(world["root"] / "files" / "images"), "--model-url", server, url=label_studio
    )
    assert code == 0, err
    print(f"teacher label-studio-setup: {time.monotonic() - started:.1f} s", file=sys.stderr)
    project_id = int(out.rsplit("/projects/", 1)[1].split("/")[0])
    tasks = api(label_studio).get("/api/tasks", params={"project": project_id}).json()["tasks"]
    return {"id": project_id, "tasks": sorted(tasks, key=lambda t: t["data"]["image"])}


def image_path(url: str) -> str:
    """A task's image URL as a path on Label Studio (the storage writes its own host first)."""
    return url if url.startswith("/") else "/" + url.split("/", 3)[3]


def test_setup_makes_a_project_whose_images_the_browser_gets(world, label_studio, project):
    ls = api(label_studio)
    images = world["root"] / "files" / "images"
    assert [t["data"]["image"].rsplit("=", 1)[1] for t in project["tasks"]] == [
        f"images/img_{i}.png" for i in range(4)
    ]
    for task in project["tasks"]:  # what the labeling page asks for: 200 and the file's bytes
        r = ls.get(image_path(task["data"]["image"]))
        name = task["data"]["image"].rsplit("/", 1)[1]
        assert r.status_code == 200 and r.content == (images / name).read_bytes(), name
    config = ls.get(f"/api/projects/{project['id']}").json()
    assert config["show_collab_predictions"] and config["evaluate_predictions_automatically"]
    for tag in ("RectangleLabels", "BrushLabels", 'KeyPointLabels name="click"'):
        assert tag in config["label_config"]
    assert '<Label value="round thing"' in config["label_config"]
    (ml,) = ls.get("/api/ml", params={"project": project["id"]}).json()
    assert ml["readable_state"] == "Connected" and ml["is_interactive"]


def test_setup_says_what_is_wrong(world, label_studio, tmp_path):
    images = str(world["root"] / "files" / "images")
    code, _, err = setup_command(images, "--classes", "box", url=label_studio, key="wrong")
    assert code == 1 and "refused the API key in LABEL_STUDIO_API_KEY (HTTP 401)" in err
    code, _, err = setup_command(images, "--classes", "box", url=f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "Label Studio is not reachable at http://127.0.0.1:" in err
    outside = tmp_path / "elsewhere"  # not under Label Studio's LOCAL_FILES_DOCUMENT_ROOT
    outside.mkdir()
    code, _, err = setup_command(str(outside), "--classes", "box", url=label_studio)
    assert code == 1 and "must be a subdirectory of LOCAL_FILES_DOCUMENT_ROOT" in err, err
    assert "start Label Studio with LOCAL_FILES_SERVING_ENABLED=true" in err


def retrieve_predictions(ls: httpx.Client, project: int) -> dict[int, dict]:
    """Label Studio's Retrieve Predictions on every task; ``{task id: prediction}``."""
    r = ls.post(
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert r.status_code == 200, r.text
    return {p["task"]: p for p in ls.get("/api/predictions", params={"project": project}).json()}


def test_predictions_show_in_label_studio(world, label_studio, server, project):
    started = time.monotonic()
    ls = api(label_studio)
    with open(world["root"] / "files" / "images" / "img_3.png", "rb") as f:  # an upload
        r = ls.post(
            f"/api/projects/{project['id']}/import", files={"file": ("up.png", f, "image/png")}
        )
    assert r.status_code == 201, r.text
    tasks = ls.get("/api/tasks", params={"project": project["id"]}).json()["tasks"]
    assert len(tasks) == 5 and any("/data/upload/" in t["data"]["image"] for t in tasks)
    version = httpx.get(server + "/health").json()["model_version"]
    preds = retrieve_predictions(ls, project["id"])
    assert sorted(preds) == sorted(t["id"] for t in tasks)
    for p in preds.values():
        assert p["model_version"] == version and 0 <= p["score"] <= 1
        by_id = {r["id"]: r for r in p["result"]}
        assert len(by_id) == len(p["result"])  # one region per result
        assert {r["type"] for r in p["result"]} == {"rectanglelabels", "brushlabels"}
        for region in p["result"]:
            assert region["value"][region["type"]][0] in ("box", "round thing")
            if region["type"] == "brushlabels":  # its box, the same detection, is its parent
                box = by_id[region["parentID"]]
                assert box["type"] == "rectanglelabels" and box["score"] == region["score"]
                assert brush.rle_to_mask(region["value"]["rle"], height=H, width=W).any()
    # a smart-tool click, through Label Studio
    (ml,) = ls.get("/api/ml", params={"project": project["id"]}).json()
    click = {
        "type": "keypointlabels",
        "from_name": "click",
        "to_name": "image",
        "is_positive": True,
        "original_width": W,
        "original_height": H,
        "value": {"x": 30, "y": 40, "width": 1, "keypointlabels": ["box"]},
    }
    r = ls.post(
        f"/api/ml/{ml['id']}/interactive-annotating",
        json={"task": tasks[-1]["id"], "context": {"result": [click]}},
    )
    assert r.status_code == 200, r.text
    (region,) = r.json()["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["box"]
    print(f"label-studio round trip: {time.monotonic() - started:.1f} s", file=sys.stderr)


def sdk_masks(rles: list[list[int]]) -> list[np.ndarray]:
    """Brush RLEs decoded by Label Studio's own converter (label_studio_sdk, in .venv-ls): a
    decoder independent of teacher.serve.brush."""
    code = (
        "import json,sys; from label_studio_sdk.converter.brush import decode_rle\n"
        f"print(json.dumps([(decode_rle(r).reshape({H},{W},4)[...,3]>0).tolist() "
        "for r in json.load(sys.stdin)]))"
    )
    run = subprocess.run(
        [str(LS_PYTHON), "-c", code],
        input=json.dumps(rles),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return [np.array(m, bool) for m in json.loads(run.stdout)]


def assert_saved_as_predicted(saved: list[dict], predicted: list[dict]) -> None:
    """An annotation's results are the prediction's: every box where it was, every mask with
    the predicted pixels (decoded by the SDK), each its own region."""
    by_id = {r["id"]: r for r in saved}
    assert sorted(by_id) == sorted(r["id"] for r in predicted)
    brushes = [r for r in predicted if r["type"] == "brushlabels"]
    assert all("rle" in by_id[r["id"]]["value"] for r in brushes), "a mask saved without pixels"
    for want, got in zip(
        [brush.rle_to_mask(r["value"]["rle"], height=H, width=W) for r in brushes],
        sdk_masks([by_id[r["id"]]["value"]["rle"] for r in brushes]),
        strict=True,
    ):
        assert want.any() and np.array_equal(got, want)
    for r in predicted:
        got = by_id[r["id"]]
        assert got["type"] == r["type"] and got.get("parentID") == r.get("parentID")
        if r["type"] == "rectanglelabels":
            for k in ("x", "y", "width", "height"):
                assert got["value"][k] == pytest.approx(r["value"][k], abs=1e-3)


def test_an_accepted_prediction_is_saved_with_its_masks(label_studio, project):
    """What Label Studio's page sends when a labeler accepts the prediction and presses
    Submit: POST /api/tasks/{id}/annotations with the prediction's result."""
    ls = api(label_studio)
    task = project["tasks"][0]["id"]
    (pred,) = ls.get("/api/predictions", params={"task": task}).json()
    r = ls.post(f"/api/tasks/{task}/annotations", json={"result": pred["result"]})
    assert r.status_code == 201, r.text
    saved = ls.get(f"/api/annotations/{r.json()['id']}").json()["result"]
    assert_saved_as_predicted(saved, pred["result"])


def browser_missing() -> str | None:
    """Why the browser test cannot run here; None when it can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} absent (Debian: apt-get install chromium)"
    if not LS_PYTHON.exists():
        return f"{LS_PYTHON} absent (`make label-studio` installs Label Studio and Playwright)"
    run = subprocess.run([str(LS_PYTHON), "-c", "import playwright"], capture_output=True)
    if run.returncode != 0:
        return f"Playwright is not installed in {LS_VENV} (`make label-studio` installs it)"
    return None


def test_the_labeler_sees_the_image_and_the_predictions(label_studio, project, tmp_path):
    if why := browser_missing():
        pytest.skip(why)
    started = time.monotonic()
    ls = api(label_studio)
    task = project["tasks"][2]
    (pred,) = ls.get("/api/predictions", params={"task": task["id"]}).json()
    shot = tmp_path / "labeling-page.png"
    run = subprocess.run(
        [
            str(LS_PYTHON),
            str(PAGE),
            label_studio,
            str(project["id"]),
            str(task["id"]),
            str(shot),
            "--image",
            task["data"]["image"],
            "--email",
            LS_USER[0],
            "--password",
            LS_USER[1],
            "--submit",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if os.environ.get("TEACHER_TEST_ARTIFACTS"):
        Path(os.environ["TEACHER_TEST_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["TEACHER_TEST_ARTIFACTS"]) / shot.name)
    seen = json.loads(run.stdout)
    assert seen["image"]["width"] == W and seen["image"]["height"] == H  # the image loaded
    assert seen["errors"] == []
    assert not [f for f in seen["failed"] if "/data/" in f[1] or "/api/" in f[1]], seen["failed"]
    # the regions drawn are the predictions: a rectangle per box, a brush per mask
    kinds = {"rectanglelabels": "rectangleregion", "brushlabels": "brushregion"}
    assert sorted((r["id"], r["kind"]) for r in seen["regions"]) == sorted(
        (r["id"], kinds[r["type"]]) for r in pred["result"]
    )
    assert_saved_as_predicted(seen["results"], pred["result"])  # what Submit sends
    assert seen["submitted"] == 201
    (annotation,) = ls.get(f"/api/tasks/{task['id']}/annotations").json()
    assert_saved_as_predicted(annotation["result"], pred["result"])  # what Submit saved
    print(f"labeling page: {time.monotonic() - started:.1f} s, {shot}", file=sys.stderr)


def test_predict_format_label_studio_imports_with_predictions(
    world, label_studio, tmp_path, monkeypatch
):
    monkeypatch.chdir(world["root"] / "files")
    out = tmp_path / "tasks.json"
    assert teacher_main(predict_args(world, "images", out, max_detections=2)) == 0
    code, stdout, err = setup_command("images", "--tasks", str(out), url=label_studio)
    assert code == 0, err
    assert "imported 4 tasks" in stdout
    project = int(stdout.rsplit("/projects/", 1)[1].split("/")[0])
    ls = api(label_studio)
    tasks = ls.get("/api/tasks", params={"project": project}).json()["tasks"]
    assert len(tasks) == 4  # the file's, no task per image besides
    for t in tasks:
        assert ls.get(image_path(t["data"]["image"])).status_code == 200
    preds = ls.get("/api/predictions", params={"project": project}).json()
    assert len(preds) == 4
    for p in preds:  # 2 boxes + 2 masks per image, each its own region, masks under boxes
        assert len({r["id"] for r in p["result"]}) == len(p["result"]) == 4
        assert sum("parentID" in r for r in p["result"]) == 2
