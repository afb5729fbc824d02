"""The gRPC client and both CLIs, against the local server on loopback."""

import json
import os
import shlex
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from serving_testing import (
    HANG_GUARD,
    MODEL,
    REPO,
    cli_server,
    encode,
    run_module,
    save_stats_model,
    single_model_flags,
    solid,
)

from serving.client import ServingClient, ServingError
from serving.server import start_server


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / MODEL
    save_stats_model(base / "3", offset=5.0)
    return base


@pytest.fixture(scope="module")
def server(base_path):
    server, _ = start_server(str(base_path), MODEL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images():
    noise = np.random.default_rng(1).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    return [encode(noise, "JPEG"), encode(solid((0, 100, 250), 6, 8), "PNG")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_images_matches_the_signature_called_in_process(server, base_path, images):
    with ServingClient(f"127.0.0.1:{server.port}", MODEL) as client:
        outputs = client.predict_images(images)

    local = tf.saved_model.load(str(base_path / "3")).signatures["serving_default"](images=tf.constant(images))
    assert set(outputs) == {"mean_colour", "image_size"}
    for key, value in local.items():
        np.testing.assert_array_equal(outputs[key], value.numpy())
    np.testing.assert_array_equal(outputs["image_size"][1], [6, 8])


def test_predict_with_another_signature_and_output_filter(server):
    pixels = np.stack([solid((10, 20, 30), 4, 4)])
    with ServingClient(f"127.0.0.1:{server.port}", MODEL, version=3) as client:
        outputs = client.predict({"images": pixels}, signature_name="serving_images", output_filter=["mean_colour"])

    assert list(outputs) == ["mean_colour"]
    np.testing.assert_allclose(outputs["mean_colour"], [[15, 25, 35]])


def test_metadata_and_status_helpers(server):
    with ServingClient(f"127.0.0.1:{server.port}", MODEL) as client:
        metadata = client.get_model_metadata()
        status = client.get_model_status()

    assert (metadata.name, metadata.version) == (MODEL, 3)
    assert set(metadata.signature_defs["serving_images"].outputs) == {"mean_colour", "image_size"}
    assert status == [(3, "AVAILABLE", "OK", "")]


def test_server_errors_are_raised_with_their_code_without_retrying(server):
    with ServingClient(f"127.0.0.1:{server.port}", MODEL, version=4, max_attempts=5, initial_backoff=2.0) as client:
        start = time.monotonic()
        with pytest.raises(ServingError, match=r"NOT_FOUND: Servable not found .*Specific\(stats, 4\)") as e:
            client.predict_images([b"x"])

    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert time.monotonic() - start < 2.0


def test_client_retries_until_a_late_server_comes_up(base_path, images):
    port = free_port()
    result = {}

    def call():
        target = f"127.0.0.1:{port}"
        with ServingClient(target, MODEL, max_attempts=30, initial_backoff=0.05, max_backoff=0.2) as client:
            result["outputs"] = client.predict_images(images[1:])

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)
    assert caller.is_alive(), "the client gave up before the server started"
    server, _ = start_server(str(base_path), MODEL, port=port)
    try:
        caller.join(timeout=HANG_GUARD)
    finally:
        server.stop()

    np.testing.assert_allclose(result["outputs"]["mean_colour"], [[5, 105, 255]])


def test_client_gives_up_with_a_clear_error_when_the_retry_budget_is_spent():
    client = ServingClient(f"127.0.0.1:{free_port()}", MODEL, max_attempts=3, initial_backoff=0.05, timeout=2.0)
    start = time.monotonic()
    with pytest.raises(ServingError, match="UNAVAILABLE for 3 attempts") as e:
        client.predict_images([b"x"])

    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert 0.15 <= time.monotonic() - start < 10


def test_client_rejects_a_version_and_a_label_together():
    with pytest.raises(ValueError, match="Received: version=1, version_label='stable'"):
        ServingClient("localhost:8500", MODEL, version=1, version_label="stable")


def test_the_readmes_client_command_runs_as_written(server, images, tmp_path):
    with open(os.path.join(REPO, "README.md")) as f:
        (line,) = [line for line in f if line.startswith("python -m serving.client predict ")]
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "serving.client"]
    # The README's command with this test's server, model and files in the places it names them.
    replace = {"localhost:8500": f"127.0.0.1:{server.port}", "sharpmask": MODEL}
    replace.update({"photo.jpg": str(tmp_path / "photo.jpg"), "proposals.json": str(tmp_path / "proposals.json")})
    assert set(replace) <= set(argv), argv
    (tmp_path / "photo.jpg").write_bytes(images[0])

    result = run_module([replace.get(arg, arg) for arg in argv[1:]])

    assert result.returncode == 0, result.stderr
    outputs = json.loads((tmp_path / "proposals.json").read_text())
    with ServingClient(f"127.0.0.1:{server.port}", MODEL, timeout=HANG_GUARD) as direct:
        expected = direct.predict_images(images[:1])
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(outputs[key], value.dtype), value)


@pytest.mark.slow
def test_command_lines_serve_predict_as_json_and_stop_on_sigterm(base_path, images, tmp_path):
    flags = single_model_flags(base_path)
    with cli_server(flags, tmp_path) as server:
        paths = []
        for i, data in enumerate(images):
            paths.append(tmp_path / f"image{i}")
            paths[-1].write_bytes(data)
        out = tmp_path / "outputs.json"
        target = f"127.0.0.1:{server.port}"
        command = ["-m", "serving.client", "predict", *map(str, paths), "--server", target]
        client = run_module([*command, "--model-name", MODEL, "--output", str(out)])
        assert client.returncode == 0, client.stderr
        outputs = json.loads(out.read_text())
        with ServingClient(target, MODEL, timeout=HANG_GUARD) as direct:
            expected = direct.predict_images(images)
        assert set(outputs) == set(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(outputs[key], value.dtype), value)

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=HANG_GUARD) == 0
        assert "Stopped" in server.log_text()
