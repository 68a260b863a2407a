"""End to end with a real Label Studio (PyPI `label-studio`, locked in
requirements/label-studio.txt, in its own virtual environment `.venv-ls/` because its pins clash
with ours): create a project with a labeling config, import tasks (local files and an upload),
connect `teacher serve` as its ML backend, ask for predictions, read them back through Label
Studio's API; a smart-tool click; and importing the tasks `teacher predict --format
label-studio` writes.

Label Studio and the server bind 127.0.0.1 only, Label Studio's data dir is temporary (a copy of
a migrated template kept in `.venv-ls/template-data/`, made on the first run).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_world import free_port, make_world, predict_args, start_server

from teacher.cli import main as teacher_main
from teacher.serve import brush

REPO = Path(__file__).resolve().parents[2]
LS_VENV = REPO / ".venv-ls"
LS_BIN = LS_VENV / "bin" / "label-studio"
TEMPLATE = LS_VENV / "template-data"
LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"
LS_CONFIG = """<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="box"/><Label value="round thing"/></RectangleLabels>
  <BrushLabels name="mask" toName="img"><Label value="box"/><Label value="round thing"/></BrushLabels>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="box" smart="true"/></KeyPointLabels>
</View>"""

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
            "e2e@example.com",
            "--password",
            "e2e-password",
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


def test_predictions_show_in_label_studio(world, label_studio):
    started = time.monotonic()
    ls = httpx.Client(
        base_url=label_studio, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=120
    )
    r = ls.post("/api/projects", json={"title": "teacher e2e", "label_config": LS_CONFIG})
    assert r.status_code == 201, r.text
    project = r.json()["id"]
    r = ls.post(
        f"/api/projects/{project}/import",
        json=[{"image": f"/data/local-files/?d=images/img_{i}.png"} for i in range(2)],
    )
    assert r.status_code == 201, r.text
    with open(world["root"] / "files" / "images" / "img_3.png", "rb") as f:  # an upload
        r = ls.post(f"/api/projects/{project}/import", files={"file": ("up.png", f, "image/png")})
    assert r.status_code == 201, r.text
    tasks = ls.get("/api/tasks", params={"project": project}).json()["tasks"]
    assert len(tasks) == 3 and any("/data/upload/" in t["data"]["image"] for t in tasks)

    server_env = {"LABEL_STUDIO_URL": label_studio, "LABEL_STUDIO_API_KEY": LS_TOKEN}
    proc, server = start_server(world, env=server_env)
    try:
        version = httpx.get(server + "/health").json()["model_version"]
        r = ls.post(
            "/api/ml",
            json={
                "url": server,
                "project": project,
                "title": "teacher",
                "is_interactive": True,
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": "label-studio",
                "basic_auth_pass": "test-token-15",
            },
        )
        assert r.status_code == 201, r.text
        ml = r.json()
        assert ml["readable_state"] == "Connected" and ml["model_version"] == version
        r = ls.post(
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": True, "excluded": []}},
        )
        assert r.status_code == 200, r.text
        preds = ls.get("/api/predictions", params={"project": project}).json()
        assert sorted(p["task"] for p in preds) == sorted(t["id"] for t in tasks)
        for p in preds:
            assert p["model_version"] == version and 0 <= p["score"] <= 1
            types = {r["type"] for r in p["result"]}
            assert types == {"rectanglelabels", "brushlabels"}, types
            for region in p["result"]:
                label = region["value"][region["type"]][0]
                assert label in ("box", "round thing")
                if region["type"] == "brushlabels":
                    assert brush.rle_to_mask(region["value"]["rle"], height=48, width=64).any()
        # a smart-tool click, through Label Studio
        click = {
            "type": "keypointlabels",
            "from_name": "kp",
            "to_name": "img",
            "is_positive": True,
            "original_width": 64,
            "original_height": 48,
            "value": {"x": 30, "y": 40, "width": 1, "keypointlabels": ["box"]},
        }
        r = ls.post(
            f"/api/ml/{ml['id']}/interactive-annotating",
            json={"task": tasks[2]["id"], "context": {"result": [click]}},
        )
        assert r.status_code == 200, r.text
        (region,) = r.json()["data"]["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["box"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(f"label-studio round trip: {time.monotonic() - started:.1f} s", file=sys.stderr)


def test_predict_format_label_studio_imports_with_predictions(
    world,
    label_studio,
    tmp_path,
    monkeypatch,
):
    monkeypatch.chdir(world["root"] / "files")
    out = tmp_path / "tasks.json"
    assert teacher_main(predict_args(world, "images", out, max_detections=2)) == 0
    ls = httpx.Client(
        base_url=label_studio, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=120
    )
    config = (tmp_path / "tasks.label_config.xml").read_text()
    project = ls.post(
        "/api/projects", json={"title": "teacher import", "label_config": config}
    ).json()["id"]
    r = ls.post(
        f"/api/projects/{project}/import",
        content=out.read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["task_count"] == 4 and r.json()["prediction_count"] == 4
    preds = ls.get("/api/predictions", params={"project": project}).json()
    assert all(len(p["result"]) == 4 for p in preds)  # 2 boxes + 2 masks per image
