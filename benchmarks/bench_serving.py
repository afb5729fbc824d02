"""Latency and throughput of Predict over gRPC, against a running server or one started here.

    # against tensorflow_model_server or `python -m serving.server` already listening:
    python -m benchmarks.bench_serving --server localhost:8500 --model-name sharpmask --images a.jpg b.jpg
    # start serving.server in-process on the export first:
    python -m benchmarks.bench_serving --model-base-path exports/sharpmask --concurrency 1 2 4
    # export presets with random weights, serve each from a `serving.server` subprocess, and
    # compare gRPC with calling the same exported signature in-process (a Markdown table):
    python -m benchmarks.bench_serving --export-presets small sharpmask_resnet50 --concurrency 1 2
    # also over the REST API, and with server-side batching (serving/batching_parameters.txt):
    python -m benchmarks.bench_serving --export-presets small --concurrency 1 4 16 --rest --batching

Without --images it sends random-noise JPEGs of --image-size (e.g. 640x480 or 320). Prints one
JSON line per concurrency level: requests/s, images/s and latency percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from serving.client import ServingClient
from serving.server import start_server


def parse_size(text: str) -> tuple[int, int]:
    """ "640x480" -> (640, 480); "320" -> (320, 320)."""
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT or SIDE. Received: {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"sides must be positive. Received: {text!r}")
    return size


def random_jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """`count` JPEG-encoded noise images of size (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    return images


def summarize(latencies: Sequence[float], elapsed: float, batch: int) -> dict:
    """Requests/s, images/s and latency percentiles (ms) of one timed run."""
    ms = np.asarray(latencies) * 1000
    requests = len(latencies)
    return {
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 2),
        "images_per_s": round(requests * batch / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


class RestPredictor:
    """Predict over TF Serving's REST API on one kept-alive HTTP connection: the images as b64
    instances in the row format, the JSON answer parsed as a client would."""

    def __init__(self, target: str, model_name: str, timeout: float = 300.0):
        host, _, port = target.rpartition(":")
        self._connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self._path = f"/v1/models/{model_name}:predict"

    def predict_images(self, images: Sequence[bytes]) -> list:
        body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()} for image in images]})
        self._connection.request("POST", self._path, body, {"Content-Type": "application/json"})
        response = self._connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"REST predict failed with HTTP {response.status}: {answer}")
        return answer["predictions"]

    def __enter__(self) -> RestPredictor:
        return self

    def __exit__(self, *exc) -> None:
        self._connection.close()


def free_port() -> int:
    """A port nothing listens on right now, for a server subprocess's REST API."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_level(
    target: str,
    model_name: str,
    images: list[bytes],
    batch: int,
    concurrency: int,
    requests: int,
    rest: bool = False,
) -> dict:
    """Sends `requests` Predict calls of `batch` images from `concurrency` threads, one channel
    (or, with `rest`, one HTTP connection to the REST API at `target`) each."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    client_class = RestPredictor if rest else ServingClient

    def worker(index: int, count: int) -> None:
        with client_class(target, model_name, timeout=300.0) as client:
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
    return {"concurrency": concurrency, "batch": batch, **summarize(latencies, elapsed, batch)}


def run_paired(signature, target: str, model_name: str, images: list[bytes], requests: int) -> tuple[dict, dict, float]:
    """Alternates one in-process call of an exported signature with one gRPC Predict of the same
    image, `requests` times, so load from other processes on the machine hits both alike.

    The in-process call is the baseline: same graph, same bytes, outputs copied to numpy as the
    server does, but no serialisation or transport.

    Returns:
        (in-process summary, gRPC summary, median over pairs of gRPC / in-process latency - 1).
    """
    import tensorflow as tf

    local, remote = [], []
    with ServingClient(target, model_name, timeout=300.0) as client:
        for j in range(requests):
            image = images[j % len(images)]
            t0 = time.perf_counter()
            _ = [v.numpy() for v in signature(images=tf.constant([image])).values()]
            t1 = time.perf_counter()
            client.predict_images([image])
            t2 = time.perf_counter()
            local.append(t1 - t0)
            remote.append(t2 - t1)
    overhead = float(np.median(np.asarray(remote) / np.asarray(local)) - 1)
    return (
        {"concurrency": 1, "batch": 1, **summarize(local, sum(local), 1)},
        {"concurrency": 1, "batch": 1, **summarize(remote, sum(remote), 1)},
        overhead,
    )


def bench_presets(
    presets: Sequence[str],
    images: list[bytes],
    concurrencies: Sequence[int],
    requests: int,
    warmup: int,
    overrides: Sequence[str] = (),
    rest: bool = False,
    batching: bool = False,
) -> list[dict]:
    """Exports each preset (random weights, config `overrides` applied) and serves it from a
    `serving.server` subprocess; measures concurrency 1 paired with in-process calls of the same
    signature (`run_paired`), then gRPC alone at every other concurrency level. With `rest`, the
    REST API at every level too; with `batching`, both again from a server batching requests
    with `serving/batching_parameters.txt`."""
    import keras
    import tensorflow as tf

    from serving.demo_query import ServerProcess
    from serving.export import export_model
    from serving.protocol import SIGNATURE_BYTES
    from sharpmask_tf.config import get_config
    from sharpmask_tf.sharpmask import build_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as base:
        for preset in presets:
            config = get_config(preset, list(overrides))
            keras.utils.set_random_seed(0)
            t0 = time.perf_counter()
            version_dir = export_model(build_model(config, trunk_weights=False), config, base, model_name=preset)
            label = " ".join([preset, *overrides])
            common = {"preset": label, "top_n": config.export.top_n, "export_s": round(time.perf_counter() - t0, 1)}
            keras.backend.clear_session()
            signature = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_BYTES]
            with ServerProcess(version_dir.parent, preset, rest_api_port=free_port() if rest else None) as server:
                with ServingClient(server.target, preset) as client:
                    response_bytes = sum(v.nbytes for v in client.predict_images(images[:1]).values())
                run_paired(signature, server.target, preset, images, warmup)
                local, remote, overhead = run_paired(signature, server.target, preset, images, requests)
                rows.append({**common, "mode": "in-process", **local})
                rows.append(
                    {**common, "mode": "gRPC", "response_bytes": response_bytes, "paired_overhead": overhead, **remote}
                )
                for row in rows[-2:]:
                    print(json.dumps(row), flush=True)
                for concurrency in (c for c in concurrencies if c != 1):
                    result = run_level(server.target, preset, images, 1, concurrency, requests)
                    rows.append({**common, "mode": "gRPC", "response_bytes": response_bytes, **result})
                    print(json.dumps(rows[-1]), flush=True)
                if rest:
                    rows += _levels(server, preset, images, concurrencies, requests, warmup, common, "REST")
            if batching:
                parameters = os.path.join(
                    os.path.dirname(os.path.dirname(__file__)), "serving", "batching_parameters.txt"
                )
                flags = ["--enable-batching", "--batching-parameters-file", parameters]
                port = free_port() if rest else None
                with ServerProcess(version_dir.parent, preset, rest_api_port=port, extra_args=flags) as server:
                    for mode in ["gRPC batched", "REST batched"][: 1 + rest]:
                        rows += _levels(server, preset, images, concurrencies, requests, warmup, common, mode)
            del signature
    return rows


def _levels(server, preset, images, concurrencies, requests, warmup, common, mode) -> list[dict]:
    """One row per concurrency level of `mode` ("gRPC"/"REST", batched or not) on a ServerProcess."""
    rest = mode.startswith("REST")
    target = f"127.0.0.1:{server.rest_api_port}" if rest else server.target
    run_level(target, preset, images, 1, 1, warmup, rest=rest)
    rows = []
    for concurrency in concurrencies:
        rows.append({**common, "mode": mode, **run_level(target, preset, images, 1, concurrency, requests, rest=rest)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The preset rows as a Markdown table. Overhead: gRPC against in-process at concurrency 1,
    as the median of the paired per-request ratios and as the ratio of mean latencies."""
    baseline = {r["preset"]: r for r in rows if r["mode"] == "in-process"}
    lines = [
        "| preset | mode | concurrency | requests | req/s | p50 ms | p99 ms | overhead (paired) | overhead (means) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        over_paired = over_mean = ""
        if "paired_overhead" in r:
            over_paired = f"{100 * r['paired_overhead']:+.1f}%"
            over_mean = f"{100 * (baseline[r['preset']]['requests_per_s'] / r['requests_per_s'] - 1):+.1f}%"
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {over_paired} | {over_mean} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="host:port of a running server")
    where.add_argument("--model-base-path", help="start serving.server in-process on this base path")
    where.add_argument(
        "--export-presets",
        nargs="+",
        metavar="PRESET",
        help="export these presets (random weights), serve each from a subprocess, compare with in-process",
    )
    parser.add_argument("--model-name", default="sharpmask")
    parser.add_argument("--images", nargs="*", default=[], help="JPEG/PNG files to send")
    parser.add_argument(
        "--image-size", type=parse_size, default=(320, 320), help="random JPEG size: WIDTHxHEIGHT or SIDE"
    )
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=20, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and not timed")
    parser.add_argument("--rest", action="store_true", help="with --export-presets: the REST API too")
    parser.add_argument("--batching", action="store_true", help="with --export-presets: a server batching requests too")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config overrides for --export-presets",
    )
    args = parser.parse_args(argv)

    images = []
    for path in args.images:
        with open(path, "rb") as f:
            images.append(f.read())
    images = images or random_jpegs(8, args.image_size)
    if args.export_presets:
        if args.batch != 1:
            parser.error("--export-presets measures one image per request; drop --batch")
        rows = bench_presets(
            args.export_presets,
            images,
            args.concurrency,
            args.requests,
            args.warmup,
            args.set,
            args.rest,
            args.batching,
        )
        print(markdown_table(rows))
        return
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
