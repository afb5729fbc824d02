"""The authors' models converted into Keras (sharpmask_tf.convert.build / run_dir / __main__),
checked against the independent NumPy forward of the Torch7 trees (tests/reference_forward.py)
and the PyTorch port (tests/pytorch_port.py); the trees come from tests/torch_trees.py."""

import dataclasses
import os
import shutil
import subprocess
import sys

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
import torch_trees
from reference_forward import deepmask_forward, forward
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from torch7_writer import Object, dumps, save
from train_cli_testing import dataset_args, run_train, set_args

from serving.export import export_model
from serving.protocol import INPUT_KEY, SIGNATURE_PIXELS
from serving.server import start_server
from sharpmask_tf.backbone import TRUNK_WEIGHTS_FILE
from sharpmask_tf.checkpoints import has_stage_result
from sharpmask_tf.config import Config, ExportConfig, InferenceConfig, load_run_config
from sharpmask_tf.convert import build, ir
from sharpmask_tf.convert.run_dir import convert_file, read_conversion
from sharpmask_tf.convert.torch7 import read_deepmask_t7
from sharpmask_tf.inference import ProposalGenerator
from sharpmask_tf.layers import IMAGENET_MEAN, IMAGENET_STD
from sharpmask_tf.pyramid import scale_and_pad
from sharpmask_tf.sharpmask import SharpMask, build_model
from sharpmask_tf.task import stage_model

BATCH = 3
SIDE = 64  # the trees' iSz (32) + 32
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def files(tmp_path_factory, deepmask_file, sharpmask_file):
    root = tmp_path_factory.mktemp("t7")
    save(root / "deepmask.t7", deepmask_file)
    save(root / "sharpmask.t7", sharpmask_file)
    return root


@pytest.fixture(scope="module")
def deepmask_run(files, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "deepmask"
    convert_file(files / "deepmask.t7", run)
    return run


@pytest.fixture(scope="module")
def sharpmask_run(files, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "sharpmask"
    convert_file(files / "sharpmask.t7", run)
    return run


def _rgb(seed: int, n: int = BATCH, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, side, side, 3)).astype(np.float32)


def _nchw(rgb: np.ndarray) -> np.ndarray:
    """The reference's input: ImageNet mean/std RGB (DataSampler.lua), NCHW."""
    return ((rgb.astype(np.float64) - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)


def _reference(saved: dict, rgb: np.ndarray) -> dict:
    """Coarse mask logits before the mask branch's upsampling, score logits, refined logits."""
    x = _nchw(rgb)
    model = saved["model"].fields
    features = forward(model["trunk"], x, {})
    mask_branch = model.get("maskBranch", model.get("maskBranchDM"))
    coarse = forward(mask_branch.fields["modules"][0], features, {})
    side = int(round(np.sqrt(coarse.shape[1])))
    want = deepmask_forward(saved, x)
    out = {"masks": coarse.reshape(len(x), side, side), "scores": want["scores"]}
    if "refined_masks" in want:
        patch = int(round(np.sqrt(want["refined_masks"].size // len(x))))
        out["refined_masks"] = want["refined_masks"].reshape(len(x), patch, patch)
    return out


def _predict(model: keras.Model, rgb: np.ndarray) -> dict:
    return {k: np.asarray(v) for k, v in model.predict(rgb, verbose=0).items()}


def _agrees(got, want) -> bool:
    return np.allclose(got, want, **TOLERANCE)


def test_converted_deepmask_run_predicts_the_reference(deepmask_run, deepmask_file):
    model = keras.models.load_model(deepmask_run / "deepmask.keras")
    rgb = _rgb(2)
    got, want = _predict(model, rgb), _reference(deepmask_file, rgb)

    assert sorted(os.listdir(deepmask_run)) == ["config.json", "deepmask", "deepmask.keras", TRUNK_WEIGHTS_FILE]
    assert got["masks"].shape == (BATCH, 6, 6) and got["scores"].shape == (BATCH, 1)
    np.testing.assert_allclose(got["masks"], want["masks"], **TOLERANCE)
    np.testing.assert_allclose(got["scores"], want["scores"], **TOLERANCE)
    assert np.std(want["masks"]) > 0.1 and np.std(want["scores"]) > 0.01  # the comparison has signal


def test_converted_sharpmask_run_predicts_the_reference(sharpmask_run, sharpmask_file):
    rgb = _rgb(3)
    want = _reference(sharpmask_file, rgb)
    sharp = _predict(keras.models.load_model(sharpmask_run / "sharpmask.keras"), rgb)
    deep = _predict(keras.models.load_model(sharpmask_run / "deepmask.keras"), rgb)

    assert sharp["masks"].shape == (BATCH, 32, 32) and sharp["scores"].shape == (BATCH, 1)
    np.testing.assert_allclose(sharp["masks"], want["refined_masks"], **TOLERANCE)
    np.testing.assert_allclose(sharp["coarse_masks"], want["masks"], **TOLERANCE)
    np.testing.assert_allclose(sharp["scores"], want["scores"], **TOLERANCE)
    np.testing.assert_allclose(deep["masks"], want["masks"], **TOLERANCE)
    assert np.std(want["refined_masks"]) > 0.1


def test_the_run_config_names_the_reference_layout_and_builds_the_same_model(sharpmask_run):
    """config.json is what training reads: building from it (loading the trunk weights file it
    names, as stage 1 does) gives the converted trunk."""
    config = load_run_config(sharpmask_run)
    m = config.model
    assert (m.trunk_flavour, m.padding, m.upsampling, m.refinement_layout, m.skip_crop) == (
        "reference",
        "symmetric",
        "nearest",
        "reference",
        "before",
    )
    assert m.trunk_weights == str(sharpmask_run / TRUNK_WEIGHTS_FILE) and m.pretrained_trunk
    fresh = build_model(config)  # loads model.trunk_weights into the trunk
    converted = keras.models.load_model(sharpmask_run / "sharpmask.keras")
    rgb = _rgb(4, n=1)
    taps = fresh.get_layer("trunk")(fresh.get_layer("normalize")(rgb))
    want = converted.get_layer("trunk")(converted.get_layer("normalize")(rgb))
    np.testing.assert_allclose(np.asarray(taps["conv4"]), np.asarray(want["conv4"]), rtol=1e-6, atol=1e-6)


def test_stage_two_starts_from_a_converted_deepmask(deepmask_run, deepmask_file):
    """The run holds stage 1's result where the trainer looks for it, restoring to the converted
    model into the DeepMask that stage 2 (SharpMask.lua's refinement, per config.json) starts from."""
    config = load_run_config(deepmask_run)
    assert config.model.refinement and has_stage_result(str(deepmask_run), "deepmask")
    model = stage_model(config, "deepmask", trunk_weights=False)
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(deepmask_run / "deepmask" / "best")
    ).expect_partial()
    rgb = _rgb(16)
    got, want = _predict(model, rgb), _reference(deepmask_file, rgb)
    np.testing.assert_allclose(got["masks"], want["masks"], **TOLERANCE)
    np.testing.assert_allclose(got["scores"], want["scores"], **TOLERANCE)
    assert isinstance(stage_model(config, "sharpmask", trunk_weights=False), SharpMask)


def test_train_py_trains_stage_two_on_a_converted_deepmask_from_its_config_json(deepmask_run, deepmask_file, tmp_path):
    """`train.py --model-dir RUN_DIR --stage sharpmask`, no --preset and no --set of the model:
    the run's config.json (SharpMask.lua's layout on the converted trunk) is the configuration,
    and stage 2 refines the converted DeepMask, which it leaves as it was."""
    run = tmp_path / "run"
    shutil.copytree(deepmask_run, run)
    converted = load_run_config(run)
    steps = ["training.stage2_steps=2", "training.batch_size=4", "training.val_patches=4", "training.log_every=1"]
    result = run_train(
        ["--model-dir", str(run), "--stage", "sharpmask", "--no-progress"]
        + dataset_args(str(tmp_path / "data"), num_train=12, num_val=4, seed=4)
        + set_args(*steps),
        cwd=tmp_path,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"of {run / 'config.json'}" in result.stdout
    assert load_run_config(run).model == converted.model
    refined = keras.models.load_model(run / "sharpmask.keras")
    rgb = _rgb(18)
    got, want = _predict(refined, rgb), _reference(deepmask_file, rgb)
    assert got["masks"].shape == (BATCH, 32, 32)
    np.testing.assert_allclose(got["coarse_masks"], want["masks"], **TOLERANCE)
    np.testing.assert_allclose(got["scores"], want["scores"], **TOLERANCE)


@pytest.mark.parametrize("affine_type", ["nn.SpatialConstDiagonal", "inn.ConstAffine"])
def test_both_fixed_affine_modules_convert(tmp_path, affine_type):
    saved = torch_trees.deepmask(np.random.default_rng(5), batch=BATCH, affine_type=affine_type)
    save(tmp_path / "model.t7", saved)
    conversion, kind = read_conversion(tmp_path / "model.t7", str(tmp_path / TRUNK_WEIGHTS_FILE))
    rgb = _rgb(6)
    got, want = _predict(build.keras_model(conversion), rgb), _reference(saved, rgb)
    assert kind == "deepmask"
    np.testing.assert_allclose(got["masks"], want["masks"], **TOLERANCE)
    np.testing.assert_allclose(got["scores"], want["scores"], **TOLERANCE)


# A converter that got one of the layout facts wrong must fail the comparison above.


def _conversion(files, name: str) -> build.Conversion:
    return build.convert_record(read_deepmask_t7(files / f"{name}.t7"), "unused.weights.h5")


def _with_model(conversion: build.Conversion, **changes) -> build.Conversion:
    return dataclasses.replace(conversion, config=dataclasses.replace(conversion.config, **changes))


@pytest.mark.parametrize("padding", ["reflect", "zero"])
def test_a_wrong_padding_mode_fails_the_comparison(files, deepmask_file, padding):
    rgb = _rgb(7)
    got = _predict(build.keras_model(_with_model(_conversion(files, "deepmask"), padding=padding)), rgb)
    want = _reference(deepmask_file, rgb)
    assert not _agrees(got["masks"], want["masks"])


def test_a_wrong_flatten_order_fails_the_comparison(files, sharpmask_file, monkeypatch):
    monkeypatch.setattr(build, "chw_to_hwc", lambda weight, channels, side: weight)
    rgb = _rgb(8)
    got, want = _predict(build.keras_model(_conversion(files, "sharpmask")), rgb), _reference(sharpmask_file, rgb)
    assert not _agrees(got["coarse_masks"], want["masks"])  # the object vector's Linear
    assert not _agrees(got["masks"], want["refined_masks"])


def test_a_wrong_crop_fails_the_comparison(files, sharpmask_file):
    """Cutting the windows after the horizontal nets (our default, and what full-image inference
    computes) is not SharpMask.lua's patch net: the refined masks differ, nothing else."""
    rgb = _rgb(9)
    got = _predict(build.keras_model(_with_model(_conversion(files, "sharpmask"), skip_crop="after")), rgb)
    want = _reference(sharpmask_file, rgb)
    assert not _agrees(got["masks"], want["refined_masks"])
    np.testing.assert_allclose(got["coarse_masks"], want["masks"], **TOLERANCE)


def _affine_before_the_addition(block: ir.Sequential) -> ir.Sequential:
    """A released bottleneck with its post-addition affine moved onto the branch and the
    shortcut (torchvision's placement)."""
    table, add, affine, relu = block.layers
    branch, shortcut = table.branches
    branch = dataclasses.replace(branch, layers=branch.layers + (affine,))
    shortcut = ir.Sequential(path=f"{shortcut.path}.moved", layers=(shortcut, affine))
    return dataclasses.replace(block, layers=(dataclasses.replace(table, branches=(branch, shortcut)), add, relu))


def test_a_wrong_affine_placement_fails_the_comparison(files, deepmask_file):
    record = read_deepmask_t7(files / "deepmask.t7")
    layers = list(record.trunk.layers)
    for i in range(4, 7):
        layers[i] = dataclasses.replace(layers[i], layers=tuple(map(_affine_before_the_addition, layers[i].layers)))
    moved = dataclasses.replace(record, trunk=dataclasses.replace(record.trunk, layers=tuple(layers)))
    conversion = build.convert_record(moved, "unused.weights.h5")
    rgb = _rgb(10)
    got = _predict(build.keras_model(conversion), rgb)

    assert conversion.config.trunk_flavour == "torch"  # the layout the moved record has
    np.testing.assert_allclose(got["scores"], ir.run_deepmask(moved, _nchw(rgb))["scores"], **TOLERANCE)
    assert not _agrees(got["masks"], _reference(deepmask_file, rgb)["masks"])


def test_the_resnet50_t7_trunk_converts_for_training(tmp_path):
    rng = np.random.default_rng(11)
    resnet = torch_trees.resnet(rng, width=8)
    save(tmp_path / "resnet-50.t7", resnet)
    run = tmp_path / "run"
    assert convert_file(tmp_path / "resnet-50.t7", run) == ["config.json", TRUNK_WEIGHTS_FILE]

    config = load_run_config(run)
    assert (config.model.trunk_flavour, config.model.trunk_blocks, config.model.trunk_width) == (
        "reference",
        (1, 1, 1),
        8,
    )
    model = build_model(config)  # what stage 1 builds: the trunk from trunk.weights.h5
    rgb = _rgb(12, n=2)
    conv4 = np.asarray(model.get_layer("trunk")(model.get_layer("normalize")(rgb))["conv4"])
    # The reference trunk with DeepMask.lua's symmetric padding (modelUtils.updatePadding).
    trunk = torch_trees.sequential(*resnet.fields["modules"][:7])
    torch_trees.update_padding(trunk)
    want = forward(trunk, _nchw(rgb), {}).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(conv4, want, **TOLERANCE)


def test_the_pytorch_port_deepmask_converts(tmp_path):
    torch = pytest.importorskip("torch", reason="the port's files are read with torch")
    from pytorch_port import random_port

    port = random_port()
    state = {f"module.{k}": v for k, v in port.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "DeepMask.pth.tar")
    convert_file(tmp_path / "DeepMask.pth.tar", tmp_path / "run")

    model = keras.models.load_model(tmp_path / "run" / "deepmask.keras")
    rgb = _rgb(13, side=port.patch + 32)
    got = _predict(model, rgb)
    with torch.no_grad():
        features = port.crop_trick(port.trunk(torch.from_numpy(_nchw(rgb).astype(np.float32))))
        masks, scores = port.maskBranch[0](features), port.scoreBranch(features)
    assert load_run_config(tmp_path / "run").model.trunk_flavour == "deepmask_pytorch"
    np.testing.assert_allclose(got["masks"], masks.numpy().reshape(got["masks"].shape), **TOLERANCE)
    np.testing.assert_allclose(got["scores"], scores.numpy().reshape(-1, 1), **TOLERANCE)


def _reference_trunk_map(saved: dict, padded: np.ndarray) -> tuple[np.ndarray, dict]:
    """The trunk over a whole padded image as InferDeepMask.lua / SharpMask:inference run it
    (its crop, trunk position 8, an Identity): object vectors of every window (H, W, D), the
    object Linear as an fSz x fSz convolution (linear2convTrunk), and every trunk module's output
    by id."""
    modules = saved["model"].fields["trunk"].fields["modules"]
    outputs: dict = {}
    x = forward(torch_trees.sequential(*modules[:7]), _nchw(padded[None]), outputs)
    outputs[id(modules[7])] = x  # the crop, removed
    x = forward(torch_trees.sequential(modules[8], modules[9]), x, {})[0]  # 1x1 conv, ReLU
    linear = modules[11].fields
    f_size = saved["model"].fields["fSz"]
    weight = linear["weight"].numpy().reshape(-1, x.shape[0], f_size, f_size)
    windows = np.lib.stride_tricks.sliding_window_view(x, weight.shape[2:], axis=(1, 2))
    return np.einsum("chwij,dcij->hwd", windows, weight) + linear["bias"].numpy(), outputs


def _reference_score_map(saved: dict, padded: np.ndarray) -> np.ndarray:
    """Score logits of every window of a padded image as InferDeepMask.lua computes them: the
    score branch at every position of the trunk's map."""
    vectors, _ = _reference_trunk_map(saved, padded)
    scores = forward(saved["model"].fields["scoreBranch"], vectors.reshape(-1, vectors.shape[-1]), {})
    return scores.reshape(vectors.shape[:2])


def _reference_refined_masks(saved: dict, padded: np.ndarray, windows: list[tuple[int, int]]) -> np.ndarray:
    """Refined mask logits (n, iSz, iSz) of windows (row, col) of a padded image as
    InferSharpMask.lua computes them: each horizontal net, its crop removed, over the whole trunk
    output at its skip position; window (row, col) takes cells [row * t, (row + fSz) * t) of the
    map at stride 16 / t (Infer:getTopPatches); the vertical path (refs) over those crops."""
    model = saved["model"].fields
    vectors, outputs = _reference_trunk_map(saved, padded)
    trunk_modules, f_size = model["trunk"].fields["modules"], model["fSz"]
    # refs[0] is Linear + View(batch, km, fSz, fSz); setnpinference sets its batch to the windows'.
    linear = model["refs"][0].fields["modules"][0]
    current = forward(linear, np.stack([vectors[r, c] for r, c in windows]), {}).reshape(
        len(windows), -1, f_size, f_size
    )
    for k, position in enumerate(model["skpos"], start=1):
        ref = model["refs"][k].fields["modules"]
        horizontal, vertical = ref[0].fields["modules"]
        layers = horizontal.fields["modules"]
        if layers[0].typename == "nn.SpatialZeroPadding":
            layers = layers[1:]
        skip = forward(torch_trees.sequential(*layers), outputs[id(trunk_modules[position - 1])], {})[0]
        t = 2 ** (k - 1)
        crops = np.stack([skip[:, r * t : (r + f_size) * t, c * t : (c + f_size) * t] for r, c in windows])
        current = [crops, forward(vertical, current, {})]
        for m in ref[1:]:
            if m.typename != "nn.View":  # SharpMask:inference removes the last View
                current = forward(m, current, {})
    patch = int(round(np.sqrt(current.size // len(windows))))
    return current.reshape(len(windows), patch, patch)


def test_full_image_scores_are_the_reference_inference_over_the_image(deepmask_run, deepmask_file):
    """At scale 1 every window of the padded image is a proposal; their scores are those of the
    reference's full-image inference on the same padded image. (A patch's own forward differs
    from it: the trunk's receptive field reaches past the 16 px of context into the patch's
    padding, in the reference as here.)"""
    config = InferenceConfig(scale_min=0.0, scale_max=0.0, top_n=1000, max_side=1024, crop_size=6)
    generator = ProposalGenerator.from_saved(deepmask_run, config)
    image = _rgb(14, n=1, side=96)[0, :80]
    out = generator.propose(image)
    padded, _ = scale_and_pad(tf.constant(image), tf.constant(1.0), generator.patch_size)
    want = _reference_score_map(deepmask_file, padded.numpy())

    assert out["num_proposals"] == want.size
    got = np.sort(out["scores"][: out["num_proposals"]])
    np.testing.assert_allclose(got, np.sort(1 / (1 + np.exp(-want.ravel()))), **TOLERANCE)
    assert np.std(want) > 0.1


def test_full_image_refined_masks_are_the_reference_inference_over_the_image(sharpmask_run, sharpmask_file):
    """At scale 1 the generator's refined masks of every window are those of InferSharpMask.lua's
    inference over the same padded image, windows at the borders included (both run the
    horizontal nets, mirror padding and all, on the whole maps)."""
    config = InferenceConfig(scale_min=0.0, scale_max=0.0, top_n=1000, max_side=1024, crop_size=6)
    generator = ProposalGenerator.from_saved(sharpmask_run, config)
    image = _rgb(17, n=1, side=112)[0, :96]
    levels = generator._pyramid(tf.constant(image), tf.constant(1.0))
    rows_, cols_ = (int(v) for v in levels["sizes"][0])
    windows = [(r, c) for r in range(rows_) for c in range(cols_)]
    rows, cols = (tf.constant(v, tf.int32) for v in zip(*windows))
    got = generator._window_mask_logits(levels, rows * cols_ + cols, tf.zeros_like(rows), rows, cols)
    padded, _ = scale_and_pad(tf.constant(image), tf.constant(1.0), generator.patch_size)
    want = _reference_refined_masks(sharpmask_file, padded.numpy(), windows)

    assert len(windows) >= 20 and want.shape == (len(windows), 32, 32)
    assert np.std(want) > 0.1  # the comparison has signal
    np.testing.assert_allclose(np.asarray(got), want, **TOLERANCE)
    scores = generator.propose(image)["scores"]
    np.testing.assert_allclose(
        np.sort(scores[: len(windows)]),
        np.sort(1 / (1 + np.exp(-_reference_score_map(sharpmask_file, padded.numpy()).ravel()))),
        **TOLERANCE,
    )


def test_a_converted_model_exports_serves_and_answers(deepmask_run, tmp_path):
    config = Config(inference=InferenceConfig(max_side=256, crop_size=8), export=ExportConfig(model_name="converted"))
    version = export_model(deepmask_run, config, tmp_path / "exports")
    image = (_rgb(15, n=1, side=96)[0] * 255).astype(np.uint8)
    want = ProposalGenerator.from_saved(deepmask_run, config.inference).propose(image.astype(np.float32) / 255)
    server, port = start_server(str(version.parent), "converted")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "converted"
            request.model_spec.signature_name = SIGNATURE_PIXELS
            request.inputs[INPUT_KEY].CopyFrom(tf.make_tensor_proto(image[None]))
            reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=120)
    finally:
        server.stop()
    scores = tf.make_ndarray(reply.outputs["scores"])[0]
    count = int(tf.make_ndarray(reply.outputs["num_proposals"])[0])
    top = min(count, config.export.top_n)
    assert count > 0
    np.testing.assert_allclose(scores[:top], want["scores"][:top], rtol=1e-4, atol=1e-5)


# Bad files: a clear error, and nothing under the run directory (nor staging left beside it).


def _unknown_module(deepmask_file) -> dict:
    trunk = deepmask_file["model"].fields["trunk"]
    modules = list(trunk.fields["modules"])
    modules[2] = torch_trees.module("nn.SpatialFancyPooling")
    model = Object("nn.DeepMask", {**deepmask_file["model"].fields, "trunk": torch_trees.sequential(*modules)})
    return {"model": model, "config": deepmask_file["config"]}


def _inexpressible(deepmask_file) -> dict:
    score = deepmask_file["model"].fields["scoreBranch"]
    modules = list(score.fields["modules"])
    modules[2] = torch_trees.threshold(0.5, 0.0)
    model = Object("nn.DeepMask", {**deepmask_file["model"].fields, "scoreBranch": torch_trees.sequential(*modules)})
    return {"model": model, "config": deepmask_file["config"]}


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", "not a Torch7 binary file"),
        ("truncated", "truncated Torch7 file"),
        ("unknown", r"model.trunk.modules\[3\]: unknown module nn.SpatialFancyPooling"),
        ("inexpressible", r"model.scoreBranch.modules\[3\]: only a ReLU or Threshold"),
        ("pth_tar", "must hold a 'state_dict'"),
    ],
)
def test_bad_files_raise_and_leave_nothing(tmp_path, files, deepmask_file, kind, message):
    source = tmp_path / ("model.pth.tar" if kind == "pth_tar" else "model.t7")
    if kind == "text":
        source.write_text("model = DeepMask\n")
    elif kind == "truncated":
        data = (files / "sharpmask.t7").read_bytes()
        source.write_bytes(data[: len(data) // 2])
    elif kind == "unknown":
        source.write_bytes(dumps(_unknown_module(deepmask_file)))
    elif kind == "inexpressible":
        source.write_bytes(dumps(_inexpressible(deepmask_file)))
    else:
        torch = pytest.importorskip("torch", reason="writing .pth.tar files needs torch")
        torch.save({"epoch": 1, "arch": "DeepMask"}, source)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=message):
        convert_file(source, tmp_path / "run")
    assert sorted(os.listdir(tmp_path)) == before


def test_a_failure_while_writing_leaves_nothing(tmp_path, files, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_file(files / "deepmask.t7", tmp_path / "run")
    assert os.listdir(tmp_path) == []


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = ["timeout", "600", sys.executable, "-m", "sharpmask_tf.convert", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=660)


def test_cli_converts_and_refuses_an_existing_target(tmp_path, files):
    done = _cli(files / "deepmask.t7", "--out", tmp_path / "run", cwd=tmp_path)
    again = _cli(files / "deepmask.t7", "--out", tmp_path / "run", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "deepmask.keras" in done.stdout and (tmp_path / "run" / "deepmask.keras").is_file()
    assert again.returncode == 2 and "exists" in again.stderr
