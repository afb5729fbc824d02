"""What the serving tests share: the ImageStats fixture SavedModel, requests and images, waiting
on a condition, REST calls, GetModelStatus as a dict, a small SharpMask export, and
`python -m serving.server` as a subprocess found through its port file.

The fixture SavedModels decode real PNG/JPEG bytes with tf.io.decode_image and return each image's
mean colour (plus a per-version offset, so versions are told apart) and size, so every answer can
be checked.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, predict_pb2

MODEL = "stats"
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds a test waits for an RPC, a condition or a subprocess before it fails: a guard against a
# hang, never a speed limit, so that a loaded machine makes a test slow and not failing.
HANG_GUARD = 600.0


class ImageStats(tf.Module):
    """Per-image mean RGB colour (+ offset) and (height, width), from encoded bytes or pixels.

    `channels` goes to tf.io.decode_image: 0 keeps the file's channels, as the export decodes.
    """

    def __init__(self, offset: float, channels: int = 3):
        super().__init__()
        self.offset = tf.Variable(offset, dtype=tf.float32)
        self.channels = channels

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def from_bytes(self, images):
        tf.debugging.assert_positive(tf.size(images), message="images must hold at least one encoded image")

        def stats(data):
            image = tf.io.decode_image(data, channels=self.channels, expand_animations=False)
            return tf.reduce_mean(tf.cast(image, tf.float32), axis=[0, 1]), tf.shape(image)[:2]

        mean, size = tf.map_fn(
            stats, images, fn_output_signature=(tf.TensorSpec([3], tf.float32), tf.TensorSpec([2], tf.int32))
        )
        return {"mean_colour": mean + self.offset, "image_size": size}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def from_pixels(self, images):
        mean = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2]) + self.offset
        size = tf.tile(tf.shape(images)[None, 1:3], [tf.shape(images)[0], 1])
        return {"mean_colour": mean, "image_size": size}


def save_stats_model(path, offset: float = 0.0, channels: int = 3) -> str:
    """Writes an ImageStats SavedModel with `serving_default` (bytes) and `serving_images` (uint8)."""
    module = ImageStats(offset, channels)
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": module.from_bytes, "serving_images": module.from_pixels}
    )
    return str(path)


def save_stats_versions(base: Path, offsets: Mapping[int, float]) -> Path:
    """Writes ImageStats versions `<base>/<version>` with these offsets; returns `base`."""
    for version, offset in offsets.items():
        save_stats_model(base / str(version), offset=offset)
    return base


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def solid(colour, height=12, width=20) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3)).copy()


def predict_request(inputs, signature="", version=None, label=None, name=MODEL, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def eventually(condition, timeout: float = HANG_GUARD) -> None:
    """Waits for `condition()` to hold; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def version_states(channel, name: str = MODEL) -> dict[int, int]:
    """{version: ModelVersionStatus.State} from GetModelStatus over `channel`."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=HANG_GUARD)
    return {s.version: s.state for s in status.model_version_status}


def http(server, method, path, body=None) -> tuple[int, dict]:
    """Sends one request to a ModelServer's REST API; returns (HTTP status, parsed JSON body) for
    successes and errors alike."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_api_port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HANG_GUARD) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def export_small_sharpmask(base_path: Path, top_n: int = 5) -> Path:
    """Exports the small preset (seeded random weights, no warm-up records) as model `sharpmask`;
    returns its version directory."""
    from serving.export import export_model
    from sharpmask_tf.config import get_config
    from sharpmask_tf.sharpmask import build_model

    config = get_config("small", [f"export.top_n={top_n}", "export.warmup_requests=0"])
    keras.utils.set_random_seed(0)
    return export_model(build_model(config), config, base_path, model_name="sharpmask")


def run_module(args: Sequence[str]) -> subprocess.CompletedProcess:
    """Runs `python ARGS` (e.g. `-m serving.client ...`) from the repository to its end, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        cwd=REPO,
        timeout=HANG_GUARD,
    )


def single_model_flags(base_path: str | os.PathLike) -> list[str]:
    """`python -m serving.server` flags serving the fixture model MODEL from `base_path`, gRPC only."""
    return ["--model-base-path", str(base_path), "--model-name", MODEL, "--rest-api-port", "0"]


@dataclasses.dataclass
class CliServer:
    """A `python -m serving.server` subprocess that listens (see `cli_server`)."""

    process: subprocess.Popen
    port: int
    port_file: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def cli_server(flags: Sequence[str], scratch: Path) -> Iterator[CliServer]:
    """Runs `python -m serving.server --port 0 --port-file <scratch>/run/port FLAGS` and yields it
    once the port file is written (the server listens and handles signals); kills it on the way
    out if it still runs. Its log is `<scratch>/server.log`."""
    port_file = scratch / "run" / "port"
    port_file.parent.mkdir(parents=True)
    log = scratch / "server.log"
    command = [sys.executable, "-m", "serving.server", "--port", "0", "--port-file", str(port_file), *flags]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stderr=stderr, env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)
    try:
        eventually(lambda: port_file.is_file() or process.poll() is not None)
        assert process.poll() is None, log.read_text()
        yield CliServer(process, int(port_file.read_text()), port_file, log)
    finally:
        if process.poll() is None:
            # A server still running here failed its test: its thread stacks go to its log first
            # (serving.server dumps them on SIGUSR1), and the log's end to the test's output.
            process.send_signal(signal.SIGUSR1)
            time.sleep(2)
            process.kill()
            process.wait(timeout=HANG_GUARD)
            print(f"serving.server's log ({log}), its end:\n{log.read_text()[-8000:]}")
