"""Inference copies with BatchNorm and mirror pads folded into the convolutions."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sharpmask_tf.config import get_config
from sharpmask_tf.fold import fold_batch_norm
from sharpmask_tf.sharpmask import build_model


def test_fold_batch_norm_keeps_the_trunk_outputs():
    tf.keras.utils.set_random_seed(5)
    trunk = build_model(get_config("small")).get_layer("trunk")
    rng = np.random.default_rng(0)
    for layer in trunk.layers:
        if layer.name.endswith("_bn"):  # non-trivial statistics
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    folded = fold_batch_norm(trunk)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    x = rng.uniform(-1, 1, (1, 77, 93, 3)).astype(np.float32)
    want, got = trunk(x), folded(x)
    for tap in ("conv1", "conv2", "conv3", "conv4"):
        np.testing.assert_allclose(got[tap], want[tap], atol=1e-4)


# Skip nets whose every convolution shrinks its channels (refine_k=16, widths 32 / 8), and the
# small preset's, whose finest ones widen them (conv1's 16 channels to 32; conv2's 64 to 64).
NARROWING = ("model.refine_k=16", "model.refine_skip_hidden=32", "model.refine_skip_hidden_last=8")


@pytest.mark.parametrize("padding", ["reflect", "symmetric", "zero"])
@pytest.mark.parametrize("height,width", [(2, 2), (2, 5), (7, 3), (13, 17)])
@pytest.mark.parametrize("geometry", [NARROWING, ()], ids=["narrowing", "preset"])
def test_folded_skip_nets_keep_their_outputs_without_padded_copies(padding, height, width, geometry):
    # Where a skip net's convolution shrinks channels, the copy drops its mirror pad and recomputes
    # the output borders (corners included) from the input; maps as small as 2x2. Where it does
    # not, the pad stays (as the trunk's: the next test).
    tf.keras.utils.set_random_seed(6)
    skip = build_model(get_config("small", [*geometry, f"model.padding={padding}"])).get_layer("skip")
    rng = np.random.default_rng(1)
    for layer in skip.layers:  # biases too, so every border term matters
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    folded = fold_batch_norm(skip)
    names = {type(layer).__name__ for layer in folded.layers}
    assert "_MirrorBorderConv2D" in names
    assert ("MirrorPad2D" in names) == (geometry != NARROWING)
    taps = {t.name: rng.uniform(0, 1, (2, height, width, t.shape[-1])).astype(np.float32) for t in skip.inputs}
    want, got = skip(taps), folded(taps)
    for name in want:  # float rounding of sums of terms as large as the outputs
        np.testing.assert_allclose(got[name], want[name], atol=2e-5 * max(1.0, np.abs(want[name]).max()))


def test_folded_trunk_keeps_its_pads_where_channels_do_not_shrink():
    trunk = build_model(get_config("small")).get_layer("trunk")
    folded = fold_batch_norm(trunk)
    pads = lambda model: sorted(layer.name for layer in model.layers if type(layer).__name__ == "MirrorPad2D")  # noqa: E731
    assert pads(folded) == pads(trunk)
