"""The serve tests' world: adapters, images and params as `dvc repro` leaves them, `teacher serve`
started over it as a real process on localhost, and the `teacher predict` argv over it; and the
hostile peers of the limits tests (an image server that never answers, raw chunked bodies, the
server's RSS). A test module makes the world once:

    @pytest.fixture(scope="module")
    def world(tmp_path_factory):
        return make_world(tmp_path_factory.mktemp("serve"))
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from conftest import REPO_ROOT
from fake_adapters import (
    write_dino_adapter,
    write_sam_adapter,
    write_tiny_coco,
    write_tiny_params,
)

TOKEN = "test-token-15"  # TEACHER_SERVE_TOKEN of start_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_world(root: Path) -> dict:
    """Adapters (classes 'box', 'round thing'), images, params in ``root``: what `dvc repro`
    leaves. Returns ``{"root", "params" (the params.yaml), "coco" (the images' COCO)}``."""
    gt = write_tiny_coco(root / "files" / "images", n_images=4)
    write_dino_adapter(root / "models" / "dino", gt["categories"])
    write_sam_adapter(root / "models" / "sam")
    (root / "outside.png").write_bytes((root / "files" / "images" / "img_0.png").read_bytes())
    params = write_tiny_params(root / "params.yaml", box_threshold=0.0, text_threshold=0.0)
    return {"root": root, "params": params, "coco": gt}


def model_args(world: dict) -> list[str]:
    """The world's ``--adapters`` and ``--params`` (`teacher serve` and `teacher predict`)."""
    return ["--adapters", str(world["root"] / "models"), "--params", str(world["params"])]


def predict_args(world: dict, images: str | Path, out: Path, *, max_detections: int) -> list[str]:
    """`teacher predict IMAGES --format label-studio` over the world's adapters and params."""
    return [
        "predict",
        str(images),
        *model_args(world),
        "--out",
        str(out),
        "--format",
        "label-studio",
        "--max-detections",
        str(max_detections),
    ]


def wait_until_up(url: str, proc: subprocess.Popen, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not up after {timeout_s} s")


def start_server(
    world, *extra: str, token: str | None = TOKEN, env: dict | None = None, adapters: bool = True
):
    """`teacher serve` over ``world`` (``extra`` arguments appended; without ``adapters``, the
    base models and no classes) on a free port; returns ``(process, url)`` once its /health
    answers."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")},
        "PYTHONPATH": str(REPO_ROOT / "src"),
        "TEACHER_SERVE_TOKEN": token or "",
        **(env or {}),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "teacher.cli",
            "serve",
            *(model_args(world) if adapters else ["--params", str(world["params"])]),
            "--port",
            str(port),
            "--local-files-root",
            str(world["root"] / "files"),
            "--max-detections",
            "3",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, timeout_s=120)
    except AssertionError:
        proc.kill()
        raise
    return proc, url


@contextmanager
def hanging_server():
    """An http URL on 127.0.0.1 whose server accepts connections and never answers (a thread);
    its connections are closed on exit."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # closed on exit
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def send_chunked(
    url: str, path: str, headers: dict[str, str], *, total: int, chunk: int = 2**16
) -> tuple[int, bytes]:
    """POST ``total`` bytes to ``path`` as a chunked body over a raw socket (small send buffer,
    so that the count is close to what the server took), stopping as soon as the server answers
    or closes. Returns (body bytes sent, the first bytes of the answer, b"" if none)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**16)
        head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Transfer-Encoding: chunked"]
        head += ["Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        piece = b"%x\r\n" % chunk + b"x" * chunk + b"\r\n"
        sent, deadline = 0, time.monotonic() + 60
        while sent < total and time.monotonic() < deadline:
            if select.select([s], [], [], 0)[0]:  # an answer (or a close) came
                break
            try:
                s.sendall(piece)
            except OSError:
                break
            sent += chunk
        try:
            if sent >= total:
                s.sendall(b"0\r\n\r\n")
            return sent, s.recv(4096)
        except OSError:
            return sent, b""


@contextmanager
def static_files(folder: Path):
    """An http URL on 127.0.0.1 serving the files of ``folder`` (a thread), for http task URLs."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def peak_rss_mb(pid: int) -> float:
    """The highest resident memory process ``pid`` has had, in MiB (Linux /proc VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def drain_output(proc: subprocess.Popen) -> deque[str]:
    """Read the server's output in a thread, keeping the last 200 lines: a server that logs much
    (access lines, refused requests) would otherwise block on the full pipe and stop serving."""
    tail: deque[str] = deque(maxlen=200)

    def read() -> None:
        for line in proc.stdout:
            tail.append(line)

    threading.Thread(target=read, daemon=True).start()
    return tail


def boxes_only_backend(world: dict, *, local_root: Path | None = None):
    """In process: the world's adapters as the server loads them, boxes only (no SAM)."""
    from fake_adapters import TINY_DINO, TINY_SAM

    from teacher.inference.predict import Filter
    from teacher.serve.backend import Backend
    from teacher.serve.sources import ImageSources
    from teacher.serve.teachers import load_serve_teachers

    teachers = load_serve_teachers(
        adapters=world["root"] / "models",
        classes=None,
        dino_params=TINY_DINO,
        sam_params=TINY_SAM,
        keep=Filter(score_threshold=0.0, max_detections=2),
        text_threshold=0.0,
        segment_masks=False,
        log=lambda *_: None,
    )
    return Backend(teachers=teachers, sources=ImageSources(local_root=local_root))
