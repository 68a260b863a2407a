"""`teacher serve` as a real process on localhost, over HTTP: Label Studio's ML backend protocol
(health, setup, batched predict with per-task errors, smart-tool clicks reusing SAM's image
embedding, webhook), auth, limits, 4xx; and `teacher predict --format label-studio`."""

import base64
import json
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from serve_world import TOKEN, boxes_only_backend, make_world, predict_args, start_server

from teacher.cli import main as teacher_main
from teacher.serve import brush

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = """<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="box"/><Label value="giraffe"/></RectangleLabels>
  <BrushLabels name="mask" toName="img"><Label value="box"/></BrushLabels>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="box" smart="true"/></KeyPointLabels>
</View>"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The adapters, images and params of serve_world.make_world, once for this module."""
    return make_world(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def image_http(world):
    """A plain http server for the images (http task URLs)."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(world["root"] / "files"))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def server(world):
    proc, url = start_server(world, "--max-tasks", "8")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def post(url, path, body, headers=AUTH, **kw):
    return httpx.post(url + path, json=body, headers=headers, timeout=120, **kw)


def task(i, name, key="image"):
    return {"id": i, "data": {key: name}}


def local(name):
    return f"/data/local-files/?d=images/{name}"


def test_health_is_open_and_names_the_model(server):
    body = httpx.get(server + "/health", timeout=10).json()
    assert body["status"] == "UP" and body["model_version"].startswith("teacher-adapters-")
    assert body["classes"] == ["box", "round thing"] and body["sam"] is True


def test_routes_need_the_token_bearer_or_basic(server):
    body = {"tasks": [task(1, local("img_0.png"))], "label_config": CONFIG}
    assert post(server, "/predict", body, headers={}).status_code == 401
    assert (
        post(server, "/predict", body, headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert (
        post(server, "/predict", body, headers={"Authorization": f"Basic {basic}"}).status_code
        == 200
    )
    assert (
        post(server, "/setup", {"project": "1.1", "schema": CONFIG}, headers={}).status_code == 401
    )


def test_setup_reports_classes_without_labels_and_labels_without_classes(server):
    r = post(server, "/setup", {"project": "7.1700000000", "schema": CONFIG})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == httpx.get(server + "/health").json()["model_version"]
    assert body["unknown_classes"] == {"box": ["round thing"], "mask": ["round thing"]}
    assert body["labels_without_class"] == {"box": ["giraffe"]}
    # the project's config is remembered: predict without label_config
    r = post(
        server, "/predict", {"tasks": [task(1, local("img_0.png"))], "project": "7.1700000000"}
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_predict_batches_tasks_and_fails_only_the_bad_ones(server, image_http):
    tasks = [
        task(1, local("img_0.png")),
        task(2, "/data/local-files/?d=../outside.png"),
        task(3, local("img_1.png")),
        task(4, local("img_2.png"), key="other"),
        task(5, f"{image_http}/images/img_3.png"),
        task(6, f"{image_http}/images/missing.png"),
        task(7, local("img_2.png")),
    ]
    r = post(server, "/predict", {"tasks": tasks, "label_config": CONFIG, "project": "3.1"})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == len(tasks)
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert sorted(errors) == [2, 4, 6]
    assert "leaves the local-files root" in errors[2] and "data.image" in errors[4]
    assert "HTTP 404" in errors[6]
    assert all(results[i] == [] for i in (1, 3, 5))
    assert body["unknown_classes"] == ["round thing"]
    n_regions = 0  # 'round thing' detections have no label here: some task may have none
    for pred in (results[i] for i in (0, 2, 4, 6)):
        assert pred["model_version"] == body["model_version"]
        rects = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
        brushes = [r for r in pred["result"] if r["type"] == "brushlabels"]
        assert len(brushes) <= len(rects)  # a mask per box unless SAM's is empty
        n_regions += len(rects)
        for r in pred["result"]:
            assert (r["from_name"], r["to_name"]) in (("box", "img"), ("mask", "img"))
            assert (r["original_width"], r["original_height"]) == (64, 48) and 0 <= r["score"] <= 1
        for r in rects:
            v = r["value"]
            assert v["rectanglelabels"] == ["box"]
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and v["x"] + v["width"] <= 100.01
        for r in brushes:
            assert r["value"]["format"] == "rle"
            assert brush.rle_to_mask(r["value"]["rle"], height=48, width=64).any()
        scores = [r["score"] for r in pred["result"]]
        assert pred["score"] == pytest.approx(np.mean(scores) if scores else 0.0, abs=1e-3)
    assert n_regions > 0


def click(x, y, *, positive=True, label="box"):
    return {
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "img",
        "original_width": 64,
        "original_height": 48,
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]},
    }


def test_smart_clicks_give_a_mask_and_reuse_the_embedding(server):
    before = httpx.get(server + "/health").json()["images_embedded"]
    t = task(11, local("img_3.png"))
    ids = set()
    for ctx in (
        {"result": [click(25, 30)]},
        {"result": [click(25, 30), click(70, 60, positive=False)]},
        {
            "result": [
                {
                    "type": "rectanglelabels",
                    "from_name": "box",
                    "to_name": "img",
                    "original_width": 64,
                    "original_height": 48,
                    "value": {
                        "x": 10,
                        "y": 10,
                        "width": 40,
                        "height": 40,
                        "rectanglelabels": ["box"],
                    },
                }
            ]
        },
    ):
        r = post(
            server, "/predict", {"tasks": [t], "label_config": CONFIG, "params": {"context": ctx}}
        )
        assert r.status_code == 200, r.text
        (pred,) = r.json()["results"]
        (region,) = pred["result"]
        assert region["type"] == "brushlabels" and region["from_name"] == "mask"
        assert region["value"]["brushlabels"] == ["box"]
        assert brush.rle_to_mask(region["value"]["rle"], height=48, width=64).shape == (48, 64)
        ids.add(region["id"])
    assert httpx.get(server + "/health").json()["images_embedded"] == before + 1  # once per image
    # Label Studio puts an accepted answer in place of the region with its id: one id per answer
    assert len(ids) == 3


class NoObjectTeachers:
    """Teachers whose SAM finds nothing wherever one clicks."""

    has_sam = True
    model_version = "teacher-test"

    def segment(self, key, load, prompts):
        return np.zeros((prompts.height, prompts.width), bool), 0.02


def test_a_click_that_yields_no_mask_says_why():
    from teacher.serve.backend import Backend
    from teacher.serve.sources import ImageSources

    backend = Backend(teachers=NoObjectTeachers(), sources=ImageSources())
    reply = backend.predict(
        tasks=[task(5, local("img_1.png"))],
        label_config=CONFIG,
        project=None,
        context={"result": [click(25, 30), click(70, 60, positive=False)]},
    )
    (pred,) = reply["results"]
    assert pred["result"] == [] and pred["model_version"] == "teacher-test"
    (error,) = reply["errors"]
    assert error["index"] == 0 and error["task"] == 5
    assert error["error"].startswith(
        "no mask: SAM found no object at the 1 positive and 1 negative"
    )


@pytest.mark.parametrize(
    "clicks, match",
    [
        ([click(25, 30)] * 10_000, "10000 keypoints and rectangles in one context; at most 64"),
        ([click(float("nan"), 30)], "value.x = nan is not a finite number"),
        ([click(25, float("inf"))], "value.y = inf is not a finite number"),
        ([click(25, 130)], "value.y = 130 is off the image"),
        ([click(25, 30, label="giraffe")], "label 'giraffe' is not a label of 'kp' (['box'])"),
    ],
)
def test_bad_smart_clicks_get_400_saying_what_was_wrong(server, clicks, match):
    before = httpx.get(server + "/health").json()["images_embedded"]
    body = {
        "tasks": [task(12, local("img_2.png"))],
        "label_config": CONFIG,
        "params": {"context": {"result": clicks}},
    }
    r = httpx.post(  # json.dumps writes NaN and Infinity as Python's json reads them
        server + "/predict",
        content=json.dumps(body),
        headers={**AUTH, "content-type": "application/json"},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("params.context: ") and match in r.json()["error"]
    assert httpx.get(server + "/health").json()["images_embedded"] == before  # refused first


@pytest.mark.parametrize(
    "body, status, match",
    [
        ({"label_config": CONFIG}, 422, "tasks"),
        ({"tasks": "nope", "label_config": CONFIG}, 422, "tasks"),
        ({"tasks": [task(1, local("img_0.png"))], "label_config": "<View"}, 400, "not valid XML"),
        ({"tasks": [task(1, local("img_0.png"))]}, 400, "no label_config"),
        ({"tasks": [task(1, local("img_0.png"))] * 9, "label_config": CONFIG}, 400, "at most 8"),
        (
            {
                "tasks": [task(1, local("img_0.png"))],
                "label_config": '<View><Image name="i" value="$image"/></View>',
            },
            400,
            "nothing to predict",
        ),
        (
            {
                "tasks": [task(1, local("img_0.png"))] * 2,
                "label_config": CONFIG,
                "params": {"context": {"result": [click(1, 1)]}},
            },
            400,
            "one task",
        ),
        (
            {
                "tasks": [task(1, local("nope.png"))],
                "label_config": CONFIG,
                "params": {"context": {"result": [click(1, 1)]}},
            },
            400,
            "cannot read",
        ),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, body, status, match):
    r = post(server, "/predict", body)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]


def test_not_json_and_oversized_bodies(server):
    r = httpx.post(
        server + "/predict",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 422 and "invalid request" in r.json()["error"]
    r = httpx.post(server + "/predict", content=b"x" * (21 * 2**20), headers=AUTH)
    assert r.status_code == 413


def test_webhook_is_acknowledged(server):
    r = post(server, "/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 1}}, headers={})
    assert r.status_code == 200 and r.json()["status"] == "ignored"


def test_binds_localhost_by_default(server):
    port = server.rsplit(":", 1)[1]
    listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    lines = [line for line in listening.splitlines() if f":{port} " in line]
    assert lines and all("127.0.0.1:" in line for line in lines), listening


def test_boxes_only_without_token(world):
    """In process (FastAPI's test client): no SAM, no token configured -> open, boxes only."""
    from fastapi.testclient import TestClient

    from teacher.serve.app import create_app

    backend = boxes_only_backend(world, local_root=world["root"] / "files")
    client = TestClient(create_app(backend, token=None))
    r = client.post(
        "/predict", json={"tasks": [task(1, local("img_0.png"))], "label_config": CONFIG}
    )
    assert r.status_code == 200
    assert {x["type"] for x in r.json()["results"][0]["result"]} <= {"rectanglelabels"}
    r = client.post(
        "/predict",
        json={
            "tasks": [task(1, local("img_0.png"))],
            "label_config": CONFIG,
            "params": {"context": {"result": [click(1, 1)]}},
        },
    )
    assert r.status_code == 400 and "--boxes-only" in r.json()["error"]


def test_predict_format_label_studio_writes_importable_tasks(world, server, tmp_path, monkeypatch):
    monkeypatch.chdir(world["root"] / "files")
    out = tmp_path / "tasks.json"
    rc = teacher_main(predict_args(world, "images", out, max_detections=2))
    assert rc == 0
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"] for t in tasks] == [local(f"img_{i}.png") for i in range(4)]
    config = (tmp_path / "tasks.label_config.xml").read_text()
    assert '<BrushLabels name="mask" toName="image">' in config and 'value="round thing"' in config
    for t in tasks:
        (pred,) = t["predictions"]
        assert pred["model_version"].startswith("teacher-adapters-")
        assert {r["type"] for r in pred["result"]} <= {"rectanglelabels", "brushlabels"}
        assert len([r for r in pred["result"] if r["type"] == "rectanglelabels"]) == 2
    assert pred["model_version"] == httpx.get(server + "/health").json()["model_version"]


def test_predict_format_label_studio_with_a_given_config(world, tmp_path, capsys):
    config = tmp_path / "config.xml"
    config.write_text(
        '<View><Image name="photo" value="$img"/><PolygonLabels name="poly" '
        'toName="photo"><Label value="Box"/></PolygonLabels></View>'
    )
    out = tmp_path / "tasks.json"
    args = [
        *predict_args(world, world["root"] / "files" / "images", out, max_detections=3),
        "--image-url-prefix",
        "https://files.example/",
    ]
    assert teacher_main([*args, "--label-config", str(tmp_path / "absent.xml")]) == 1
    assert "absent.xml: no such file" in capsys.readouterr().err
    assert teacher_main([*args, "--label-config", str(config)]) == 0
    assert "round thing" in capsys.readouterr().err  # no label for it: said, not dropped silently
    tasks = json.loads(out.read_text())
    assert tasks[0]["data"] == {"img": "https://files.example/img_0.png"}
    regions = [r for t in tasks for r in t["predictions"][0]["result"]]
    assert regions
    assert {(r["type"], r["from_name"], r["to_name"]) for r in regions} <= {
        ("polygonlabels", "poly", "photo")
    }
    assert all(
        r["value"]["polygonlabels"] == ["Box"] and len(r["value"]["points"]) >= 3 for r in regions
    )


def test_a_sam2_teacher_serves_masks_and_smart_clicks_over_http(tmp_path):
    """`teacher serve` with sam.model tiny-random-sam2 and a SAM 2 adapter: pre-labels carry
    SAM 2's masks, a smart click answers with one, and the image is embedded once."""
    from fake_adapters import write_sam_adapter, write_tiny_params

    world = make_world(tmp_path)
    write_sam_adapter(world["root"] / "models" / "sam", model="tiny-random-sam2")
    write_tiny_params(
        world["params"], sam_model="tiny-random-sam2", box_threshold=0.0, text_threshold=0.0
    )
    # both of the world's classes (the random DINO's top boxes may name either)
    config = CONFIG.replace('<Label value="giraffe"/>', '<Label value="round thing"/>')
    config = config.replace(
        '<BrushLabels name="mask" toName="img"><Label value="box"/>',
        '<BrushLabels name="mask" toName="img"><Label value="box"/><Label value="round thing"/>',
    )
    proc, url = start_server(world)
    try:
        r = post(url, "/predict", {"tasks": [task(1, local("img_0.png"))], "label_config": config})
        assert r.status_code == 200, r.text
        (pred,) = r.json()["results"]
        brushes = [x for x in pred["result"] if x["type"] == "brushlabels"]
        assert brushes and all(x["value"]["format"] == "rle" for x in brushes)
        before = httpx.get(url + "/health").json()["images_embedded"]
        ctx = {"result": [click(25, 30)]}
        t = task(2, local("img_1.png"))
        for _ in range(2):  # the second click on the same image reuses its embedding
            r = post(
                url, "/predict", {"tasks": [t], "label_config": config, "params": {"context": ctx}}
            )
            assert r.status_code == 200, r.text
            (region,) = r.json()["results"][0]["result"]
            assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["box"]
            mask = brush.rle_to_mask(region["value"]["rle"], height=48, width=64)
            assert mask.shape == (48, 64)
        assert httpx.get(url + "/health").json()["images_embedded"] == before + 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
