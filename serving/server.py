"""A local stand-in for tensorflow_model_server: PredictionService and ModelService over grpcio.

It serves any SavedModel with signatures from TF Serving's layout,
`<base_path>/<version>/saved_model.pb` (the export writes `exports/<model_name>/<version>/`), and
answers like TF Serving does: the same request and response protos, the same status codes and the
same metadata. A poll thread picks up new version directories without a restart; a directory that
has no `saved_model.pb` yet, or fails to load, is logged and skipped while the previous version
keeps serving, and is tried again once its files change.

    python -m serving.server --model-base-path exports/sharpmask --model-name sharpmask --port 8500
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
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
SERVE_TAG = "serve"
# Large enough for a batch of full-resolution images in and dense masks out; gRPC's default
# receive limit is 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# TF Serving's SavedModel warm-up file, under the version's assets.extra, and its record limit.
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000
# TensorFlow's error codes are gRPC's, number for number.
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}

State = get_model_status_pb2.ModelVersionStatus.State


class RequestError(Exception):
    """A request that fails with the gRPC status code TF Serving would answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class LoadedVersion:
    """One loaded SavedModel version.

    Attributes:
        version: the version directory's number.
        path: the version directory.
        signature_defs: the `serve` MetaGraphDef's SignatureDef map, verbatim from
            `saved_model.pb`, as GetModelMetadata returns it.
        signatures: the callable signatures, by name.
        model: the loaded object; kept so the signatures' variables stay alive.
    """

    version: int
    path: str
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    signatures: Mapping[str, Callable[..., Mapping[str, tf.Tensor]]]
    model: Any


def load_version(path: str, version: int, warmup: bool = True) -> LoadedVersion:
    """Loads the `serve` MetaGraph of the SavedModel in `path`, then replays its warm-up
    requests (`run_warmup`) unless `warmup` is False.

    Raises:
        ValueError: if the SavedModel has no MetaGraphDef tagged exactly `serve`.
        OSError, tf.errors.OpError, google.protobuf.message.DecodeError: for a missing, partial
            or corrupt SavedModel.
        RequestError: for warm-up data that does not run, as TF Serving fails such a load.
    """
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    tag_sets = [sorted(mg.meta_info_def.tags) for mg in saved_model.meta_graphs]
    meta_graph = next((mg for mg, tags in zip(saved_model.meta_graphs, tag_sets) if tags == [SERVE_TAG]), None)
    if meta_graph is None:
        raise ValueError(f"{path} has no MetaGraphDef tagged {{{SERVE_TAG}}}. Received tag sets: {tag_sets}")
    model = tf.saved_model.load(path, tags=[SERVE_TAG])
    loaded = LoadedVersion(
        version=version,
        path=path,
        signature_defs=dict(meta_graph.signature_def),
        signatures=dict(model.signatures),
        model=model,
    )
    if warmup:
        count = run_warmup(loaded)
        if count:
            logger.info("Ran %d warm-up requests of version %d from %s", count, version, path)
    return loaded


def run_warmup(loaded: LoadedVersion) -> int:
    """Replays `assets.extra/tf_serving_warmup_requests` against a loaded version, as
    tensorflow_model_server does at load time (its default `--enable_model_warmup`): a TFRecord
    file of PredictionLog records, at most 1000, each run once. No file is no warm-up.

    Returns:
        The number of requests run.

    Raises:
        RequestError: DATA_LOSS for a file that is not TFRecord, INVALID_ARGUMENT for a record
            that is not a PredictionLog or for more than 1000 records, UNIMPLEMENTED for a
            log type other than Predict (this server answers Predict only), or the error a
            Predict request gets.
    """
    path = os.path.join(loaded.path, "assets.extra", WARMUP_FILE)
    if not os.path.isfile(path):
        return 0
    try:
        records = [record.numpy() for record in tf.data.TFRecordDataset(path)]
    except tf.errors.DataLossError as e:
        raise RequestError(
            grpc.StatusCode.DATA_LOSS, f"{e.message}. Please verify your warmup data is in TFRecord format."
        ) from e
    if len(records) > MAX_WARMUP_RECORDS:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}. "
            f"Received: {len(records)} records",
        )
    count = 0
    for index, record in enumerate(records):
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record)
        except Exception as e:  # noqa: BLE001 -- protobuf's DecodeError differs between implementations
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Failed to parse warmup record {index} from {path}: {e}"
            ) from e
        kind = log.WhichOneof("log_type")
        if kind is None:
            continue
        if kind != "predict_log":
            raise RequestError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"Unsupported log_type for warmup: {kind} (record {index} of {path}); this server answers Predict only",
            )
        run_predict(loaded, log.predict_log.request)
        count += 1
    return count


def _directory_fingerprint(path: str) -> tuple[tuple[str, int, int], ...]:
    """Every file under `path` with its size and mtime: changes whenever a writer touches it."""
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


class VersionManager:
    """Keeps the servable versions of one model loaded, following the directories under its base path.

    The newest `num_versions` loadable versions are kept (TF Serving's `latest` policy, whose
    default is 1), plus every version a label points at. A version directory without
    `saved_model.pb` is not a candidate yet; one that fails to load is logged, reported as END
    with its error by GetModelStatus, and tried again once its files change.

    Args:
        base_path: the directory holding the numbered version directories.
        model_name: the name requests must use.
        num_versions: how many of the newest loadable versions to keep loaded.
        version_labels: label -> version, for `model_spec.version_label`.
        enable_model_warmup: replay each version's warm-up requests before serving it.
    """

    def __init__(
        self,
        base_path: str,
        model_name: str,
        num_versions: int = 1,
        version_labels: Mapping[str, int] | None = None,
        enable_model_warmup: bool = True,
    ):
        if num_versions < 1:
            raise ValueError(f"num_versions must be positive. Received: num_versions={num_versions}")
        self.base_path = base_path
        self.model_name = model_name
        self.num_versions = num_versions
        self.version_labels = dict(version_labels or {})
        self.enable_model_warmup = enable_model_warmup
        self._lock = threading.Lock()
        self._loaded: dict[int, LoadedVersion] = {}
        # Versions that are not loaded any more, or failed to: version -> (code, message).
        self._ended: dict[int, tuple[grpc.StatusCode, str]] = {}
        self._failed_fingerprints: dict[int, tuple] = {}
        self._reported_pending: set[int] = set()

    def _version_dirs(self) -> dict[int, str]:
        try:
            names = os.listdir(self.base_path)
        except FileNotFoundError:
            logger.warning("Base path %s of model %s does not exist (yet)", self.base_path, self.model_name)
            return {}
        dirs = {}
        for name in names:
            path = os.path.join(self.base_path, name)
            if name.isdigit() and os.path.isdir(path):
                dirs[int(name)] = path
        return dirs

    def refresh(self) -> None:
        """Scans the base path once, loads the versions that should be served and unloads the rest."""
        dirs = self._version_dirs()
        ready = {}
        for version, path in dirs.items():
            if os.path.isfile(os.path.join(path, "saved_model.pb")):
                ready[version] = path
                self._reported_pending.discard(version)
            elif version not in self._reported_pending:
                logger.info("Version %d of %s has no saved_model.pb yet; not serving it", version, self.model_name)
                self._reported_pending.add(version)
        labelled = set(self.version_labels.values())
        keep: set[int] = set()
        latest_kept = 0
        for version in sorted(ready, reverse=True):
            in_latest = latest_kept < self.num_versions
            if (in_latest or version in labelled) and self._ensure_loaded(version, ready[version]):
                keep.add(version)
                latest_kept += in_latest
        with self._lock:
            for version in set(self._loaded) - keep:
                logger.info("Unloading version %d of %s", version, self.model_name)
                del self._loaded[version]
                self._ended[version] = (grpc.StatusCode.OK, "")

    def _ensure_loaded(self, version: int, path: str) -> bool:
        with self._lock:
            if version in self._loaded:
                return True
        fingerprint = _directory_fingerprint(path)
        if self._failed_fingerprints.get(version) == fingerprint:
            return False
        logger.info("Loading version %d of %s from %s", version, self.model_name, path)
        try:
            loaded = load_version(path, version, warmup=self.enable_model_warmup)
        except Exception as e:  # noqa: BLE001 -- any load failure leaves the served versions as they are
            logger.warning(
                "Loading version %d of %s failed; keeping the served versions: %s", version, self.model_name, e
            )
            self._failed_fingerprints[version] = fingerprint
            code = _GRPC_CODES.get(e.error_code) if isinstance(e, tf.errors.OpError) else None
            code = e.code if isinstance(e, RequestError) else code
            with self._lock:
                self._ended[version] = (code or grpc.StatusCode.UNKNOWN, f"Loading {path} failed: {e}")
            return False
        self._failed_fingerprints.pop(version, None)
        with self._lock:
            self._loaded[version] = loaded
            self._ended.pop(version, None)
        logger.info("Serving version %d of %s", version, self.model_name)
        return True

    def resolve(self, model_spec) -> LoadedVersion:
        """Returns the version a request's ModelSpec names: its version, its label, or the newest.

        Raises:
            RequestError: NOT_FOUND for an unknown model or a version that is not loaded,
                INVALID_ARGUMENT for an unknown version label.
        """
        name = model_spec.name
        choice = model_spec.WhichOneof("version_choice")
        version = None
        if choice == "version":
            version = model_spec.version.value
        elif choice == "version_label":
            if model_spec.version_label not in self.version_labels or name != self.model_name:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {model_spec.version_label}",
                )
            version = self.version_labels[model_spec.version_label]
        with self._lock:
            if name == self.model_name:
                if version is None and self._loaded:
                    return self._loaded[max(self._loaded)]
                if version in self._loaded:
                    return self._loaded[version]
        request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")

    def version_states(self) -> dict[int, tuple[int, grpc.StatusCode, str]]:
        """Every version seen: version -> (ModelVersionStatus.State, status code, error message)."""
        with self._lock:
            states = {v: (State.END, code, message) for v, (code, message) in self._ended.items()}
            states.update({v: (State.AVAILABLE, grpc.StatusCode.OK, "") for v in self._loaded})
        return states


def _serving_rpc(method):
    """Turns a RequestError (or an unexpected exception) into the call's gRPC status."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request)
        except RequestError as e:
            code, message = e.code, e.message
        except Exception as e:
            logger.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        context.abort(code, message)

    return wrapper


def _input_tensors(signature_name: str, signature: meta_graph_pb2.SignatureDef, inputs) -> dict[str, tf.Tensor]:
    """Checks a request's inputs against a SignatureDef and converts them to tensors."""
    expected = sorted(signature.inputs)
    for key in inputs:
        if key not in signature.inputs:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input tensor alias not found in signature: {key}. "
                f"Inputs expected to be in the set {{{','.join(expected)}}}.",
            )
    missing = [key for key in expected if key not in inputs]
    if missing:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Signature {signature_name!r} requires inputs {{{','.join(expected)}}}. "
            f"Missing: {{{','.join(missing)}}}; received: {{{','.join(sorted(inputs))}}}.",
        )
    tensors = {}
    for key, proto in inputs.items():
        info = signature.inputs[key]
        want = tf.dtypes.as_dtype(info.dtype)
        if proto.dtype != info.dtype:
            got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "DT_INVALID"
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {key!r} of signature {signature_name!r} must have dtype {want.name}. Received: dtype={got}",
            )
        try:
            value = tf.make_ndarray(proto)
        except (ValueError, TypeError) as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {key}: {e}") from e
        shape = tf.TensorShape(info.tensor_shape)
        if not shape.is_compatible_with(value.shape):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {key!r} of signature {signature_name!r} must have shape {shape}. "
                f"Received: shape={tuple(value.shape)}",
            )
        tensors[key] = tf.constant(value, dtype=want)
    return tensors


def run_predict(loaded: LoadedVersion, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Answers a PredictRequest with one loaded version, as TF Serving's Predict does.

    Raises:
        RequestError: with the status code TF Serving answers a bad request or a failed run with.
    """
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if signature_name not in loaded.signatures:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
    signature = loaded.signature_defs[signature_name]
    inputs = _input_tensors(signature_name, signature, request.inputs)
    aliases = list(request.output_filter) or sorted(signature.outputs)
    for alias in aliases:
        if alias not in signature.outputs:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} "
                f"Outputs expected to be in the set {{{','.join(sorted(signature.outputs))}}}.",
            )
    if len(set(aliases)) != len(aliases):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias. Received: output_filter={aliases}"
        )
    try:
        outputs = loaded.signatures[signature_name](**inputs)
    except tf.errors.OpError as e:
        raise RequestError(_GRPC_CODES.get(e.error_code, grpc.StatusCode.UNKNOWN), e.message) from e
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = loaded.version
    response.model_spec.signature_name = signature_name
    for alias in aliases:
        response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias].numpy()))
    return response


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify, Regress and MultiInference stay UNIMPLEMENTED."""

    def __init__(self, manager: VersionManager):
        self._manager = manager

    @_serving_rpc
    def Predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        return run_predict(self._manager.resolve(request.model_spec), request)

    @_serving_rpc
    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        loaded = self._manager.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self._manager.model_name
        response.model_spec.version.value = loaded.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in loaded.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature)
        response.metadata["signature_def"].Pack(signature_map)
        return response


class ModelStatusServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus; HandleReloadConfigRequest stays UNIMPLEMENTED."""

    def __init__(self, manager: VersionManager):
        self._manager = manager

    @_serving_rpc
    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        if not request.HasField("model_spec"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        name = request.model_spec.name
        states = self._manager.version_states() if name == self._manager.model_name else {}
        if request.model_spec.HasField("version"):
            version = request.model_spec.version.value
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


class ModelServer:
    """A gRPC server for one model's SavedModel versions, with a thread following its base path.

    Args:
        base_path: `<base_path>/<version>/saved_model.pb`, e.g. `exports/sharpmask`.
        model_name: the name clients put in `model_spec.name`.
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
    """

    def __init__(
        self,
        base_path: str,
        model_name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        version_labels: Mapping[str, int] | None = None,
        num_versions: int = 1,
        poll_interval: float = 1.0,
        max_workers: int = 8,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        enable_model_warmup: bool = True,
    ):
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive. Received: poll_interval={poll_interval}")
        self.manager = VersionManager(base_path, model_name, num_versions, version_labels, enable_model_warmup)
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
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.manager), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelStatusServicer(self.manager), self._server)

    def start(self) -> int:
        """Loads the current versions, starts answering and following the base path.

        Returns:
            The bound port.

        Raises:
            RuntimeError: if the address cannot be bound.
        """
        self.manager.refresh()
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"Could not bind the gRPC server. Received: address={address!r}")
        self._server.start()
        self._poller = threading.Thread(target=self._poll, name="serving-version-poller", daemon=True)
        self._poller.start()
        logger.info(
            "Serving model %s from %s on %s:%d", self.manager.model_name, self.manager.base_path, self.host, self.port
        )
        return self.port

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.manager.refresh()
            except Exception:
                logger.exception("Scanning %s failed", self.manager.base_path)

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting requests, lets in-flight ones finish for `grace` seconds, stops polling."""
        self._stop.set()
        self._server.stop(grace).wait()
        if self._poller is not None:
            self._poller.join()

    def wait(self) -> None:
        """Blocks until the server has stopped."""
        self._server.wait_for_termination()

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    base_path: str, model_name: str, port: int = 0, host: str = "127.0.0.1", **kwargs: Any
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
        if not sep or not label.strip() or not version.strip().isdigit():
            raise ValueError(f"A version label must look like name=<version number>. Received: {item!r}")
        labels[label.strip()] = int(version)
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-base-path", required=True, help="directory of numbered SavedModel versions")
    parser.add_argument("--model-name", required=True, help="the name requests use in model_spec.name")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one")
    parser.add_argument("--version-labels", default="", help="e.g. stable=1,canary=2")
    parser.add_argument("--num-versions", type=int, default=1, help="newest versions kept loaded")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between base path scans")
    parser.add_argument("--max-workers", type=int, default=8, help="request threads")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument(
        "--enable-model-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay assets.extra/tf_serving_warmup_requests before serving a version (as TF Serving does)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        labels = parse_version_labels(args.version_labels)
    except ValueError as e:
        parser.error(str(e))
    server = ModelServer(
        args.model_base_path,
        args.model_name,
        host=args.host,
        port=args.port,
        version_labels=labels,
        num_versions=args.num_versions,
        poll_interval=args.poll_interval,
        max_workers=args.max_workers,
        max_message_bytes=args.max_message_bytes,
        enable_model_warmup=args.enable_model_warmup,
    )
    server.start()
    stop = threading.Event()

    def on_signal(signum, _frame):
        logger.info("Received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop()
    logger.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
