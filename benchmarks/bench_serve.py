"""Benchmark `teacher serve`: /predict latency (p50/p95) for one image, and throughput with 4
concurrent clients, over HTTP on 127.0.0.1 (uvicorn in this process, the real app and backend).

Architectures, random weights (no download): ``tiny`` (DINO and SAM ``tiny-random``) and
``real`` (Grounding DINO tiny's architecture: Swin-T + BERT-base, and SAM ``vit_b``). Also the
latency of a smart-tool click on an image whose SAM embedding is already prepared.

    .venv/bin/python benchmarks/bench_serve.py [--archs tiny real] [--requests 20 3] [--per-client 10 1]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from teacher.core.params import DinoParams
from teacher.dino.labels import build_label_map
from teacher.dino.model import DinoBundle, build_processor, load_dino, prepare_model, tiny_tokenizer
from teacher.inference.predict import Filter, Teachers
from teacher.sam.build import ARCHITECTURES, build_sam, build_tiny_random
from teacher.serve.app import create_app
from teacher.serve.backend import Backend
from teacher.serve.sources import ImageSources
from teacher.serve.teachers import ServeTeachers

CLASSES = [{"id": i + 1, "name": n} for i, n in enumerate(["cat", "dog", "car", "person"])]
CONFIG = """<View><Image name="img" value="$image"/>
<RectangleLabels name="box" toName="img"><Label value="cat"/><Label value="dog"/>
<Label value="car"/><Label value="person"/></RectangleLabels>
<BrushLabels name="mask" toName="img"><Label value="cat"/><Label value="dog"/>
<Label value="car"/><Label value="person"/></BrushLabels>
<KeyPointLabels name="kp" toName="img" smart="true"><Label value="cat"/></KeyPointLabels></View>"""


def real_size_dino(params: DinoParams) -> DinoBundle:
    """Grounding DINO tiny's architecture (transformers' default config) with random weights."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(GroundingDinoConfig())
    return DinoBundle(model=prepare_model(model), processor=build_processor(tokenizer, dino=params))


def build_backend(arch: str, root: Path, *, detections: int) -> Backend:
    params = DinoParams(model="tiny-random", shortest_edge=480, longest_edge=800)
    dino = load_dino(params) if arch == "tiny" else real_size_dino(params)
    dino.model.eval()
    torch.manual_seed(0)
    sam = build_tiny_random() if arch == "tiny" else build_sam(ARCHITECTURES["vit_b"])
    teachers = Teachers(
        dino=dino,
        sam=sam.eval(),
        label_map=build_label_map(CLASSES, tokenizer=dino.processor.tokenizer),
    )
    keep = Filter(score_threshold=0.0, nms_iou=1.0, max_detections=detections)
    serve = ServeTeachers(
        teachers, keep=keep, text_threshold=0.0, multimask=True, model_version=f"bench-{arch}"
    )
    return Backend(teachers=serve, sources=ImageSources(local_root=root))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(backend: Backend):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(backend), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def one_request(client: httpx.Client, url: str, image: str, context=None) -> float:
    body = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG}
    if context:
        body["params"] = {"context": context}
    start = time.perf_counter()
    r = client.post(url + "/predict", json=body, timeout=600)
    r.raise_for_status()
    assert r.json()["results"][0]["result"], "no region predicted"
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def bench(
    arch: str,
    *,
    requests: int,
    per_client: int,
    clients: int,
    size: tuple[int, int],
    detections: int,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(Path(tmp) / "a.jpg")
        server, thread, url = serve_in_thread(build_backend(arch, Path(tmp), detections=detections))
        image = "/data/local-files/?d=a.jpg"
        try:
            with httpx.Client() as client:
                one_request(client, url, image)  # warm-up
                latency = [one_request(client, url, image) for _ in range(requests)]
                click = {
                    "result": [
                        {
                            "type": "keypointlabels",
                            "to_name": "img",
                            "from_name": "kp",
                            "original_width": size[1],
                            "original_height": size[0],
                            "is_positive": True,
                            "value": {"x": 50, "y": 50, "keypointlabels": ["cat"]},
                        }
                    ]
                }
                one_request(client, url, image, click)  # embeds the image once
                clicks = [one_request(client, url, image, click) for _ in range(requests)]
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool, httpx.Client() as client:
                list(
                    pool.map(lambda _: one_request(client, url, image), range(per_client * clients))
                )
            wall = time.perf_counter() - start
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    return {
        "p50": percentile(latency, 50),
        "p95": percentile(latency, 95),
        "click_p50": percentile(clicks, 50),
        "throughput": per_client * clients / wall,
        "mean": statistics.mean(latency),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["tiny", "real"])
    parser.add_argument(
        "--requests",
        type=int,
        nargs="+",
        default=[20, 3],
        help="timed sequential requests per arch (latency, clicks)",
    )
    parser.add_argument(
        "--per-client",
        type=int,
        nargs="+",
        default=[10, 1],
        help="requests per concurrent client per arch (throughput)",
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument(
        "--detections", type=int, default=5, help="kept boxes (and masks) per image"
    )
    args = parser.parse_args()
    device = f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {device}; one {args.size[0]}x{args.size[1]} image per request, "
        f"{args.detections} detections with masks, {args.clients} concurrent clients"
    )
    print(
        "| arch | /predict p50 s | p95 s | throughput, 4 clients (img/s) | click p50 s (embedding reused) |"
    )
    print("|---|---|---|---|---|")

    def per_arch(values: list[int]) -> dict[str, int]:
        return dict(zip(args.archs, values + values[-1:] * len(args.archs), strict=False))

    requests, per_client = per_arch(args.requests), per_arch(args.per_client)
    for arch in args.archs:
        r = bench(
            arch,
            requests=requests[arch],
            per_client=per_client[arch],
            clients=args.clients,
            size=tuple(args.size),
            detections=args.detections,
        )
        print(
            f"| {arch} | {r['p50']:.3f} | {r['p95']:.3f} | {r['throughput']:.2f} | "
            f"{r['click_p50']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
