import keras
import numpy as np
import pytest
import tensorflow as tf

from sharpmask_tf.layers import (
    CenterCrop2D,
    FrozenBatchNormalization,
    GradientScale,
    ImageNormalization,
    MirrorPad2D,
    Upsample2D,
    mirror_index,
)

KNOWN = np.arange(2 * 5 * 4 * 3, dtype="float32").reshape(2, 5, 4, 3)


@pytest.mark.parametrize("mode, np_mode", [("reflect", "reflect"), ("symmetric", "symmetric"), ("zero", "constant")])
@pytest.mark.parametrize("pad", [1, 3])
def test_mirror_pad_matches_numpy(mode, np_mode, pad):
    got = MirrorPad2D(pad, mode)(KNOWN)
    want = np.pad(KNOWN, [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode=np_mode)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_reflect_and_symmetric_differ_at_the_edge():
    r = np.asarray(MirrorPad2D(1, "reflect")(KNOWN))
    s = np.asarray(MirrorPad2D(1, "symmetric")(KNOWN))
    np.testing.assert_array_equal(r[:, 0, 1:-1], KNOWN[:, 1])  # reflect skips the edge row
    np.testing.assert_array_equal(s[:, 0, 1:-1], KNOWN[:, 0])  # symmetric repeats it


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="mode='wrap'"):
        MirrorPad2D(1, "wrap")
    with pytest.raises(ValueError, match="interpolation='area'"):
        Upsample2D(2, "area")
    with pytest.raises(ValueError, match="factor=1.5"):
        GradientScale(1.5)


def test_center_crop():
    got = np.asarray(CenterCrop2D(1)(KNOWN))
    np.testing.assert_array_equal(got, KNOWN[:, 1:-1, 1:-1])


def test_upsample_on_unknown_spatial_size():
    layer = Upsample2D(2, "bilinear")
    fn = tf.function(layer.call, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for h, w in [(5, 4), (3, 7)]:
        x = np.random.default_rng(0).random((1, h, w, 3)).astype("float32")
        got = fn(tf.constant(x)).numpy()
        assert got.shape == (1, 2 * h, 2 * w, 3)
        want = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
        np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
    nearest = Upsample2D(2, "nearest")(KNOWN)
    np.testing.assert_array_equal(np.asarray(nearest), KNOWN.repeat(2, axis=1).repeat(2, axis=2))


def test_frozen_batchnorm_ignores_training_flag():
    bn = FrozenBatchNormalization(epsilon=1e-3)
    x = np.random.default_rng(1).normal(3.0, 2.0, (4, 3, 3, 2)).astype("float32")
    bn.build(x.shape)
    bn.set_weights([np.full(2, 2.0), np.full(2, 0.5), np.full(2, 1.0), np.full(2, 4.0)])
    want = 2.0 * (x - 1.0) / np.sqrt(4.0 + 1e-3) + 0.5
    np.testing.assert_allclose(np.asarray(bn(x, training=True)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), [1.0, 1.0])
    assert not bn.trainable and not bn.trainable_weights


def test_normalization():
    x = np.full((1, 1, 1, 3), 0.5, "float32")
    want = (0.5 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(np.asarray(ImageNormalization()(x))[0, 0, 0], want, rtol=1e-6)


def test_caffe_normalization_is_keras_resnet_preprocessing():
    x = np.random.default_rng(4).random((2, 3, 5, 3)).astype("float32")
    want = keras.applications.resnet.preprocess_input(255.0 * x)
    np.testing.assert_allclose(np.asarray(ImageNormalization("caffe")(x)), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="mode='tf'"):
        ImageNormalization("tf")


@pytest.mark.parametrize(
    "layer",
    [
        MirrorPad2D(2, "symmetric"),
        CenterCrop2D(3),
        Upsample2D(4, "nearest"),
        ImageNormalization(),
        ImageNormalization("caffe"),
        FrozenBatchNormalization(epsilon=1e-3),
        GradientScale(0.25),
    ],
)
def test_layers_serialise(layer):
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is type(layer)
    assert {k: v for k, v in clone.get_config().items() if k != "name"} == {
        k: v for k, v in layer.get_config().items() if k != "name"
    }


def test_upsample_trains_in_half_precision_under_xla():
    # XLA on CPU refused the gradient of a float16 bilinear resize after a ReLU (mixed precision + --jit).
    x = tf.Variable(np.random.default_rng(2).normal(size=(1, 3, 5, 2)).astype("float16"))
    layer = Upsample2D(2, "bilinear", dtype="mixed_float16")

    @tf.function(jit_compile=True)
    def grad():
        with tf.GradientTape() as tape:
            y = layer(tf.nn.relu(x))
            loss = tf.reduce_sum(tf.cast(y, tf.float32))
        return y, tape.gradient(loss, x)

    y, g = grad()
    assert y.dtype == tf.float16 and tuple(y.shape) == (1, 6, 10, 2)
    assert g.dtype == tf.float16
    want = Upsample2D(2, "bilinear")(tf.nn.relu(tf.cast(x, tf.float32)))
    np.testing.assert_allclose(y.numpy().astype("float32"), want.numpy(), atol=2e-3)


@pytest.mark.parametrize("mode", ["reflect", "symmetric"])
@pytest.mark.parametrize("size", [2, 3, 7])
def test_mirror_index_reads_what_numpy_padding_writes(mode, size):
    # np.pad's reflect and symmetric modes are MirrorPad2D's (tf.pad's), one pixel or more.
    pad = size - 1 if mode == "reflect" else size
    want = np.pad(np.arange(size), pad, mode=mode)
    index = np.arange(-pad, size + pad)
    np.testing.assert_array_equal(mirror_index(index, size, mode), want)
    np.testing.assert_array_equal(mirror_index(tf.constant(index), size, mode).numpy(), want)
    assert [mirror_index(int(i), size, mode) for i in index] == want.tolist()
    with pytest.raises(ValueError, match="mode='zero'"):
        mirror_index(index, size, "zero")


@pytest.mark.parametrize("factor", [0.0, 0.1, 1.0])
def test_gradient_scale_is_the_identity_forward_and_scales_the_gradient(factor):
    x = tf.constant(np.random.default_rng(3).normal(size=(4, 7)).astype("float32") * 1e3)
    weights = tf.constant(np.random.default_rng(4).normal(size=(4, 7)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = GradientScale(factor)(x)
        loss = tf.reduce_sum(tf.sin(y) * weights)
    np.testing.assert_array_equal(y.numpy(), x.numpy())  # bit for bit
    # d/dx sum(sin(x) * w) = cos(x) * w, written out independently of the layer.
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), factor * np.cos(x.numpy()) * weights.numpy(), rtol=1e-6)
