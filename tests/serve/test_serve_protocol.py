"""teacher.serve pure parts: brush RLE, labeling configs, Label Studio results, image sources."""

import io
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from teacher.serve import brush
from teacher.serve.label_config import (
    MAX_CONFIG_CLASSES,
    LabelConfigError,
    config_classes,
    match_labels,
    parse_label_config,
)
from teacher.serve.protocol import (
    MAX_CLICKS,
    ContextError,
    Found,
    context_prompts,
    interactive_prediction,
    mask_polygon,
    percent_rectangle,
    task_prediction,
)
from teacher.serve.sources import (
    ImageSourceError,
    ImageSources,
    decode_image,
    label_studio_headers,
    load_task_image,
    locate,
)
from teacher.serve.tasks import default_label_config

REPO = Path(__file__).resolve().parents[2]
LS_PYTHON = REPO / ".venv-ls" / "bin" / "python"

CONFIG = """<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img">
    <Label value="Cat"/><Label value="Dog" predicted_values="puppy,hound"/><Label value="Bird"/>
  </RectangleLabels>
  <BrushLabels name="brush" toName="img"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="img"><Label value="Cat"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="Cat" smart="true"/></KeyPointLabels>
</View>"""


def masks(h=20, w=30):
    m = np.zeros((2, h, w), bool)
    m[0, 2:10, 3:12] = True
    m[1, 5:15, 15:28] = True
    return m


def found():
    return Found(
        width=30,
        height=20,
        boxes_xywh=np.array([[3, 2, 9, 8], [15, 5, 13, 10.0]]),
        scores=np.array([0.9, 0.5]),
        names=["cat", "puppy"],
        masks=masks(),
    )


# --- brush RLE ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (40, 60), (150, 600)])
def test_brush_rle_round_trips(shape):
    rng = np.random.default_rng(0)
    for m in (rng.random(shape) < 0.3, np.zeros(shape, bool), np.ones(shape, bool)):
        assert (brush.rle_to_mask(brush.mask_to_rle(m), height=shape[0], width=shape[1]) == m).all()


def test_brush_rle_long_runs_split_like_label_studio():
    m = np.ones((300, 300), bool)  # one run of 360000 bytes: split into runs of <= 2**16
    rle = brush.mask_to_rle(m)
    assert brush.rle_to_mask(rle, height=300, width=300).all()
    assert all(0 <= b <= 255 for b in rle)


def test_brush_rle_equals_the_label_studio_sdk():
    """Parity with label_studio_sdk.converter.brush (in Label Studio's own venv)."""
    if not LS_PYTHON.exists():
        pytest.skip(f"{LS_PYTHON} absent: run `make label-studio` to compare with the SDK")
    rng = np.random.default_rng(1)
    cases = [rng.random((12, 17)) < 0.4, np.ones((300, 300), bool), masks()[0]]
    code = (
        "import json,sys,numpy as np; from label_studio_sdk.converter import brush as b\n"
        "out=[]\nfor m in json.load(sys.stdin):\n"
        "  a=np.array(m,dtype=np.uint8)*255; r=b.mask2rle(a)\n"
        "  out.append([r, (b.decode_rle(r).reshape(*a.shape,4)[...,3]>0).tolist()])\n"
        "print(json.dumps(out))"
    )
    run = subprocess.run(
        [str(LS_PYTHON), "-c", code],
        input=json.dumps([c.tolist() for c in cases]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for case, (sdk_rle, sdk_mask) in zip(cases, json.loads(run.stdout), strict=True):
        assert brush.mask_to_rle(case) == sdk_rle
        assert np.array_equal(np.array(sdk_mask), case)


# --- labeling config ---------------------------------------------------------------------


def test_config_controls_and_label_matching():
    config = parse_label_config(CONFIG)
    assert [(c.name, c.type, c.to_name, c.value) for c in config.controls] == [
        ("box", "rectanglelabels", "img", "image"),
        ("brush", "brushlabels", "img", "image"),
        ("poly", "polygonlabels", "img", "image"),
        ("kp", "keypointlabels", "img", "image"),
    ]
    box = config.controls[0]
    mapping, unknown = match_labels(["cat", "puppy", "giraffe", "bird"], box)
    assert mapping == {"cat": "Cat", "puppy": "Dog", "bird": "Bird"} and unknown == ["giraffe"]


@pytest.mark.parametrize(
    "xml, match",
    [
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        ('<View><RectangleLabels name="b" toName="nope"/></View>', "toName must name an <Image>"),
    ],
)
def test_bad_configs_say_what_is_wrong(xml, match):
    with pytest.raises(LabelConfigError, match=match):
        parse_label_config(xml)


def test_config_classes_are_the_region_labels_once_each_as_written():
    # the KeyPointLabels' labels are clicks, never prompts
    assert config_classes(parse_label_config(CONFIG)) == ["Cat", "Dog", "Bird"]
    config = parse_label_config(
        '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">'
        '<Label value="St. Bernard"/><Label value="round_thing"/></RectangleLabels>'
        '<BrushLabels name="b" toName="i"><Label value="st bernard"/><Label value="Round thing"/>'
        '<Label value="Cat"/></BrushLabels></View>'
    )
    assert config_classes(config) == ["St. Bernard", "round_thing", "Cat"]


def _rectangle_labels(*labels):
    tags = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        f'<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">{tags}'
        "</RectangleLabels></View>"
    )


@pytest.mark.parametrize(
    "xml, match",
    [
        (_rectangle_labels(), r"have no <Label value=\"...\"/>: the server was started without"),
        ('<View><Image name="i" value="$image"/></View>', "nothing to predict"),
        (_rectangle_labels("cat", ". ?"), r"<Label value='. \?'> of 'r' has no words"),
        (
            _rectangle_labels(*(f"class {i}" for i in range(MAX_CONFIG_CLASSES + 1))),
            f"{MAX_CONFIG_CLASSES + 1} labels; at most {MAX_CONFIG_CLASSES}.*--classes",
        ),
    ],
)
def test_configs_without_usable_classes_say_what_to_add(xml, match):
    with pytest.raises(LabelConfigError, match=match):
        config_classes(parse_label_config(xml))


# --- results -----------------------------------------------------------------------------


def test_rectangle_in_percent_clipped():
    assert percent_rectangle(np.array([3, 2, 9, 8]), width=30, height=20) == {
        "x": 10.0,
        "y": 10.0,
        "width": 30.0,
        "height": 40.0,
        "rotation": 0,
    }
    clipped = percent_rectangle(np.array([-3, 15, 10, 10]), width=30, height=20)
    assert clipped["x"] == 0 and clipped["width"] == pytest.approx(100 * 7 / 30, abs=1e-3)
    assert clipped["y"] == 75 and clipped["height"] == 25


def test_task_prediction_fills_every_control_and_reports_unknown():
    f = found()
    f.names = ["cat", "giraffe"]
    pred, unknown = task_prediction({"image": f}, parse_label_config(CONFIG), model_version="v1")
    assert unknown == ["giraffe"]
    by_type = {}
    for r in pred["result"]:
        by_type.setdefault(r["type"], []).append(r)
    assert sorted(by_type) == ["brushlabels", "polygonlabels", "rectanglelabels"]
    rect = by_type["rectanglelabels"][0]
    assert rect["value"]["rectanglelabels"] == ["Cat"] and rect["from_name"] == "box"
    assert rect["to_name"] == "img" and rect["original_width"] == 30 and rect["score"] == 0.9
    # one region per result (Label Studio merges results of one id into one region of the first
    # one's type: the mask's pixels were lost); the mask and polygon name their box as parent
    assert len({r["id"] for r in pred["result"]}) == len(pred["result"])
    for kind in ("brushlabels", "polygonlabels"):
        assert by_type[kind][0]["parentID"] == rect["id"] and by_type[kind][0]["id"] != rect["id"]
    assert "parentID" not in rect
    mask = brush.rle_to_mask(by_type["brushlabels"][0]["value"]["rle"], height=20, width=30)
    assert (mask == masks()[0]).all()
    pts = np.array(by_type["polygonlabels"][0]["value"]["points"])
    assert pts[:, 0].min() == pytest.approx(10) and pts[:, 1].max() == pytest.approx(45)
    assert pred["score"] == 0.9 and pred["model_version"] == "v1"
    json.dumps(pred)


def test_no_detection_gives_an_empty_prediction_with_score_zero():
    empty = Found(
        width=30,
        height=20,
        boxes_xywh=np.zeros((0, 4)),
        scores=np.zeros(0),
        names=[],
        masks=np.zeros((0, 20, 30), bool),
    )
    pred, unknown = task_prediction({"image": empty}, parse_label_config(CONFIG), model_version="v")
    assert pred == {"result": [], "score": 0.0, "model_version": "v"} and unknown == []


def test_mask_polygon_traces_the_largest_part():
    m = np.zeros((20, 30), bool)
    m[2:10, 3:12] = True
    m[15:17, 20:22] = True
    poly = mask_polygon(m)
    assert poly[:, 0].min() == 3 and poly[:, 0].max() == 11 and poly[:, 1].max() == 9
    assert mask_polygon(np.zeros((5, 5), bool)) is None


def _click(kind, value, **extra):
    return {
        "type": kind,
        "to_name": "img",
        "from_name": "kp" if kind == "keypointlabels" else "box",
        "original_width": 200,
        "original_height": 100,
        "value": value,
        **extra,
    }


def test_context_prompts_points_and_box():
    ctx = {
        "result": [
            _click(
                "keypointlabels",
                {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Cat"]},
                is_positive=True,
            ),
            _click(
                "keypointlabels", {"x": 10, "y": 20, "keypointlabels": ["Cat"]}, is_positive=False
            ),
            _click(
                "rectanglelabels",
                {"x": 10, "y": 10, "width": 50, "height": 50, "rectanglelabels": ["Cat"]},
            ),
        ]
    }
    config = parse_label_config(CONFIG)
    to_name, p = context_prompts(ctx, config)
    assert to_name == "img" and p.label == "Cat" and (p.width, p.height) == (200, 100)
    assert p.points.tolist() == [[100, 50], [20, 20]] and p.point_labels.tolist() == [1, 0]
    assert p.box_xyxy.tolist() == [20, 10, 120, 60]
    assert context_prompts({}, config) is None and context_prompts({"result": []}, config) is None
    with pytest.raises(ContextError, match="original_width"):
        context_prompts(
            {"result": [{"type": "keypointlabels", "to_name": "img", "value": {"x": 1, "y": 1}}]},
            config,
        )
    with pytest.raises(ContextError, match="to_name None: send the name of the <Image>"):
        context_prompts({"result": [{"type": "keypointlabels", "value": {"x": 1}}]}, config)


def _keypoint(x=50.0, y=50.0, label="Cat", **extra):
    return _click("keypointlabels", {"x": x, "y": y, "keypointlabels": [label]}, **extra)


def _rectangle(x=10.0, y=10.0, w=50.0, h=50.0, label="Cat"):
    value = {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label]}
    return _click("rectanglelabels", value)


@pytest.mark.parametrize(
    "results, match",
    [
        (
            [_keypoint()] * (MAX_CLICKS + 1),
            f"65 keypoints and rectangles in one context; at most {MAX_CLICKS}",
        ),
        (
            [_keypoint(x=float("nan"))],
            r"result\[0\] \(keypointlabels\): value.x = nan is not a finite",
        ),
        ([_keypoint(), _keypoint(y=float("inf"))], r"result\[1\] .*value.y = inf is not a finite"),
        ([_rectangle(w=float("-inf"))], r"value.width = -inf is not a finite"),
        ([_keypoint(x="50")], r"value.x = '50' is not a finite number"),
        ([_keypoint(x=101)], r"value.x = 101 is off the image: .*0..100"),
        ([_keypoint(y=-3)], r"value.y = -3 is off the image"),
        ([_rectangle(x=80, w=30)], r"x \+ width = 110.*leave the image"),
        ([_keypoint(original_width=float("nan"))], r"original_width = nan is not a finite"),
        ([_keypoint(original_height=0)], r"original size \(200.0, 0.0\) is not a positive"),
        (
            [_keypoint(), _keypoint(original_width=100)],
            r"several original sizes \[\(100, 100\), \(200, 100\)\]",
        ),
        (
            [_keypoint(label="Giraffe")],
            r"label 'Giraffe' is not a label of 'kp' \(\['Cat'\]\); add it",
        ),
        (
            [_rectangle(label="Cat "), _keypoint()],
            r"result\[0\] .*label 'Cat ' is not a label of 'box'",
        ),
        (
            [_keypoint(from_name="nope")],
            r"from_name 'nope' names no keypointlabels control .*\['kp'\]",
        ),
        ([{**_keypoint(), "value": [1, 2]}], r"no value with x, y"),
    ],
)
def test_bad_clicks_say_what_is_wrong_and_the_fix(results, match):
    with pytest.raises(ContextError, match=match):
        context_prompts({"result": results}, parse_label_config(CONFIG))


def test_clicks_at_the_cap_and_on_the_edge_are_taken():
    config = parse_label_config(CONFIG)
    _, p = context_prompts({"result": [_keypoint(0, 100)] * MAX_CLICKS}, config)
    assert p.points.shape == (MAX_CLICKS, 2) and p.points[0].tolist() == [0, 100]
    _, p = context_prompts({"result": [_rectangle(x=60, w=40.005)]}, config)  # rounding slack
    assert p.box_xyxy.tolist() == [120, 10, 200, 60]
    with pytest.raises(ContextError, match="expected {'result'"):
        context_prompts({"result": "clicks"}, config)


def test_interactive_prediction_is_a_brush_with_the_clicked_label():
    config = parse_label_config(CONFIG)
    pred = interactive_prediction(
        masks()[1],
        0.8,
        controls=config.of_type("brushlabels"),
        label="Dog",
        model_version="v",
        id_prefix="smart1-",
    )
    (r,) = pred["result"]
    assert r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["Dog"]
    assert r["id"] == "smart1-0" and "parentID" not in r
    assert (brush.rle_to_mask(r["value"]["rle"], height=20, width=30) == masks()[1]).all()


def test_default_label_config_parses_with_the_classes():
    config = parse_label_config(default_label_config(["cat", 'round "thing"'], masks=True))
    assert [c.type for c in config.controls] == ["rectanglelabels", "brushlabels"]
    assert config.controls[1].labels == ("cat", 'round "thing"')


# --- image sources -----------------------------------------------------------------------


def _png(path, size=(8, 6)):
    Image.fromarray(np.full((size[1], size[0], 3), 7, np.uint8)).save(path)


def test_local_files_stay_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    _png(root / "a" / "x.png")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    sources = ImageSources(local_root=root)
    image = load_task_image("/data/local-files/?d=a/x.png", sources)
    assert image.pixels.shape == (6, 8, 3) and image.size == (8, 6)
    assert load_task_image("/data/local-files/?d=a%2Fx.png", sources).pixels.shape == (6, 8, 3)
    for bad in (
        "/data/local-files/?d=../secret.png",
        "/data/local-files/?d=a/../../secret.png",
        "/data/local-files/?d=..%252Fsecret.png",
        "/data/local-files/?d=link.png",
    ):
        with pytest.raises(ImageSourceError, match="leaves the local-files root"):
            load_task_image(bad, sources)
    with pytest.raises(  # stays in the root; the message names the path under it, not the server's
        ImageSourceError, match=r"^etc/passwd \(under the local-files root\): cannot read"
    ):
        load_task_image("/data/local-files/?d=/etc/passwd", sources)


def test_urls_are_resolved_with_the_key_only_for_label_studio(tmp_path):
    s = ImageSources(ls_url="http://localhost:8080", api_key="k")
    up = locate("/data/upload/1/x.jpg", s)
    assert up.url == "http://localhost:8080/data/upload/1/x.jpg" and up.with_key
    assert label_studio_headers(s) == {"Authorization": "Token k"}
    assert locate("http://localhost:8080/data/upload/x.jpg", s).with_key
    assert not locate("http://example.com/x.jpg", s).with_key
    assert not locate("http://localhost:9999/x.jpg", s).with_key  # another port: another origin
    for bad, match in (
        ("s3://b/x.jpg", "unsupported"),
        ("/etc/passwd", "Label Studio path"),
        ("", "empty"),
        ("file:///etc/passwd", "unsupported"),
    ):
        with pytest.raises(ImageSourceError, match=match):
            locate(bad, ImageSources())
    with pytest.raises(ImageSourceError, match="disabled"):
        locate("http://example.com/x.jpg", ImageSources(allow_http=False))


class FakeLabelStudio(BaseHTTPRequestHandler):
    """Uploads behind auth; personal access tokens exchanged at /api/token/refresh/."""

    PAT, ACCESS, IMAGE = "aaa.bbb.ccc", "access-1", b""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = self.path == "/api/token/refresh/" and body.get("refresh") == self.PAT
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(json.dumps({"access": self.ACCESS} if ok else {}).encode())

    def do_GET(self):
        ok = self.headers.get("Authorization") == f"Bearer {self.ACCESS}"
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(self.IMAGE if ok else b"no")


def test_uploads_with_a_personal_access_token():
    buf = io.BytesIO()
    Image.new("RGB", (5, 4)).save(buf, format="PNG")
    FakeLabelStudio.IMAGE = buf.getvalue()
    server = HTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        image = load_task_image(
            "/data/upload/1/x.png", ImageSources(ls_url=url, api_key=FakeLabelStudio.PAT)
        )
        assert image.pixels.shape == (4, 5, 3)
        with pytest.raises(ImageSourceError, match="refused the personal access token"):
            load_task_image("/data/upload/1/x.png", ImageSources(ls_url=url, api_key="x.y.z"))
        with pytest.raises(ImageSourceError, match="HTTP 401"):  # a legacy token it refuses
            load_task_image("/data/upload/1/x.png", ImageSources(ls_url=url, api_key="legacy"))
    finally:
        server.shutdown()


def test_limits_on_bytes_and_pixels(tmp_path):
    _png(tmp_path / "x.png", size=(100, 100))
    with pytest.raises(ImageSourceError, match="over the limit"):
        load_task_image(
            "/data/local-files/?d=x.png", ImageSources(local_root=tmp_path, max_bytes=10)
        )
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    with pytest.raises(ImageSourceError, match="10000 pixels|100x100 pixels"):
        decode_image(buf.getvalue(), name="x", max_pixels=5000)
    with pytest.raises(ImageSourceError, match="not a readable image"):
        decode_image(b"nope", name="x", max_pixels=5000)


# --- backend (models stubbed) ------------------------------------------------------------


class StubTeachers:
    """ServeTeachers' interface: one 'cat' box per image; an all-white image breaks the model."""

    model_version, class_names, has_sam, embeddings_computed = "v", ["cat"], False, 0
    classes_per_call = False

    def __init__(self):
        self.calls = []

    def detect(self, images, *, classes=None):
        self.calls.append(len(images))
        if any(img.pixels.min() == 255 for img in images):  # sources.TaskImage
            raise RuntimeError("model broke")
        return [
            Found(
                width=img.size[0],
                height=img.size[1],
                boxes_xywh=np.array([[1, 1, 2, 2.0]]),
                scores=np.array([0.5]),
                names=["cat"],
            )
            for img in images
        ]


def test_backend_chunks_big_calls_and_isolates_failing_tasks(tmp_path, monkeypatch):
    from teacher.serve import backend as backend_module
    from teacher.serve.backend import Backend

    _png(tmp_path / "ok.png")
    Image.fromarray(np.full((6, 8, 3), 255, np.uint8)).save(tmp_path / "white.png")
    monkeypatch.setattr(backend_module, "CHUNK_TASKS", 16)
    stub = StubTeachers()
    backend = Backend(teachers=stub, sources=ImageSources(local_root=tmp_path))
    names = ["ok.png"] * 40
    names[5], names[30] = "white.png", "missing.png"
    tasks = [
        {"id": 100 + i, "data": {"image": f"/data/local-files/?d={n}"}} for i, n in enumerate(names)
    ]
    out = backend.predict(tasks=tasks, label_config=CONFIG, project=None, context=None)
    assert len(out["results"]) == 40
    assert [e["task"] for e in out["errors"]] == [105, 130]
    assert "model broke" in out["errors"][0]["error"] and "cannot read" in out["errors"][1]["error"]
    assert out["results"][5] == [] and out["results"][30] == []
    assert all(
        r["result"][0]["value"]["rectanglelabels"] == ["Cat"]
        for i, r in enumerate(out["results"])
        if i not in (5, 30)
    )
    assert max(stub.calls) <= 16  # one chunk's images at a time
