"""Prometheus metrics as tensorflow_model_server exposes them with `--monitoring_config_file`.

    prometheus_config {
      enable: true
      path: "/monitoring/prometheus/metrics"
    }

The page is served on the REST API's port. It counts requests by model, requested version, API,
entry point (GRPC or REST) and status; histograms request latencies (microseconds, as TF Serving
does) and the sizes of merged batches; and shows every model version's load state at scrape time.
Metric names follow TF Serving's (`:tensorflow:serving:request_count`, ...); the registry and
the text exposition are prometheus_client's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

import grpc
from google.protobuf import text_format
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from tensorflow_serving.apis import get_model_status_pb2

from serving.protocol import define_messages

# TF Serving's tensorflow_serving/config/monitoring_config.proto, which tensorflow-serving-api
# does not ship.
_MESSAGES = define_messages(
    """
    name: "tensorflow_serving/config/monitoring_config.proto"
    package: "tensorflow.serving"
    syntax: "proto3"
    message_type {
      name: "PrometheusConfig"
      field { name: "enable" number: 1 label: LABEL_OPTIONAL type: TYPE_BOOL }
      field { name: "path" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
    }
    message_type {
      name: "MonitoringConfig"
      field {
        name: "prometheus_config" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
        type_name: ".tensorflow.serving.PrometheusConfig"
      }
    }
    """
)
MonitoringConfig = _MESSAGES["tensorflow.serving.MonitoringConfig"]
# TF Serving's page when prometheus_config names no path.
DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"

# TF Serving's latency buckets: 10 us growing by 1.8x, 33 of them (up to about 2.5 hours).
LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(33))
BATCH_SIZE_BUCKETS = tuple(2**i for i in range(11))

# model name -> version -> (ModelVersionStatus.State, status code, error message)
StatesFn = Callable[[], Mapping[str, Mapping[int, tuple[int, grpc.StatusCode, str]]]]


# Called once per answered request: (model name, requested version, API, gRPC code, seconds).
RequestObserver = Callable[[str, str, str, grpc.StatusCode, float], None]


def requested_version(model_spec) -> str:
    """The `model_version` label of a request: the version or label its ModelSpec names, or ""
    for the newest."""
    if model_spec.HasField("version"):
        return str(model_spec.version.value)
    return model_spec.version_label


def parse_monitoring_config(path: str | os.PathLike) -> MonitoringConfig:
    """Reads a MonitoringConfig text proto, with TF Serving's default path filled in.

    Raises:
        google.protobuf.text_format.ParseError: for a file that is not a MonitoringConfig.
        ValueError: for a metrics path that does not start with "/".
    """
    with open(path) as f:
        config = text_format.Parse(f.read(), MonitoringConfig())
    prometheus = config.prometheus_config
    if not prometheus.path:
        prometheus.path = DEFAULT_METRICS_PATH
    if not prometheus.path.startswith("/"):
        raise ValueError(f"prometheus_config.path must start with '/'. Received: path={prometheus.path!r} in {path}")
    return config


class _ModelStates:
    """A collector reading every version's state when scraped, so the page is never stale."""

    def __init__(self, states: StatesFn):
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            ":tensorflow:serving:model_version_state",
            "1 for each model version's current ModelVersionStatus state (AVAILABLE, END, ...)",
            labels=["model_name", "model_version", "state", "status"],
        )
        for name, versions in sorted(self._states().items()):
            for version, (state, code, _) in sorted(versions.items()):
                state_name = get_model_status_pb2.ModelVersionStatus.State.Name(state)
                family.add_metric([name, str(version), state_name, code.name], 1.0)
        yield family


class ServingMetrics:
    """The server's Prometheus registry.

    Args:
        states: returns every model's version states, read at each scrape.
    """

    def __init__(self, states: StatesFn):
        self.registry = CollectorRegistry()
        labels = ["model_name", "model_version", "API", "entrypoint", "status"]
        self.request_count = Counter(
            ":tensorflow:serving:request_count", "Requests answered, by status", labels, registry=self.registry
        )
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Request latency in microseconds",
            labels,
            buckets=LATENCY_BUCKETS_US,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            ":tensorflow:serving:batching_session:processed_batch_size",
            "Rows in each merged batch run by the batch scheduler",
            ["model_name"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ModelStates(states))

    def observer(self, entrypoint: str) -> RequestObserver:
        """A callback recording one request: (model, version, API, status code, seconds)."""

        def observe(model: str, version: str, api: str, code: grpc.StatusCode, seconds: float) -> None:
            labels = (model, version, api, entrypoint, code.name)
            self.request_count.labels(*labels).inc()
            self.request_latency.labels(*labels).observe(seconds * 1e6)

        return observe

    def observe_batch(self, model: str, rows: int) -> None:
        """Records one merged batch of `rows` rows run for `model`."""
        self.batch_size.labels(model).observe(rows)

    def exposition(self) -> tuple[str, bytes]:
        """(content type, Prometheus text) of the whole registry."""
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)
