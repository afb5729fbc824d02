"""Several models from a ModelServerConfig (serving.model_config): version policies, labels and
HandleReloadConfigRequest over real gRPC on loopback; the shipped serving/models.config."""

import os
import signal

import grpc
import pytest
import tensorflow as tf
from google.protobuf import text_format
from serving_testing import (
    AVAILABLE,
    HANG_GUARD,
    REPO,
    cli_server,
    encode,
    predict_request,
    run_module,
    save_stats_model,
    solid,
    version_states,
)
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving.model_config import ModelServerConfig, parse_model_config
from serving.predict import RequestError
from serving.server import start_server

IMAGE = encode(solid((100, 100, 100)), "PNG")


def config_text(root, cats_policy="specific { versions: 1 versions: 3 }", extra="") -> str:
    return f"""
    model_config_list {{
      config {{
        name: "cats"
        base_path: "{root / "cats"}"
        model_platform: "tensorflow"
        model_version_policy {{ {cats_policy} }}
        version_labels {{ key: "stable" value: 1 }}
      }}
      config {{
        name: "dogs"
        base_path: "{root / "dogs"}"
        model_platform: "tensorflow"
      }}
      {extra}
    }}
    """


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    for version in (1, 2, 3):
        save_stats_model(root / "cats" / str(version), offset=float(version))
    for version in (1, 2):
        save_stats_model(root / "dogs" / str(version), offset=100.0 * version)
    save_stats_model(root / "birds" / "5", offset=500.0)
    (root / "models.config").write_text(config_text(root))
    return root


@pytest.fixture()
def server(root):
    server, _ = start_server(model_config=parse_model_config(root / "models.config"))
    yield server
    server.stop()


def offset(channel, name, **spec) -> float:
    """Which version answered: the stats model's offset (mean colour minus the image's)."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(predict_request({"images": [IMAGE]}, name=name, **spec), timeout=HANG_GUARD)
    return float(tf.make_ndarray(response.outputs["mean_colour"])[0, 0]) - 100.0


def reload(channel, text: str) -> model_management_pb2.ReloadConfigResponse:
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(text, request.config)
    return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=HANG_GUARD)


def test_two_models_with_their_policies_and_labels(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert version_states(channel, "cats") == {1: AVAILABLE, 3: AVAILABLE}
        assert version_states(channel, "dogs") == {2: AVAILABLE}
        assert offset(channel, "cats") == 3.0
        assert offset(channel, "cats", label="stable") == 1.0
        assert offset(channel, "dogs") == 200.0
        with pytest.raises(grpc.RpcError) as error:
            offset(channel, "cats", version=2)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as error:
            offset(channel, "birds")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reload_swaps_the_list_without_a_restart(server, root):
    bird = f'config {{ name: "birds" base_path: "{root / "birds"}" model_platform: "tensorflow" }}'
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = reload(channel, config_text(root, cats_policy="all {}", extra=bird))
        assert response.status.error_code == 0

        assert version_states(channel, "cats") == {1: AVAILABLE, 2: AVAILABLE, 3: AVAILABLE}
        assert offset(channel, "cats", version=2) == 2.0
        assert offset(channel, "birds") == 500.0
        assert offset(channel, "dogs") == 200.0

        # Dogs left out of the list are not served any more; a bad list changes nothing.
        only_birds = f"model_config_list {{ {bird} }}"
        reload(channel, only_birds)
        with pytest.raises(grpc.RpcError) as error:
            offset(channel, "dogs")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as error:
            reload(channel, f"model_config_list {{ {bird} {bird} }}")
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "multiple times" in error.value.details()
        assert offset(channel, "birds") == 500.0


@pytest.mark.parametrize(
    "text, match",
    [
        ('custom_model_config { type_url: "x" }', "Only a model_config_list"),
        ('model_config_list { config { name: "a" } }', "base_path"),
        ('model_config_list { config { name: "a" base_path: "/a" model_platform: "onnx" } }', "onnx"),
        ('model_config_list { config { name: "a" base_path: "/a" model_version_policy { specific {} } } }', "no versions"),
    ],
)  # fmt: skip
def test_configs_this_server_cannot_serve_are_refused(tmp_path, text, match):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(RequestError, match=match):
        parse_model_config(path)


def test_latest_n_keeps_the_newest_versions(root, tmp_path):
    (tmp_path / "models.config").write_text(
        f'model_config_list {{ config {{ name: "cats" base_path: "{root / "cats"}" '
        f"model_version_policy {{ latest {{ num_versions: 2 }} }} }} }}"
    )
    server, port = start_server(model_config=parse_model_config(tmp_path / "models.config"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert version_states(channel, "cats") == {2: AVAILABLE, 3: AVAILABLE}
    finally:
        server.stop()


def test_the_shipped_models_config_parses_with_tf_servings_message():
    config = parse_model_config(os.path.join(REPO, "serving", "models.config"))
    assert isinstance(config, ModelServerConfig)
    (model,) = config.model_config_list.config
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}


@pytest.mark.slow
def test_the_cli_serves_the_shipped_models_config_as_is(tmp_path):
    flags = ["--model-config-file", os.path.join(REPO, "serving", "models.config"), "--rest-api-port", "0"]
    with cli_server(flags, tmp_path) as server:
        assert "Serving model sharpmask from /models/sharpmask" in server.log_text()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            # /models/sharpmask is the Docker mount of the config; here it holds no versions yet.
            with pytest.raises(grpc.RpcError) as error:
                version_states(channel, "sharpmask")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=HANG_GUARD) == 0


def test_the_cli_refuses_a_config_file_together_with_a_base_path(root):
    result = run_module(
        ["-m", "serving.server", "--model-config-file", str(root / "models.config"),
         "--model-base-path", str(root / "cats"), "--model-name", "cats"]
    )  # fmt: skip
    assert result.returncode == 2
    assert "--model-config-file" in result.stderr
