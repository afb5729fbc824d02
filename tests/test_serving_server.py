"""The local PredictionService/ModelService server, over real gRPC on loopback, answering the
ImageStats fixture SavedModels (`serving_testing`)."""

import os
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from serving_testing import (
    AVAILABLE,
    HANG_GUARD,
    MODEL,
    cli_server,
    encode,
    eventually,
    predict_request,
    save_stats_model,
    save_stats_versions,
    single_model_flags,
    solid,
    version_states,
)
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2
from test_serving_predict import animation, gif_with_frame, png_bomb

from serving.protocol import DEFAULT_MAX_BATCH_SIZE
from serving.server import parse_version_labels, start_server
from sharpmask_tf.config import ExportConfig


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return save_stats_versions(tmp_path_factory.mktemp("models") / MODEL, {1: 0.0, 2: 10.0})


@pytest.fixture(scope="module")
def server(base_path):
    server, _ = start_server(str(base_path), MODEL, version_labels={"stable": 1, "canary": 2}, max_workers=8)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def predict(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    return [encode(solid((200, 40, 10)), "PNG"), encode(noise, "JPEG"), encode(noise[:20, :9], "PNG")]


def test_round_trip_matches_the_signature_called_in_process(predict, base_path, images):
    response = predict(predict_request({"images": images}), timeout=HANG_GUARD)

    local = tf.saved_model.load(str(base_path / "2")).signatures["serving_default"](images=tf.constant(images))
    assert set(response.outputs) == {"mean_colour", "image_size"}
    for key, value in local.items():
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs[key]), value.numpy())
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["image_size"]), [[12, 20], [33, 47], [20, 9]])
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["mean_colour"])[0], [210, 50, 20])
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"


def test_uint8_signature_and_output_filter(predict):
    pixels = np.stack([solid((1, 2, 3)), solid((9, 8, 7))])
    response = predict(predict_request({"images": pixels}, signature="serving_images", output_filter=["mean_colour"]))

    assert list(response.outputs) == ["mean_colour"]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["mean_colour"]), [[11, 12, 13], [19, 18, 17]])


def test_specific_versions_and_labels(predict, images):
    def version_and_red(**spec):
        response = predict(predict_request({"images": images[:1]}, **spec))
        return response.model_spec.version.value, float(tf.make_ndarray(response.outputs["mean_colour"])[0, 0])

    assert version_and_red() == (2, 210.0)
    assert version_and_red(version=1) == (1, 200.0)
    assert version_and_red(label="stable") == (1, 200.0)
    assert version_and_red(label="canary") == (2, 210.0)


@pytest.mark.parametrize(
    "kwargs, code, detail",
    [
        ({"inputs": {"images": [b"\x89PNG\r\n\x1a\n not"]}}, grpc.StatusCode.INVALID_ARGUMENT, "Invalid PNG"),
        ({"inputs": {"images": np.array([], dtype=object)}}, grpc.StatusCode.INVALID_ARGUMENT, "at least one"),
        ({"inputs": {"images": np.zeros([1], np.float32)}}, grpc.StatusCode.INVALID_ARGUMENT, "dtype=float32"),
        ({"inputs": {"images": [[b"a", b"b"]]}}, grpc.StatusCode.INVALID_ARGUMENT, "shape=(1, 2)"),
        ({"inputs": {"image": [b"x"]}}, grpc.StatusCode.INVALID_ARGUMENT, "alias not found in signature: image"),
        ({"inputs": {}}, grpc.StatusCode.INVALID_ARGUMENT, "Missing: {images}"),
        ({"inputs": {"images": [b"x"]}, "output_filter": ["boxes"]}, grpc.StatusCode.INVALID_ARGUMENT, "boxes"),
        ({"inputs": {"images": [b"x"]}, "name": "deepmask"}, grpc.StatusCode.NOT_FOUND, "Latest(deepmask)"),
        ({"inputs": {"images": [b"x"]}, "version": 7}, grpc.StatusCode.NOT_FOUND, f"Specific({MODEL}, 7)"),
        ({"inputs": {"images": [b"x"]}, "label": "beta"}, grpc.StatusCode.INVALID_ARGUMENT, "version label: beta"),
        ({"inputs": {"images": [b"x"]}, "signature": "classify"}, grpc.StatusCode.FAILED_PRECONDITION, '"classify"'),
    ],
    ids=[
        "corrupt-image",
        "empty-batch",
        "wrong-dtype",
        "wrong-shape",
        "wrong-input-key",
        "missing-input",
        "unknown-output",
        "unknown-model",
        "unknown-version",
        "unknown-label",
        "unknown-signature",
    ],
)
def test_bad_requests_get_tf_serving_status_codes_and_the_server_keeps_answering(predict, images, kwargs, code, detail):
    with pytest.raises(grpc.RpcError) as error:
        predict(predict_request(**kwargs), timeout=HANG_GUARD)

    assert error.value.code() == code
    assert detail in error.value.details()
    response = predict(predict_request({"images": images[:1]}), timeout=HANG_GUARD)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["mean_colour"]), [[210, 50, 20]])


def crafted_request(dims, dtype, signature="", **values) -> predict_pb2.PredictRequest:
    """A request whose `images` TensorProto declares `dims` and holds only `values`, as an
    attacker writes it (tf.make_tensor_proto never writes such a proto)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
    request.inputs["images"].CopyFrom(tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, **values))
    return request


def test_a_hundred_byte_request_cannot_ask_for_a_hundred_images(predict, images):
    request = crafted_request([100], types_pb2.DT_STRING, string_val=[images[0]])
    assert len(request.SerializeToString()) < 200

    with pytest.raises(grpc.RpcError) as error:
        predict(request, timeout=HANG_GUARD)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape (100,) declares 100 elements of string" in error.value.details()
    assert "Received: 1 values" in error.value.details()
    response = predict(predict_request({"images": images[:1]}), timeout=HANG_GUARD)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["mean_colour"]), [[210, 50, 20]])


@pytest.mark.parametrize(
    "values, received",
    [({"int_val": [7]}, "1 values"), ({"tensor_content": bytes(300)}, "300 bytes of tensor_content")],
    ids=["one-int-val", "short-tensor-content"],
)
def test_a_pixel_tensor_must_provide_every_pixel_it_declares(predict, images, values, received):
    request = crafted_request([1, 8000, 8000, 3], types_pb2.DT_UINT8, "serving_images", **values)
    assert len(request.SerializeToString()) < 400

    with pytest.raises(grpc.RpcError) as error:
        predict(request, timeout=HANG_GUARD)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"declares {8000 * 8000 * 3} elements of uint8" in error.value.details()
    assert f"Received: {received}" in error.value.details()
    response = predict(predict_request({"images": images[:1]}), timeout=HANG_GUARD)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["mean_colour"]), [[210, 50, 20]])


def test_a_png_bomb_is_refused_from_its_header_with_resource_exhausted(predict, images):
    bomb = png_bomb(16000)

    with pytest.raises(grpc.RpcError) as error:
        predict(predict_request({"images": [images[0], bomb]}), timeout=HANG_GUARD)

    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "images[1] is a PNG of 16000x16000 = 256000000 pixels" in error.value.details()
    assert "--max-image-pixels" in error.value.details()
    response = predict(predict_request({"images": images[:1]}), timeout=HANG_GUARD)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["mean_colour"]), [[210, 50, 20]])


def test_a_batch_over_the_default_maximum_is_refused(predict, images):
    batch = [images[0]] * (DEFAULT_MAX_BATCH_SIZE + 1)

    with pytest.raises(grpc.RpcError) as error:
        predict(predict_request({"images": batch}), timeout=HANG_GUARD)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"batch of {DEFAULT_MAX_BATCH_SIZE + 1}, over this server's maximum of {DEFAULT_MAX_BATCH_SIZE}" in (
        error.value.details()
    )
    response = predict(predict_request({"images": [images[0]] * DEFAULT_MAX_BATCH_SIZE}), timeout=HANG_GUARD)
    assert tf.make_ndarray(response.outputs["mean_colour"]).shape == (DEFAULT_MAX_BATCH_SIZE, 3)


def test_empty_batch_is_answered_by_a_signature_that_accepts_it(predict):
    response = predict(predict_request({"images": np.zeros([0, 4, 4, 3], np.uint8)}, signature="serving_images"))

    assert tf.make_ndarray(response.outputs["mean_colour"]).shape == (0, 3)
    assert tf.make_ndarray(response.outputs["image_size"]).shape == (0, 2)


def test_concurrent_clients_all_get_their_own_correct_answers(server):
    n_clients, n_requests = 8, 25
    failures, answered = [], []

    def client(i):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            for j in range(n_requests):
                colour, height, width = (i * 30, j * 10, 7), 5 + i, 5 + j
                try:
                    image = encode(solid(colour, height, width), "PNG")
                    response = predict(predict_request({"images": [image]}), timeout=HANG_GUARD)
                    mean = tf.make_ndarray(response.outputs["mean_colour"])[0]
                    size = tf.make_ndarray(response.outputs["image_size"])[0]
                    if not (np.allclose(mean, np.add(colour, 10)) and list(size) == [height, width]):
                        failures.append((i, j, mean, size))
                    answered.append((i, j))
                except grpc.RpcError as e:
                    failures.append((i, j, e.code()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert failures == []
    assert sorted(answered) == [(i, j) for i in range(n_clients) for j in range(n_requests)]


def test_metadata_is_the_saved_models_signature_def_map(channel, base_path):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    request.model_spec.version.value = 1
    response = stub.GetModelMetadata(request)

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((base_path / "1" / "saved_model.pb").read_bytes())
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    assert dict(signature_map.signature_def) == dict(saved_model.meta_graphs[0].signature_def)
    assert {"serving_default", "serving_images", "__saved_model_init_op"} == set(signature_map.signature_def)
    assert signature_map.signature_def["serving_default"].inputs["images"].dtype == tf.string.as_datatype_enum
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL, 1)

    request.ClearField("metadata_field")
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelMetadata(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_model_status_lists_loaded_versions_as_available(channel):
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    response = stub.GetModelStatus(request)

    assert [(s.version, s.state, s.status.error_code) for s in response.model_version_status] == [
        (1, AVAILABLE, 0),
        (2, AVAILABLE, 0),
    ]
    request.model_spec.version.value = 9
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelStatus(request)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    request.model_spec.name = "other"
    request.model_spec.ClearField("version")
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelStatus(request)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_parse_version_labels():
    assert parse_version_labels("stable=1, canary=2") == {"stable": 1, "canary": 2}
    assert parse_version_labels("") == {}
    with pytest.raises(ValueError, match="Received: 'stable:1'"):
        parse_version_labels("stable:1")


def test_example_model_server_config_parses_and_labels_point_at_served_versions():
    path = os.path.join(os.path.dirname(__file__), "..", "serving", "models.config")
    with open(path) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())

    (model,) = config.model_config_list.config
    assert model.name == ExportConfig().model_name
    assert os.path.basename(model.base_path) == ExportConfig().model_name
    assert set(model.version_labels.values()) <= set(model.model_version_policy.specific.versions)


@pytest.mark.slow
def test_cli_writes_the_bound_port_to_the_port_file_and_removes_it_at_shutdown(base_path, tmp_path):
    flags = single_model_flags(base_path)
    with cli_server(flags, tmp_path) as server:
        # The file is the whole port (no staging file left beside it), the one the log line shows.
        assert os.listdir(server.port_file.parent) == ["port"]
        assert f"Serving model {MODEL} from {base_path} on 127.0.0.1:{server.port}" in server.log_text()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert list(version_states(channel)) == [2]

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=HANG_GUARD) == 0
        assert not server.port_file.exists()


def _threads_taking(pid: int, signum: int) -> list[int]:
    """The ids of the process's threads other than its main one that do not block `signum`."""
    tids = []
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        lines = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
        status = dict(line.split(":\t", 1) for line in lines)
        if tid != pid and not int(status["SigBlk"], 16) >> (signum - 1) & 1:
            tids.append(tid)
    return tids


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc/<pid>/task")
def test_cli_shuts_down_when_the_kernel_hands_sigterm_to_a_thread_other_than_the_main_one(base_path, tmp_path):
    # kill(2) of a thread's id delivers the process's signal to that thread. Python's C handler
    # then only flags it for the main thread, which a wait on a lock without timeout would never see.
    flags = single_model_flags(base_path)
    with cli_server(flags, tmp_path) as server:
        others = _threads_taking(server.process.pid, signal.SIGTERM)
        assert others, "the server runs no thread that takes SIGTERM"
        os.kill(others[0], signal.SIGTERM)
        assert server.process.wait(timeout=HANG_GUARD) == 0
        assert not server.port_file.exists()
        assert "Received SIGTERM; shutting down" in server.log_text()


def test_cli_writes_every_threads_stack_to_its_log_on_sigusr1_and_keeps_serving(base_path, tmp_path):
    flags = single_model_flags(base_path)
    with cli_server(flags, tmp_path) as server:
        server.process.send_signal(signal.SIGUSR1)
        eventually(lambda: "_serve_until_signalled" in server.log_text())
        # Every thread: the main one sleeping for a signal, the poller between two scans.
        log = server.log_text()
        assert "(most recent call first)" in log and "in _poll" in log, log[-4000:]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert list(version_states(channel)) == [2]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=HANG_GUARD) == 0


@pytest.mark.slow
def test_cli_limit_flags_refuse_requests_over_them_and_the_server_keeps_answering(tmp_path):
    # Decoding with channels=0, as the export does: TensorFlow 2.21 then corrupts the heap on an
    # animated WebP, killing the server unless it is refused first.
    base_path = tmp_path / MODEL
    save_stats_model(base_path / "1", channels=0)
    flags = ["--model-base-path", str(base_path), "--model-name", MODEL, "--max-batch-size", "2"]
    flags += ["--max-image-pixels", "400"]
    small, large = solid((20, 30, 40), 20, 20), solid((20, 30, 40), 20, 21)
    refused = [
        (predict_request({"images": [encode(small, "PNG")] * 3}), grpc.StatusCode.INVALID_ARGUMENT, "batch of 3"),
        (predict_request({"images": [encode(large, "JPEG")]}), grpc.StatusCode.RESOURCE_EXHAUSTED, "JPEG of 21x20"),
        (predict_request({"images": large[None]}, "serving_images"), grpc.StatusCode.RESOURCE_EXHAUSTED, "21x20"),
        (
            predict_request({"images": [gif_with_frame((10, 10), (30, 20))]}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "GIF of 30x20",
        ),
        (
            predict_request({"images": [animation([small, solid((90, 10, 10), 20, 20)], "WEBP")]}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "animated WebP",
        ),
    ]
    with cli_server(flags, tmp_path) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            for request, code, detail in refused:
                with pytest.raises(grpc.RpcError) as error:
                    predict(request, timeout=HANG_GUARD)
                assert (error.value.code(), detail in error.value.details()) == (code, True), error.value.details()
            response = predict(predict_request({"images": [encode(small, "PNG")] * 2}), timeout=HANG_GUARD)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["mean_colour"]), [[20, 30, 40]] * 2)

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=HANG_GUARD) == 0


@pytest.mark.parametrize("flag", ["--max-batch-size", "--max-image-pixels"])
def test_cli_refuses_a_limit_that_is_not_positive(flag, capsys):
    from serving.server import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model-base-path", "unused", "--model-name", MODEL, flag, "0"])

    assert exit_.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err
