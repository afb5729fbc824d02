"""SavedModel export for TF Serving: signatures against the in-process generator, the graph's ops,
metadata and warm-up records, versions and atomic writes, and real gRPC round trips (in-process
server and a `serving.server` subprocess)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from serving_testing import HANG_GUARD, encode, eventually
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from serving.client import ServingClient, ServingError
from serving.demo_query import serve_and_query
from serving.export import _move_into_place, export_model, main
from serving.protocol import METADATA_FILE, SIGNATURE_BYTES, SIGNATURE_PIXELS, WARMUP_FILE
from serving.server import start_server
from serving.versions import VersionManager
from sharpmask_tf.config import Config, get_config
from sharpmask_tf.inference import ProposalGenerator
from sharpmask_tf.sharpmask import build_model

NAME = "sharpmask"
FLOAT_KEYS = ("scores", "boxes", "masks", "window_boxes")


def smooth(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A blobby uint8 image (so masks and scores vary across the picture)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, channels), dtype=np.uint8)
    return np.asarray(Image.fromarray(small.squeeze()).resize((width, height), Image.BILINEAR)).reshape(
        height, width, channels
    )


@pytest.fixture(scope="module")
def config() -> Config:
    return get_config("small", ["export.top_n=20", "export.warmup_requests=2"])


@pytest.fixture(scope="module")
def model(config):
    keras.utils.set_random_seed(0)
    return build_model(config)


@pytest.fixture(scope="module")
def exported(model, config, tmp_path_factory) -> Path:
    return export_model(model, config, tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported))


@pytest.fixture(scope="module")
def generator(model, config):
    inference = Config(inference=config.inference).override([f"inference.top_n={config.export.top_n}"]).inference
    return ProposalGenerator(model, inference, full_masks=False)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """A JPEG and a PNG of different sizes, sent in one batch."""
    return [encode(smooth(96, 128), "JPEG"), encode(smooth(80, 112, seed=1), "PNG")]


@pytest.fixture(scope="module")
def server(exported):
    server, _ = start_server(str(exported.parent), NAME, poll_interval=0.2)
    yield server
    server.stop()


def in_process(generator, image) -> dict[str, np.ndarray]:
    out = {k: v.numpy() for k, v in generator.propose_tensors(tf.convert_to_tensor(image)).items()}
    out["masks"] = out.pop("mask_crops")
    return out


def assert_row_matches(batch: dict, row: int, want: dict) -> None:
    assert int(batch["num_proposals"][row]) == int(want["num_proposals"])
    for key in FLOAT_KEYS:
        np.testing.assert_allclose(np.asarray(batch[key])[row], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


def assert_outputs_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)


# ----------------------------------------------------------------------------- the SavedModel


def test_signatures_equal_the_in_process_generator(loaded, generator, images, config):
    out = loaded.signatures[SIGNATURE_BYTES](images=tf.constant(images))
    n, m = config.export.top_n, config.inference.crop_size
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "boxes": (2, n, 4),
        "scores": (2, n),
        "masks": (2, n, m, m),
        "window_boxes": (2, n, 4),
        "num_proposals": (2,),
    }
    assert out["masks"].dtype == tf.float32 and out["num_proposals"].dtype == tf.int32
    for row, data in enumerate(images):
        image = tf.io.decode_image(data, channels=0, expand_animations=False)
        assert_row_matches(out, row, in_process(generator, image))
    assert np.all(np.diff(out["scores"].numpy(), axis=1) <= 0)

    pixels = tf.stack([tf.io.decode_image(images[0], channels=3)] * 2)
    by_pixels = loaded.signatures[SIGNATURE_PIXELS](images=pixels)
    for row in range(2):
        assert_row_matches(by_pixels, row, {k: v[0].numpy() for k, v in out.items()})


def test_gray_and_alpha_pngs_are_read_like_the_numpy_api(loaded, generator):
    rgba = smooth(64, 72, channels=4, seed=2)
    gray = smooth(64, 72, channels=1, seed=3)[..., 0]
    out = loaded.signatures[SIGNATURE_BYTES](images=tf.constant([encode(rgba, "PNG"), encode(gray, "PNG")]))
    assert_row_matches(out, 0, in_process(generator, rgba))
    assert_row_matches(out, 1, in_process(generator, gray))


def test_saved_model_cli_lists_exactly_the_two_signatures(exported, loaded):
    assert set(loaded.signatures) == {SIGNATURE_BYTES, SIGNATURE_PIXELS}
    cli = Path(sys.executable).parent / "saved_model_cli"
    shown = subprocess.run(
        [str(cli), "show", "--dir", str(exported), "--all"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=True,
    ).stdout
    listed = {line.split("'")[1] for line in shown.splitlines() if line.startswith("signature_def[")}
    assert listed == {SIGNATURE_BYTES, SIGNATURE_PIXELS, "__saved_model_init_op"}
    default = shown[
        shown.index(f"signature_def['{SIGNATURE_BYTES}']") : shown.index(f"signature_def['{SIGNATURE_PIXELS}']")
    ]
    assert "dtype: DT_STRING" in default and "shape: (-1)" in default
    assert "shape: (-1, 20, 32, 32)" in default


def test_the_graph_uses_only_core_tensorflow_ops(exported):
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((exported / "saved_model.pb").read_bytes())
    (meta_graph,) = saved_model.meta_graphs
    assert list(meta_graph.meta_info_def.tags) == ["serve"]
    ops = {node.op for node in meta_graph.graph_def.node}
    for function in meta_graph.graph_def.library.function:
        ops |= {node.op for node in function.node_def}
    assert {"DecodeImage", "TopKV2", "Conv2D"} <= ops
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    unknown = {op for op in ops if not hasattr(tf.raw_ops, op)}
    assert not unknown, f"ops outside core TensorFlow: {sorted(unknown)}"


def test_a_bfloat16_export_serves_nearly_the_same_proposals(model, config, generator, images, tmp_path):
    bf16 = config.override(["inference.compute_dtype=bfloat16"])
    path = export_model(model, bf16, tmp_path)
    assert json.loads((path / "assets.extra" / METADATA_FILE).read_text())["config"]["inference"]["compute_dtype"] == (
        "bfloat16"
    )
    out = tf.saved_model.load(str(path)).signatures[SIGNATURE_BYTES](images=tf.constant(images))
    for row, data in enumerate(images):
        want = in_process(generator, tf.io.decode_image(data, channels=0, expand_animations=False))
        got = {k: v[row].numpy() for k, v in out.items()}
        index = {tuple(np.round(box, 2)): i for i, box in enumerate(got["window_boxes"])}
        matched = [(i, index.get(tuple(np.round(box, 2)))) for i, box in enumerate(want["window_boxes"][:10])]
        assert all(j is not None for _, j in matched), "the float32 top 10 must be among the bfloat16 top 20"
        assert max(abs(want["scores"][i] - got["scores"][j]) for i, j in matched) < 0.05
        assert max(np.abs(want["masks"][i] - got["masks"][j]).max() for i, j in matched) < 0.1


def test_a_tf1_session_loads_and_runs_the_signature_by_tensor_names(exported, loaded, images):
    # TF Serving's C++ SavedModelBundle: restore into a Session, run the init op, feed and fetch
    # the SignatureDef's tensor names. The closest stand-in for tensorflow_model_server here.
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(exported))
        signature = meta_graph.signature_def[SIGNATURE_BYTES]
        got = session.run(
            {k: v.name for k, v in signature.outputs.items()}, feed_dict={signature.inputs["images"].name: images}
        )
    want = loaded.signatures[SIGNATURE_BYTES](images=tf.constant(images))
    assert_outputs_equal(got, {k: v.numpy() for k, v in want.items()})


def test_metadata_records_the_resolved_config(exported, config):
    metadata = json.loads((exported / "assets.extra" / METADATA_FILE).read_text())
    recorded = Config.from_dict(metadata["config"])
    assert recorded.export.version == 1 and recorded.export.base_path == str(exported.parent.parent)
    assert recorded.model == config.model and recorded.inference == config.inference
    assert metadata["proposals"]["top_n"] == 20
    assert metadata["proposals"]["mask_threshold"] == config.inference.mask_threshold
    assert metadata["proposals"]["scales"] == pytest.approx(config.inference.scales)
    assert metadata["model"]["kind"] == "sharpmask"


def test_warmup_records_are_prediction_logs_the_signature_answers(exported, loaded):
    records = list(tf.data.TFRecordDataset(str(exported / "assets.extra" / WARMUP_FILE)).as_numpy_iterator())
    assert len(records) == 2
    for record in records:
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        assert request.model_spec.name == NAME and request.model_spec.signature_name == SIGNATURE_BYTES
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](**inputs)
        assert out["num_proposals"].numpy().tolist() == [20]


def test_bad_inputs_raise_invalid_argument_in_the_signature(loaded):
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        loaded.signatures[SIGNATURE_BYTES](images=tf.constant([b"not an image"]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one encoded image"):
        loaded.signatures[SIGNATURE_BYTES](images=tf.constant([], tf.string))
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one image"):
        loaded.signatures[SIGNATURE_PIXELS](images=tf.zeros([0, 8, 8, 3], tf.uint8))


# ----------------------------------------------------------------------------- over gRPC


def test_grpc_round_trip_gives_the_same_proposals(server, loaded, images):
    with ServingClient(f"127.0.0.1:{server.port}", NAME, timeout=HANG_GUARD) as client:
        got = client.predict_images(images)
        pixels = np.stack([tf.io.decode_image(images[0], channels=3).numpy()])
        got_pixels = client.predict({"images": pixels}, signature_name=SIGNATURE_PIXELS)
        metadata = client.get_model_metadata()
    assert_outputs_equal(
        got, {k: v.numpy() for k, v in loaded.signatures[SIGNATURE_BYTES](images=tf.constant(images)).items()}
    )
    assert_outputs_equal(
        got_pixels, {k: v.numpy() for k, v in loaded.signatures[SIGNATURE_PIXELS](images=pixels).items()}
    )
    assert metadata.version == 1
    # GetModelMetadata shows the MetaGraph's SignatureDef map verbatim, as TF Serving does.
    assert set(metadata.signature_defs) == {SIGNATURE_BYTES, SIGNATURE_PIXELS, "__saved_model_init_op"}
    assert set(metadata.signature_defs[SIGNATURE_BYTES].outputs) == {
        "boxes", "scores", "masks", "window_boxes", "num_proposals"
    }  # fmt: skip


@pytest.mark.parametrize(
    "inputs, detail",
    [
        ({"images": [b"\x89PNG\r\n\x1a\n truncated"]}, "PNG"),
        ({"images": np.array([], dtype=object)}, "at least one encoded image"),
        ({"images": np.zeros([1], np.float32)}, "dtype=float32"),
        ({"image": [b"x"]}, "alias not found in signature: image"),
    ],
    ids=["corrupt-image", "empty-batch", "wrong-dtype", "wrong-input-key"],
)
def test_bad_requests_are_invalid_argument_and_the_server_keeps_answering(server, images, inputs, detail):
    with ServingClient(f"127.0.0.1:{server.port}", NAME, timeout=HANG_GUARD) as client:
        with pytest.raises(ServingError, match=detail) as raised:
            client.predict(inputs)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert client.predict_images(images[:1])["num_proposals"].shape == (1,)


def test_versions_count_up_and_a_running_server_switches_without_seeing_staging(model, config, tmp_path):
    base = tmp_path / "exports"
    assert export_model(model, config, base) == base / NAME / "1"
    server, port = start_server(str(base / NAME), NAME, poll_interval=0.1)
    seen, stop = [], threading.Event()

    def watch():
        # Scans every millisecond until told to stop, then once more (after the export has
        # returned); the pause leaves the export the CPU and the GIL, a staging directory lives
        # for the whole export.
        while True:
            done = stop.is_set()
            for name in os.listdir(base / NAME):
                complete = (base / NAME / name / "assets.extra" / WARMUP_FILE).is_file()
                seen.append((name, complete))
            if done:
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ServingClient(f"127.0.0.1:{port}", NAME, timeout=HANG_GUARD) as client:
            assert client.get_model_metadata().version == 1
            assert export_model(model, config, base) == base / NAME / "2"
            stop.set()
            watcher.join()
            # The poll thread has tried version 2 once it reports a state for it: loading and
            # warming it up takes what this machine's load makes it take.
            eventually(lambda: 2 in server.models.version_states(NAME))
            assert client.get_model_metadata().version == 2
            assert client.predict_images([encode(smooth(96, 128), "JPEG")])["num_proposals"].tolist() == [20]
    finally:
        stop.set()
        server.stop()
    names = {name for name, _ in seen}
    assert any(name.startswith(".tmp-2-") for name in names), "the export never used a staging directory"
    assert all(complete for name, complete in seen if name.isdigit()), "a numbered version was seen half-written"
    assert {name for name in names if not name.startswith(".")} == {"1", "2"}
    assert sorted(os.listdir(base / NAME)) == ["1", "2"]

    # The server's version scan ignores a staging directory even once it holds a saved_model.pb.
    staging = base / NAME / ".tmp-3-999"
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes((base / NAME / "2" / "saved_model.pb").read_bytes())
    assert sorted(VersionManager(str(base / NAME), NAME)._version_dirs()) == [1, 2]

    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(model, config, base, version=2)


def test_the_next_free_version_skips_names_that_are_not_versions(model, config, tmp_path):
    model_dir = tmp_path / "exports" / NAME
    for name in ("3", "²", "99999999999999999999", "12abc"):
        (model_dir / name).mkdir(parents=True)

    assert export_model(model, config, tmp_path / "exports") == model_dir / "4"


def test_moving_into_place_refuses_a_taken_version_unless_overwriting(tmp_path):
    def version_dir(name, content):
        path = tmp_path / name
        path.mkdir()
        (path / "saved_model.pb").write_text(content)
        return path

    target = version_dir("1", "old")
    with pytest.raises(FileExistsError, match="another export"):
        _move_into_place(version_dir(".tmp-1-1", "new"), target, overwrite=False)
    assert (target / "saved_model.pb").read_text() == "old"
    # A failed replacement puts the old version back.
    with pytest.raises(FileExistsError, match="another export"):
        _move_into_place(tmp_path / ".tmp-missing", target, overwrite=True)
    assert (target / "saved_model.pb").read_text() == "old"
    _move_into_place(tmp_path / ".tmp-1-1", target, overwrite=True)
    assert (target / "saved_model.pb").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["1"]


# ----------------------------------------------------------------------------- CLI and demo


def test_cli_exports_a_deepmask_run_directory_with_its_config(tmp_path, capsys):
    config = get_config("small", ["model.refinement=false", "export.top_n=7", "export.warmup_requests=0"])
    run = tmp_path / "run"
    run.mkdir()
    build_model(config).save(run / "deepmask.keras")
    (run / "config.json").write_text(config.to_json())
    base = tmp_path / "exports"

    assert main(["--model", str(run), "--base-path", str(base), "--model-name", "dm", "--set", "export.top_n=5"]) == 0
    version_dir = Path(capsys.readouterr().out.strip())
    assert version_dir == base / "dm" / "1"
    metadata = json.loads((version_dir / "assets.extra" / METADATA_FILE).read_text())
    assert metadata["model"]["kind"] == "deepmask" and metadata["proposals"]["top_n"] == 5
    assert not (version_dir / "assets.extra" / WARMUP_FILE).exists()
    out = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_BYTES](
        images=tf.constant([encode(smooth(48, 64), "PNG")])
    )
    assert out["masks"].shape == (1, 5, 32, 32)

    assert main(["--model", str(run), "--base-path", str(base), "--model-name", "dm", "--version", "1"]) == 1
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", ".", "../escaped", "a/b", ".tmp-1-2", "", "two words", "-x", "naïve"])
def test_cli_refuses_a_model_name_that_is_not_a_plain_name(name, tmp_path, capsys):
    base = tmp_path / "deep" / "exports"
    base.mkdir(parents=True)

    assert main(["--model", str(tmp_path / "run"), "--base-path", str(base), f"--model-name={name}"]) == 1

    assert "export.model_name must be letters, digits" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["deep", "deep/exports"]


def test_serve_and_query_draws_the_answer_of_a_server_subprocess(exported, loaded, images, tmp_path):
    paths = []
    for i, data in enumerate(images):
        paths.append(tmp_path / f"image{i}.{'jpg' if i == 0 else 'png'}")
        paths[-1].write_bytes(data)

    result = serve_and_query(exported.parent.parent, NAME, paths, tmp_path / "out" / "proposals.png", max_draw=5)

    assert result["version"] == 1
    want = loaded.signatures[SIGNATURE_BYTES](images=tf.constant(images))
    for i, item in enumerate(result["images"]):
        assert (item["height"], item["width"]) == [(96, 128), (80, 112)][i]
        assert item["num_proposals"] == int(want["num_proposals"][i])
        np.testing.assert_array_equal(item["scores"], want["scores"][i, : item["num_proposals"]].numpy())
    picture = np.asarray(Image.open(tmp_path / "out" / "proposals.png"))
    assert picture.shape == (96, 128 + 112, 3)
    original = np.asarray(Image.open(paths[1]))
    assert not np.array_equal(picture[:80, 128:], original), "no proposal was drawn"
