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


def _head_gradients(model, x, labels):
    """Gradients of the score loss and of the mask loss, by variable path."""
    out = {}
    for name in ("scores", "masks"):
        with tf.GradientTape() as tape:
            logits = model(x, training=False)[name]
            loss = tf.reduce_sum(tf.math.softplus(-labels[name] * logits))
        grads = tape.gradient(loss, model.trainable_variables)
        out[name] = {v.path: g for v, g in zip(model.trainable_variables, grads)}
    return out


@pytest.mark.parametrize("factor", [0.0, 0.25])
def test_score_gradient_scales_only_the_scores_gradient_into_head_and_trunk(factor):
    joint = build_model(get_config("small", ["model.refinement=false", "model.score_gradient=1"]))
    scaled = build_model(get_config("small", ["model.refinement=false", f"model.score_gradient={factor}"]))
    scaled.set_weights(joint.get_weights())
    rng = np.random.default_rng(5)
    x = rng.random((3, 96, 96, 3)).astype("float32")
    labels = {
        "scores": np.array([[1.0], [-1.0], [1.0]], "float32"),
        "masks": np.sign(rng.normal(size=(3, 32, 32))).astype("float32"),
    }
    for k, v in joint(x).items():
        np.testing.assert_array_equal(np.asarray(scaled(x)[k]), np.asarray(v))  # the same forward
    reference, got = _head_gradients(joint, x, labels), _head_gradients(scaled, x, labels)
    # The layers both losses train: the trunk and head C's shared part, up to the object vector.
    shared_layers = [scaled.get_layer("trunk"), scaled.get_layer("head_reduce"), scaled.get_layer("head_object")]
    shared = {v.path for layer in shared_layers for v in layer.trainable_variables}
    assert len(shared) > 10 and set(shared) < set(got["scores"])
    for path, grad in got["scores"].items():
        want = reference["scores"][path]
        if path in shared:
            np.testing.assert_allclose(np.asarray(grad), factor * np.asarray(want), rtol=1e-4, atol=1e-6)
        elif want is not None:  # the score branch's own layers learn as before
            np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5, atol=1e-7)
    for path, grad in got["masks"].items():  # the masks' gradients are untouched
        want = reference["masks"][path]
        if want is not None:
            np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_score_gradient_survives_a_reload(tmp_path):
    model = build_model(get_config("small", ["model.refinement=false", "model.score_gradient=0.1"]))
    model.save(tmp_path / "deepmask.keras")
    loaded = keras.saving.load_model(tmp_path / "deepmask.keras")
    assert loaded.score_gradient == 0.1 and loaded.get_layer("score_gradient").factor == 0.1
    joint = build_model(get_config("small", ["model.refinement=false", "model.score_gradient=1"]))
    assert "score_gradient" not in [layer.name for layer in joint.layers]  # the paper's graph, as before
