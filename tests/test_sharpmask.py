import keras
import numpy as np
import pytest
import tensorflow as tf

from sharpmask_tf.config import get_config
from sharpmask_tf.layers import CenterCrop2D
from sharpmask_tf.sharpmask import (
    SharpMask,
    build_model,
    copy_weights,
    is_sharpmask,
    model_geometry,
    refinement_split,
)

X = np.random.default_rng(0).random((2, 96, 96, 3)).astype("float32")
# The paper's patch, mask and refinement geometry on the small preset's trunk.
PAPER_GEOMETRY = ["model.patch_size=160", "model.mask_size=56", "model.refine_k=32", "model.object_dim=512"]


@pytest.fixture(scope="module")
def resnet50_sharpmask():
    return build_model(get_config("sharpmask_resnet50"), trunk_weights=False)


def _refinement_params(model):
    return model.get_layer("skip").count_params() + model.get_layer("refine").count_params()


def test_parameter_counts_of_the_resnet50_preset(resnet50_sharpmask):
    model = resnet50_sharpmask
    assert _refinement_params(model) == pytest.approx(2.75e6, rel=0.05)
    assert model.count_params() - _refinement_params(model) == pytest.approx(17.3e6, rel=0.03)


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(batch):
    model = build_model(get_config("small", PAPER_GEOMETRY))
    out = model(np.random.default_rng(0).random((batch, 192, 192, 3)).astype("float32"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "masks": (batch, 160, 160),
        "scores": (batch, 1),
        "coarse_masks": (batch, 56, 56),
    }


def test_each_refinement_stage_doubles_the_size():
    refine = build_model(get_config("small", PAPER_GEOMETRY)).get_layer("refine")
    stages = [refine.get_layer("refine_m1_reshape")] + [refine.get_layer(f"refine{i}_up") for i in range(1, 5)]
    probe = keras.Model(refine.inputs, [s.output for s in stages])
    outs = probe([np.zeros((1, *t.shape[1:]), "float32") for t in refine.inputs])
    assert [tuple(o.shape[1:]) for o in outs] == [(10, 10, 32), (20, 20, 16), (40, 40, 8), (80, 80, 4), (160, 160, 2)]


def test_refinement_taps_are_the_papers(resnet50_sharpmask):
    refine = resnet50_sharpmask.get_layer("refine")
    assert [tuple(t.shape[1:]) for t in refine.inputs] == [(512,), (10, 10, 16), (20, 20, 8), (40, 40, 4), (80, 80, 2)]


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="refine_k=24"):
        SharpMask(refine_k=24)


def test_keras_save_load_gives_identical_outputs(tmp_path):
    model = build_model(get_config("small"))
    path = str(tmp_path / "sharpmask.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    want, got = model(X), loaded(X)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_geometry_is_read_from_a_reloaded_model(tmp_path):
    model = build_model(get_config("small", ["model.patch_size=48", "model.context=32"]))
    assert model_geometry(model) == (48, 32) and is_sharpmask(model)
    model.save(tmp_path / "sharpmask.keras")
    loaded = keras.saving.load_model(tmp_path / "sharpmask.keras")
    assert isinstance(loaded, SharpMask) and is_sharpmask(loaded)
    assert model_geometry(loaded) == (48, 32)
    assert loaded.get_config() == model.get_config()


def test_geometry_is_not_recovered_from_a_plain_models_crop():
    inputs = keras.Input((96, 96, 3), name="images")
    plain = keras.Model(inputs, CenterCrop2D(1, name="head_crop")(inputs))
    assert not is_sharpmask(plain)
    with pytest.raises(ValueError, match="Expected a DeepMask or SharpMask model"):
        model_geometry(plain)


def test_refinement_split_of_a_reloaded_model(tmp_path):
    model = build_model(get_config("small"))
    model.save(tmp_path / "sharpmask.keras")
    loaded = keras.saving.load_model(tmp_path / "sharpmask.keras")
    frozen, refinement = refinement_split(loaded)
    features = frozen(X)
    assert [tuple(f.shape) for f in features] == [
        (2, 128),
        (2, 48, 48, 16),
        (2, 24, 24, 64),
        (2, 12, 12, 128),
        (2, 6, 6, 256),
    ]
    np.testing.assert_allclose(np.asarray(refinement(features)), np.asarray(model(X)["masks"]), atol=1e-5)
    trained = {v.path for v in refinement.trainable_variables}
    assert trained == {v.path for v in loaded.get_layer("skip").weights + loaded.get_layer("refine").weights}
    assert trained.isdisjoint(v.path for v in frozen.weights)
    with pytest.raises(ValueError, match="needs a SharpMask"):
        refinement_split(build_model(get_config("small", ["model.refinement=false"])))


def test_config_round_trip():
    model = build_model(get_config("small"))
    clone = SharpMask.from_config(model.get_config())
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
    clone.set_weights(model.get_weights())
    for k, v in model(X).items():
        np.testing.assert_allclose(np.asarray(clone(X)[k]), np.asarray(v), atol=1e-5)


@pytest.mark.parametrize("refinement", [True, False])
def test_saved_model_export_matches_the_live_model(tmp_path, refinement):
    model = build_model(get_config("small", [f"model.refinement={str(refinement).lower()}"]))
    path = str(tmp_path / "saved")
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    got = reloaded.serve(tf.constant(X))
    want = model(X)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), np.asarray(want[k]), atol=1e-5)


def test_copy_weights_carries_deepmask_into_sharpmask():
    deep = build_model(get_config("small", ["model.refinement=false"]))
    sharp = build_model(get_config("small"))
    copied = copy_weights(deep, sharp)
    assert "head_object" in copied and "conv1_conv" in copied and "score_logits" in copied
    d, s = deep(X), sharp(X)
    np.testing.assert_allclose(np.asarray(s["coarse_masks"]), np.asarray(d["masks"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s["scores"]), np.asarray(d["scores"]), atol=1e-5)
    with pytest.raises(ValueError, match="different configs"):
        copy_weights(deep, build_model(get_config("small", ["model.object_dim=64"])))


# ----------------------------------------------------------------------------- the refinement layouts

# SharpMask.lua's horizontal nets' first two widths (nhu1, nhu2), module 1 (conv4) to 4 (conv1).
REFERENCE_SKIP_WIDTHS = [(1024, 64), (512, 64), (256, 64), (64, 32)]
REFERENCE = ["model.refinement_layout=reference", "model.padding=symmetric", "model.upsampling=nearest"]


def _conv_valid(x, kernel, bias):
    """An independent 3x3 valid convolution: x (B, H+2, W+2, C), kernel (3, 3, C, O)."""
    h, w = x.shape[1] - 2, x.shape[2] - 2
    out = sum(
        np.einsum("bhwc,co->bhwo", x[:, dy : dy + h, dx : dx + w], kernel[dy, dx]) for dy in range(3) for dx in range(3)
    )
    return out + bias


def _random_weights(model, seed):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        fan_in = np.prod(w.shape[:-1]) if len(w.shape) > 1 else 4
        w.assign(rng.normal(0, 1 / np.sqrt(fan_in), w.shape).astype("float32"))


@pytest.mark.parametrize("padding", ["reflect", "symmetric"])
@pytest.mark.parametrize("context", [16, 0])
def test_the_papers_module_is_a_conv_of_the_concat_of_mask_and_skip_features(padding, context):
    # Fig. 7: the vertical conv of M_i plus the linear skip conv S_i* is one 3x3 conv of
    # concat(M_i, S_i). S_i* runs on the whole (context-padded) map before the window is cut, so
    # at the window's border it reads S_i's real neighbours where M_i is mirror-padded; with no
    # context the window is the map and both are mirror-padded.
    model = build_model(get_config("small", [f"model.context={context}", f"model.padding={padding}"]))
    skip, refine = model.get_layer("skip"), model.get_layer("refine")
    _random_weights(skip, seed=3)
    _random_weights(refine, seed=4)
    frozen, _ = refinement_split(model)
    image = np.random.default_rng(4).random((2, 64 + 2 * context, 64 + 2 * context, 3)).astype("float32")
    objects, *taps = (np.asarray(f) for f in frozen(image))
    taps = dict(zip(("conv1", "conv2", "conv3", "conv4"), taps))
    skip_probe = keras.Model(skip.inputs, [skip.get_layer(f"refine{i}_skip_conv2").output for i in range(1, 5)])
    features = [np.asarray(f) for f in skip_probe(taps)]
    terms = skip(taps)
    crops = [context // s for s in (16, 8, 4, 2)]
    windows = [
        np.asarray(terms[f"skip{i}"])[:, c : t.shape[1] - c, c : t.shape[2] - c]
        for i, (c, t) in enumerate(zip(crops, features), start=1)
    ]
    stages = [refine.get_layer("refine_m1_reshape")] + [refine.get_layer(f"refine{i}_up") for i in range(1, 4)]
    probe = keras.Model(
        refine.inputs, [s.output for s in stages] + [refine.get_layer(f"refine{i}_add").output for i in range(1, 5)]
    )
    outputs = [np.asarray(o) for o in probe([objects, *windows])]
    for i in range(1, 5):
        m, want = outputs[i - 1], outputs[3 + i]
        s, c = features[i - 1], crops[i - 1]
        n = m.shape[1]
        m_padded = np.pad(m, [(0, 0), (1, 1), (1, 1), (0, 0)], mode=padding)  # NumPy's modes are ours
        if c:
            s_around = s[:, c - 1 : c + n + 1, c - 1 : c + n + 1]
        else:
            s_around = np.pad(s, [(0, 0), (1, 1), (1, 1), (0, 0)], mode=padding)
        vertical = refine.get_layer(f"refine{i}_vertical_conv1")
        skip_conv = skip.get_layer(f"refine{i}_skip_conv3")
        kernel = np.concatenate([np.asarray(vertical.kernel), np.asarray(skip_conv.kernel)], axis=2)
        bias = np.asarray(vertical.bias) + np.asarray(skip_conv.bias)
        got = _conv_valid(np.concatenate([m_padded, s_around], axis=-1), kernel, bias)
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(want, got, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_the_papers_skip_features_and_their_linear_conv():
    # S_i has k_s^i = k / 2^(i-1) channels after a ReLU; the term added to the vertical conv is a
    # linear conv of it to k_m^(i+1) channels, so it takes negative values too.
    model = build_model(get_config("sharpmask_resnet50"), trunk_weights=False)
    skip = model.get_layer("skip")
    for i, channels in enumerate((32, 16, 8, 4), start=1):
        features = skip.get_layer(f"refine{i}_skip_conv2")
        term = skip.get_layer(f"refine{i}_skip_conv3")
        assert features.filters == channels and features.get_config()["activation"] == "relu"
        assert term.filters == channels // 2 and term.get_config()["activation"] == "linear"
        assert skip.get_layer(f"refine{i}_skip_conv3_pad").input is features.output
    _random_weights(skip, seed=0)
    rng = np.random.default_rng(1)
    out = skip({t.name: rng.random((1, 12, 12, t.shape[-1])).astype("float32") for t in skip.inputs})
    assert all(np.asarray(v).min() < 0 for v in out.values())


def _layer_chain(model, names, source):
    """The layers `names` of `model`, checked to feed each other in order from tensor `source`."""
    layers = [model.get_layer(name) for name in names]
    for layer in layers:
        assert layer.input is source, f"{layer.name} does not take the previous layer's output"
        source = layer.output
    return layers


def _padded_conv_shapes(layers, padding):
    """[(kernel shape, activation)] of alternating 1-pixel pads and convs, checking the pads."""
    pads, convs = layers[0::2], layers[1::2]
    assert all(p.padding == 1 and p.mode == padding for p in pads)
    return [(tuple(c.kernel.shape), c.get_config()["activation"]) for c in convs]


def test_the_reference_layout_is_sharpmask_lua():
    # SharpMask.lua with km = ks = 32: createHorizontal, createVertical, the final conv, and
    # the parameter count it prints (nh + nv), from its formulas.
    model = build_model(get_config("sharpmask_resnet50", REFERENCE), trunk_weights=False)
    skip, refine = model.get_layer("skip"), model.get_layer("refine")
    km = ks = 32
    nh = nv = 0
    taps = {t.name: t for t in skip.inputs}
    for i, (nhu1, nhu2) in enumerate(REFERENCE_SKIP_WIDTHS, start=1):
        n_inps = ks // 2 ** (i - 1)
        names = [f"refine{i}_skip_conv{j}{suffix}" for j in (1, 2, 3) for suffix in ("_pad", "")]
        tap = ("conv4", "conv3", "conv2", "conv1")[i - 1]
        layers = _layer_chain(skip, names, taps[tap])
        assert _padded_conv_shapes(layers, "symmetric") == [
            ((3, 3, nhu1, nhu2), "relu"),
            ((3, 3, nhu2, n_inps), "relu"),
            ((3, 3, n_inps, n_inps // 2), "linear"),
        ]
        nh += (9 * nhu1 + 1) * nhu2 + (9 * nhu2 + 1) * n_inps + (9 * n_inps + 1) * (n_inps // 2)
    fsz = 10
    dense = refine.get_layer("refine_m1")
    assert tuple(dense.kernel.shape) == (512, fsz * fsz * km)
    assert refine.get_layer("refine_m1_reshape").target_shape == (fsz, fsz, km)
    nv += (512 + 1) * fsz * fsz * km
    source = refine.get_layer("refine_m1_reshape").output
    for i in range(1, 5):
        n_inps = km // 2 ** (i - 1)
        names = [f"refine{i}_vertical_conv1_pad", f"refine{i}_vertical_conv1", f"refine{i}_vertical_relu1"]
        names += [f"refine{i}_vertical_conv2_pad", f"refine{i}_vertical_conv2", f"refine{i}_add"]
        layers = _layer_chain(refine, names[:3], source)
        layers += _layer_chain(refine, names[3:5], layers[-1].output)
        assert layers[2].get_config()["activation"] == "relu"
        assert _padded_conv_shapes(layers[:2] + layers[3:], "symmetric") == [
            ((3, 3, n_inps, n_inps), "linear"),
            ((3, 3, n_inps, n_inps // 2), "linear"),
        ]
        add = refine.get_layer(f"refine{i}_add")
        assert add.input[0] is layers[-1].output and add.input[1] is refine.inputs[i]
        relu, up = _layer_chain(refine, [f"refine{i}_relu", f"refine{i}_up"], add.output)
        assert relu.get_config()["activation"] == "relu" and up.factor == 2 and up.interpolation == "nearest"
        source = up.output
        nv += (9 * n_inps + 1) * n_inps + (9 * n_inps + 1) * (n_inps // 2)
    out = _layer_chain(refine, ["refine_out_pad", "refine_out"], source)
    assert _padded_conv_shapes(out, "symmetric") == [((3, 3, km // 16, 1), "linear")]
    nv += 9 * km // 16 + 1
    assert skip.count_params() + refine.count_params() == nh + nv == pytest.approx(2.75e6, rel=0.002)


def test_the_layouts_share_the_skip_nets_and_differ_in_the_vertical_ones():
    paper = build_model(get_config("small"))
    reference = build_model(get_config("small", ["model.refinement_layout=reference"]))
    configs = lambda net: [layer.get_config() for layer in net.layers]  # noqa: E731
    assert configs(paper.get_layer("skip")) == configs(reference.get_layer("skip"))
    convs = lambda net: {layer.name for layer in net.layers if "vertical" in layer.name and layer.weights}  # noqa: E731
    assert convs(paper.get_layer("refine")) == {f"refine{i}_vertical_conv1" for i in range(1, 5)}
    assert convs(reference.get_layer("refine")) == {f"refine{i}_vertical_conv{j}" for i in range(1, 5) for j in (1, 2)}


def test_parameter_counts_of_the_papers_layout(resnet50_sharpmask):
    # Skip nets as for the reference, one 3x3 conv n -> n/2 per vertical module: under 3M.
    skip_nets = sum(
        (9 * a + 1) * b + (9 * b + 1) * n + (9 * n + 1) * (n // 2)
        for (a, b), n in zip(REFERENCE_SKIP_WIDTHS, (32, 16, 8, 4))
    )
    vertical = (512 + 1) * 3200 + sum((9 * n + 1) * (n // 2) for n in (32, 16, 8, 4)) + 9 * 2 + 1
    model = resnet50_sharpmask
    assert _refinement_params(model) == skip_nets + vertical < 3e6


def test_unknown_layouts_are_refused():
    with pytest.raises(ValueError, match="refinement_layout must be one of"):
        get_config("small", ["model.refinement_layout=torch"])
    with pytest.raises(ValueError, match="refinement_layout='torch'"):
        SharpMask(refinement_layout="torch")
