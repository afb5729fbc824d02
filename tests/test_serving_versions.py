"""Version directories under a base path: new versions picked up without a restart, half-written
and broken ones skipped, the newest and the labelled versions kept loaded, warm-up replayed before
serving. Through the real gRPC server where the behaviour is what a client sees."""

import os
import shutil

import grpc
import numpy as np
import pytest
import tensorflow as tf
from serving_testing import (
    AVAILABLE,
    END,
    HANG_GUARD,
    MODEL,
    encode,
    eventually,
    predict_request,
    save_stats_model,
    solid,
    version_states,
)
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from serving.predict import RequestError, RequestLimits
from serving.protocol import WARMUP_FILE
from serving.server import ModelServer
from serving.versions import VersionManager


@pytest.fixture(scope="module")
def images():
    return [encode(solid((200, 40, 10)), "PNG")]


def test_new_versions_are_served_without_restart_and_half_written_ones_are_not(tmp_path, images):
    base = tmp_path / MODEL
    save_stats_model(base / "1", offset=0.0)
    staged = save_stats_model(tmp_path / "staging", offset=20.0)
    with (
        ModelServer(str(base), MODEL, poll_interval=0.1) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict

        def served():
            response = predict(predict_request({"images": images[:1]}), timeout=HANG_GUARD)
            return response.model_spec.version.value, float(tf.make_ndarray(response.outputs["mean_colour"])[0, 0])

        def states():
            return version_states(channel)

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


def test_the_newest_and_the_labelled_versions_stay_loaded_and_replaced_ones_end(tmp_path):
    base = tmp_path / MODEL
    for version in (1, 2, 3):
        save_stats_model(base / str(version), offset=float(version))
    manager = VersionManager(str(base), MODEL, num_versions=1, version_labels={"old": 1}, enable_model_warmup=False)
    manager.refresh()

    assert {v: state for v, (state, _, _) in manager.version_states().items()} == {1: AVAILABLE, 3: AVAILABLE}
    assert manager.resolve(predict_request({}).model_spec).version == 3
    assert manager.resolve(predict_request({}, label="old").model_spec).version == 1
    with pytest.raises(RequestError) as error:
        manager.resolve(predict_request({}, version=2).model_spec)
    assert error.value.code == grpc.StatusCode.NOT_FOUND and f"Specific({MODEL}, 2)" in error.value.message

    # A newer version takes the newest's place; the labelled one stays, the replaced one ends.
    save_stats_model(base / "4", offset=4.0)
    manager.refresh()
    assert {v: state for v, (state, _, _) in manager.version_states().items()} == {1: AVAILABLE, 3: END, 4: AVAILABLE}
    assert manager.resolve(predict_request({}).model_spec).version == 4


def test_version_manager_rejects_keeping_no_versions(tmp_path):
    with pytest.raises(ValueError, match="Received: num_versions=0"):
        VersionManager(str(tmp_path), MODEL, num_versions=0)


def test_names_that_are_not_versions_are_ignored_with_a_warning_and_the_server_keeps_loading(tmp_path, images, caplog):
    base = tmp_path / MODEL
    save_stats_model(base / "1", offset=0.0)
    # Names str.isdigit() accepts that int() refuses, or that overflow TF Serving's int64 versions,
    # plus a plain file and names that are not numbers at all.
    for name in ("²", "٣", "99999999999999999999", "9223372036854775808", "-4", "1e3", " 5"):
        save_stats_model(base / name, offset=50.0)
    (base / "6").write_bytes(b"a file, not a version directory")
    caplog.set_level("WARNING", logger="serving.versions")
    with (
        ModelServer(str(base), MODEL, poll_interval=0.1, enable_model_warmup=False) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict

        def states():
            return version_states(channel)

        assert states() == {1: AVAILABLE}
        # A new version still loads while the bad names are there; the largest int64 is a version.
        save_stats_model(base / "9223372036854775807", offset=20.0)
        eventually(lambda: states() == {1: END, 2**63 - 1: AVAILABLE})
        response = predict(predict_request({"images": images[:1]}), timeout=HANG_GUARD)
        assert response.model_spec.version.value == 2**63 - 1
        assert float(tf.make_ndarray(response.outputs["mean_colour"])[0, 0]) == 220.0

    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ignoring")]
    # Each name once, however many scans saw it.
    assert sorted(ignored) == sorted(
        [f"Ignoring {name!r} under the base path of {MODEL}: not a version number (ASCII digits, at most 2**63 - 1)"
         for name in ("²", "٣", "99999999999999999999", "9223372036854775808", "-4", "1e3", " 5")]
        + [f"Ignoring '6' under the base path of {MODEL}: not a directory"]
    )  # fmt: skip


def test_a_symlinked_version_leading_out_of_the_base_path_is_ignored(tmp_path, caplog):
    base = tmp_path / MODEL
    save_stats_model(base / "1", offset=0.0)
    outside = save_stats_model(tmp_path / "elsewhere" / "2", offset=10.0)
    os.symlink(outside, base / "2")
    # A link to another version inside the base path stays a version, as TF Serving follows it.
    os.symlink(base / "1", base / "3")
    caplog.set_level("WARNING", logger="serving.versions")
    manager = VersionManager(str(base), MODEL, num_versions=3, enable_model_warmup=False)
    manager.refresh()

    assert {v: state for v, (state, _, _) in manager.version_states().items()} == {1: AVAILABLE, 3: AVAILABLE}
    assert [r.getMessage() for r in caplog.records] == [
        f"Ignoring '2' under the base path of {MODEL}: a symbolic link out of the base path, to {outside}"
    ]


def test_two_names_of_one_version_keep_the_first_and_warn(tmp_path, caplog):
    base = tmp_path / MODEL
    save_stats_model(base / "007", offset=7.0)
    save_stats_model(base / "7", offset=70.0)
    caplog.set_level("WARNING", logger="serving.versions")
    manager = VersionManager(str(base), MODEL, enable_model_warmup=False)
    manager.refresh()

    assert manager.resolve(predict_request({}).model_spec).path == str(base / "007")
    assert [r.getMessage() for r in caplog.records] == [
        f"Ignoring '7' under the base path of {MODEL}: names version 7 as '007' does"
    ]


def test_warmup_requests_are_held_to_the_servers_limits(tmp_path):
    base = tmp_path / MODEL
    save_counter_model(base / "1", [predict_log({"images": [b"x"] * 3})])
    manager = VersionManager(str(base), MODEL, limits=RequestLimits(max_batch_size=2))
    manager.refresh()

    ((state, code, message),) = manager.version_states().values()
    assert (state, code) == (END, grpc.StatusCode.INVALID_ARGUMENT)
    assert "batch of 3, over this server's maximum of 2" in message
