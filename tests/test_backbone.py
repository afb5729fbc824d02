import keras
import numpy as np
import pytest

from sharpmask_tf.backbone import load_imagenet_weights, resnet_trunk
from sharpmask_tf.layers import MirrorPad2D


def test_tap_shapes_for_a_192_patch():
    trunk = resnet_trunk((1, 1, 1), 64)  # the tap shapes depend on the width, not the block counts
    taps = trunk(np.zeros((1, 192, 192, 3), "float32"))
    shapes = {k: tuple(v.shape) for k, v in taps.items()}
    assert shapes == {
        "conv1": (1, 96, 96, 64),
        "conv2": (1, 48, 48, 256),
        "conv3": (1, 24, 24, 512),
        "conv4": (1, 12, 12, 1024),
    }


def test_small_trunk_keeps_taps_and_strides():
    taps = resnet_trunk((1, 1, 1), 16)(np.zeros((2, 96, 80, 3), "float32"))
    assert [tuple(t.shape[1:3]) for t in taps.values()] == [(48, 40), (24, 20), (12, 10), (6, 5)]


@pytest.mark.parametrize("mode", ["reflect", "symmetric"])
def test_no_zero_padding_in_a_mirror_trunk(mode):
    trunk = resnet_trunk((1, 1, 1), 8, padding=mode)
    spatial = [
        layer for layer in trunk.layers if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size != (1, 1)
    ]
    assert len(spatial) == 1 + 3  # conv1 and one 3x3 conv per block
    for conv in spatial:
        assert conv.padding == "valid", conv.name
        source = conv._inbound_nodes[0].parent_nodes[0].operation
        assert isinstance(source, MirrorPad2D) and source.mode == mode, conv.name
        assert source.padding == conv.kernel_size[0] // 2
    assert not [layer for layer in trunk.layers if isinstance(layer, keras.layers.ZeroPadding2D)]
    assert all(layer.padding == "valid" for layer in trunk.layers if isinstance(layer, keras.layers.MaxPooling2D))


def _random_resnet50():
    ref = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for layer in ref.layers:
        if layer.weights:
            # positive variances, everything else random, so a mis-copied tensor shows
            layer.set_weights(
                [
                    np.abs(rng.normal(1.0, 0.1, w.shape)).astype("float32")
                    if "variance" in v.name
                    else rng.normal(0, 0.05, w.shape).astype("float32")
                    for v, w in zip(layer.weights, layer.get_weights())
                ]
            )
    return ref


@pytest.fixture(scope="module")
def random_resnet50(tmp_path_factory):
    """Keras' ResNet50 with random weights, and the weights file it saved."""
    ref = _random_resnet50()
    path = str(tmp_path_factory.mktemp("resnet50") / "resnet50_notop.weights.h5")
    ref.save_weights(path)
    return ref, path


def test_imagenet_loader_copies_every_tensor_from_a_weights_file(random_resnet50):
    ref, path = random_resnet50
    trunk = resnet_trunk()
    copied = load_imagenet_weights(trunk, path)
    ref_layers = [layer for layer in ref.layers if layer.weights and not layer.name.startswith("conv5")]
    assert sorted(copied) == sorted(layer.name for layer in ref_layers)
    for layer in ref_layers:
        for want, got in zip(layer.get_weights(), trunk.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(got, want)
    # With zero padding the trunk is Keras' ResNet50 through conv4: same numbers.
    zero = resnet_trunk(padding="zero")
    load_imagenet_weights(zero, path)
    x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype("float32")
    want = keras.Model(ref.input, ref.get_layer("conv4_block6_out").output)(x)
    np.testing.assert_allclose(np.asarray(zero(x)["conv4"]), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_imagenet_loader_refuses_a_small_trunk(random_resnet50):
    _, path = random_resnet50
    with pytest.raises(ValueError, match="ResNet-50 geometry"):
        load_imagenet_weights(resnet_trunk((1, 1, 1), 16), path)
