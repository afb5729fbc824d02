"""Server-side batching (serving.batching): concurrent callers merged into one SavedModel call,
each getting its own rows, over gRPC and REST on loopback; the queue limit; TF Serving's file."""

import os
import signal
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from serving_testing import (
    HANG_GUARD,
    MODEL,
    REPO,
    b64,
    cli_server,
    encode,
    eventually,
    export_small_sharpmask,
    http,
    predict_request,
    save_stats_model,
    single_model_flags,
    solid,
)
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving.batching import QUEUE_FULL, Batcher, BatchingParameters, BatchOptions, parse_batching_parameters
from serving.client import ServingClient
from serving.predict import RequestError
from serving.server import start_server

# Batches run only once full: the tests know exactly which requests share one.
NEVER = 600_000_000


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("batching") / MODEL
    save_stats_model(base / "1", offset=0.5)
    return base


def batches(server) -> tuple[float, float]:
    """(merged batches run, rows in them) from the server's metrics."""
    name = ":tensorflow:serving:batching_session:processed_batch_size"
    registry = server.metrics.registry
    labels = {"model_name": MODEL}
    return registry.get_sample_value(f"{name}_count", labels) or 0, registry.get_sample_value(
        f"{name}_sum", labels
    ) or 0


def in_threads(calls) -> list:
    """Runs each call on its own thread at once; returns their results or exceptions, in order."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 -- compared by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_GUARD)
    return results


def test_sixteen_callers_over_grpc_and_rest_share_one_batch_and_each_gets_its_own_rows(base_path):
    options = BatchOptions(max_batch_size=16, batch_timeout_micros=NEVER, num_batch_threads=1)
    server, port = start_server(str(base_path), MODEL, batching=options, max_workers=16, rest_api_port=0)
    colours = [(10 * i, 255 - 10 * i, 3 * i) for i in range(16)]
    images = [encode(solid(c, 6 + i, 9), "PNG") for i, c in enumerate(colours)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict

            def grpc_call(image):
                response = predict(predict_request({"images": [image]}), timeout=HANG_GUARD)
                return {k: tf.make_ndarray(v)[0].tolist() for k, v in response.outputs.items()}

            def rest_call(image):
                status, body = http(server, "POST", f"/v1/models/{MODEL}:predict", {"instances": [b64(image)]})
                assert status == 200, body
                return body["predictions"][0]

            calls = [(lambda im=im, i=i: (grpc_call if i % 2 else rest_call)(im)) for i, im in enumerate(images)]
            results = in_threads(calls)
        assert batches(server) == (1, 16)
    finally:
        server.stop()
    for i, (result, colour) in enumerate(zip(results, colours)):
        np.testing.assert_allclose(result["mean_colour"], np.add(colour, 0.5), err_msg=f"caller {i}")
        assert result["image_size"] == [6 + i, 9]


def test_a_bad_image_in_a_merged_batch_fails_only_its_caller(base_path):
    options = BatchOptions(max_batch_size=4, batch_timeout_micros=NEVER, num_batch_threads=1)
    server, port = start_server(str(base_path), MODEL, batching=options, max_workers=4)
    images = [encode(solid((i, i, i)), "PNG") for i in (10, 20, 30)] + [b"not an image"]
    try:
        with ServingClient(f"127.0.0.1:{port}", MODEL, max_attempts=1, timeout=HANG_GUARD) as client:
            results = in_threads([lambda im=im: client.predict_images([im]) for im in images])
    finally:
        server.stop()
    for value, result in zip((10, 20, 30), results[:3]):
        np.testing.assert_allclose(result["mean_colour"], [[value + 0.5] * 3])
    assert results[3].code == grpc.StatusCode.INVALID_ARGUMENT
    assert batches(server) == (0, 0)


def test_requests_of_several_rows_are_split_back_by_their_own_sizes(base_path):
    options = BatchOptions(max_batch_size=6, batch_timeout_micros=NEVER, num_batch_threads=2)
    server, port = start_server(str(base_path), MODEL, batching=options, max_workers=4)
    groups = [[encode(solid((v, v, v)), "PNG") for v in values] for values in ([1, 2, 3], [4], [5, 6])]
    try:
        with ServingClient(f"127.0.0.1:{port}", MODEL, timeout=HANG_GUARD) as client:
            results = in_threads([lambda g=g: client.predict_images(g) for g in groups])
            with pytest.raises(Exception, match="Task size 7 is larger than maximum input batch size 6"):
                client.predict_images(groups[0] * 2 + groups[1])
        assert batches(server) == (1, 6)
    finally:
        server.stop()
    for group, result in zip(([1, 2, 3], [4], [5, 6]), results):
        np.testing.assert_allclose(result["mean_colour"][:, 0], np.add(group, 0.5))


def test_a_full_queue_answers_unavailable():
    release, entered = threading.Event(), threading.Event()

    def run(loaded, request):
        entered.set()
        release.wait(timeout=HANG_GUARD)
        response = predict_pb2.PredictResponse()
        response.outputs["echo"].CopyFrom(request.inputs["x"])
        return response

    batcher = Batcher(BatchOptions(max_batch_size=1, num_batch_threads=1, max_enqueued_batches=1), run=run)
    request = [predict_pb2.PredictRequest() for _ in range(3)]
    for i, r in enumerate(request):
        r.inputs["x"].CopyFrom(tf.make_tensor_proto([i]))
    try:
        first = threading.Thread(target=lambda: batcher.predict("version", request[0]))
        first.start()
        assert entered.wait(timeout=HANG_GUARD)
        # The worker is busy: one of the next two is queued, the other finds the queue full.
        results = []
        threads = [
            threading.Thread(target=lambda r=r: results.append(_outcome(batcher, r))) for r in request[1:]
        ]  # fmt: skip
        for t in threads:
            t.start()
        eventually(lambda: any(isinstance(r, RequestError) for r in results))
        release.set()
        for t in threads + [first]:
            t.join(timeout=HANG_GUARD)
    finally:
        release.set()
        batcher.stop()
    (error,) = [r for r in results if isinstance(r, RequestError)]
    (answer,) = [r for r in results if not isinstance(r, RequestError)]
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.message == QUEUE_FULL
    assert tf.make_ndarray(answer.outputs["echo"]).tolist() in ([1], [2])
    with pytest.raises(RequestError, match="stopping"):
        batcher.predict("version", request[0])


def _outcome(batcher, request):
    try:
        return batcher.predict("version", request)
    except RequestError as e:
        return e


def test_the_shipped_batching_parameters_parse_as_tf_servings_message():
    options = parse_batching_parameters(os.path.join(REPO, "serving", "batching_parameters.txt"))
    assert options == BatchOptions(
        max_batch_size=8, batch_timeout_micros=5000, num_batch_threads=4, max_enqueued_batches=100
    )
    assert BatchOptions.from_proto(BatchingParameters()) == BatchOptions()
    with pytest.raises(ValueError, match="allowed_batch_sizes"):
        BatchOptions.from_proto(text_format.Parse("allowed_batch_sizes: 4", BatchingParameters()))
    with pytest.raises(ValueError, match="max_batch_size=0"):
        BatchOptions.from_proto(text_format.Parse("max_batch_size { value: 0 }", BatchingParameters()))
    with pytest.raises(text_format.ParseError, match="batch_size"):
        text_format.Parse("batch_size { value: 4 }", BatchingParameters())


@pytest.mark.slow
def test_sixteen_different_images_get_their_own_sharpmask_proposals(tmp_path):
    version_dir = export_small_sharpmask(tmp_path)
    rng = np.random.default_rng(2)
    images = [encode(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "JPEG") for _ in range(16)]
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    want = [{k: v.numpy()[0] for k, v in signature(images=tf.constant([image])).items()} for image in images]
    options = BatchOptions(max_batch_size=16, batch_timeout_micros=NEVER, num_batch_threads=1)
    server, port = start_server(str(version_dir.parent), "sharpmask", batching=options, max_workers=16)
    try:
        with ServingClient(f"127.0.0.1:{port}", "sharpmask", timeout=HANG_GUARD) as client:
            results = in_threads([lambda im=im: client.predict_images([im]) for im in images])
        registry = server.metrics.registry
        name = ":tensorflow:serving:batching_session:processed_batch_size_sum"
        assert registry.get_sample_value(name, {"model_name": "sharpmask"}) == 16
    finally:
        server.stop()
    for i, (got, expected) in enumerate(zip(results, want)):
        assert set(got) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(got[key][0], value, rtol=1e-5, atol=1e-5, err_msg=f"caller {i} {key}")


@pytest.mark.slow
def test_the_cli_batches_with_the_shipped_parameters_file(base_path, tmp_path):
    parameters = os.path.join(REPO, "serving", "batching_parameters.txt")
    flags = single_model_flags(base_path)
    flags += ["--enable-batching", "--batching-parameters-file", parameters]
    with cli_server(flags, tmp_path) as server:
        images = [encode(solid((v, v, v)), "PNG") for v in (40, 80, 120, 160)]
        with ServingClient(f"127.0.0.1:{server.port}", MODEL, timeout=HANG_GUARD) as client:
            results = in_threads([lambda im=im: client.predict_images([im]) for im in images])
        for v, result in zip((40, 80, 120, 160), results):
            np.testing.assert_allclose(result["mean_colour"], [[v + 0.5] * 3])
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=HANG_GUARD) == 0
