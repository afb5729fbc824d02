"""TF Serving's REST API (serving.rest) over real HTTP on loopback, against the gRPC answers."""

import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from serving_testing import (
    HANG_GUARD,
    MODEL,
    b64,
    encode,
    export_small_sharpmask,
    http,
    predict_request,
    save_stats_versions,
    solid,
)
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.client import ServingClient
from serving.rest import HTTP_STATUS
from serving.server import start_server


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return save_stats_versions(tmp_path_factory.mktemp("models") / MODEL, {1: 0.0, 2: 10.0})


@pytest.fixture(scope="module")
def server(base_path):
    server, _ = start_server(
        str(base_path), MODEL, version_labels={"stable": 1}, num_versions=2, rest_api_port=0, max_message_bytes=100_000
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [encode(solid((200, 40, 10)), "PNG"), encode(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), "JPEG")]


def grpc_outputs(server, inputs, **kwargs) -> dict:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict_request(inputs, **kwargs), timeout=HANG_GUARD
        )
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def test_row_format_with_b64_equals_grpc_row_by_row(server, images):
    status, body = http(server, "POST", f"/v1/models/{MODEL}:predict", {"instances": [b64(i) for i in images]})

    assert status == 200
    want = grpc_outputs(server, {"images": images})
    assert [set(row) for row in body["predictions"]] == [set(want)] * len(images)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray([row[key] for row in body["predictions"]], value.dtype), value)


def test_columnar_format_versions_labels_and_named_instances(server, images):
    pixels = np.stack([solid((1, 2, 3), 4, 5), solid((7, 8, 9), 4, 5)])
    status, body = http(
        server,
        "POST",
        f"/v1/models/{MODEL}/labels/stable:predict",
        {"signature_name": "serving_images", "inputs": {"images": pixels.tolist()}},
    )
    assert status == 200
    want = grpc_outputs(server, {"images": pixels}, signature="serving_images", label="stable")
    assert set(body["outputs"]) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(body["outputs"][key], value.dtype), value)

    status, body = http(
        server, "POST", f"/v1/models/{MODEL}/versions/2:predict", {"instances": [{"images": b64(images[0])}]}
    )
    assert status == 200
    np.testing.assert_allclose(body["predictions"][0]["mean_colour"], [210, 50, 20])


def test_status_and_metadata_are_the_grpc_answers_as_json(server):
    status, body = http(server, "GET", f"/v1/models/{MODEL}")
    assert status == 200
    assert body == {
        "model_version_status": [
            {"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            for v in (1, 2)
        ]
    }
    assert http(server, "GET", f"/v1/models/{MODEL}/versions/1")[1]["model_version_status"][0]["version"] == "1"
    assert [
        s["version"] for s in http(server, "GET", f"/v1/models/{MODEL}/labels/stable")[1]["model_version_status"]
    ] == ["1"]
    assert http(server, "GET", f"/v1/models/{MODEL}/labels/nope")[0] == 400

    status, body = http(server, "GET", f"/v1/models/{MODEL}/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": MODEL, "version": "1", "signature_name": ""}
    with ServingClient(f"127.0.0.1:{server.port}", MODEL, version=1) as client:
        signature_defs = client.get_model_metadata().signature_defs
    assert set(body["metadata"]["signature_def"]["signature_def"]) == set(signature_defs)
    inputs = body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert inputs["images"]["dtype"] == "DT_STRING"


@pytest.mark.parametrize(
    "path, body, code, detail",
    [
        (f"/v1/models/{MODEL}:predict", b'{"instances": [', grpc.StatusCode.INVALID_ARGUMENT, "JSON Parse error"),
        (f"/v1/models/{MODEL}:predict", {"instance": []}, grpc.StatusCode.INVALID_ARGUMENT, "Missing 'inputs' or 'instances'"),
        (f"/v1/models/{MODEL}:predict", {"instances": [], "inputs": []}, grpc.StatusCode.INVALID_ARGUMENT, "only one of"),
        (f"/v1/models/{MODEL}:predict", {"instances": [{"b64": "%%%"}]}, grpc.StatusCode.INVALID_ARGUMENT, "base64"),
        (f"/v1/models/{MODEL}:predict", {"instances": [{"pixels": "x"}]}, grpc.StatusCode.INVALID_ARGUMENT, "alias not found"),
        (f"/v1/models/{MODEL}:predict", {"inputs": {"images": [[1, 2], [3]]}}, grpc.StatusCode.INVALID_ARGUMENT, "images"),
        (f"/v1/models/{MODEL}:predict", {"signature_name": "nope", "instances": ["x"]}, grpc.StatusCode.FAILED_PRECONDITION, "nope"),
        (f"/v1/models/{MODEL}:predict", {"instances": ["not an image"]}, grpc.StatusCode.INVALID_ARGUMENT, ""),
        (f"/v1/models/{MODEL}/versions/9:predict", {"instances": ["x"]}, grpc.StatusCode.NOT_FOUND, "Servable not found"),
        ("/v1/models/other:predict", {"instances": ["x"]}, grpc.StatusCode.NOT_FOUND, "other"),
        (f"/v1/models/{MODEL}:classify", {"examples": []}, grpc.StatusCode.UNIMPLEMENTED, "classify"),
        (f"/v1/models/{MODEL}:predict", b"x" * 200_000, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than the limit"),
        (f"/v2/models/{MODEL}:predict", {"instances": []}, grpc.StatusCode.NOT_FOUND, "Malformed request"),
    ],
)  # fmt: skip
def test_bad_requests_get_tf_serving_http_status_and_the_server_keeps_serving(server, images, path, body, code, detail):
    status, answer = http(server, "POST", path, body)

    assert status == HTTP_STATUS[code]
    assert set(answer) == {"error"} and detail in answer["error"]
    assert http(server, "POST", f"/v1/models/{MODEL}:predict", {"instances": [b64(images[0])]})[0] == 200


def test_http_status_follows_tf_serving_for_every_grpc_code():
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert HTTP_STATUS[grpc.StatusCode.UNIMPLEMENTED] == 501


@pytest.mark.slow
def test_a_jpeg_as_b64_gives_the_sharpmask_export_the_same_proposals_as_grpc(tmp_path):
    version_dir = export_small_sharpmask(tmp_path)
    rng = np.random.default_rng(1)
    jpeg = encode(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "JPEG")
    server, _ = start_server(str(version_dir.parent), "sharpmask", rest_api_port=0)
    try:
        status, body = http(server, "POST", "/v1/models/sharpmask:predict", {"instances": [b64(jpeg)]})
        with ServingClient(f"127.0.0.1:{server.port}", "sharpmask", timeout=HANG_GUARD) as client:
            want = client.predict_images([jpeg])
    finally:
        server.stop()
    assert status == 200
    (row,) = body["predictions"]
    assert set(row) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(row[key], value.dtype), value[0], err_msg=key)


def test_a_burst_of_concurrent_clients_each_gets_its_own_answer(server):
    images = [encode(solid((i, 2 * i, 3 * i)), "PNG") for i in range(32)]
    results = [None] * len(images)

    def call(i):
        results[i] = http(server, "POST", f"/v1/models/{MODEL}/versions/1:predict", {"instances": [b64(images[i])]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_GUARD)
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"][0]["mean_colour"], [i, 2 * i, 3 * i], err_msg=f"client {i}")
