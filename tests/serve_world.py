"""The serve tests' world: adapters, images and params as `dvc repro` leaves them, `teacher serve`
started over it as a real process on localhost, and the `teacher predict` argv over it. A test
module makes the world once:

    @pytest.fixture(scope="module")
    def world(tmp_path_factory):
        return make_world(tmp_path_factory.mktemp("serve"))
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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


def start_server(world, *extra: str, token: str | None = TOKEN, env: dict | None = None):
    """`teacher serve` over ``world`` (``extra`` arguments appended) on a free port; returns
    ``(process, url)`` once its /health answers."""
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
            *model_args(world),
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
