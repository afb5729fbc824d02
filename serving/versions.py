"""The versions of one model under its base path: scanning, loading with warm-up, and the
VersionManager that keeps the right ones loaded, as TF Serving's file-system source and `latest`
version policy do."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2, prediction_log_pb2

from serving.predict import RequestError, RequestLimits, run_predict
from serving.protocol import (
    ASSETS_EXTRA,
    GRPC_CODES,
    MAX_WARMUP_RECORDS,
    SAVED_MODEL_FILE,
    SERVE_TAG,
    WARMUP_FILE,
    version_number,
)

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State


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


def load_version(path: str, version: int, warmup: bool = True, limits: RequestLimits | None = None) -> LoadedVersion:
    """Loads the `serve` MetaGraph of the SavedModel in `path`, then replays its warm-up
    requests (`run_warmup`, under `limits`) unless `warmup` is False.

    Raises:
        ValueError: if the SavedModel has no MetaGraphDef tagged exactly `serve`.
        OSError, tf.errors.OpError, google.protobuf.message.DecodeError: for a missing, partial
            or corrupt SavedModel.
        RequestError: for warm-up data that does not run, as TF Serving fails such a load.
    """
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, SAVED_MODEL_FILE), "rb") as f:
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
        count = run_warmup(loaded, limits)
        if count:
            logger.info("Ran %d warm-up requests of version %d from %s", count, version, path)
    return loaded


def run_warmup(loaded: LoadedVersion, limits: RequestLimits | None = None) -> int:
    """Replays `assets.extra/tf_serving_warmup_requests` against a loaded version, as
    tensorflow_model_server does at load time (its default `--enable_model_warmup`): a TFRecord
    file of PredictionLog records, at most 1000, each run once. No file is no warm-up.

    Returns:
        The number of requests run.

    Raises:
        RequestError: DATA_LOSS for a file that is not TFRecord, INVALID_ARGUMENT for a record
            that is not a PredictionLog or for more than 1000 records, UNIMPLEMENTED for a
            log type other than Predict (this server answers Predict only), or the error a
            Predict request gets (under `limits`, the defaults when None).
    """
    path = os.path.join(loaded.path, ASSETS_EXTRA, WARMUP_FILE)
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
        run_predict(loaded, log.predict_log.request, limits)
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


def _inside(path: str, directory: str) -> bool:
    """Whether `path` lies under `directory` (both real paths), not at it."""
    return path != directory and os.path.commonpath([path, directory]) == directory


class VersionManager:
    """Keeps the servable versions of one model loaded, following the directories under its base path.

    The newest `num_versions` loadable versions are kept (TF Serving's `latest` policy, whose
    default is 1), or the `specific_versions` (its `specific` policy), plus every version a
    label points at. An entry of the base path whose name is not a version (ASCII digits within
    int64), a plain file, or a symbolic link that leads out of the base path is ignored with a
    warning, once. A version directory without
    `saved_model.pb` is not a candidate yet; one that fails to load is logged, reported as END
    with its error by GetModelStatus, and tried again once its files change.

    Args:
        base_path: the directory holding the numbered version directories.
        model_name: the name requests must use.
        num_versions: how many of the newest loadable versions to keep loaded.
        version_labels: label -> version, for `model_spec.version_label`.
        enable_model_warmup: replay each version's warm-up requests before serving it.
        limits: the request limits warm-up requests are held to, as clients' are.
        specific_versions: keep exactly these versions (when present) instead of the newest.
    """

    def __init__(
        self,
        base_path: str,
        model_name: str,
        num_versions: int = 1,
        version_labels: Mapping[str, int] | None = None,
        enable_model_warmup: bool = True,
        limits: RequestLimits | None = None,
        specific_versions: Collection[int] | None = None,
    ):
        if num_versions < 1:
            raise ValueError(f"num_versions must be positive. Received: num_versions={num_versions}")
        self.base_path = base_path
        self.model_name = model_name
        self.num_versions = num_versions
        self.version_labels = dict(version_labels or {})
        self.enable_model_warmup = enable_model_warmup
        self.limits = limits
        self.specific_versions = None if specific_versions is None else frozenset(specific_versions)
        self._lock = threading.Lock()
        self._loaded: dict[int, LoadedVersion] = {}
        # Versions that are not loaded any more, or failed to: version -> (code, message).
        self._ended: dict[int, tuple[grpc.StatusCode, str]] = {}
        self._failed_fingerprints: dict[int, tuple] = {}
        self._reported_pending: set[int] = set()
        self._reported_ignored: set[str] = set()

    def _ignore(self, name: str, why: str) -> None:
        if name not in self._reported_ignored:
            logger.warning("Ignoring %r under the base path of %s: %s", name, self.model_name, why)
            self._reported_ignored.add(name)

    def _version_dirs(self) -> dict[int, str]:
        try:
            names = sorted(os.listdir(self.base_path))
        except FileNotFoundError:
            logger.warning("Base path %s of model %s does not exist (yet)", self.base_path, self.model_name)
            return {}
        base = os.path.realpath(self.base_path)
        dirs = {}
        for name in names:
            path = os.path.join(self.base_path, name)
            version = version_number(name)
            if version is None:
                if not name.startswith("."):  # an export's staging directories are hidden
                    self._ignore(name, "not a version number (ASCII digits, at most 2**63 - 1)")
            elif not os.path.isdir(path):
                self._ignore(name, "not a directory")
            elif os.path.islink(path) and not _inside(os.path.realpath(path), base):
                self._ignore(name, f"a symbolic link out of the base path, to {os.path.realpath(path)}")
            elif version in dirs:
                self._ignore(name, f"names version {version} as {os.path.basename(dirs[version])!r} does")
            else:
                dirs[version] = path
        return dirs

    def refresh(self) -> None:
        """Scans the base path once, loads the versions that should be served and unloads the rest."""
        dirs = self._version_dirs()
        ready = {}
        for version, path in dirs.items():
            if os.path.isfile(os.path.join(path, SAVED_MODEL_FILE)):
                ready[version] = path
                self._reported_pending.discard(version)
            elif version not in self._reported_pending:
                logger.info("Version %d of %s has no saved_model.pb yet; not serving it", version, self.model_name)
                self._reported_pending.add(version)
        labelled = set(self.version_labels.values())
        keep: set[int] = set()
        latest_kept = 0
        for version in sorted(ready, reverse=True):
            if self.specific_versions is None:
                in_latest = latest_kept < self.num_versions
            else:
                in_latest = version in self.specific_versions
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
            loaded = load_version(path, version, warmup=self.enable_model_warmup, limits=self.limits)
        except Exception as e:  # noqa: BLE001 -- any load failure leaves the served versions as they are
            logger.warning(
                "Loading version %d of %s failed; keeping the served versions: %s", version, self.model_name, e
            )
            self._failed_fingerprints[version] = fingerprint
            code = GRPC_CODES.get(e.error_code) if isinstance(e, tf.errors.OpError) else None
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
