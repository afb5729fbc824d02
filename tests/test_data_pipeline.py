import numpy as np
import pytest
import tensorflow as tf
from data_testing import (
    annotation,
    compressed_rle,
    config_for,
    crowded_dataset,
    disc_mask,
    image_record,
    malformed_dataset,
    truncated_image_dataset,
    write_image,
    write_json,
)
from strategies import two_cpus

from sharpmask_tf.data import DatasetError, make_dataset, make_validation_patches, pipeline
from sharpmask_tf.data.coco import CocoDataset
from sharpmask_tf.data.sampler import PatchSampler


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


@pytest.mark.parametrize("first_step, mask_batches", [(0, 3), (2, 1), (5, 0)])
def test_mask_only_steps_come_first_counted_from_the_streams_first_step(crowded, first_step, mask_batches):
    """With every other batch a score batch (score_frequency 1), the steps before
    data.mask_only_steps = 3 are mask batches; a stream resumed at `first_step` keeps the rest."""
    config = config_for(*crowded, "data.score_frequency=1.0", "data.mask_only_steps=3")
    batches = take(make_dataset(config, stage=1, batch_size=2, first_step=first_step), 5)
    kinds = ["mask" if np.all(b["mask_weight"] == 1) else "score" for b in batches]
    assert kinds == ["mask"] * mask_batches + ["score"] * (5 - mask_batches)
    assert all(np.all(b["score_weight"] == (k == "score")) for b, k in zip(batches, kinds))


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
    strategy = two_cpus()
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


@pytest.fixture(autouse=True)
def split_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SHARPMASK_TF_CACHE", str(tmp_path_factory.mktemp("cache")))


def reference_batch(config, stage, seed, index, patches_per_image=1):
    """Batch `index` of make_dataset redrawn from its seed and cut by the NumPy sampler."""
    d = config.data
    sampler = PatchSampler.from_config(CocoDataset(d.train_annotations, d.train_images), config, stage)
    rng = np.random.default_rng([seed, pipeline._TRAIN_STREAM, 0, stage, index])
    # One replica: batch `index` is global step `index`, whose kind has a stream of its own.
    kind_draw = np.random.default_rng([seed, pipeline._KIND_STREAM, stage, index]).random()
    kind = "score" if kind_draw < (d.score_frequency if stage == 1 else 0.0) else "mask"
    windows = sampler.draw_windows(rng, kind, config.training.batch_size, patches_per_image)
    images, masks = [], []
    for w in windows:
        image = sampler.crop_image(w)
        mask = sampler.crop_label(w) if kind == "mask" else np.full((sampler.label_size,) * 2, -1.0, np.float32)
        images.append(image[:, ::-1] if w.flip else image)
        masks.append(mask[:, ::-1] if w.flip else mask)
    scores = [1.0 if w.annotation_id is not None else -1.0 for w in windows]
    return kind, np.stack(images), np.stack(masks), np.array(scores, np.float32)[:, None]


def test_batches_are_the_numpy_samplers_patches(crowded):
    config = config_for(*crowded)
    for stage in (1, 2):
        batches = take(make_dataset(config, stage=stage, seed=5), 6)
        kinds = set()
        for index, batch in enumerate(batches):
            kind, images, masks, scores = reference_batch(config, stage, 5, index)
            kinds.add(kind)
            assert np.abs(batch["images"] - images).max() <= 1.01 / 255
            np.testing.assert_array_equal(batch["masks"], masks)
            np.testing.assert_array_equal(batch["scores"], scores)
            assert np.all(batch["mask_weight"] == (kind == "mask"))
        assert kinds == ({"mask", "score"} if stage == 1 else {"mask"})


def test_same_seed_and_step_give_the_same_batch(crowded):
    config = config_for(*crowded)
    for k in (1, 2):
        stream = take(make_dataset(config, seed=3, patches_per_image=k), 5)
        later = take(make_dataset(config, seed=3, patches_per_image=k).skip(4), 1)[0]
        for key in later:
            np.testing.assert_array_equal(later[key], stream[4][key])


def test_several_patches_per_image(crowded):
    config = config_for(*crowded)
    batches = take(make_dataset(config, stage=2, patches_per_image=4, seed=1), 3)
    for index, batch in enumerate(batches):
        _, images, masks, _ = reference_batch(config, 2, 1, index, patches_per_image=4)
        np.testing.assert_array_equal(batch["masks"], masks)
        # A group decodes once at its finest window's JPEG reduction: a coarser window is sampled from
        # finer pixels than it would be alone, otherwise the same patch.
        assert np.abs(batch["images"] - images).mean(axis=(1, 2, 3)).max() < 2 / 255
    with pytest.raises(ValueError, match="multiple of patches_per_image"):
        make_dataset(config, batch_size=6, patches_per_image=4)
    # data.patches_per_image is the default.
    configured = take(make_dataset(config_for(*crowded, "data.patches_per_image=4"), stage=2, seed=1), 3)
    for batch, expected in zip(configured, batches):
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected[key])


def test_changed_annotation_file_is_not_served_from_a_stale_cache(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    first, second = disc_mask(50, 50, 20), disc_mask(110, 70, 30)
    write_image(str(image_dir / "a.jpg"), objects=((first, (0, 0, 255)), (second, (0, 255, 0))))
    path = str(tmp_path / "instances.json")
    config = config_for(path, str(image_dir), "data.score_frequency=0")
    masks = []
    for mask, box in ((first, [30, 30, 40, 40]), (second, [80, 40, 60, 60])):
        write_json(path, [image_record(1, "a.jpg")], [annotation(1, 1, compressed_rle(mask), box)])
        batch = take(make_dataset(config, seed=0), 1)[0]
        _, _, expected, _ = reference_batch(config, 1, 0, 0)
        np.testing.assert_array_equal(batch["masks"], expected)
        masks.append(batch["masks"])
    assert not np.array_equal(masks[0], masks[1])


def test_undecodable_image_is_redrawn_or_raises_in_the_pipeline(tmp_path):
    path, image_dir = truncated_image_dataset(str(tmp_path))
    config = config_for(path, str(image_dir))
    batches = take(make_dataset(config, batch_size=8), 4)
    assert len(batches) == 4 and all(np.isfinite(b["images"]).all() for b in batches)
    split = pipeline.load_packed_split(config, "train")
    planner = pipeline.patch_planner(split, config.data, config.model, config.inference, 1)
    assert planner.sampler.skipped["undecodable image"] > 0
    with pytest.raises(tf.errors.OpError, match="truncated JPEG"):
        take(make_dataset(config_for(path, str(image_dir), "data.on_bad_annotation=error"), batch_size=8), 4)


def spread_reference(config, stage, seed, tag, round_, batch, k, replicas=1):
    """Round `round_` of the spread stream of kind tag 0 (mask) redrawn from its seed and cut by
    the NumPy sampler, dealt as the README says: step j, replica r takes window j of the groups
    [r * batch, (r + 1) * batch); returns the k * replicas batches' masks in stream order."""
    d = config.data
    sampler = PatchSampler.from_config(CocoDataset(d.train_annotations, d.train_images), config, stage)
    rng = np.random.default_rng([seed, pipeline._TRAIN_STREAM, 0, stage, tag, round_])
    windows = sampler.draw_windows(rng, "mask", replicas * batch * k, k)
    batches = []
    for j in range(k):
        for r in range(replicas):
            chosen = [windows[g * k + j] for g in range(r * batch, (r + 1) * batch)]
            masks = [sampler.crop_label(w)[:, ::-1] if w.flip else sampler.crop_label(w) for w in chosen]
            batches.append(np.stack(masks))
    return batches


def test_spread_patches_deal_an_images_windows_to_consecutive_batches(crowded):
    """Two rounds of stage 2 with 2 windows per image and batch 4: each batch takes one window of
    each of 4 groups, and a group's 2 windows go to consecutive batches."""
    config = config_for(*crowded, "data.patches_per_image=2", "data.spread_patches=true")
    batches = take(make_dataset(config, stage=2, batch_size=4, seed=2), 4)
    expected = spread_reference(config, 2, 2, 0, 0, 4, 2) + spread_reference(config, 2, 2, 0, 1, 4, 2)
    for batch, masks in zip(batches, expected):
        np.testing.assert_array_equal(batch["masks"], masks)
        assert np.all(batch["mask_weight"] == 1) and np.all(batch["scores"] == 1)
    # Without spreading the same windows' groups sit inside one batch.
    grouped = take(make_dataset(config.override(["data.spread_patches=false"]), stage=2, batch_size=4, seed=2), 1)
    assert not np.array_equal(grouped[0]["masks"], batches[0]["masks"])
    # The same (seed, step) gives the same batch.
    again = take(make_dataset(config, stage=2, batch_size=4, seed=2).skip(3), 1)[0]
    for key in again:
        np.testing.assert_array_equal(again[key], batches[3][key])


def test_spread_patches_keep_the_kind_of_every_step(crowded):
    """Stage 1's kinds (the mask-only start, then the per-step coin) are those of the stream
    without spreading, and score batches hold score samples of both signs."""
    overrides = ("data.patches_per_image=2", "data.mask_only_steps=3")
    plain = take(make_dataset(config_for(*crowded, *overrides), stage=1, batch_size=4, seed=4), 16)
    spread_config = config_for(*crowded, *overrides, "data.spread_patches=true")
    spread = take(make_dataset(spread_config, stage=1, batch_size=4, seed=4), 16)
    kinds = [["score" if b["score_weight"][0] else "mask" for b in s] for s in (plain, spread)]
    assert kinds[0] == kinds[1] and kinds[0][:3] == ["mask"] * 3 and "score" in kinds[0][3:]
    for batch, kind in zip(spread, kinds[1]):
        assert np.all(batch["score_weight"] == (kind == "score")) and np.all(batch["mask_weight"] == (kind == "mask"))
    scores = np.concatenate([b["scores"] for b, kind in zip(spread, kinds[1]) if kind == "score"])
    assert set(np.unique(scores).tolist()) == {-1.0, 1.0}


def test_spread_patches_give_each_replica_of_a_step_other_images(crowded):
    """Two local replicas: a round holds 2 x 4 groups; step j's two batches are window j of
    groups 0-3 and of groups 4-7."""
    config = config_for(*crowded, "data.patches_per_image=2", "data.spread_patches=true")
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=2)
    batches = take(make_dataset(config, stage=2, batch_size=8, input_context=context, seed=6), 4)
    expected = spread_reference(config, 2, 6, 0, 0, 4, 2, replicas=2)
    assert [b["masks"].shape[0] for b in batches] == [4] * 4
    for batch, masks in zip(batches, expected):
        np.testing.assert_array_equal(batch["masks"], masks)
