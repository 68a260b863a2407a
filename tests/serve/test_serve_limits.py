"""`teacher serve` against hostile and broken clients, as a real process on localhost: auth and
body limits before the body is read (chunked bodies too), a deadline per call, /health never
held up, 429 past --max-concurrent, work stopped when the client leaves, per-task errors for
every malformed task, slow request heads dropped; and a soak of all of it at once (slow)."""

import itertools
import json
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_world import (
    TOKEN,
    boxes_only_backend,
    drain_output,
    hanging_server,
    make_world,
    rss_mb,
    send_chunked,
    start_server,
)

from teacher.serve.guard import BODY_TIMEOUT_S, HEAD_TIMEOUT_S

AUTH = {"Authorization": f"Bearer {TOKEN}"}
# both of the world's classes: with one, whether a random tiny teacher's top boxes on an image
# carry the other name (then dropped as unknown) decides if the image gets any region
CONFIG = """<View><Image name="img" value="$image"/>
<RectangleLabels name="box" toName="img"><Label value="box"/><Label value="round thing"/>
</RectangleLabels></View>"""
CALL_TIMEOUT_S = 5  # the server's --call-timeout
MAX_CONCURRENT = 2  # and --max-concurrent
MB = 2**20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("serve_limits"))
    (world["root"] / "files" / "folder").mkdir()
    return world


@pytest.fixture(scope="module")
def served(world):
    """(process, url) of `teacher serve` with a short call deadline, downloads that would
    outlast it, and room for two predictions at once."""
    proc, url = start_server(
        world,
        *("--call-timeout", str(CALL_TIMEOUT_S), "--fetch-timeout", "30"),
        *("--max-concurrent", str(MAX_CONCURRENT)),
    )
    drain_output(proc)
    yield proc, url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def server(served):
    """The server's url, once no prediction of an earlier test holds a slot."""
    _, url = served
    for _ in range(40):  # 10 s at most: a call ends by its deadline (5 s)
        if predict(url, [task(0, local("img_0.png"))]).status_code != 429:
            return url
        time.sleep(0.25)
    raise AssertionError("the predictions of an earlier test never ended")


def task(i, image):
    return {"id": i, "data": {"image": image}}


def local(name):
    return f"/data/local-files/?d=images/{name}"


def predict(url, tasks, *, headers=AUTH, timeout=60, **extra):
    return httpx.post(
        url + "/predict",
        json={"tasks": tasks, "label_config": CONFIG, **extra},
        headers=headers,
        timeout=timeout,
    )


def health_s(url) -> float:
    start = time.monotonic()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    return time.monotonic() - start


# --- bodies and auth: refused before the body is read --------------------------------------


@pytest.mark.parametrize(
    "path, headers, status",
    [
        ("/predict", {"Authorization": "Bearer wrong"}, 401),
        ("/predict", {}, 401),
        ("/setup", {"Authorization": "Bearer wrong"}, 401),
        ("/webhook", {}, 413),  # open, with a small limit (1 MiB)
    ],
)
def test_chunked_bodies_are_refused_before_they_are_read(served, path, headers, status):
    proc, url = served
    before = rss_mb(proc.pid)
    sent, answer = send_chunked(url, path, headers, total=50 * MB)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer
    # what was sent sits in the kernel's socket buffers: the server read (almost) none of it
    assert sent < 10 * MB, sent
    assert rss_mb(proc.pid) - before < 20


def test_chunked_body_with_the_token_is_cut_at_the_limit(served):
    proc, url = served
    before = rss_mb(proc.pid)
    sent, answer = send_chunked(url, "/predict", AUTH, total=50 * MB)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"connection: close" in answer.lower()
    assert 20 * MB < sent < 32 * MB  # the 20 MiB limit, and what the socket buffers hold
    assert rss_mb(proc.pid) - before < 60  # the limit at most, not the 50 MB sent


def test_declared_lengths_are_refused_without_reading(server):
    huge = {"Content-Length": str(300 * MB), "Content-Type": "application/json"}
    for path, headers, status in [
        ("/predict", {**huge, "Authorization": "Bearer wrong"}, 401),
        ("/predict", huge, 401),
        ("/predict", {**huge, **AUTH}, 413),
        ("/webhook", {**huge, "Content-Length": str(2 * MB)}, 413),
    ]:
        with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as s:
            s.settimeout(10)
            head = [f"POST {path} HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in headers.items())]
            s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())  # and no body at all
            answer = b"".join(iter(lambda: s.recv(4096), b""))  # until the server closes
        assert answer.startswith(b"HTTP/1.1 %d" % status), (path, answer)
        assert b'{"error":' in answer
    r = httpx.post(server + "/webhook", json={"action": "PROJECT_UPDATED"}, timeout=10)
    assert r.status_code == 200  # a webhook event of normal size is still acknowledged


def test_unknown_routes_and_methods_answer_json(server):
    r = httpx.get(server + "/nope", headers=AUTH, timeout=10)
    assert r.status_code == 404 and r.json()["error"]
    r = httpx.get(server + "/predict", headers=AUTH, timeout=10)
    assert r.status_code == 405 and r.json()["error"]
    assert httpx.get(server + "/nope", timeout=10).status_code == 401  # no token: nothing more


def test_a_webhook_echoes_only_a_string_action(server):
    for action, echoed in [('"ANNOTATION_CREATED"', "ANNOTATION_CREATED"), ("1e309", None)]:
        r = httpx.post(
            server + "/webhook",
            content=f'{{"action": {action}}}',  # 1e309: infinity, which no JSON reply can hold
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["action"] == echoed, r.text


def test_an_unforeseen_error_is_a_json_500_without_its_message(world):
    """In process: the real app, and a route added here that fails as nothing in it should."""
    from fastapi.testclient import TestClient

    from teacher.serve.app import create_app

    app = create_app(boxes_only_backend(world), token=TOKEN)

    @app.get("/fails")
    def fails():
        raise RuntimeError("/srv/secret/path")

    r = TestClient(app, raise_server_exceptions=False).get("/fails", headers=AUTH)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert "RuntimeError" in r.json()["error"] and "/srv" not in r.text


# --- per-task errors: one bad task never costs the others their predictions ----------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (task(1, "/data/local-files/?d=images/a\x00b.png"), ""),
        (task(1, "/data/local-files/?d=."), ""),
        (task(1, "/data/local-files/?d=folder"), ""),
        (task(1, {"url": "not a string"}), "image URL"),
        ({"id": 1, "data": "not an object"}, "data.image"),
        (7, "data.image"),
    ],
    ids=[
        "nul-byte",
        "dot",
        "folder",
        "url-not-a-string",
        "data-not-an-object",
        "task-not-an-object",
    ],
)
def test_a_bad_task_gets_an_error_the_others_predictions(server, bad, match):
    r = predict(server, [task(0, local("img_0.png")), bad, task(2, local("img_1.png"))])
    assert r.status_code == 200, r.text
    body = r.json()
    (error,) = body["errors"]
    assert error["index"] == 1 and match in error["error"]
    assert body["results"][1] == []
    assert body["results"][0]["result"] and body["results"][2]["result"]


@pytest.mark.parametrize(
    "context, status, match",
    [
        ("not an object", 400, "params.context"),
        ({"result": "not a list"}, 400, "params.context"),
        (
            {
                "result": [
                    {
                        "type": "keypointlabels",
                        "from_name": "kp",
                        "to_name": "img",
                        "original_width": 1e309,  # inf once parsed
                        "original_height": 48,
                        "value": {"x": 10, "y": 10},
                    }
                ]
            },
            400,
            "original_width",
        ),
        ({"result": [1, "two", None]}, 200, None),  # not clicks: pre-labeling as without them
    ],
    ids=["not-an-object", "result-not-a-list", "width-1e309", "items-not-objects"],
)
def test_a_bad_context_is_a_json_answer_never_a_500(server, context, status, match):
    body = {"tasks": [task(0, local("img_0.png"))], "label_config": CONFIG}
    body["params"] = {"context": context}
    r = httpx.post(
        server + "/predict",
        content=json.dumps(body).replace("Infinity", "1e309"),  # as the attacker sent it
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    if match:
        assert match in r.json()["error"]
    else:
        assert r.json()["results"][0]["result"]


def test_a_task_id_json_cannot_hold_is_not_echoed(server):
    """``1e309`` parses as infinity, which a JSON reply cannot hold: the error entry of its
    task (a folder for an image) says ``task: null``."""
    body = {"tasks": [task("ID", "/data/local-files/?d=.")], "label_config": CONFIG}
    r = httpx.post(
        server + "/predict",
        content=json.dumps(body).replace('"ID"', "1e309"),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert [(e["index"], e["task"]) for e in r.json()["errors"]] == [(0, None)]


# --- time: deadlines, /health, 429, disconnects, slow heads --------------------------------


def test_a_call_stops_at_its_deadline_and_answers_the_tasks_done(server):
    with hanging_server() as hang:
        tasks = [task(i, local(f"img_{i % 4}.png")) for i in range(16)]  # the first chunk
        tasks += [task(16 + i, f"{hang}/{i}.png") for i in range(16)]  # 30 s each, without it
        start = time.monotonic()
        r = predict(server, tasks)
        took = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert took < CALL_TIMEOUT_S + 3, took
    body = r.json()
    assert [e["index"] for e in body["errors"]] == list(range(16, 32))
    assert any("--call-timeout" in e["error"] for e in body["errors"])
    assert all(body["results"][i]["result"] for i in range(16))


def test_health_answers_within_a_second_while_calls_hang(server):
    statuses: Counter = Counter()
    stop = time.monotonic() + 8

    def hammer(hang):
        while time.monotonic() < stop:
            r = predict(server, [task(i, f"{hang}/{i}.png") for i in range(8)], timeout=30)
            statuses[r.status_code] += 1
            if r.status_code == 429:
                assert r.headers["Retry-After"] and "--max-concurrent" in r.json()["error"]
                time.sleep(0.05)

    with hanging_server() as hang, ThreadPoolExecutor(20) as pool:
        callers = [pool.submit(hammer, hang) for _ in range(20)]
        latencies = []
        while time.monotonic() < stop:
            latencies.append(health_s(server))
            time.sleep(0.1)
        for c in callers:
            c.result(timeout=30)
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    assert statuses[429] > 0 and set(statuses) <= {200, 429}, statuses


def test_past_max_concurrent_calls_get_429(server):
    """Calls arriving together, each holding its slot to the deadline: --max-concurrent of
    them are answered, the others get 429 at once with Retry-After."""
    extra = 3
    with hanging_server() as hang, ThreadPoolExecutor(MAX_CONCURRENT + extra) as pool:
        hanging = [task(i, f"{hang}/{i}.png") for i in range(8)]
        calls = [pool.submit(predict, server, hanging) for _ in range(MAX_CONCURRENT + extra)]
        answers = [c.result(timeout=30) for c in calls]
    assert sorted(r.status_code for r in answers) == [200] * MAX_CONCURRENT + [429] * extra
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) > 0 and "--max-concurrent" in r.json()["error"]
            assert r.elapsed.total_seconds() < 1.0
        else:
            assert r.elapsed.total_seconds() > CALL_TIMEOUT_S - 0.5  # held to the deadline
    assert predict(server, [task(0, local("img_0.png"))]).status_code == 200


def test_a_client_that_leaves_frees_its_slot(server):
    """Calls whose clients hang up stop between tasks: their slots free long before the
    deadline would free them."""
    with hanging_server() as hang:
        hanging = [task(i, f"{hang}/{i}.png") for i in range(32)]
        start = time.monotonic()
        with ThreadPoolExecutor(MAX_CONCURRENT) as pool:
            gone = [pool.submit(predict, server, hanging, timeout=1) for _ in range(MAX_CONCURRENT)]
            for g in gone:
                with pytest.raises(httpx.TimeoutException):
                    g.result(timeout=10)
        for _ in range(40):
            r = predict(server, [task(0, local("img_0.png"))])
            if r.status_code == 200:
                break
            time.sleep(0.05)
        freed = time.monotonic() - start
    assert r.status_code == 200 and freed < CALL_TIMEOUT_S - 1.5, freed


def test_slow_request_heads_are_dropped(server):
    """A client sending its headers a byte a second, and one sending nothing, are closed
    within HEAD_TIMEOUT_S; a health check meanwhile is answered at once."""
    port = int(server.rsplit(":", 1)[1])
    slow, silent = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))
    start, closed = time.monotonic(), {}
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
    try:
        for i in range(int(HEAD_TIMEOUT_S) + 10):  # a byte a second, bounded
            for name, s in (("slow", slow), ("silent", silent)):
                if name in closed:
                    continue
                try:
                    if name == "slow":
                        s.sendall(head[i : i + 1])
                    s.settimeout(0.01)
                    if s.recv(1) == b"":
                        closed[name] = time.monotonic() - start
                except TimeoutError:
                    pass
                except OSError:
                    closed[name] = time.monotonic() - start
            if len(closed) == 2:
                break
            assert health_s(server) < 1.0
            time.sleep(1)
    finally:
        slow.close()
        silent.close()
    assert set(closed) == {"slow", "silent"}, closed
    assert all(HEAD_TIMEOUT_S - 1 < t < HEAD_TIMEOUT_S + 3 for t in closed.values()), closed


# --- soak ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_mixed_good_and_hostile_requests(served):
    """~60 s of good predictions, wrong tokens, oversized chunked bodies, hanging URLs and
    malformed tasks from several threads: /health answers within a second throughout, nothing
    is a 5xx, and the server's memory comes back to where it started."""
    proc, url = served
    predict(url, [task(i, local(f"img_{i}.png")) for i in range(4)])  # warm: lazy allocations
    start_rss, stop = rss_mb(proc.pid), time.monotonic() + 60
    seen: Counter = Counter()

    def loop(send):
        while time.monotonic() < stop:
            status = send()
            seen[status] += 1
            if status == 429:
                time.sleep(0.1)  # a polite client; Retry-After asks for more

    def good():
        return predict(url, [task(i, local(f"img_{i}.png")) for i in range(4)]).status_code

    def wrong_token():
        return predict(
            url, [task(0, local("img_0.png"))], headers={"Authorization": "x"}
        ).status_code

    refusals = itertools.cycle([("/predict", {}), ("/webhook", {}), ("/predict", AUTH)])

    def oversized():
        path, headers = next(refusals)  # one thread: no lock
        answer = send_chunked(url, path, headers, total=30 * MB)[1]
        return int(answer[9:12]) if answer[:5] == b"HTTP/" else 0

    def hanging():
        return predict(url, [task(i, f"{hang}/{i}.png") for i in range(8)], timeout=30).status_code

    def malformed():
        bad = [task(1, "/data/local-files/?d=."), 7, task(2, {"x": 1}), {"data": []}]
        return predict(url, [task(0, local("img_0.png")), *bad]).status_code

    def slow_body():  # 10 bytes of the 1000 announced, then nothing: 408 at BODY_TIMEOUT_S
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT_S + 10) as s:
            head = f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            s.sendall(f"{head}Content-Length: 1000\r\n\r\n{{'tasks': [".encode())
            answer = s.recv(4096)
        return int(answer[9:12]) if answer[:5] == b"HTTP/" else 0

    senders = (good, wrong_token, oversized, hanging, malformed, slow_body)
    with hanging_server() as hang, ThreadPoolExecutor(len(senders)) as pool:
        sending = [pool.submit(loop, f) for f in senders]
        latencies = []
        while time.monotonic() < stop:
            latencies.append(health_s(url))
            time.sleep(0.2)
        for s in sending:
            s.result(timeout=BODY_TIMEOUT_S + 20)
    time.sleep(CALL_TIMEOUT_S + 1)  # the last calls' downloads end
    grown = rss_mb(proc.pid) - start_rss
    print(f"soak: {dict(seen)}, /health max {max(latencies):.3f} s, RSS {grown:+.0f} MiB")
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    assert not [s for s in seen if s >= 500 or s == 0], seen
    assert seen[200] > 0 and seen[401] > 0 and seen[413] > 0 and seen[408] > 0, seen
    assert grown < 300, grown
