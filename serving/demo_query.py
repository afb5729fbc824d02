"""Serve an export with `serving.server` in a subprocess, query it over gRPC and draw the answer.

    python -m serving.demo_query --base-path exports --model-name sharpmask street.jpg --out proposals.png

What a client of the exported signature does: send file bytes, paste each fixed-size mask crop
back onto its image through `window_boxes` at the export's mask threshold (read from the
version's `assets.extra/sharpmask_export.json`), draw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.client import ServingClient
from serving.protocol import ASSETS_EXTRA, METADATA_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`python -m serving.server` on a free loopback port, as a child process; the port is read
    from the file its `--port-file` writes once it listens.

    Args:
        base_path: the model's directory of numbered versions.
        model_name: the name requests use.
        startup_timeout: seconds to wait for the server to load the model and listen.
        poll_interval: the server's seconds between version scans.
        rest_api_port: serve the REST API on this port too; None serves none.
        extra_args: more `serving.server` flags (e.g. `--enable-batching`).

    Attributes:
        port: the bound port, once started.
        target: "127.0.0.1:<port>", once started.
    """

    def __init__(
        self,
        base_path: str | os.PathLike,
        model_name: str,
        startup_timeout: float = 180.0,
        poll_interval: float = 0.5,
        rest_api_port: int | None = None,
        extra_args: Sequence[str] = (),
    ):
        self.base_path = str(base_path)
        self.rest_api_port = rest_api_port
        self.extra_args = list(extra_args)
        self.model_name = model_name
        self.startup_timeout = startup_timeout
        self.poll_interval = poll_interval
        self.port: int | None = None
        self.log: list[str] = []
        self._process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> int:
        """Starts the server and waits until it listens.

        Returns:
            The bound port.

        Raises:
            RuntimeError: if the server exits or does not listen within startup_timeout (with
                the end of its log).
        """
        with tempfile.TemporaryDirectory(prefix="serving_port_") as scratch:
            port_file = Path(scratch) / "port"
            command = [
                sys.executable, "-m", "serving.server",
                "--model-base-path", self.base_path,
                "--model-name", self.model_name,
                "--port", "0",
                "--port-file", str(port_file),
                "--poll-interval", str(self.poll_interval),
                "--rest-api-port", str(self.rest_api_port or 0),
                *self.extra_args,
            ]  # fmt: skip
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            }
            self._process = subprocess.Popen(
                command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
            )
            threading.Thread(target=self._read_log, name="serving-log", daemon=True).start()
            deadline = time.monotonic() + self.startup_timeout
            # The server writes the file atomically, so once it exists it holds the whole port.
            while not port_file.is_file():
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = "\n".join(self.log[-20:])
                    raise RuntimeError(f"serving.server did not start listening on {self.base_path}. Its log:\n{tail}")
                time.sleep(0.1)
            self.port = int(port_file.read_text())
        return self.port

    def _read_log(self) -> None:
        # Drains the pipe for the server's whole life, so it never blocks on a full pipe.
        for line in self._process.stderr:
            self.log.append(line.rstrip())

    def stop(self, timeout: float = 30.0) -> int | None:
        """Sends SIGTERM (SIGKILL after `timeout` seconds) and returns the exit code."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def paste_crops(crops: np.ndarray, window_boxes: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    """Full-image binary masks from the signature's mask crops.

    Args:
        crops: (n, M, M) mask probabilities.
        window_boxes: (n, 4) image-pixel windows (x0, y0, x1, y1) the crops cover.
        height: the image height.
        width: the image width.
        threshold: the export's mask threshold.

    Returns:
        (n, height, width) bool.
    """
    from sharpmask_tf.masks import paste_masks

    if len(crops) == 0:
        return np.zeros((0, height, width), bool)
    return paste_masks(crops, window_boxes, height, width, threshold).numpy()


def side_by_side(pictures: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W, 3) uint8 pictures left to right on white, top-aligned."""
    canvas = np.full((max(p.shape[0] for p in pictures), sum(p.shape[1] for p in pictures), 3), 255, np.uint8)
    x = 0
    for picture in pictures:
        canvas[: picture.shape[0], x : x + picture.shape[1]] = picture
        x += picture.shape[1]
    return canvas


def serve_and_query(
    export_dir_base: str | os.PathLike,
    model_name: str,
    image_paths: Sequence[str | os.PathLike],
    out_png: str | os.PathLike,
    max_draw: int = 10,
) -> dict:
    """Serves `<export_dir_base>/<model_name>` in a subprocess, sends the images in one Predict
    request, and writes the proposals drawn over the images (side by side) as one PNG.

    Args:
        export_dir_base: the exports root (`export.base_path`).
        model_name: the exported model's name.
        image_paths: JPEG/PNG files; sizes may differ.
        out_png: the picture to write.
        max_draw: proposals drawn per image.

    Returns:
        {"version": the served version, "target": "127.0.0.1:<port>", "out_png": str,
         "images": [{"path", "height", "width", "num_proposals", "scores" (list), "boxes"
         (list of [x0, y0, x1, y1])} per image]}.
    """
    from PIL import Image

    from sharpmask_tf.images import load_image
    from sharpmask_tf.visualize import draw_proposals

    if not image_paths:
        raise ValueError("serve_and_query needs at least one image. Received: image_paths=[]")
    encoded = [Path(p).read_bytes() for p in image_paths]
    base = Path(export_dir_base) / model_name
    with ServerProcess(base, model_name) as server, ServingClient(server.target, model_name, timeout=300.0) as client:
        version = client.get_model_metadata().version
        outputs = client.predict_images(encoded)
        target = server.target
    metadata = json.loads((base / str(version) / ASSETS_EXTRA / METADATA_FILE).read_text())
    threshold = metadata["proposals"]["mask_threshold"]
    pictures, results = [], []
    for i, path in enumerate(image_paths):
        image = load_image(path)
        height, width = image.shape[:2]
        n = int(outputs["num_proposals"][i])
        masks = paste_crops(outputs["masks"][i, :n], outputs["window_boxes"][i, :n], height, width, threshold)
        pictures.append(draw_proposals(image, masks, outputs["scores"][i, :n], max_draw))
        results.append(
            {
                "path": str(path),
                "height": height,
                "width": width,
                "num_proposals": n,
                "scores": outputs["scores"][i, :n].tolist(),
                "boxes": outputs["boxes"][i, :n].tolist(),
            }
        )
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(side_by_side(pictures)).save(out_png)
    return {"version": version, "target": target, "out_png": str(out_png), "images": results}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.demo_query", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="JPEG/PNG files")
    parser.add_argument("--base-path", default="exports", help="the exports root")
    parser.add_argument("--model-name", default="sharpmask")
    parser.add_argument("--out", default="proposals.png", help="the PNG to write")
    parser.add_argument("--draw", type=int, default=10, help="proposals drawn per image")
    args = parser.parse_args(argv)
    result = serve_and_query(args.base_path, args.model_name, args.images, args.out, args.draw)
    for item in result["images"]:
        top = ", ".join(f"{s:.2f}" for s in item["scores"][:5])
        print(f"{item['path']}: {item['num_proposals']} proposals, best scores {top}")
    print(f"version {result['version']} answered; picture -> {result['out_png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
