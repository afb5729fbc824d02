"""Latency and throughput of Predict over gRPC, against a running server or one started here.

    # against tensorflow_model_server or `python -m serving.server` already listening:
    python -m benchmarks.bench_serving --server localhost:8500 --model-name sharpmask --images a.jpg b.jpg
    # start serving.server in-process on the export first:
    python -m benchmarks.bench_serving --model-base-path exports/sharpmask --concurrency 1 2 4

Without --images it sends random-noise JPEGs of --image-size. Prints one JSON line per
concurrency level: requests/s, images/s and latency percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from serving.client import ServingClient
from serving.server import start_server


def random_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """`count` JPEG-encoded size x size noise images."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    return images


def run_level(target: str, model_name: str, images: list[bytes], batch: int, concurrency: int, requests: int) -> dict:
    """Sends `requests` Predict calls of `batch` images from `concurrency` threads, one channel each."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def worker(index: int, count: int) -> None:
        with ServingClient(target, model_name, timeout=300.0) as client:
            for j in range(count):
                start = (index + j) * batch
                chosen = [images[(start + k) % len(images)] for k in range(batch)]
                t0 = time.perf_counter()
                client.predict_images(chosen)
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(per_thread)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if len(latencies) != requests:
        raise RuntimeError(f"{requests - len(latencies)} of {requests} requests failed; see the errors above")
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "batch": batch,
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 2),
        "images_per_s": round(requests * batch / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="host:port of a running server")
    where.add_argument("--model-base-path", help="start serving.server in-process on this base path")
    parser.add_argument("--model-name", default="sharpmask")
    parser.add_argument("--images", nargs="*", default=[], help="JPEG/PNG files to send")
    parser.add_argument("--image-size", type=int, default=320, help="side of the random JPEGs")
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=20, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and not timed")
    args = parser.parse_args(argv)

    images = []
    for path in args.images:
        with open(path, "rb") as f:
            images.append(f.read())
    images = images or random_jpegs(8, args.image_size)
    server = None
    target = args.server
    if args.model_base_path:
        server, port = start_server(args.model_base_path, args.model_name)
        target = f"127.0.0.1:{port}"
    try:
        if args.warmup:
            run_level(target, args.model_name, images, args.batch, 1, args.warmup)
        for concurrency in args.concurrency:
            print(json.dumps(run_level(target, args.model_name, images, args.batch, concurrency, args.requests)))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
