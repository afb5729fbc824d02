import numpy as np
import pytest
from data_testing import (
    annotation,
    compressed_rle,
    config_for,
    crowded_dataset,
    disc_mask,
    exact_dataset,
    image_record,
    truncated_image_dataset,
    write_image,
    write_json,
)
from pycocotools.coco import COCO

from sharpmask_tf.config import get_config
from sharpmask_tf.data.coco import CocoDataset
from sharpmask_tf.data.sampler import GREY, PatchSampler


def sampler_for(config, stage=1):
    d = config.data
    return PatchSampler.from_config(CocoDataset(d.train_annotations, d.train_images), config, stage)


def _spec_config(tmp_path):
    path, image_dir = crowded_dataset(str(tmp_path))
    config = get_config(
        "sharpmask_resnet50",
        [f"data.train_annotations={path}", f"data.train_images={image_dir}", "data.min_area=20"],
    )
    assert config.data.shift_jitter == 16 and config.model.input_size == 192
    return config, COCO(path)


def _assert_spec_bounds(config, coco, mask_windows, score_windows):
    """SPEC section 3's rules over windows of 500 mask and 1000 score samples."""
    canonical = config.data.object_fraction * config.model.patch_size
    positives = mask_windows + [w for w in score_windows if w.annotation_id is not None]
    negatives = [w for w in score_windows if w.annotation_id is None]
    assert 400 < len(negatives) < 600
    for w in positives:
        ann = coco.anns[w.annotation_id]
        assert not ann["iscrowd"]
        x, y, bw, bh = ann["bbox"]
        assert abs(x + bw / 2 - w.center_x) * w.scale <= 16 + 1e-6
        assert abs(y + bh / 2 - w.center_y) * w.scale <= 16 + 1e-6
        assert abs(np.log2(max(bw, bh) * w.scale / canonical)) <= 0.25 + 1e-9
    shifts = [
        abs(coco.anns[w.annotation_id]["bbox"][0] + coco.anns[w.annotation_id]["bbox"][2] / 2 - w.center_x) * w.scale
        for w in positives
    ]
    assert max(shifts) > 12  # the jitter is used, not just bounded
    near = 0
    for w in negatives:
        for ann in coco.imgToAnns[w.image_id]:  # crowd regions and tiny objects included
            x, y, bw, bh = ann["bbox"]
            offset = max(abs(x + bw / 2 - w.center_x), abs(y + bh / 2 - w.center_y)) * w.scale
            octaves = abs(np.log2(max(bw, bh) * w.scale / canonical))
            near += offset < 32 and octaves < 1
    assert near == 0


def test_positives_and_negatives_obey_the_spec_bounds_over_1000_samples(tmp_path):
    config, coco = _spec_config(tmp_path)
    sampler = sampler_for(config)
    rng = np.random.default_rng(0)
    _, mask_windows = sampler.sample_batch(rng, "mask", 500)
    batch, score_windows = sampler.sample_batch(rng, "score", 1000)
    np.testing.assert_array_equal(batch["scores"][:, 0] > 0, [w.annotation_id is not None for w in score_windows])
    _assert_spec_bounds(config, coco, mask_windows, score_windows)


@pytest.mark.parametrize("patches_per_image", [1, 4])
def test_the_pipelines_windows_obey_the_spec_bounds(tmp_path, patches_per_image):
    """`draw_windows`, which `make_dataset` cuts, by the same rules, one or several per image."""
    config, coco = _spec_config(tmp_path)
    sampler = sampler_for(config)
    rng = np.random.default_rng(0)
    mask_windows = sampler.draw_windows(rng, "mask", 500, patches_per_image)
    score_windows = sampler.draw_windows(rng, "score", 1000, patches_per_image)
    groups = [score_windows[i : i + patches_per_image] for i in range(0, 1000, patches_per_image)]
    for group in groups + [mask_windows[i : i + patches_per_image] for i in range(0, 500, patches_per_image)]:
        assert len({w.image_id for w in group}) == 1
    for group in groups:
        assert len({w.annotation_id is None for w in group}) == 1  # one sign per group
    _assert_spec_bounds(config, coco, mask_windows, score_windows)


def test_negative_check_compares_positions_at_the_window_scale():
    """One object of longest side 40 px at (100, 100); canonical scale 91.43/40 ~ 2.29."""
    config = get_config("sharpmask_resnet50")
    sampler = object.__new__(PatchSampler)
    sampler.canonical_size = config.data.object_fraction * config.model.patch_size
    sampler.negative_shift, sampler.negative_scale = 32.0, 1.0
    sampler._objects = [np.array([[100.0, 100.0, 40.0]])]
    s0 = sampler.canonical_scale(40.0)
    assert not sampler.is_negative(0, 100, 100, s0)
    assert not sampler.is_negative(0, 100, 100, s0 * 2**0.99)
    assert sampler.is_negative(0, 100, 100, s0 * 2**1.01)
    assert sampler.is_negative(0, 100, 100, s0 / 2**1.01)
    # 31 vs 33 patch pixels at a scale half an octave above canonical: image offsets differ by scale.
    s = s0 * 2**0.5
    assert not sampler.is_negative(0, 100 + 31 / s, 100, s)
    assert sampler.is_negative(0, 100 + 33 / s, 100, s)
    assert not sampler.is_negative(0, 100 + 31 / s, 100 - 31 / s, s)


def test_labels_equal_pycocotools_masks_without_jitter(tmp_path):
    path, image_dir = exact_dataset(str(tmp_path))
    config = config_for(
        path, image_dir, "data.scale_jitter=0", "data.shift_jitter=0", "data.flip_probability=0", "data.label_size=32"
    )
    coco = COCO(path)
    for stage, label_size, step in ((2, 64, 1), (1, 32, 2)):
        sampler = sampler_for(config, stage)
        assert sampler.label_size == label_size
        batch, windows = sampler.sample_batch(np.random.default_rng(1), "mask", 30)
        assert {w.annotation_id for w in windows} == {1, 2, 3}
        for label, w in zip(batch["masks"], windows):
            assert w.scale == 1.0
            x0, y0 = int(w.center_x) - 32, int(w.center_y) - 32
            full = np.pad(coco.annToMask(coco.anns[w.annotation_id]), 64)
            expected = full[64 + y0 : 64 + y0 + 64, 64 + x0 : 64 + x0 + 64][step // 2 :: step, step // 2 :: step]
            got = label > 0
            intersection = np.logical_and(got, expected).sum()
            union = np.logical_or(got, expected).sum()
            assert union > 0 and intersection / union == 1.0
            assert set(np.unique(label)) == {-1.0, 1.0}


def test_flip_mirrors_image_and_label_together(tmp_path):
    path, image_dir = exact_dataset(str(tmp_path))
    plain = sampler_for(config_for(path, image_dir, "data.flip_probability=0"))
    flipped = sampler_for(config_for(path, image_dir, "data.flip_probability=1"))
    a, wa = plain.sample_batch(np.random.default_rng(3), "mask", 8)
    b, wb = flipped.sample_batch(np.random.default_rng(3), "mask", 8)
    assert not any(w.flip for w in wa) and all(w.flip for w in wb)
    np.testing.assert_array_equal(b["images"], a["images"][:, :, ::-1])
    np.testing.assert_array_equal(b["masks"], a["masks"][:, :, ::-1])
    assert not np.array_equal(a["masks"], b["masks"])  # the objects are not symmetric


def test_outside_the_image_is_grey(tmp_path):
    """An object in the image's top-left corner: its 96 px input patch starts 32 px outside."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    mask = np.zeros((120, 160), np.uint8)
    mask[0:32, 0:32] = 1
    write_image(str(image_dir / "a.jpg"), objects=((mask, (0, 0, 255)),))
    path = str(tmp_path / "instances.json")
    write_json(path, [image_record(1, "a.jpg")], [annotation(1, 1, compressed_rle(mask), [0, 0, 32, 32])])
    config = config_for(path, str(image_dir), "data.scale_jitter=0", "data.shift_jitter=0", "data.flip_probability=0")
    batch, _ = sampler_for(config).sample_batch(np.random.default_rng(0), "mask", 1)
    image = batch["images"][0]
    assert np.all(image[:32] == GREY) and np.all(image[:, :32] == GREY)
    inside = image[32:, 32:]
    assert np.all(np.abs(inside - GREY).max(-1) > 0.2)  # red background and blue object, never grey
    assert inside[5, 5, 2] > 0.8 and inside[50, 50, 0] > 0.6  # blue object, red background
    # The 48 px label covers image rows -16..48: its first 12 rows are above the image.
    assert np.all(batch["masks"][0][:12] == -1) and np.any(batch["masks"][0][12] == 1)


def test_same_seed_same_batch_and_other_seed_other_batch(tmp_path):
    path, image_dir = crowded_dataset(str(tmp_path))
    sampler = sampler_for(config_for(path, image_dir))
    for kind in ("mask", "score"):
        a, _ = sampler.sample_batch(np.random.default_rng(7), kind, 6)
        b, _ = sampler.sample_batch(np.random.default_rng(7), kind, 6)
        c, _ = sampler.sample_batch(np.random.default_rng(8), kind, 6)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a["images"], c["images"])


def test_score_batch_weights_and_labels(tmp_path):
    path, image_dir = crowded_dataset(str(tmp_path))
    sampler = sampler_for(config_for(path, image_dir))
    score, _ = sampler.sample_batch(np.random.default_rng(0), "score", 16)
    mask, _ = sampler.sample_batch(np.random.default_rng(0), "mask", 16)
    assert np.all(score["score_weight"] == 1) and np.all(score["mask_weight"] == 0) and np.all(score["masks"] == -1)
    assert set(score["scores"][:, 0]) == {-1.0, 1.0}
    assert np.all(mask["score_weight"] == 0) and np.all(mask["mask_weight"] == 1) and np.all(mask["scores"] == 1)
    assert np.all((mask["masks"] > 0).mean(axis=(1, 2)) > 0)
    for batch in (score, mask):
        assert batch["images"].dtype == np.float32 and 0 <= batch["images"].min() <= batch["images"].max() <= 1


def test_no_sampleable_object_is_an_error_not_a_hang(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    write_image(str(image_dir / "a.jpg"))
    mask = disc_mask(50, 50, 20)
    path = str(tmp_path / "instances.json")
    write_json(path, [image_record(1, "a.jpg")], [annotation(1, 1, compressed_rle(mask), [30, 30, 40, 40], iscrowd=1)])
    with pytest.raises(ValueError, match="No object to sample"):
        sampler_for(config_for(path, str(image_dir)))


def test_undecodable_image_is_skipped_or_raised(tmp_path):
    path, image_dir = truncated_image_dataset(str(tmp_path))
    sampler = sampler_for(config_for(path, str(image_dir)))
    _, windows = sampler.sample_batch(np.random.default_rng(0), "mask", 20)
    assert {w.image_id for w in windows} == {1} and sampler.skipped["undecodable image"] > 0
    strict = sampler_for(config_for(path, str(image_dir), "data.on_bad_annotation=error"))
    with pytest.raises(ValueError, match="Cannot decode image"):
        strict.sample_batch(np.random.default_rng(0), "mask", 20)
