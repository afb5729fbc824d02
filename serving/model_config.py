"""Several models from a `--model_config_file`, as tensorflow_model_server serves them.

The file is TF Serving's ModelServerConfig text proto (tensorflow-serving-api's own message),
with a `model_config_list`: each model's name, base path, `model_version_policy` (`latest {
num_versions: N }`, `all {}`, `specific { versions: ... }`) and `version_labels`. See
`serving/models.config`. ModelService's HandleReloadConfigRequest hands a new list to
`ModelRegistry.reload`, which loads the models it adds before swapping the list, so requests keep
being answered throughout.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping

import grpc
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.predict import RequestError, RequestLimits
from serving.versions import LoadedVersion, VersionManager

logger = logging.getLogger(__name__)

ModelServerConfig = model_server_config_pb2.ModelServerConfig
# `all {}`: keep every version, i.e. the newest sys.maxsize of them.
ALL_VERSIONS = sys.maxsize


def parse_model_config(path: str | os.PathLike) -> ModelServerConfig:
    """Reads a ModelServerConfig text proto and checks it (`check_model_config`).

    Raises:
        google.protobuf.text_format.ParseError: for a file that is not a ModelServerConfig.
        RequestError: INVALID_ARGUMENT for a config this server cannot serve.
    """
    with open(path) as f:
        config = text_format.Parse(f.read(), ModelServerConfig())
    check_model_config(config)
    return config


def single_model_config(
    base_path: str, model_name: str, num_versions: int = 1, version_labels: Mapping[str, int] | None = None
) -> ModelServerConfig:
    """The ModelServerConfig of `--model_base_path` and `--model_name`: one model, latest N."""
    config = ModelServerConfig()
    model = config.model_config_list.config.add(name=model_name, base_path=base_path, model_platform="tensorflow")
    model.model_version_policy.latest.num_versions = num_versions
    for label, version in (version_labels or {}).items():
        model.version_labels[label] = version
    return config


def check_model_config(config: ModelServerConfig) -> None:
    """Checks a ModelServerConfig as TF Serving does before serving it.

    Raises:
        RequestError: INVALID_ARGUMENT for a `custom_model_config`, a model listed twice, a
            model without a name or base path, a platform other than tensorflow, or an empty
            `specific` policy.
    """
    if config.WhichOneof("config") != "model_config_list":
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Only a model_config_list is served. Received: {config.WhichOneof('config') or 'no config'}",
        )
    seen = set()
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Every model needs a name and a base_path. Received: name={model.name!r}, "
                f"base_path={model.base_path!r}",
            )
        if model.name in seen:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Illegal to list model {model.name} multiple times in config list"
            )
        seen.add(model.name)
        if model.model_platform not in ("", "tensorflow"):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Model {model.name}: only model_platform 'tensorflow' is served. Received: {model.model_platform!r}",
            )
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Model {model.name}: a specific version policy lists no versions"
            )


def _policy(model: model_server_config_pb2.ModelConfig) -> tuple[int, frozenset[int] | None]:
    """(num_versions, specific_versions) of a model's version policy for its VersionManager."""
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return ALL_VERSIONS, None
    if choice == "specific":
        return 1, frozenset(policy.specific.versions)
    return (policy.latest.num_versions if choice == "latest" else 0) or 1, None


class ModelRegistry:
    """The served models by name, each a VersionManager following its base path.

    Args:
        config: the ModelServerConfig to serve (checked with `check_model_config`).
        enable_model_warmup: replay each version's warm-up requests before serving it.
        limits: the request limits warm-up requests are held to, as clients' are.
    """

    def __init__(
        self, config: ModelServerConfig, enable_model_warmup: bool = True, limits: RequestLimits | None = None
    ):
        check_model_config(config)
        self.enable_model_warmup = enable_model_warmup
        self.limits = limits
        self._lock = threading.Lock()
        # Serialises reloads against each other and against the poll thread's refreshes.
        self._refresh_lock = threading.Lock()
        self._managers = {model.name: self._manager(model) for model in config.model_config_list.config}
        # Answers for a model that is not served: its resolve raises TF Serving's NOT_FOUND.
        self._unknown = VersionManager("", "")

    def _manager(self, model: model_server_config_pb2.ModelConfig) -> VersionManager:
        num_versions, specific = _policy(model)
        return VersionManager(
            model.base_path,
            model.name,
            num_versions,
            dict(model.version_labels),
            self.enable_model_warmup,
            limits=self.limits,
            specific_versions=specific,
        )

    @property
    def managers(self) -> dict[str, VersionManager]:
        """A snapshot of the served models: name -> VersionManager."""
        with self._lock:
            return dict(self._managers)

    def refresh(self) -> None:
        """Scans every model's base path once (see `VersionManager.refresh`)."""
        with self._refresh_lock:
            for name, manager in self.managers.items():
                try:
                    manager.refresh()
                except Exception:
                    logger.exception("Scanning %s of model %s failed", manager.base_path, name)

    def reload(self, config: ModelServerConfig) -> None:
        """Serves `config` instead of the current list, without a restart.

        A model whose base path is unchanged keeps its manager and its loaded versions, taking
        the new policy and labels; a new model (or a new base path) is loaded before the list is
        swapped; a model left out stops being served.

        Raises:
            RequestError: INVALID_ARGUMENT for a config `check_model_config` refuses; the current
                list is then served unchanged.
        """
        check_model_config(config)
        with self._refresh_lock:
            current = self.managers
            managers = {}
            for model in config.model_config_list.config:
                manager = current.get(model.name)
                if manager is None or manager.base_path != model.base_path:
                    manager = self._manager(model)
                else:
                    manager.num_versions, manager.specific_versions = _policy(model)
                    manager.version_labels = dict(model.version_labels)
                manager.refresh()
                managers[model.name] = manager
            with self._lock:
                self._managers = managers
        logger.info("Reloaded the model config: serving %s", sorted(managers))

    def resolve(self, model_spec) -> LoadedVersion:
        """The version a request's ModelSpec names (see `VersionManager.resolve`)."""
        with self._lock:
            manager = self._managers.get(model_spec.name, self._unknown)
        return manager.resolve(model_spec)

    def version_states(self, name: str) -> dict:
        """The version states of one model (see `VersionManager.version_states`); {} if unknown."""
        with self._lock:
            manager = self._managers.get(name)
        return manager.version_states() if manager is not None else {}

    def all_states(self) -> dict[str, dict]:
        """Every served model's version states, by name."""
        return {name: manager.version_states() for name, manager in self.managers.items()}
