"""`teacher serve` started with neither --classes nor adapters: it prompts the teachers with the
labels of each project's labeling config (as Label Studio's own Grounding DINO backend does),
as a real process on localhost."""

import subprocess

import httpx
import pytest
from serve_world import TOKEN, make_world, start_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config(*labels: str, brush: tuple[str, ...] = ()) -> str:
    def tags(names):
        return "".join(f'<Label value="{n}"/>' for n in names)

    return (
        f'<View><Image name="img" value="$image"/>'
        f'<RectangleLabels name="box" toName="img">{tags(labels)}</RectangleLabels>'
        + (f'<BrushLabels name="mask" toName="img">{tags(brush)}</BrushLabels>' if brush else "")
        + "</View>"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server without classes, and its output up to the startup line."""
    world = make_world(tmp_path_factory.mktemp("serve-config-classes"))
    proc, url = start_server(world, adapters=False)
    lines = []
    while not lines or not lines[-1].startswith("teacher serve:"):  # printed before it listens
        lines.append(proc.stdout.readline())
    yield url, lines[-1]
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def post(url, path, body):
    return httpx.post(url + path, json=body, headers=AUTH, timeout=120)


def predict(url, **body):
    task = {"id": 1, "data": {"image": "/data/local-files/?d=images/img_0.png"}}
    return post(url, "/predict", {"tasks": [task, {**task, "id": 2}], **body})


def test_health_and_the_startup_line_say_where_classes_come_from(served):
    url, startup = served
    body = httpx.get(url + "/health", timeout=10).json()
    assert body["classes"] == "from each project's labeling config"
    assert body["model_version"].startswith("teacher-base-")
    assert "classes from each project's labeling config" in startup


def test_setup_then_predict_label_regions_with_the_configs_labels(served):
    url, _ = served
    labels = ("St. Bernard", "round_thing", "Giraffe")
    r = post(url, "/setup", {"project": "5.1700000000", "schema": config(*labels)})
    assert r.status_code == 200, r.text
    assert r.json()["classes"] == list(labels)
    assert r.json()["unknown_classes"] == {} and r.json()["labels_without_class"] == {}
    r = predict(url, project="5.1700000000")  # the config /setup stored
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["errors"] == [] and body["unknown_classes"] == []
    regions = [region for pred in body["results"] for region in pred["result"]]
    assert regions  # box_threshold 0: DINO keeps its best 3 per image
    assert {region["value"]["rectanglelabels"][0] for region in regions} <= set(
        labels
    )  # as written
    # another project, other labels: the prompt follows the config of the call
    r = predict(url, label_config=config("Cat", brush=("Cat",)))
    assert r.status_code == 200, r.text
    regions = [region for pred in r.json()["results"] for region in pred["result"]]
    assert {(x["type"], x["value"][x["type"]][0]) for x in regions} == {
        ("rectanglelabels", "Cat"),
        ("brushlabels", "Cat"),
    }


@pytest.mark.parametrize(
    "xml, match",
    [
        (config(), 'have no <Label value="..."/>: the server was started without --classes'),
        (config(". ?", "cat"), "<Label value='. ?'> of 'box' has no words"),
    ],
)
def test_a_config_without_usable_labels_is_a_clear_error(served, xml, match):
    url, _ = served
    r = post(url, "/setup", {"project": "6.1", "schema": xml})
    assert r.status_code == 400 and match in r.json()["error"], r.text
    r = predict(url, label_config=xml)
    assert r.status_code == 400 and match in r.json()["error"], r.text
