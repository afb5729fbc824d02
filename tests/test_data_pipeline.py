import numpy as np
import pytest
import tensorflow as tf
from data_testing import config_for, crowded_dataset, malformed_dataset

from sharpmask_tf.data import DatasetError, make_dataset, make_validation_patches


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    return crowded_dataset(str(tmp_path_factory.mktemp("crowded")))


def take(dataset, n):
    return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(n)]


def test_stage1_batches_are_all_mask_or_all_score_with_static_shapes(crowded):
    config = config_for(*crowded)
    dataset = make_dataset(config, batch_size=4)
    spec = dataset.element_spec
    assert spec["images"].shape == (4, 96, 96, 3) and spec["masks"].shape == (4, 48, 48)
    assert spec["scores"].shape == (4, 1) and spec["mask_weight"].shape == (4,) and spec["score_weight"].shape == (4,)
    assert all(s.dtype == tf.float32 for s in spec.values())
    kinds = []
    for batch in take(dataset, 24):
        if batch["score_weight"][0] == 1:
            kinds.append("score")
            assert np.all(batch["score_weight"] == 1) and np.all(batch["mask_weight"] == 0)
        else:
            kinds.append("mask")
            assert np.all(batch["mask_weight"] == 1) and np.all(batch["score_weight"] == 0)
            assert np.all(batch["scores"] == 1) and np.all(np.isin(batch["masks"], (-1.0, 1.0)))
            assert np.all((batch["masks"] > 0).any(axis=(1, 2)))
        assert 0 <= batch["images"].min() <= batch["images"].max() <= 1
    assert 4 <= kinds.count("score") <= 20  # score_frequency 0.5 over 24 batches


def test_stage2_is_mask_only_with_patch_size_labels(crowded):
    config = config_for(*crowded, "data.score_frequency=1.0")
    batches = take(make_dataset(config, stage=2, batch_size=2), 4)
    assert all(b["masks"].shape == (2, 64, 64) and np.all(b["mask_weight"] == 1) for b in batches)


def test_default_batch_size_and_determinism(crowded):
    config = config_for(*crowded)
    a = take(make_dataset(config, seed=3), 2)
    b = take(make_dataset(config, seed=3), 2)
    c = take(make_dataset(config, seed=4), 2)
    assert a[0]["images"].shape[0] == config.training.batch_size
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["images"], c[0]["images"])


def test_two_input_pipelines_see_distinct_streams(crowded):
    config = config_for(*crowded)
    streams = []
    for pipeline_id in (0, 1, 0):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        streams.append(take(make_dataset(config, batch_size=8, input_context=context), 3))
    assert streams[0][0]["images"].shape[0] == 4  # the per-replica share of the global batch
    for x, y in zip(streams[0], streams[2]):
        np.testing.assert_array_equal(x["images"], y["images"])
    for x, y in zip(streams[0], streams[1]):
        assert not np.array_equal(x["images"], y["images"])


def test_feeds_a_mirrored_strategy(crowded):
    config = config_for(*crowded)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    distributed = strategy.distribute_datasets_from_function(
        lambda context: make_dataset(config, batch_size=8, input_context=context)
    )
    batch = next(iter(distributed))
    shards = strategy.experimental_local_results(batch["images"])
    assert len(shards) == 2 and all(s.shape == (4, 96, 96, 3) for s in shards)


def test_one_epoch_without_repeat(crowded):
    config = config_for(*crowded)
    dataset = make_dataset(config, batch_size=4, repeat=False)
    positives = sum(1 for _ in dataset)
    assert positives == dataset.cardinality().numpy() >= 1


def test_validation_patches_are_fixed_mask_samples(crowded):
    config = config_for(*crowded)
    a = make_validation_patches(config, 10, stage=1, seed=0)
    b = make_validation_patches(config, 10, stage=1, seed=0)
    c = make_validation_patches(config, 10, stage=2, seed=0)
    assert (
        a["images"].shape == (10, 96, 96, 3) and a["masks"].shape == (10, 48, 48) and c["masks"].shape == (10, 64, 64)
    )
    assert np.all(a["mask_weight"] == 1) and np.all((a["masks"] > 0).any(axis=(1, 2)))
    np.testing.assert_array_equal(a["images"], b["images"])
    with pytest.raises(ValueError, match="num_patches"):
        make_validation_patches(config, 0, stage=1, seed=0)


def test_malformed_dataset_trains_through_in_skip_mode_and_fails_early_in_error_mode(tmp_path):
    path, image_dir = malformed_dataset(str(tmp_path))
    batches = take(make_dataset(config_for(path, image_dir), batch_size=8), 6)
    assert len(batches) == 6 and all(np.isfinite(b["images"]).all() for b in batches)
    with pytest.raises(DatasetError, match="image file not found"):
        make_dataset(config_for(path, image_dir, "data.on_bad_annotation=error"))


def test_bad_arguments_raise(crowded):
    config = config_for(*crowded)
    with pytest.raises(ValueError, match="split"):
        make_dataset(config, split="test")
    with pytest.raises(ValueError, match="stage"):
        make_dataset(config, stage=3)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(config, batch_size=0)
