"""The local PredictionService/ModelService server, over real gRPC on loopback.

The fixture SavedModels decode real PNG/JPEG bytes with tf.io.decode_image and return each image's
mean colour (plus a per-version offset, so versions are told apart) and size, so every answer can
be checked.
"""

import io
import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from serving.server import WARMUP_FILE, ModelServer, parse_version_labels, start_server
from sharpmask_tf.config import ExportConfig

MODEL = "stats"
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


class ImageStats(tf.Module):
    """Per-image mean RGB colour (+ offset) and (height, width), from encoded bytes or pixels."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = tf.Variable(offset, dtype=tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def from_bytes(self, images):
        tf.debugging.assert_positive(tf.size(images), message="images must hold at least one encoded image")

        def stats(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return tf.reduce_mean(tf.cast(image, tf.float32), axis=[0, 1]), tf.shape(image)[:2]

        mean, size = tf.map_fn(
            stats, images, fn_output_signature=(tf.TensorSpec([3], tf.float32), tf.TensorSpec([2], tf.int32))
        )
        return {"mean_colour": mean + self.offset, "image_size": size}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def from_pixels(self, images):
        mean = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2]) + self.offset
        size = tf.tile(tf.shape(images)[None, 1:3], [tf.shape(images)[0], 1])
        return {"mean_colour": mean, "image_size": size}


def save_stats_model(path, offset: float = 0.0) -> str:
    """Writes an ImageStats SavedModel with `serving_default` (bytes) and `serving_images` (uint8)."""
    module = ImageStats(offset)
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": module.from_bytes, "serving_images": module.from_pixels}
    )
    return str(path)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def solid(colour, height=12, width=20) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3)).copy()


def predict_request(inputs, signature="", version=None, label=None, name=MODEL, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def eventually(condition, timeout=20.0):
    """Waits for `condition()` to hold; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / MODEL
    save_stats_model(base / "1", offset=0.0)
    save_stats_model(base / "2", offset=10.0)
    return base


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
    response = predict(predict_request({"images": images}), timeout=30)

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
        predict(predict_request(**kwargs), timeout=30)

    assert error.value.code() == code
    assert detail in error.value.details()
    response = predict(predict_request({"images": images[:1]}), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["mean_colour"]), [[210, 50, 20]])


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
                    response = predict(predict_request({"images": [image]}), timeout=60)
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


def test_new_versions_are_served_without_restart_and_half_written_ones_are_not(tmp_path, images):
    base = tmp_path / MODEL
    save_stats_model(base / "1", offset=0.0)
    staged = save_stats_model(tmp_path / "staging", offset=20.0)
    with (
        ModelServer(str(base), MODEL, poll_interval=0.1) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus
        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = MODEL

        def served():
            response = predict(predict_request({"images": images[:1]}))
            return response.model_spec.version.value, float(tf.make_ndarray(response.outputs["mean_colour"])[0, 0])

        def states():
            return {s.version: s.state for s in status(status_request).model_version_status}

        # Version 3 is still being written: variables but no saved_model.pb.
        shutil.copytree(os.path.join(staged, "variables"), base / "3" / "variables")
        # Version 2 has a saved_model.pb that does not parse.
        (base / "2").mkdir()
        (base / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
        eventually(lambda: 2 in states())
        assert states() == {1: AVAILABLE, 2: END}
        assert served() == (1, 200.0)

        # Version 2 completed (renamed into place, as an exporter should): it is loaded and served.
        shutil.rmtree(base / "2")
        os.rename(staged, base / "2")
        eventually(lambda: served()[0] == 2)
        assert served() == (2, 220.0)
        assert states() == {1: END, 2: AVAILABLE}


class CallCounter(tf.Module):
    """Counts the requests it answers (a variable assigned in the signature), so a test sees
    whether warm-up requests ran before the first real one."""

    def __init__(self):
        super().__init__()
        self.calls = tf.Variable(0, dtype=tf.int64)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def count(self, images):
        tf.debugging.assert_positive(tf.size(images), message="images must hold at least one encoded image")
        return {"calls": self.calls.assign_add(1)[None]}


def save_counter_model(path, warmup_logs=None, warmup_bytes=None) -> str:
    """A CallCounter SavedModel whose assets.extra holds these warm-up records (or raw bytes)."""
    module = CallCounter()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.count})
    extra = path / "assets.extra"
    if warmup_logs is not None:
        extra.mkdir()
        with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
            for log in warmup_logs:
                writer.write(log if isinstance(log, bytes) else log.SerializeToString())
    if warmup_bytes is not None:
        extra.mkdir()
        (extra / WARMUP_FILE).write_bytes(warmup_bytes)
    return str(path)


def predict_log(inputs) -> prediction_log_pb2.PredictionLog:
    request = predict_request(inputs)
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


@pytest.mark.parametrize("warmup", [True, False])
def test_warmup_requests_run_before_the_first_request(tmp_path, warmup):
    base = tmp_path / MODEL
    save_counter_model(base / "1", [predict_log({"images": [b"x"]})] * 3 + [prediction_log_pb2.PredictionLog()])
    with (
        ModelServer(str(base), MODEL, enable_model_warmup=warmup) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        response = predict(predict_request({"images": [b"y"]}))
    # Three Predict records ran at load time (the empty record is skipped, as TF Serving does).
    assert tf.make_ndarray(response.outputs["calls"]).tolist() == ([4] if warmup else [1])


def test_a_version_whose_warmup_fails_is_not_served_and_says_why(tmp_path):
    base = tmp_path / MODEL
    good = predict_log({"images": [b"x"]})
    classify = prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(request=classification_pb2.ClassificationRequest())
    )
    save_counter_model(base / "1", [good])
    save_counter_model(base / "2", [good, predict_log({"pictures": [b"x"]})])  # an input it does not have
    save_counter_model(base / "3", [good, predict_log({"images": np.array([], object)})])  # fails in the run
    save_counter_model(base / "4", warmup_bytes=b"not a TFRecord file at all")
    save_counter_model(base / "5", [b"\xff\xff not a PredictionLog"])
    save_counter_model(base / "6", [classify])
    save_counter_model(base / "7", [good] * 1001)
    with (
        ModelServer(str(base), MODEL) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = MODEL
        statuses = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request)
        codes = {code.value[0]: code for code in grpc.StatusCode}
        states = {s.version: (s.state, codes[s.status.error_code]) for s in statuses.model_version_status}
        messages = {s.version: s.status.error_message for s in statuses.model_version_status}
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict_request({"images": [b"y"]})
        )
    assert states == {
        1: (AVAILABLE, grpc.StatusCode.OK),
        2: (END, grpc.StatusCode.INVALID_ARGUMENT),
        3: (END, grpc.StatusCode.INVALID_ARGUMENT),
        4: (END, grpc.StatusCode.DATA_LOSS),
        5: (END, grpc.StatusCode.INVALID_ARGUMENT),
        6: (END, grpc.StatusCode.UNIMPLEMENTED),
        7: (END, grpc.StatusCode.INVALID_ARGUMENT),
    }
    assert "pictures" in messages[2] and "at least one encoded image" in messages[3]
    assert "TFRecord" in messages[4] and "parse" in messages[5]
    assert "classify_log" in messages[6] and "exceeds the maximum (1000)" in messages[7]
    # The version that warmed up serves, its one warm-up request counted.
    assert response.model_spec.version.value == 1
    assert tf.make_ndarray(response.outputs["calls"]).tolist() == [2]


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
