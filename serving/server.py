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
batches by `serving.batching`; the REST API is `serving.rest`, the Prometheus metrics
`serving.metrics`. This module holds the gRPC servicers, the server's lifecycle and its CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.batching import Batcher, BatchOptions, parse_batching_parameters
from serving.metrics import (
    MonitoringConfig,
    RequestObserver,
    ServingMetrics,
    parse_monitoring_config,
    requested_version,
)
from serving.model_config import ModelRegistry, ModelServerConfig, parse_model_config, single_model_config
from serving.predict import RequestError, RequestLimits, check_request, run_predict
from serving.protocol import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_MESSAGE_BYTES,
    version_number,
)
from serving.rest import RestServer

logger = logging.getLogger(__name__)


def _serving_rpc(method):
    """Turns a RequestError (or an unexpected exception) into the call's gRPC status, and
    reports each call to the servicer's `observe` (see `ServingMetrics.observer`)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        started = time.perf_counter()
        code, message, response = grpc.StatusCode.OK, "", None
        try:
            response = method(self, request)
        except RequestError as e:
            code, message = e.code, e.message
        except Exception as e:
            logger.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        # A ReloadConfigRequest names no model.
        spec = getattr(request, "model_spec", model_pb2.ModelSpec())
        self._observe(spec.name, requested_version(spec), method.__name__, code, time.perf_counter() - started)
        if response is None:
            context.abort(code, message)
        return response

    return wrapper


class ServingApi:
    """Predict, GetModelMetadata, GetModelStatus and HandleReloadConfigRequest on request protos,
    as TF Serving answers them; the gRPC servicers and the REST API (`serving.rest`) call these.

    Args:
        models: the served models.
        batcher: merges concurrent Predict requests into batches; None runs each alone.
        limits: what one Predict request may ask for (`serving.predict.RequestLimits`); each
            request is held to them before it joins a batch.
    """

    def __init__(self, models: ModelRegistry, batcher: Batcher | None = None, limits: RequestLimits | None = None):
        self._models = models
        self._batcher = batcher
        self._limits = limits or RequestLimits()

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Runs a PredictRequest on the version its ModelSpec names, in a batch if batching."""
        loaded = self._models.resolve(request.model_spec)
        if self._batcher is not None:
            check_request(loaded, request, self._limits)
            return self._batcher.predict(loaded, request)
        return run_predict(loaded, request, self._limits)

    def get_model_metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The SignatureDef map of the version a GetModelMetadataRequest names."""
        if not request.HasField("model_spec"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        loaded = self._models.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = loaded.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in loaded.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def get_model_status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """The state of every version of a model, or of the one version its ModelSpec names."""
        if not request.HasField("model_spec"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        name = request.model_spec.name
        states = self._models.version_states(name)
        if request.model_spec.HasField("version") or request.model_spec.HasField("version_label"):
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else self._models.resolve(spec).version
            if version not in states:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        elif not states:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in sorted(states):
            state, code, message = states[version]
            status = response.model_version_status.add(version=version, state=state)
            status.status.error_code = code.value[0]
            status.status.error_message = message
        return response

    def reload_config(
        self, request: model_management_pb2.ReloadConfigRequest
    ) -> model_management_pb2.ReloadConfigResponse:
        """Serves the request's ModelServerConfig instead of the current one (`ModelRegistry.reload`)."""
        self._models.reload(request.config)
        return model_management_pb2.ReloadConfigResponse()


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify, Regress and MultiInference stay UNIMPLEMENTED."""

    def __init__(self, api: ServingApi, observe: RequestObserver):
        self._api = api
        self._observe = observe

    @_serving_rpc
    def Predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        return self._api.predict(request)

    @_serving_rpc
    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return self._api.get_model_metadata(request)


class ModelStatusServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, api: ServingApi, observe: RequestObserver):
        self._api = api
        self._observe = observe

    @_serving_rpc
    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        return self._api.get_model_status(request)

    @_serving_rpc
    def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest
    ) -> model_management_pb2.ReloadConfigResponse:
        return self._api.reload_config(request)


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
        prometheus = monitoring_config.prometheus_config if monitoring_config is not None else None
        if prometheus is not None and prometheus.enable and rest_api_port is None:
            raise ValueError("Prometheus metrics are served on the REST API's port; give rest_api_port too")
        if model_config is None:
            model_config = single_model_config(base_path, model_name, num_versions, version_labels)
        self.limits = limits or RequestLimits()
        self.models = ModelRegistry(model_config, enable_model_warmup, self.limits)
        self.host = host
        self.port = port
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Two servers must not share a port: a stale test server would answer instead.
            ("grpc.so_reuseport", 0),
        ]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        self.metrics = ServingMetrics(self.models.all_states)
        self._batcher = None
        if batching is not None:
            # Each request is checked alone against `limits` first; a merged batch may hold up to
            # the batching's max_batch_size rows.
            merged = dataclasses.replace(
                self.limits, max_batch_size=max(self.limits.max_batch_size, batching.max_batch_size)
            )
            run = functools.partial(run_predict, limits=merged)
            self._batcher = Batcher(batching, run=run, on_batch=self.metrics.observe_batch)
        self.api = ServingApi(self.models, self._batcher, self.limits)
        observe = self.metrics.observer("GRPC")
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.api, observe), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelStatusServicer(self.api, observe), self._server)
        self._rest = None
        if rest_api_port is not None:
            routes = {prometheus.path: self.metrics.exposition} if prometheus is not None and prometheus.enable else {}
            self._rest = RestServer(
                self.api,
                host=host,
                port=rest_api_port,
                max_body_bytes=max_message_bytes,
                observe=self.metrics.observer("REST"),
                extra_routes=routes,
            )

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        labels = parse_version_labels(args.version_labels)
        limits = RequestLimits(max_batch_size=args.max_batch_size, max_image_pixels=args.max_image_pixels)
        monitoring = parse_monitoring_config(args.monitoring_config_file) if args.monitoring_config_file else None
        model_config = parse_model_config(args.model_config_file) if args.model_config_file else None
        batching = None
        if args.enable_batching:
            batching = (
                parse_batching_parameters(args.batching_parameters_file)
                if args.batching_parameters_file
                else BatchOptions()
            )
    except (ValueError, OSError, text_format.ParseError, RequestError) as e:
        parser.error(str(e))
    single = args.model_base_path is not None and args.model_name is not None
    if (model_config is None) != single or (model_config is not None and (args.model_base_path or args.model_name)):
        parser.error("give --model-base-path and --model-name, or --model-config-file")
    server = ModelServer(
        args.model_base_path,
        args.model_name,
        model_config=model_config,
        host=args.host,
        port=args.port,
        version_labels=labels,
        num_versions=args.num_versions,
        poll_interval=args.poll_interval,
        max_workers=args.max_workers,
        max_message_bytes=args.max_message_bytes,
        enable_model_warmup=args.enable_model_warmup,
        limits=limits,
        rest_api_port=args.rest_api_port or None,
        monitoring_config=monitoring,
        batching=batching,
    )
    server.start()
    stop = threading.Event()

    def on_signal(signum, _frame):
        logger.info("Received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Written once the signals are handled too, so whoever reads it may send SIGTERM at once.
    if args.port_file:
        write_port_file(args.port_file, server.port)
    stop.wait()
    server.stop()
    if args.port_file:
        Path(args.port_file).unlink(missing_ok=True)
    logger.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
