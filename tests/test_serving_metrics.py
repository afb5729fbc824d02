"""Prometheus metrics (serving.metrics) scraped over HTTP and read with prometheus_client's parser."""

import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import text_format
from prometheus_client.parser import text_string_to_metric_families
from serving_testing import HANG_GUARD, MODEL, b64, encode, http, predict_request, save_stats_model, solid
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.metrics import DEFAULT_METRICS_PATH, parse_monitoring_config
from serving.server import start_server

PATH = "/monitoring/prometheus/metrics"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    save_stats_model(root / MODEL / "1")
    (root / "monitoring.config").write_text(f'prometheus_config {{\n  enable: true\n  path: "{PATH}"\n}}\n')
    monitoring = parse_monitoring_config(root / "monitoring.config")
    server, _ = start_server(str(root / MODEL), MODEL, rest_api_port=0, monitoring_config=monitoring)
    yield server
    server.stop()


def scrape(server) -> dict:
    """{(sample name, frozen labels): value} of the whole page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_api_port}{PATH}", timeout=HANG_GUARD) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(api, entrypoint, status, version=""):
    return frozenset(
        {"model_name": MODEL, "model_version": version, "API": api, "entrypoint": entrypoint, "status": status}.items()
    )


def test_requests_are_counted_by_model_version_api_entrypoint_and_status(server):
    image = encode(solid((9, 9, 9)), "PNG")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        for _ in range(3):
            predict(predict_request({"images": [image]}), timeout=HANG_GUARD)
        with pytest.raises(grpc.RpcError):
            predict(predict_request({"images": [image]}, version=7), timeout=HANG_GUARD)
    assert http(server, "POST", f"/v1/models/{MODEL}:predict", {"instances": [b64(image)]})[0] == 200
    assert http(server, "POST", f"/v1/models/{MODEL}:predict", b"{")[0] == 400
    assert http(server, "GET", f"/v1/models/{MODEL}/versions/1")[0] == 200

    samples = scrape(server)

    count = ":tensorflow:serving:request_count_total"
    assert samples[(count, labels("Predict", "GRPC", "OK"))] == 3
    assert samples[(count, labels("Predict", "GRPC", "NOT_FOUND", version="7"))] == 1
    assert samples[(count, labels("predict", "REST", "OK"))] == 1
    assert samples[(count, labels("predict", "REST", "INVALID_ARGUMENT"))] == 1
    assert samples[(count, labels("GetModelStatus", "REST", "OK", version="1"))] == 1
    latency = ":tensorflow:serving:request_latency"
    assert samples[(f"{latency}_count", labels("Predict", "GRPC", "OK"))] == 3
    assert samples[(f"{latency}_bucket", labels("Predict", "GRPC", "OK") | {("le", "+Inf")})] == 3
    assert samples[(f"{latency}_sum", labels("Predict", "GRPC", "OK"))] > 0


def test_model_load_state_is_reported_per_version(server):
    samples = scrape(server)

    states = {
        dict(k)["model_version"]: dict(k) for name, k in samples if name == ":tensorflow:serving:model_version_state"
    }
    assert states == {"1": {"model_name": MODEL, "model_version": "1", "state": "AVAILABLE", "status": "OK"}}


def test_the_monitoring_config_is_tf_servings_text_proto(tmp_path):
    path = tmp_path / "monitoring.config"
    path.write_text("prometheus_config { enable: true }\n")
    assert parse_monitoring_config(path).prometheus_config.path == DEFAULT_METRICS_PATH
    path.write_text("prometheus_config { enable: true path: 'metrics' }\n")
    with pytest.raises(ValueError, match="Received: path='metrics'"):
        parse_monitoring_config(path)
    path.write_text("prometheus { enable: true }\n")
    with pytest.raises(text_format.ParseError, match="prometheus"):
        parse_monitoring_config(path)


def test_metrics_need_the_rest_port_and_are_not_served_unless_enabled(tmp_path):
    save_stats_model(tmp_path / MODEL / "1")
    path = tmp_path / "monitoring.config"
    path.write_text("prometheus_config { enable: true }\n")
    with pytest.raises(ValueError, match="rest_api_port"):
        start_server(str(tmp_path / MODEL), MODEL, monitoring_config=parse_monitoring_config(path))
    server, _ = start_server(str(tmp_path / MODEL), MODEL, rest_api_port=0)
    try:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{server.rest_api_port}{DEFAULT_METRICS_PATH}", timeout=HANG_GUARD)
        assert error.value.code == 404
    finally:
        server.stop()
