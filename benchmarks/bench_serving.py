"""Latency and throughput of Predict over gRPC, against a running server or one started here.

    # against tensorflow_model_server or `python -m serving.server` already listening:
    python -m benchmarks.bench_serving --server localhost:8500 --model-name sharpmask --images a.jpg b.jpg
    # start serving.server in-process on the export first:
    python -m benchmarks.bench_serving --model-base-path exports/sharpmask --concurrency 1 2 4
    # export presets with random weights, serve each from a `serving.server` subprocess, and
    # compare gRPC with calling the same exported signature in-process (a Markdown table):
    python -m benchmarks.bench_serving --export-presets small sharpmask_resnet50 --concurrency 1 2
    # also over the REST API, and with server-side batching (serving/batching_parameters.txt),
    # 32 timed requests a level for the small preset and 16 for ResNet-50:
    python -m benchmarks.bench_serving --export-presets small sharpmask_resnet50 --image-size 160 \
        --concurrency 1 4 16 --requests 32 16 --rest --batching

Without --images it sends random-noise JPEGs of --image-size (e.g. 640x480 or 320). Prints one
JSON line per concurrency level: requests/s, images/s and latency percentiles in milliseconds.

A little over 400 lines: one script for every serving path it compares (in-process, gRPC, REST,
batched), which must share one request plan and one table to be compared row by row.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

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


# Seconds a server subprocess may take to load and warm up an export: ResNet-50 on a loaded machine.
STARTUP_TIMEOUT = 600.0


class Plan(NamedTuple):
    """What is measured at each level: `requests` timed calls after `warmup` untimed ones."""

    concurrencies: Sequence[int]
    requests: int
    warmup: int


def export_preset(preset: str, overrides: Sequence[str], base: str) -> tuple[Path, dict]:
    """Exports a preset with random weights (no trunk download: `trunk_weights=False`) under `base`.

    Returns:
        (the version directory, the columns every row of this preset carries).
    """
    import keras

    from serving.export import export_model
    from sharpmask_tf.config import get_config
    from sharpmask_tf.sharpmask import build_model

    config = get_config(preset, list(overrides))
    keras.utils.set_random_seed(0)
    t0 = time.perf_counter()
    version_dir = export_model(build_model(config, trunk_weights=False), config, base, model_name=preset)
    keras.backend.clear_session()
    label = " ".join([preset, *overrides])
    return version_dir, {"preset": label, "top_n": config.export.top_n, "export_s": round(time.perf_counter() - t0, 1)}


def bench_unbatched(version_dir: Path, images: list[bytes], plan: Plan, common: dict, rest: bool) -> list[dict]:
    """One server subprocess without batching: concurrency 1 paired with in-process calls of
    the same signature (`run_paired`), gRPC at every other level, and with `rest` the REST API
    at every level."""
    import tensorflow as tf

    from serving.demo_query import ServerProcess
    from serving.protocol import SIGNATURE_BYTES

    model_name = version_dir.parent.name
    signature = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_BYTES]
    rows = []
    port = free_port() if rest else None
    with ServerProcess(version_dir.parent, model_name, STARTUP_TIMEOUT, rest_api_port=port) as server:
        with ServingClient(server.target, model_name) as client:
            response_bytes = sum(v.nbytes for v in client.predict_images(images[:1]).values())
        run_paired(signature, server.target, model_name, images, plan.warmup)
        local, remote, overhead = run_paired(signature, server.target, model_name, images, plan.requests)
        grpc_common = {**common, "mode": "gRPC", "response_bytes": response_bytes}
        rows += [{**common, "mode": "in-process", **local}, {**grpc_common, "paired_overhead": overhead, **remote}]
        for row in rows:
            print(json.dumps(row), flush=True)
        for concurrency in (c for c in plan.concurrencies if c != 1):
            rows.append({**grpc_common, **run_level(server.target, model_name, images, 1, concurrency, plan.requests)})
            print(json.dumps(rows[-1]), flush=True)
        if rest:
            rows += _levels(server, images, plan, common, "REST")
    return rows


def bench_batched(version_dir: Path, images: list[bytes], plan: Plan, common: dict, rest: bool) -> list[dict]:
    """One server subprocess batching requests with `serving/batching_parameters.txt`: gRPC (and
    with `rest` the REST API) at every level."""
    from serving.demo_query import REPO_ROOT, ServerProcess

    parameters = REPO_ROOT / "serving" / "batching_parameters.txt"
    flags = ["--enable-batching", "--batching-parameters-file", str(parameters)]
    port = free_port() if rest else None
    rows = []
    with ServerProcess(
        version_dir.parent, version_dir.parent.name, STARTUP_TIMEOUT, rest_api_port=port, extra_args=flags
    ) as server:
        for mode in ["gRPC batched", "REST batched"][: 1 + rest]:
            rows += _levels(server, images, plan, common, mode)
    return rows


def requests_per_preset(presets: Sequence[str], requests: Sequence[int]) -> list[int]:
    """`--requests` as one number per preset: a single number serves every preset.

    Raises:
        ValueError: for neither one number nor one per preset.
    """
    if len(requests) == 1:
        return list(requests) * len(presets)
    if len(requests) != len(presets):
        raise ValueError(
            f"Give one --requests or one per preset. Received: requests={list(requests)}, presets={list(presets)}"
        )
    return list(requests)


def bench_presets(
    presets: Sequence[str],
    images: list[bytes],
    concurrencies: Sequence[int],
    requests: Sequence[int],
    warmup: int,
    overrides: Sequence[str] = (),
    rest: bool = False,
    batching: bool = False,
) -> list[dict]:
    """Exports each preset (random weights, config `overrides` applied) and serves it from
    `serving.server` subprocesses: without batching (`bench_unbatched`) and, with `batching`,
    from a batching server too (`bench_batched`).

    Args:
        requests: timed requests per level, one number per preset (`requests_per_preset`).
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as base:
        for preset, count in zip(presets, requests, strict=True):
            version_dir, common = export_preset(preset, overrides, base)
            plan = Plan(concurrencies, count, warmup)
            rows += bench_unbatched(version_dir, images, plan, common, rest)
            if batching:
                rows += bench_batched(version_dir, images, plan, common, rest)
    return rows


def _levels(server, images: list[bytes], plan: Plan, common: dict, mode: str) -> list[dict]:
    """One row per concurrency level of `mode` ("gRPC"/"REST", batched or not) on a ServerProcess."""
    rest = mode.startswith("REST")
    target = f"127.0.0.1:{server.rest_api_port}" if rest else server.target
    run_level(target, server.model_name, images, 1, 1, plan.warmup, rest=rest)
    rows = []
    for concurrency in plan.concurrencies:
        result = run_level(target, server.model_name, images, 1, concurrency, plan.requests, rest=rest)
        rows.append({**common, "mode": mode, **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The preset rows as a Markdown table, with speeds as ratios measured in the same run:
    req/s against the in-process calls of the same signature, and a batched row's req/s against
    the unbatched row of its API and concurrency. Overhead: gRPC against in-process at
    concurrency 1, the median of the paired per-request ratios."""
    by_key = {(r["preset"], r["mode"], r["concurrency"]): r for r in rows}
    lines = [
        "| preset | mode | concurrency | requests | req/s | x in-process | batched / unbatched "
        "| p50 ms | p99 ms | gRPC overhead (paired) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        baseline = by_key[(r["preset"], "in-process", 1)]
        unbatched = by_key.get((r["preset"], r["mode"].removesuffix(" batched"), r["concurrency"]))
        batched = f"{r['requests_per_s'] / unbatched['requests_per_s']:.2f}" if r["mode"].endswith("batched") else ""
        overhead = f"{100 * r['paired_overhead']:+.1f}%" if "paired_overhead" in r else ""
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} "
            f"| {r['requests_per_s'] / baseline['requests_per_s']:.2f} | {batched} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {overhead} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--requests",
        type=int,
        nargs="+",
        default=[20],
        help="requests per concurrency level; with --export-presets one number per preset may be given",
    )
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
    return parser


def bench_server(
    target: str,
    model_name: str,
    images: list[bytes],
    batch: int,
    concurrencies: Sequence[int],
    requests: int,
    warmup: int,
) -> None:
    """Prints one JSON line per concurrency level of gRPC Predict calls to a running server."""
    if warmup:
        run_level(target, model_name, images, batch, 1, warmup)
    for concurrency in concurrencies:
        print(json.dumps(run_level(target, model_name, images, batch, concurrency, requests)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    images = [Path(path).read_bytes() for path in args.images] or random_jpegs(8, args.image_size)
    if args.export_presets:
        if args.batch != 1:
            parser.error("--export-presets measures one image per request; drop --batch")
        try:
            requests = requests_per_preset(args.export_presets, args.requests)
        except ValueError as e:
            parser.error(str(e))
        rows = bench_presets(
            args.export_presets, images, args.concurrency, requests, args.warmup, args.set, args.rest, args.batching
        )
        print(markdown_table(rows))
        return
    if len(args.requests) != 1:
        parser.error(f"one --requests against a server. Received: {args.requests}")
    if args.server:
        bench_server(args.server, args.model_name, images, args.batch, args.concurrency, args.requests[0], args.warmup)
        return
    server, port = start_server(args.model_base_path, args.model_name)
    try:
        target = f"127.0.0.1:{port}"
        bench_server(target, args.model_name, images, args.batch, args.concurrency, args.requests[0], args.warmup)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
