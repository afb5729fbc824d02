import keras
import numpy as np
import pytest
import tensorflow as tf

from sharpmask_tf.config import PADDING_MODES, REFINEMENT_LAYOUTS, UPSAMPLING_MODES, get_config
from sharpmask_tf.fast_refine import PhaseConv, fast_refine
from sharpmask_tf.layers import MirrorPad2D, Upsample2D
from sharpmask_tf.sharpmask import build_model, refine_network

TOLERANCE = 1e-4


def _randomize(model: keras.Model, seed: int = 0) -> None:
    """Random weights and biases, scaled so that the logits are of order 1."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        fan_in = np.prod(w.shape[:-1]) if len(w.shape) > 1 else 4
        w.assign(rng.normal(0, 1 / np.sqrt(fan_in), w.shape).astype("float32"))


def _refine(padding="reflect", upsampling="bilinear", feature_size=3, k=16, seed=0, layout="paper") -> keras.Model:
    refine = refine_network(8, feature_size, tuple(k // 2**i for i in range(5)), padding, upsampling, layout)
    _randomize(refine, seed)
    return refine


def _inputs(refine: keras.Model, batch: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (batch, *t.shape[1:])).astype("float32") for t in refine.inputs]


def _assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(want).max() > 0.5  # logits of order 1, so the tolerance means something
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("layout", REFINEMENT_LAYOUTS)
@pytest.mark.parametrize("upsampling", UPSAMPLING_MODES)
@pytest.mark.parametrize("padding", PADDING_MODES)
def test_equals_the_refine_net(padding, upsampling, layout):
    refine = _refine(padding, upsampling, layout=layout)
    x = _inputs(refine, 3)
    _assert_close(fast_refine(refine)(x), refine(x))


@pytest.mark.parametrize("layout", REFINEMENT_LAYOUTS)
@pytest.mark.parametrize("feature_size", [1, 2, 5])
def test_equals_the_refine_net_at_other_sizes(feature_size, layout):
    # fs 1 and 2 take the original ops for the smallest maps; reflect needs maps of 2+ pixels.
    refine = _refine("symmetric" if feature_size == 1 else "reflect", feature_size=feature_size, k=32, layout=layout)
    x = _inputs(refine, 2)
    _assert_close(fast_refine(refine)(x), refine(x))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.padding=zero", "model.upsampling=nearest"],
        ["model.refinement_layout=reference", "model.padding=symmetric", "model.upsampling=nearest"],
    ],
)
def test_small_preset_model(overrides):
    model = build_model(get_config("small", overrides))
    refine = model.get_layer("refine")
    _randomize(refine)
    x = _inputs(refine, 2)
    _assert_close(fast_refine(refine)(x), refine(x))


@pytest.mark.parametrize("layout", REFINEMENT_LAYOUTS)
@pytest.mark.parametrize("upsampling", UPSAMPLING_MODES)
@pytest.mark.parametrize("padding", PADDING_MODES)
def test_batch_sizes_eager_and_in_a_function_of_unknown_batch(padding, upsampling, layout):
    refine = _refine(padding, upsampling, layout=layout)
    fast = fast_refine(refine)
    spec = [tf.TensorSpec((None, *t.shape[1:]), tf.float32) for t in refine.inputs]
    graph = tf.function(lambda *x: fast(list(x)), input_signature=spec)
    for batch in (0, 1, 4):
        x = _inputs(refine, batch, seed=batch)
        for got in (fast(x), graph(*x)):
            assert got.shape == (batch, 48, 48) and got.dtype == tf.float32
            if batch:  # (the refine net itself fails on an empty batch with mirror padding)
                _assert_close(got, refine(x))


def test_half_precision_inputs_give_float32():
    refine = _refine()
    x = _inputs(refine, 2)
    got = fast_refine(refine)([tf.constant(v, tf.float16) for v in x])
    assert got.dtype == tf.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(refine(x)), atol=0.05)


@pytest.mark.parametrize("upsampling", UPSAMPLING_MODES)
@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("size", [(3, 5), (6, 4), (2, 7), (1, 3)])
def test_phase_conv_equals_upsample_pad_conv_everywhere(size, padding, upsampling):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (2, *size, 3)).astype("float32")
    kernel = rng.normal(0, 0.3, (3, 3, 3, 2)).astype("float32")
    bias = rng.normal(0, 1, 2).astype("float32")
    up = Upsample2D(2, upsampling)(x)
    want = tf.nn.conv2d(MirrorPad2D(1, padding)(up), kernel, 1, "VALID") + bias
    _assert_close(PhaseConv(kernel, bias, upsampling, padding)(x), want)


def _with_layer(refine: keras.Model, name: str, make) -> keras.Model:
    """A copy of the refine net with layer `name` replaced by make(its config)."""

    def clone(layer):
        config = layer.get_config()
        return make(config) if layer.name == name else layer.__class__.from_config(config)

    return keras.models.clone_model(refine, clone_function=clone)


def _relu_conv(config):
    return keras.layers.Conv2D.from_config({**config, "activation": "relu"})


@pytest.mark.parametrize(
    "layout, name, make, message",
    [
        ("paper", "refine2_vertical_conv1", _relu_conv, "not a linear"),
        ("paper", "refine3_up", lambda c: keras.layers.UpSampling2D(2, name=c["name"]), "is a UpSampling2D"),
        (
            "paper",
            "refine_m1",
            lambda c: keras.layers.Dense.from_config({**c, "activation": "relu"}),
            "not a linear layer",
        ),
        ("paper", "refine2_relu", lambda c: keras.layers.Activation("tanh", name=c["name"]), "not a ReLU"),
        ("reference", "refine3_vertical_conv2", _relu_conv, "not a linear"),
        (
            "reference",
            "refine1_vertical_relu1",
            lambda c: keras.layers.Activation("tanh", name=c["name"]),
            "not a ReLU",
        ),
    ],
)
def test_other_structures_are_refused_naming_the_layer(layout, name, make, message):
    refine = _with_layer(_refine(layout=layout), name, make)
    with pytest.raises(ValueError, match=f"Layer '{name}' of the refine net .*{message}"):
        fast_refine(refine)


def test_a_model_without_the_refine_layers_is_refused():
    inputs = [keras.Input((8,))] + [keras.Input((3 * 2**i, 3 * 2**i, 8 // 2**i)) for i in range(4)]
    other = keras.Model(inputs, keras.layers.Dense(4, name="dense")(inputs[0]))
    with pytest.raises(ValueError, match="no layer 'refine_m1'"):
        fast_refine(other)
