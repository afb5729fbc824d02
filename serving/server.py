"""A local stand-in for tensorflow_model_server: PredictionService and ModelService over grpcio.

It serves any SavedModel with signatures from TF Serving's layout,
`<base_path>/<version>/saved_model.pb` (the export writes `exports/<model_name>/<version>/`), and
answers like TF Serving does: the same request and response protos, the same status codes and the
same metadata. A poll thread picks up new version directories without a restart; a directory that
has no `saved_model.pb` yet, or fails to load, is logged and skipped while the previous version
keeps serving, and is tried again once its files change.

    python -m serving.server --model-base-path exports/sharpmask --model-name sharpmask --port 8500

Several models come from a `--model-config-file` (`serving.model_config`); versions are scanned
and loaded by `serving.versions`, requests checked and run by `serving.predict`, merged into
batches by `serving.batching`, answered by `serving.api` (gRPC servicers here, the REST API in
`serving.rest`); the Prometheus metrics are `serving.metrics`. This module holds the server's
lifecycle and its CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.api import ModelStatusServicer, PredictionServicer, ServingApi
from serving.batching import Batcher, BatchOptions, parse_batching_parameters
from serving.metrics import MonitoringConfig, ServingMetrics, parse_monitoring_config
from serving.model_config import ModelRegistry, ModelServerConfig, parse_model_config, single_model_config
from serving.predict import RequestError, RequestLimits, run_predict
from serving.protocol import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_MESSAGE_BYTES,
    version_number,
)
from serving.rest import RestServer

logger = logging.getLogger(__name__)

# How often the CLI's main thread looks for a SIGTERM/SIGINT its handler recorded.
_SIGNAL_POLL_SECONDS = 0.2


class ModelServer:
    """A gRPC server for SavedModel versions, with a thread following their base paths: one model
    (`base_path` and `model_name`) or the list of a ModelServerConfig (`model_config`).

    Args:
        base_path: `<base_path>/<version>/saved_model.pb`, e.g. `exports/sharpmask`.
        model_name: the name clients put in `model_spec.name`.
        model_config: several models with their version policies and labels
            (`serving.model_config`), instead of base_path, model_name, version_labels and
            num_versions.
        host: the interface to bind; loopback unless asked otherwise.
        port: the port to bind; 0 picks a free one (see `port` after `start`).
        version_labels: label -> version for `model_spec.version_label`; labelled versions are
            kept loaded.
        num_versions: how many of the newest versions to keep loaded.
        poll_interval: seconds between scans of the base path.
        max_workers: threads answering requests concurrently.
        max_message_bytes: max send and receive message size.
        enable_model_warmup: replay each version's `assets.extra/tf_serving_warmup_requests`
            before serving it (TF Serving's default); a version whose warm-up fails is not served.
        limits: what one Predict request may ask for (`serving.predict.RequestLimits`); its
            defaults when None.
        rest_api_port: serve TF Serving's REST API (`serving.rest`) on this port too; 0 picks a
            free one (see `rest_api_port` after `start`), None serves none.
        monitoring_config: a MonitoringConfig (`serving.metrics`); with `prometheus_config`
            enabled, the REST port serves the metrics at its path.
        batching: merge concurrent Predict requests into batches with these options
            (`serving.batching`); None runs each request alone.
    """

    def __init__(
        self,
        base_path: str | None = None,
        model_name: str | None = None,
        *,
        model_config: ModelServerConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        version_labels: Mapping[str, int] | None = None,
        num_versions: int = 1,
        poll_interval: float = 1.0,
        max_workers: int = 8,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        enable_model_warmup: bool = True,
        rest_api_port: int | None = None,
        monitoring_config: MonitoringConfig | None = None,
        batching: BatchOptions | None = None,
        limits: RequestLimits | None = None,
    ):
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive. Received: poll_interval={poll_interval}")
        if (model_config is None) == (base_path is None or model_name is None):
            raise ValueError(
                "Give either base_path and model_name, or model_config. "
                f"Received: base_path={base_path!r}, model_name={model_name!r}, model_config={model_config is not None}"
            )
        metrics_path = _metrics_path(monitoring_config, rest_api_port)
        if model_config is None:
            model_config = single_model_config(base_path, model_name, num_versions, version_labels)
        self.limits = limits or RequestLimits()
        self.models = ModelRegistry(model_config, enable_model_warmup, self.limits)
        self.host = host
        self.port = port
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.metrics = ServingMetrics(self.models.all_states)
        self._batcher = None if batching is None else self._make_batcher(batching)
        self.api = ServingApi(self.models, self._batcher, self.limits)
        self._server = _grpc_server(self.api, self.metrics, max_workers, max_message_bytes)
        self._rest = None
        if rest_api_port is not None:
            routes = {} if metrics_path is None else {metrics_path: self.metrics.exposition}
            self._rest = RestServer(
                self.api,
                host=host,
                port=rest_api_port,
                max_body_bytes=max_message_bytes,
                observe=self.metrics.observer("REST"),
                extra_routes=routes,
            )

    def _make_batcher(self, batching: BatchOptions) -> Batcher:
        # Each request is checked alone against `limits` first; a merged batch may hold up to
        # the batching's max_batch_size rows.
        merged = dataclasses.replace(
            self.limits, max_batch_size=max(self.limits.max_batch_size, batching.max_batch_size)
        )
        return Batcher(batching, run=functools.partial(run_predict, limits=merged), on_batch=self.metrics.observe_batch)

    def start(self) -> int:
        """Loads the current versions, starts answering and following the base path.

        Returns:
            The bound port.

        Raises:
            RuntimeError: if the address cannot be bound.
        """
        self.models.refresh()
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"Could not bind the gRPC server. Received: address={address!r}")
        self._server.start()
        if self._rest is not None:
            self._rest.start()
        self._poller = threading.Thread(target=self._poll, name="serving-version-poller", daemon=True)
        self._poller.start()
        for name, manager in self.models.managers.items():
            logger.info("Serving model %s from %s on %s:%d", name, manager.base_path, self.host, self.port)
        return self.port

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.models.refresh()

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting requests, lets in-flight ones finish for `grace` seconds, stops polling."""
        self._stop.set()
        if self._rest is not None:
            self._rest.stop()
        self._server.stop(grace).wait()
        if self._batcher is not None:
            self._batcher.stop()
        if self._poller is not None:
            self._poller.join()

    @property
    def rest_api_port(self) -> int | None:
        """The REST API's port (bound once started), or None when it is not served."""
        return None if self._rest is None else self._rest.port

    def wait(self) -> None:
        """Blocks until the server has stopped."""
        self._server.wait_for_termination()

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _metrics_path(monitoring_config: MonitoringConfig | None, rest_api_port: int | None) -> str | None:
    """The REST path of the Prometheus metrics, or None when they are not enabled.

    Raises:
        ValueError: for metrics enabled without a REST port to serve them on.
    """
    prometheus = monitoring_config.prometheus_config if monitoring_config is not None else None
    if prometheus is None or not prometheus.enable:
        return None
    if rest_api_port is None:
        raise ValueError("Prometheus metrics are served on the REST API's port; give rest_api_port too")
    return prometheus.path


def _grpc_server(api: ServingApi, metrics: ServingMetrics, max_workers: int, max_message_bytes: int) -> grpc.Server:
    """A grpcio server (not bound yet) with both servicers answering through `api`."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Two servers must not share a port: a stale test server would answer instead.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    observe = metrics.observer("GRPC")
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(api, observe), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelStatusServicer(api, observe), server)
    return server


def start_server(
    base_path: str | None = None, model_name: str | None = None, port: int = 0, host: str = "127.0.0.1", **kwargs: Any
) -> tuple[ModelServer, int]:
    """Starts a ModelServer (see its arguments) and returns it with its bound port."""
    server = ModelServer(base_path, model_name, host=host, port=port, **kwargs)
    return server, server.start()


def parse_version_labels(text: str) -> dict[str, int]:
    """Parses `stable=1,canary=2` into {"stable": 1, "canary": 2}.

    Raises:
        ValueError: for an item that is not `label=<non-negative integer>`.
    """
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, version = item.partition("=")
        number = version_number(version.strip())
        if not sep or not label.strip() or number is None:
            raise ValueError(f"A version label must look like name=<version number>. Received: {item!r}")
        labels[label.strip()] = number
    return labels


def write_port_file(path: str | os.PathLike, port: int) -> None:
    """Writes the bound port (decimal, one line) to `path` atomically: a file beside it, renamed
    over it, so a reader sees the whole number or no file."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(f"{port}\n")
    os.replace(staging, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-base-path", help="directory of numbered SavedModel versions")
    parser.add_argument("--model-name", help="the name requests use in model_spec.name")
    parser.add_argument(
        "--model-config-file",
        help="a ModelServerConfig text proto (model_config_list) of several models, instead of "
        "--model-base-path and --model-name",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one")
    parser.add_argument(
        "--rest-api-port", type=int, default=8501, help="TF Serving's REST API port; 0 serves no REST API"
    )
    parser.add_argument(
        "--monitoring-config-file",
        help="a MonitoringConfig text proto; prometheus_config { enable: true } serves metrics on the REST port",
    )
    parser.add_argument("--enable-batching", action="store_true", help="merge concurrent Predict requests into batches")
    parser.add_argument(
        "--batching-parameters-file",
        help="a BatchingParameters text proto (max_batch_size, batch_timeout_micros, ...), with --enable-batching",
    )
    parser.add_argument(
        "--port-file",
        help="write the bound port to this file once listening (atomically; removed at shutdown). Ours: "
        "tensorflow_model_server has no such flag",
    )
    parser.add_argument("--version-labels", default="", help="e.g. stable=1,canary=2")
    parser.add_argument("--num-versions", type=int, default=1, help="newest versions kept loaded")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between base path scans")
    parser.add_argument("--max-workers", type=int, default=8, help="request threads")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="largest first dimension of a Predict input, i.e. images per request (ours); over it: INVALID_ARGUMENT",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="most pixels (height x width, every frame of a GIF) of one image, read from its header before "
        "decoding (ours); over it: RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--enable-model-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay assets.extra/tf_serving_warmup_requests before serving a version (as TF Serving does)",
    )
    return parser


def _server_from_args(args: argparse.Namespace) -> ModelServer:
    """The ModelServer the CLI's flags describe, its config files read.

    Raises:
        ValueError, OSError, text_format.ParseError, RequestError: for a flag or file it refuses.
    """
    model_config = parse_model_config(args.model_config_file) if args.model_config_file else None
    single = args.model_base_path is not None and args.model_name is not None
    if (model_config is None) != single or (model_config is not None and (args.model_base_path or args.model_name)):
        raise ValueError("give --model-base-path and --model-name, or --model-config-file")
    batching = None
    if args.enable_batching and args.batching_parameters_file:
        batching = parse_batching_parameters(args.batching_parameters_file)
    elif args.enable_batching:
        batching = BatchOptions()
    return ModelServer(
        args.model_base_path,
        args.model_name,
        model_config=model_config,
        host=args.host,
        port=args.port,
        version_labels=parse_version_labels(args.version_labels),
        num_versions=args.num_versions,
        poll_interval=args.poll_interval,
        max_workers=args.max_workers,
        max_message_bytes=args.max_message_bytes,
        enable_model_warmup=args.enable_model_warmup,
        limits=RequestLimits(max_batch_size=args.max_batch_size, max_image_pixels=args.max_image_pixels),
        rest_api_port=args.rest_api_port or None,
        monitoring_config=parse_monitoring_config(args.monitoring_config_file) if args.monitoring_config_file else None,
        batching=batching,
    )


def _serve_until_signalled(server: ModelServer, port_file: str | None) -> None:
    """Starts the server and serves until SIGTERM or SIGINT, with the port in `port_file` meanwhile."""
    server.start()
    received: list[int] = []

    def on_signal(signum, _frame):
        # Only a list append: Python runs the handler in the main thread between two bytecodes,
        # wherever it is, and a handler that takes a lock (threading.Event.set, logging) deadlocks
        # when the main thread was holding that lock.
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Written once the signals are handled too, so whoever reads it may send SIGTERM at once.
    if port_file:
        write_port_file(port_file, server.port)
    # A sleep, not a wait on a lock: a signal the kernel hands to another thread only flags the
    # handler, which the main thread then runs once it next executes bytecode, i.e. after this
    # sleep, whereas a lock wait without timeout would never return.
    while not received:
        time.sleep(_SIGNAL_POLL_SECONDS)
    logger.info("Received %s; shutting down", signal.Signals(received[0]).name)
    server.stop()
    if port_file:
        Path(port_file).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = _server_from_args(args)
    except (ValueError, OSError, text_format.ParseError, RequestError) as e:
        parser.error(str(e))
    # `kill -USR1 <pid>` writes every thread's Python stack to stderr, e.g. for a server that hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _serve_until_signalled(server, args.port_file)
    logger.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
