import keras
import numpy as np
import pytest
import tensorflow as tf

from sharpmask_tf.config import get_config
from sharpmask_tf.deepmask import DeepMask
from sharpmask_tf.sharpmask import build_model, is_sharpmask, model_geometry


def test_parameter_count_of_the_resnet50_preset():
    model = build_model(get_config("deepmask_resnet50"), trunk_weights=False)
    assert model.count_params() == pytest.approx(17.3e6, rel=0.03)


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(batch):
    model = build_model(get_config("small", ["model.refinement=false", "model.patch_size=160", "model.mask_size=56"]))
    out = model(np.random.default_rng(0).random((batch, 192, 192, 3)).astype("float32"))
    assert set(out) == {"masks", "scores"}
    assert tuple(out["masks"].shape) == (batch, 56, 56)
    assert tuple(out["scores"].shape) == (batch, 1)


def test_config_round_trip_rebuilds_the_same_graph():
    model = build_model(get_config("small", ["model.refinement=false"]))
    clone = DeepMask.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(1).random((2, 96, 96, 3)).astype("float32")
    for k, v in model(x).items():
        np.testing.assert_allclose(np.asarray(clone(x)[k]), np.asarray(v), atol=1e-5)


def test_mixed_precision_keeps_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = DeepMask(64, 16, (1, 1, 1), 8, "reflect", 8, 16, 8, 16, 0.5)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out = model(np.zeros((1, 96, 96, 3), "float32"))
    assert out["masks"].dtype == tf.float32 and out["scores"].dtype == tf.float32
    assert model.get_layer("head_object").compute_dtype == "float16"


def test_reloaded_model_keeps_its_geometry_and_dtype_policy(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(get_config("small", ["model.refinement=false", "model.context=32"]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.save(tmp_path / "deepmask.keras")
    loaded = keras.saving.load_model(tmp_path / "deepmask.keras")
    assert isinstance(loaded, DeepMask) and not is_sharpmask(loaded)
    assert model_geometry(loaded) == (64, 32)
    assert loaded.get_layer("head_object").compute_dtype == "float16"
    assert loaded.get_layer("trunk").get_layer("conv1_conv").compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in loaded.weights)
