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
